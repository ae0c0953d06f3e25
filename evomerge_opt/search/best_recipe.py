"""The best recipe so far: ``recipes/best_<study>.yaml``, written atomically whenever the best improves.

The file is a recipe ``evo-merge apply`` takes unchanged, plus ``provenance`` (study, trial, fitness
per dataset, baseline, sampler, storage with the password hidden, date, evo-merge version).
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge_opt._version import __version__
from evomerge_opt.config.space import SearchSpace
from evomerge_opt.config.yamlio import save_yaml
from evomerge_opt.search.storage import redact_url

logger = logging.getLogger(__name__)


class BestRecipeWriter:
    """Optuna callback: writes ``recipes/best_<study>.yaml`` whenever the study's best trial improves."""

    def __init__(self, study_name: str, recipes_dir: str | os.PathLike[str], space: SearchSpace,
                 storage_url: str | None = None, sampler_name: str | None = None) -> None:
        self.study_name = study_name
        self.path = Path(recipes_dir) / f"best_{study_name}.yaml"
        self.space = space
        self.storage_url = storage_url
        self.sampler_name = sampler_name
        self.written: tuple[int, float] | None = None

    @staticmethod
    def best_trial(study: optuna.Study, trials: list[FrozenTrial] | None = None) -> FrozenTrial | None:
        """Lowest aggregate perplexity among COMPLETE trials (for several objectives too)."""
        best, best_value = None, math.inf
        if trials is None:
            trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        for t in trials:
            if t.state != TrialState.COMPLETE:
                continue
            value = t.user_attrs.get("perplexity", t.values[0] if t.values else math.inf)
            if value is not None and math.isfinite(value) and value < best_value:
                best, best_value = t, value
        return best

    def __call__(self, study: optuna.Study, trial: FrozenTrial | None = None,
                 trials: list[FrozenTrial] | None = None) -> Path | None:
        best = self.best_trial(study, trials)
        if best is None:
            return None
        value = float(best.user_attrs.get("perplexity", best.values[0]))
        if self.written is not None and (self.written[0] == best.number or value >= self.written[1]) \
                and self.path.exists():
            return None
        recipe = dict(best.user_attrs["recipe"])
        recipe["provenance"] = {
            "study": self.study_name,
            "trial": best.number,
            "fitness": {"perplexity": value, "per_dataset": dict(best.user_attrs.get("per_dataset", {}))},
            "baseline": best.user_attrs.get("baseline"),
            "sampler": self.sampler_name,
            "storage": redact_url(self.storage_url) if self.storage_url else None,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "evomerge_version": __version__,
        }
        header = (f"Best recipe of study {self.study_name!r}: trial {best.number}, perplexity {value:.6g}.\n"
                  f"Build it with: evo-merge apply {self.path.as_posix()} --out DIR")
        save_yaml(recipe, self.path, header=header)
        self.written = (best.number, value)
        logger.info("best recipe so far (trial %d, perplexity %.6g) written to %s", best.number, value, self.path)
        return self.path
