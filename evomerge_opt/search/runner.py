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

**Budget.** ``--trials N`` is the study's total, counted over every trial it holds (COMPLETE, PRUNED,
FAIL, RUNNING and WAITING; the baselines included), so a restarted search finishes exactly ``N``. A
trial failed by the heartbeat (its worker died) and re-enqueued as a retry counts once. ``N`` is the
study system attribute ``evomerge:budget_total``. A worker never lets Optuna create a trial: it claims
a WAITING one (Optuna's atomic WAITING -> RUNNING transition), enqueuing one parameter-less "token"
trial first when none is waiting and the budget allows, and then checks its *rank* (the counted trials
numbered below it). Two workers racing for the last slot both see a rank; the one ranked beyond ``N``
puts its token back as WAITING (marked ``evomerge:surplus``, never counted or claimed) and stops. So
several workers (processes or machines) finish exactly ``N`` trials between them. Tokens are created
one at a time because every WAITING trial is re-read from the database on each Optuna trial query.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from evomerge_opt._version import __version__
from evomerge_opt.config.space import PRETRAINED, SearchSpace, load_space
from evomerge_opt.config.yamlio import save_yaml
from evomerge_opt.errors import ConfigError
from evomerge_opt.search import storage as storage_mod
from evomerge_opt.search.baselines import enqueue_baselines
from evomerge_opt.search.codec import SearchCodec
from evomerge_opt.search.samplers import build_pruner, build_sampler

logger = logging.getLogger(__name__)

BUDGET_ATTR = "evomerge:budget_total"
TOKEN_ATTR = "evomerge:budget"
SURPLUS_ATTR = "evomerge:surplus"
# Parts of the space that define the genome and the fitness: a resumed study must keep them.
_FIXED_PARTS = ("kind", "pool", "ps", "dfs", "fitness")


class BudgetExhausted(Exception):
    """No trial of the budget is left for this worker to start."""


def _superseded(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of FAILED trials that were re-enqueued as retries (the retry counts instead)."""
    retried: set[int] = set()
    for t in trials:
        retried.update(t.system_attrs.get("retry_history", []) or [])
    return {t.number for t in trials if t.state == TrialState.FAIL and t.number in retried}


def _counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that use the budget: all but superseded failures and surplus tokens."""
    skip = _superseded(trials)
    return [t for t in trials if t.number not in skip and not t.system_attrs.get(SURPLUS_ATTR)]


def budget_counts(trials: list[FrozenTrial]) -> dict[str, int]:
    """``started`` (finished or running, retries counted once), ``waiting``, ``finished``."""
    started = finished = waiting = 0
    for t in _counted(trials):
        if t.state == TrialState.WAITING:
            waiting += 1
        else:
            started += 1
            finished += t.state.is_finished()
    return {"started": started, "waiting": waiting, "finished": finished}


class BudgetedStudy(optuna.Study):
    """An Optuna study whose workers only start trials the budget allows (see the module docstring).

    ``Study.ask`` creates a brand-new trial when no WAITING one is left; here the worker claims a
    waiting trial (or a token it enqueues) instead, or stops with :class:`BudgetExhausted`.
    """

    def _pop_waiting_trial_id(self) -> int | None:
        storage, study_id = self._storage, self._study_id
        total = storage.get_study_system_attrs(study_id).get(BUDGET_ATTR)
        if total is None:  # not a study made by SearchRunner: plain Optuna behaviour
            return super()._pop_waiting_trial_id()
        total = int(total)
        for _ in range(1000):
            trials = storage.get_all_trials(study_id, deepcopy=False)
            counts = budget_counts(trials)
            if counts["started"] >= total:
                raise BudgetExhausted(f"the study's {total} trials are all started")
            waiting = [t for t in trials if t.state == TrialState.WAITING and not t.system_attrs.get(SURPLUS_ATTR)]
            if not waiting:
                # A parameter-less token (the sampler fills it when the trial starts), claimed at once.
                token = optuna.create_trial(state=TrialState.WAITING, system_attrs={TOKEN_ATTR: True})
                trial_id = storage.create_new_trial(study_id, template_trial=token)
                if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    self._check_rank(trial_id, storage.get_trial_number_from_id(trial_id), True, total)
                    return trial_id
                continue
            for candidate in waiting:
                try:
                    if not storage.set_trial_state_values(candidate._trial_id, state=TrialState.RUNNING):
                        continue
                except optuna.exceptions.UpdateFinishedTrialError:
                    continue
                self._check_rank(candidate._trial_id, candidate.number,
                                 bool(candidate.system_attrs.get(TOKEN_ATTR)), total)
                return candidate._trial_id
        raise BudgetExhausted("could not claim a waiting trial (other workers took them all)")

    def _check_rank(self, trial_id: int, number: int, is_token: bool, total: int) -> None:
        """Give the claimed trial back (and stop) when ``total`` counted trials are numbered below it."""
        storage = self._storage
        trials = storage.get_all_trials(self._study_id, deepcopy=False)
        rank = sum(1 for t in _counted(trials) if t.number < number)
        if rank < total:
            return
        if is_token:
            storage.set_trial_system_attr(trial_id, SURPLUS_ATTR, True)
        storage.set_trial_state_values(trial_id, state=TrialState.WAITING)
        raise BudgetExhausted(f"trial {number} is beyond the budget of {total} (another worker was first)")


def _num_layers(space: SearchSpace) -> int:
    from transformers import AutoConfig

    from evomerge_opt.io.sources import resolve_model_ref

    ref = space.pool.models.get(PRETRAINED) or next(iter(space.pool.models.values()))
    config = AutoConfig.from_pretrained(resolve_model_ref(ref))
    return int(config.num_hidden_layers)


def _default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
            "storage": storage_mod.redact_url(self.storage_url) if self.storage_url else None,
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "evomerge_version": __version__,
        }
        header = (f"Best recipe of study {self.study_name!r}: trial {best.number}, perplexity {value:.6g}.\n"
                  f"Build it with: evo-merge apply {self.path.as_posix()} --out DIR")
        save_yaml(recipe, self.path, header=header)
        self.written = (best.number, value)
        logger.info("best recipe so far (trial %d, perplexity %.6g) written to %s", best.number, value, self.path)
        return self.path


class _Progress:
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


class _WorkerCap:
    """Stop this worker after ``limit`` trials (``evo-merge worker --trials N``)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.done = 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self.done += 1
        if self.limit is not None and self.done >= self.limit:
            study.stop()


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
        storage = self.study._storage if self.study is not None else None
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
        if self.worker:
            return self._setup_worker()
        space = self._apply_overrides(self.space)  # type: ignore[arg-type]
        if self.study_name is None:
            from evomerge_opt.config.space import default_study_name

            self.study_name = default_study_name(space, self.space_path)
        storage_mod._check_study_name(self.study_name)
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
        study._storage.set_study_system_attr(study._study_id, BUDGET_ATTR, int(total))
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
        from evomerge_opt.search.objective import CandidateBuilder, SearchObjective

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
        total = int(study._storage.get_study_system_attrs(study._study_id).get(BUDGET_ATTR, 0))
        counts = budget_counts(study.get_trials(deepcopy=False))
        progress = _Progress(total, min(counts["finished"], total), self.progress, self.writer)
        cap = _WorkerCap(self.worker_trials)
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
        storage = study._storage
        get_interval = getattr(storage, "get_heartbeat_interval", None)  # _CachedStorage / RDBStorage
        interval = get_interval() if get_interval is not None else None
        while True:
            trials = study.get_trials(deepcopy=False)
            counts = budget_counts(trials)
            total = int(storage.get_study_system_attrs(study._study_id).get(BUDGET_ATTR, 0))
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
