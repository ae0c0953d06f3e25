"""The study runner: ``SearchRunner(...).setup()`` then ``.run()`` (torchtune's recipe shape).

``setup()``
  validates the space and its sources, opens the storage (:mod:`evomerge_opt.search.storage`: SQLite
  ``studies/<study>.db`` by default, any SQLAlchemy URL, heartbeats + retry of dead workers' trials),
  creates the study or loads it (same name -> resume), records the study attributes (``space``,
  ``kind``, ``objectives``, ``evomerge_version``, ``sampler``), enqueues the baselines once, sets the
  trial budget, fails stale trials left by a crash, loads the models once and tokenises the data once.

``run()``
  ``study.optimize`` with callbacks: the best-recipe writer (``recipes/best_<study>.yaml``, atomic,
  with provenance) and a tqdm bar showing the best value so far.

The budget (:mod:`evomerge_opt.search.budget`), the best-recipe writer
(:mod:`evomerge_opt.search.best_recipe`), the progress callbacks (:mod:`evomerge_opt.search.progress`),
candidate building (:mod:`evomerge_opt.search.candidates`) and the trial objective
(:mod:`evomerge_opt.search.objective`) live in their own modules; this one wires them together.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from evomerge_opt._version import __version__
from evomerge_opt.config.space import PRETRAINED, SearchSpace, load_space
from evomerge_opt.errors import ConfigError
from evomerge_opt.search import _optuna_compat as compat
from evomerge_opt.search import storage as storage_mod
from evomerge_opt.search.baselines import enqueue_baselines
from evomerge_opt.search.best_recipe import BestRecipeWriter
from evomerge_opt.search.budget import (
    BudgetedStudy,
    BudgetExhausted,
    budget_counts,
    budget_total,
    set_budget_total,
)
from evomerge_opt.search.codec import SearchCodec
from evomerge_opt.search.progress import Progress, WorkerCap
from evomerge_opt.search.samplers import build_pruner, build_sampler

logger = logging.getLogger(__name__)

# Parts of the space that define the genome and the fitness: a resumed study must keep them.
_FIXED_PARTS = ("kind", "pool", "ps", "dfs", "fitness")


def _num_layers(space: SearchSpace) -> int:
    from transformers import AutoConfig

    from evomerge_opt.io.sources import resolve_model_ref

    ref = space.pool.models.get(PRETRAINED) or next(iter(space.pool.models.values()))
    config = AutoConfig.from_pretrained(resolve_model_ref(ref))
    return int(config.num_hidden_layers)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"



class SearchRunner:
    """One search process (``evo-merge search``) or an extra worker (``evo-merge worker``).

    ``space``: a path, mapping or :class:`SearchSpace` (None for a worker: read from the study).
    ``trials``: the study's total budget (None: the space's ``budget.trials``; a worker never changes it).
    ``worker_trials``: at most this many trials in this process.
    """

    def __init__(
        self,
        space: Any = None,
        *,
        study_name: str | None = None,
        storage: str | optuna.storages.BaseStorage | None = None,
        trials: int | None = None,
        sampler: str | None = None,
        seed: int | None = None,
        device: str | None = None,
        recipes_dir: str | os.PathLike[str] = "recipes",
        worker: bool = False,
        worker_trials: int | None = None,
        seed_offset: int = 0,
        progress: bool = True,
        check_sources: bool = True,
    ) -> None:
        self.space_path = space if isinstance(space, (str, os.PathLike)) else None
        self.space: SearchSpace | None = load_space(space) if space is not None else None
        if self.space is None and not worker:
            raise ConfigError("A search needs a search space (--space FILE).")
        self.study_name = study_name
        self.storage_arg = storage
        self.trials = trials
        self.sampler_name = sampler
        self.seed = seed
        self.device = device
        self.recipes_dir = Path(recipes_dir)
        self.worker = worker
        self.worker_trials = worker_trials
        self.seed_offset = seed_offset
        self.progress = progress
        self.check_sources = check_sources
        self.study: BudgetedStudy | None = None
        self.objective: Any = None
        self.writer: BestRecipeWriter | None = None

    # ---- setup -------------------------------------------------------------------------------------

    def _storage(self, name: str) -> optuna.storages.BaseStorage:
        if isinstance(self.storage_arg, optuna.storages.BaseStorage):
            return self.storage_arg
        if self.storage_arg is None:
            self.storage_arg = storage_mod.default_storage_url(name)
        return storage_mod.make_storage(self.storage_arg, study_name=name)

    @property
    def storage_url(self) -> str | None:
        if isinstance(self.storage_arg, str):
            return self.storage_arg
        storage = compat.study_storage(self.study) if self.study is not None else None
        return getattr(storage, "url", None)

    def _apply_overrides(self, space: SearchSpace) -> SearchSpace:
        updates: dict[str, Any] = {}
        if self.sampler_name is not None:
            updates["name"] = self.sampler_name
        if self.seed is not None:
            updates["seed"] = self.seed
        data = space.to_dict()
        data["sampler"].update(updates)
        if self.sampler_name is None and space.fitness.multi_objective and space.sampler.name in ("cmaes", "pycma"):
            data["sampler"]["name"] = "nsgaii"
        return load_space(data)

    def setup(self) -> BudgetedStudy:
        compat.require()  # before any trial: a moved Optuna internal is an error here, not mid-study
        if self.worker:
            return self._setup_worker()
        space = self._apply_overrides(self.space)  # type: ignore[arg-type]
        if self.study_name is None:
            from evomerge_opt.config.space import default_study_name

            self.study_name = default_study_name(space, self.space_path)
        storage_mod.check_study_name(self.study_name)
        if self.check_sources:
            space.check_sources()
        storage = self._storage(self.study_name)
        directions = ["minimize"] * len(space.objective_names())
        created = False
        try:
            optuna.create_study(study_name=self.study_name, storage=storage, directions=directions)
            created = True
        except optuna.exceptions.DuplicatedStudyError:
            pass
        probe = optuna.load_study(study_name=self.study_name, storage=storage)
        if not created:
            space = self._check_resume(probe, space)
        self.space = space
        codec = SearchCodec(space, _num_layers(space))
        if created or "space" not in probe.user_attrs:
            probe.set_user_attr("space", space.to_dict())
            probe.set_user_attr("kind", space.kind)
            probe.set_user_attr("objectives", space.objective_names())
            probe.set_user_attr("evomerge_version", __version__)
            probe.set_user_attr("sampler", space.sampler.model_dump(mode="json"))
            probe.set_user_attr("genome_names", codec.names)
        elif probe.user_attrs.get("space") != space.to_dict():
            # Same genome and fitness (checked above); sampler, pruner or budget changed: workers that
            # join later read the space from here.
            probe.set_user_attr("space", space.to_dict())
            probe.set_user_attr("sampler", space.sampler.model_dump(mode="json"))
        if space.baselines:
            enqueue_baselines(probe, space, codec)
        if not created:
            storage_mod.fail_stale_trials(probe, wait=True)
        self._set_budget(probe, self.trials if self.trials is not None else space.budget.trials)
        return self._finish_setup(space, codec, storage, seed_offset=self.seed_offset)

    def _check_resume(self, study: optuna.Study, space: SearchSpace) -> SearchSpace:
        stored = study.user_attrs.get("space")
        if stored is None:
            return space
        mine = space.to_dict()
        changed = [part for part in _FIXED_PARTS if stored.get(part) != mine.get(part)]
        if changed:
            raise ConfigError(
                f"Study {self.study_name!r} already exists with a different search space ({', '.join(changed)} "
                "differ); its trials would not decode. Use another --study name, or the space it was created with."
            )
        if len(study.directions) != len(space.objective_names()):
            raise ConfigError(f"Study {self.study_name!r} has {len(study.directions)} objective(s), but the space "
                              f"has {len(space.objective_names())}; use another --study name.")
        n_done = len(study.get_trials(deepcopy=False))
        logger.info("resuming study %r (%d trials so far)", self.study_name, n_done)
        return space

    def _set_budget(self, study: optuna.Study, total: int) -> None:
        counts = budget_counts(study.get_trials(deepcopy=False))
        set_budget_total(study, total)
        logger.info("budget: %d trials in total, %d started, %d to go", total, counts["started"],
                    max(0, total - counts["started"]))

    def _setup_worker(self) -> BudgetedStudy:
        if self.study_name is None or self.storage_arg is None:
            raise ConfigError("A worker needs --study NAME and --storage URL of a running search.")
        if isinstance(self.storage_arg, str):
            storage = storage_mod.make_storage(self.storage_arg, study_name=self.study_name)
        else:
            storage = self.storage_arg
        probe = storage_mod.load_study(self.study_name, storage=storage)
        data = probe.user_attrs.get("space")
        if data is None:
            raise ConfigError(f"Study {self.study_name!r} has no `space` attribute: it was not made by `evo-merge search`.")
        space = load_space(data)
        if self.check_sources:
            space.check_sources()
        self.space = space
        codec = SearchCodec(space, _num_layers(space))
        offset = self.seed_offset or (os.getpid() % 10007) + 1
        return self._finish_setup(space, codec, storage, seed_offset=offset)

    def _finish_setup(self, space: SearchSpace, codec: SearchCodec, storage: Any, seed_offset: int) -> BudgetedStudy:
        from evomerge_opt.data.spec import DataSpec
        from evomerge_opt.data.windows import load_windows
        from evomerge_opt.fitness.perplexity import PerplexityEvaluator
        from evomerge_opt.pool import load_tokenizer
        from evomerge_opt.search.candidates import CandidateBuilder
        from evomerge_opt.search.objective import SearchObjective

        sampler = build_sampler(space.sampler, codec.names, seed_offset=seed_offset, pruner_name=space.pruner.name)
        pruner = build_pruner(space.pruner)
        self.study = BudgetedStudy(study_name=self.study_name, storage=storage, sampler=sampler, pruner=pruner)
        self.codec = codec
        device = self.device or space.device or _default_device()
        t0 = time.perf_counter()
        tokenizer = load_tokenizer(space.pool.tokenizer_ref)
        datasets = []
        for i, data in enumerate(space.fitness.datasets):
            spec = DataSpec.parse(data)
            datasets.append((spec.name or f"data{i}", load_windows(spec, tokenizer), spec.weight))
        evaluator = PerplexityEvaluator(datasets, batch_size=space.fitness.batch_size, device=device)
        builder = CandidateBuilder(space, codec, device=device)
        self.objective = SearchObjective(space, codec, builder, evaluator, pruner_name=space.pruner.name)
        self.setup_seconds = time.perf_counter() - t0
        self.writer = BestRecipeWriter(self.study_name, self.recipes_dir, space, self.storage_url, space.sampler.name)
        logger.info("worker ready in %.1fs on %s: %d coordinates, %d evaluation tokens per trial",
                    self.setup_seconds, device, len(codec), evaluator.num_tokens)
        return self.study

    # ---- run -----------------------------------------------------------------------------------------

    def run(self) -> BudgetedStudy:
        """Run trials until the study's budget is used up (waiting for trials other workers still run)."""
        if self.study is None:
            self.setup()
        study = self.study
        assert study is not None and self.writer is not None
        total = budget_total(study) or 0
        counts = budget_counts(study.get_trials(deepcopy=False))
        progress = Progress(total, min(counts["finished"], total), self.progress, self.writer)
        cap = WorkerCap(self.worker_trials)
        callbacks = [progress, cap]
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.writer(study)  # a resumed study: make sure the best so far is on disk
        try:
            while True:
                try:
                    study.optimize(self.objective, callbacks=callbacks, gc_after_trial=False)
                except BudgetExhausted as exc:
                    logger.debug("worker stops: %s", exc)
                if cap.limit is not None and cap.done >= cap.limit:
                    break
                if not self._wait_for_running(study):
                    break
        finally:
            progress.close()
        return study

    def _wait_for_running(self, study: BudgetedStudy) -> bool:
        """After this worker found nothing to start: True when there is again (a retry of a dead
        worker's trial, or budget left); waits while other workers' trials run (heartbeats on)."""
        storage = compat.study_storage(study)
        get_interval = getattr(storage, "get_heartbeat_interval", None)  # the public BaseHeartbeat method
        interval = get_interval() if get_interval is not None else None
        while True:
            trials = study.get_trials(deepcopy=False)
            counts = budget_counts(trials)
            total = budget_total(study) or 0
            if counts["started"] < total:
                return True
            if interval is None or not any(t.state == TrialState.RUNNING for t in trials):
                return False
            # A RUNNING trial of a dead worker becomes a retry once its heartbeat is stale.
            storage_mod.fail_stale_trials(study)
            time.sleep(min(float(interval), 2.0))


def summary(study: optuna.Study) -> dict[str, Any]:
    """Counts by state and the best trial (for the CLI's closing line)."""
    trials = study.get_trials(deepcopy=False)
    states = {state.name: sum(t.state == state for t in trials) for state in TrialState}
    best = BestRecipeWriter.best_trial(study)
    return {
        "states": {k: v for k, v in states.items() if v},
        "best_trial": None if best is None else best.number,
        "best_perplexity": None if best is None else best.user_attrs.get("perplexity", best.values[0]),
        "best_baseline": None if best is None else best.user_attrs.get("baseline"),
    }
