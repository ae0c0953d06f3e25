"""Per-trial callbacks of a worker: the progress bar (which also drives the best-recipe writer) and
the per-worker trial cap (``evo-merge worker --trials N``)."""

from __future__ import annotations

import math

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge_opt.search.best_recipe import BestRecipeWriter


class Progress:
    """tqdm bar over the study's budget with the best value so far; also drives the best-recipe writer.

    Cheap per trial: the study is read only when the finished trial beats the best this worker knows
    (then the writer re-reads the study's best, which other workers may have improved too)."""

    def __init__(self, total: int, initial: int, enabled: bool, writer: BestRecipeWriter) -> None:
        self.writer = writer
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="search", unit="trial", dynamic_ncols=True)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if trial.state == TrialState.COMPLETE:
            value = trial.user_attrs.get("perplexity", trial.values[0] if trial.values else math.inf)
            known = self.writer.written[1] if self.writer.written is not None else math.inf
            if value is not None and math.isfinite(value) and value < known:
                self.writer(study, trial)
        if self.bar is None:
            return
        if self.writer.written is not None:
            self.bar.set_postfix(best=f"{self.writer.written[1]:.4g}", trial=self.writer.written[0], refresh=False)
        if self.bar.n < (self.bar.total or 0):
            self.bar.update(1)  # redraws (once) with the new postfix
        else:
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class WorkerCap:
    """Stop this worker after ``limit`` trials (``evo-merge worker --trials N``)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.done = 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.done += 1
        if self.limit is not None and self.done >= self.limit:
            study.stop()
