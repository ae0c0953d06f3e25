"""One trial of a search: genome -> recipe -> candidate built in memory -> perplexity (with pruning).

* PS candidates are written in place into ONE resident model by
  :class:`~evomerge_opt.merge.resident.ResidentMerger` (no disk, no re-instantiation);
* DFS candidates route through the loaded source models' layers by reference
  (:func:`~evomerge_opt.dfs.build.build_dfs_candidate`, microseconds);
* PS+DFS: the PS build first, then DFS over ``[ps_model, sources...]`` in ``dfs.sources`` order.

The evaluator reports a running value after every batch and the study's pruner decides at once
(-> :class:`optuna.TrialPruned`). The value at step ``k`` is the running perplexity, or with the
Wilcoxon pruner batch ``k``'s own mean loss (that pruner pairs instances between trials). Unlike
``trial.report``/``trial.should_prune`` (a write and a read of every trial of the study per batch), the
pruner sees a snapshot of the study taken when the evaluation starts, and the intermediate values are
written with the trial's other attributes in one transaction at its end (before Optuna records a
pruned trial's last value), so the per-batch cost is the pruner's arithmetic only.

A failing candidate — NaN/inf weights or fitness, out of memory, a shape error, a recipe the merge
rejects, an empty DFS path — becomes a FAILED trial with ``user_attrs['fail_reason']`` (the objective
returns NaN, which Optuna records as a failure and logs) and the study goes on. Any other exception is
a bug and propagates.

User attributes set on every trial (docs/ARCHITECTURE.md, "Search"): ``genome``, ``recipe``,
``per_dataset``, ``perplexity``, ``tokens``, ``build_seconds``, ``eval_seconds``, ``fail_reason``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from typing import Any

import optuna
import torch
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState

from evomerge_opt.config.space import PRETRAINED, PS_SOURCE, SearchSpace
from evomerge_opt.errors import EvoMergeError
from evomerge_opt.search.baselines import SOURCE_PREFIX
from evomerge_opt.search.codec import SearchCodec, path_length

logger = logging.getLogger(__name__)
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"

_SHAPE_WORDS = ("shape", "size mismatch", "must match the size", "dimension")


class CandidateFailed(Exception):
    """A candidate that cannot be built or scored; ``reason`` goes to ``user_attrs['fail_reason']``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    return isinstance(exc, MemoryError) or (oom is not None and isinstance(exc, oom)) or "out of memory" in str(exc)


def failure_reason(exc: BaseException) -> str | None:
    """The fail reason of a candidate-level error, or None when ``exc`` is not one (a bug: re-raise)."""
    kind = type(exc).__name__
    if _is_oom(exc):
        return f"out of memory: {exc}"
    if isinstance(exc, EvoMergeError):
        return f"{kind}: {exc}"
    if isinstance(exc, RuntimeError) and any(word in str(exc) for word in _SHAPE_WORDS):
        return f"shape error: {exc}"
    return None


_UNIT = FloatDistribution(0.0, 1.0)


def suggest_genome(trial: optuna.Trial, names: list[str]) -> dict[str, float]:
    """``trial.suggest_float(name, 0, 1)`` for every coordinate, with the parameters written to an RDB
    storage in ONE transaction.

    Optuna writes each suggested parameter in its own transaction (plus a query for the parameter's
    previous distribution): ~5 ms each, i.e. a quarter of a second per trial for a 50-coordinate DFS
    genome. Here the values are taken exactly where ``Trial._suggest`` would take them (already set,
    fixed by ``enqueue_trial``, the sampler's relative sample, else ``sample_independent``), written
    in one INSERT batch, and then suggested as usual, which finds them set and only reads them back. Falls back to
    plain ``suggest_float`` on any other storage or if Optuna's internals differ.
    """
    backend = getattr(trial.storage, "_backend", trial.storage)
    frozen = getattr(trial, "_cached_frozen_trial", None)
    if isinstance(backend, optuna.storages.RDBStorage) and frozen is not None:
        try:
            from optuna.storages._rdb import models
            from optuna.storages._rdb.storage import _create_scoped_session
        except ImportError:  # Optuna's internals moved: plain suggestions below still work
            models = None
        if models is not None:
            fixed = frozen.system_attrs.get("fixed_params") or {}
            relative = trial.relative_params or {}
            pending: dict[str, float] = {}
            for name in names:
                if name in frozen.distributions:
                    continue
                if name in fixed:
                    pending[name] = float(fixed[name])
                elif name in relative:
                    pending[name] = float(relative[name])
                else:
                    pending[name] = float(trial.study.sampler.sample_independent(
                        trial.study, trial._get_latest_trial(), name, _UNIT))
            if pending:
                dist_json = optuna.distributions.distribution_to_json(_UNIT)
                with _create_scoped_session(backend.scoped_session, True) as session:
                    row = models.TrialModel.find_or_raise_by_id(trial._trial_id, session)
                    backend.check_trial_is_updatable(trial._trial_id, row.state)
                    session.add_all([
                        models.TrialParamModel(trial_id=trial._trial_id, param_name=name,
                                               param_value=_UNIT.to_internal_repr(value), distribution_json=dist_json)
                        for name, value in pending.items()
                    ])
                frozen.params.update(pending)
                frozen.distributions.update({name: _UNIT for name in pending})
    return {name: trial.suggest_float(name, 0.0, 1.0) for name in names}


def _rdb_backend(trial: optuna.Trial) -> Any:
    backend = getattr(trial.storage, "_backend", trial.storage)
    if isinstance(backend, optuna.storages.RDBStorage) and hasattr(backend, "_set_trial_attr_without_commit") \
            and hasattr(backend, "_set_trial_intermediate_value_without_commit"):
        return backend
    return None


def write_trial_data(trial: optuna.Trial, user_attrs: dict[str, Any],
                     intermediate: dict[int, float] | None = None) -> None:
    """Set several user attributes (and intermediate values) of ``trial`` in ONE transaction on an RDB
    storage (Optuna commits each one separately); the plain Trial API elsewhere."""
    backend = _rdb_backend(trial)
    if backend is None:
        for key, value in user_attrs.items():
            trial.set_user_attr(key, value)
        for step, value in (intermediate or {}).items():
            trial.report(value, step)
        return
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    with _create_scoped_session(backend.scoped_session, True) as session:
        for key, value in user_attrs.items():
            backend._set_trial_attr_without_commit(session, models.TrialUserAttributeModel, trial._trial_id, key, value)
        for step, value in (intermediate or {}).items():
            backend._set_trial_intermediate_value_without_commit(session, trial._trial_id, step, value)
    frozen = getattr(trial, "_cached_frozen_trial", None)
    if frozen is not None:
        frozen.user_attrs.update(user_attrs)
        if intermediate:
            frozen.intermediate_values.update(intermediate)


class _StudySnapshot:
    """The study as seen by a pruner during one trial: the trials read ONCE when the trial's
    evaluation starts (Optuna's ``should_prune`` re-reads every trial of the study at every step)."""

    def __init__(self, study: optuna.Study) -> None:
        self._study = study
        self._trials = study.get_trials(deepcopy=False)

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list[FrozenTrial]:
        return [t for t in self._trials if states is None or t.state in states]

    @property
    def trials(self) -> list[FrozenTrial]:
        return list(self._trials)

    @property
    def best_trial(self) -> FrozenTrial:
        complete = [t for t in self._trials if t.state == TrialState.COMPLETE and t.value is not None]
        if not complete:
            raise ValueError("No trials are completed yet.")
        return min(complete, key=lambda t: t.value)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


class CandidateBuilder:
    """Holds the worker's models (loaded once) and builds candidates from decoded recipes."""

    def __init__(self, space: SearchSpace, codec: SearchCodec, device: str | torch.device = "cpu") -> None:
        self.space = space
        self.codec = codec
        self.device = torch.device(device)
        self.dtype = space.pool.dtype
        self.merger: Any = None
        self._models: dict[str, Any] = {}
        if space.has_ps:
            from evomerge_opt.merge.resident import ResidentMerger

            refs = [space.pool.models[s] for s in space.ps_sources()]
            self.merger = ResidentMerger(space.pool.models[PRETRAINED], refs, device=self.device, dtype=self.dtype)
        if space.dfs is not None:
            for name in space.dfs.sources:
                if name != PS_SOURCE:
                    self.model(name)

    def model(self, name: str) -> Any:
        """Pool model ``name`` as a full model (loaded once; shared with the merger when it has it)."""
        if name not in self._models:
            sources = self.space.ps_sources()
            if self.merger is not None and name in sources:
                self._models[name] = self.merger.source_model(sources.index(name))
            else:
                from evomerge_opt.pool import load_causal_lm

                base = self.space.pool.models.get(PRETRAINED)
                self._models[name] = load_causal_lm(self.space.pool.models[name], dtype=self.dtype,
                                                    device=self.device, base_model=base)
        return self._models[name]

    def release(self, name: str) -> None:
        """Drop a model loaded only for a baseline (not a DFS source, not held by the merger)."""
        keep = set(self.space.dfs.sources) if self.space.dfs is not None else set()
        if name not in keep and name not in self.space.ps_sources():
            self._models.pop(name, None)

    def build(self, recipe: dict[str, Any], baseline: str | None = None) -> Any:
        if baseline is not None and baseline.startswith(SOURCE_PREFIX):
            return self.model(baseline[len(SOURCE_PREFIX):])
        if "merge_method" in recipe:  # a PS recipe (PS search or a PS baseline)
            if self.merger is None:
                raise CandidateFailed("a parameter-space recipe needs a PS search space (no resident merger)")
            return self.merger.build(recipe)
        from evomerge_opt.config.dfs_recipe import load_dfs_recipe
        from evomerge_opt.dfs.build import build_dfs_candidate

        assert self.space.dfs is not None
        if path_length(recipe) == 0:
            raise CandidateFailed("empty path: no DFS slot is above the mask threshold")
        models = []
        for name, entry in zip(self.space.dfs.sources, recipe["model_paths"]):
            models.append(self.merger.build(entry) if name == PS_SOURCE else self.model(name))
        parsed = load_dfs_recipe(recipe)
        return build_dfs_candidate(models, parsed, source_names=list(self.space.dfs.sources))


class _BatchLosses:
    """Recovers each batch's own mean loss from the evaluator's running aggregate (for Wilcoxon).

    ``running = exp(sum_seen w_i S_i / N_i / sum_seen w_i)``; after batch k only dataset d's sum
    ``S_d`` changed, and every ``N_i`` and the other ``S_i`` are known, so ``S_d`` follows exactly.
    """

    def __init__(self, evaluator: Any) -> None:
        self.evaluator = evaluator
        self.weights = list(evaluator.weights)
        self.sums = [0.0] * len(self.weights)
        self.counts = [0] * len(self.weights)
        self.batch_tokens = []
        for batch in evaluator.batches:
            mask = batch.attention_mask
            self.batch_tokens.append(int((mask[:, 1:] & mask[:, :-1]).sum()))

    def tokens_through(self, step: int) -> int:
        return sum(self.batch_tokens[: step + 1])

    def update(self, step: int, running_perplexity: float) -> float:
        batch = self.evaluator.batches[step]
        d, n = batch.dataset, self.batch_tokens[step]
        self.counts[d] += n
        seen = [i for i, c in enumerate(self.counts) if c]
        total_w = sum(self.weights[i] for i in seen)
        running_loss = math.log(running_perplexity) if running_perplexity > 0 else -math.inf
        others = sum(self.weights[i] * self.sums[i] / self.counts[i] for i in seen if i != d)
        new_sum = (running_loss * total_w - others) * self.counts[d] / self.weights[d]
        loss = (new_sum - self.sums[d]) / n if n else math.nan
        self.sums[d] = new_sum
        return loss


class SearchObjective:
    """The Optuna objective of a search (one instance per worker)."""

    def __init__(self, space: SearchSpace, codec: SearchCodec, builder: CandidateBuilder, evaluator: Any,
                 pruner_name: str = "none") -> None:
        self.space = space
        self.codec = codec
        self.builder = builder
        self.evaluator = evaluator
        self.multi = space.fitness.multi_objective
        self.report_batch_loss = pruner_name == "wilcoxon"
        self.prune = pruner_name != "none" and not self.multi
        self.dataset_names = list(evaluator.names)

    def __call__(self, trial: optuna.Trial) -> float | list[float]:
        genome = suggest_genome(trial, self.codec.names)
        # The attributes the trial was enqueued with (read when it started; `trial.user_attrs` re-reads).
        frozen = getattr(trial, "_cached_frozen_trial", None)
        enqueued = frozen.user_attrs if frozen is not None else trial.user_attrs
        baseline = enqueued.get("baseline")
        recipe = enqueued.get("recipe") if baseline else None
        # Written with the results in one transaction when the trial ends (a trial killed before that
        # keeps its params, which decode to the same recipe).
        # `worker` (host:pid) shows in the dashboard which process/machine ran the trial.
        start_attrs: dict[str, Any] = {"genome": [genome[n] for n in self.codec.names], "worker": WORKER_ID}
        if recipe is None:
            recipe = self.codec.decode(genome)
            start_attrs["recipe"] = recipe

        tracker = _BatchLosses(self.evaluator)
        state = _EvalState(trial, prune=self.prune and not baseline, attrs=start_attrs)
        build_s = eval_s = 0.0
        try:
            t0 = time.perf_counter()
            model = self.builder.build(recipe, baseline)
            build_s = time.perf_counter() - t0
            t1 = time.perf_counter()
            try:
                result = self.evaluator.evaluate(model, on_batch=self._on_batch(state, tracker))
            finally:
                eval_s = time.perf_counter() - t1
        except optuna.TrialPruned:
            # The running perplexity when stopped (samplers that rank pruned trials use it).
            self._finish(trial, state, build_s, eval_s, tracker.tokens_through(state.step),
                         {"perplexity_at_prune": state.running})
            raise
        except CandidateFailed as exc:
            return self._fail(trial, state, exc.reason, build_s, eval_s, tracker.tokens_through(state.step))
        except (EvoMergeError, RuntimeError, MemoryError) as exc:
            reason = failure_reason(exc)
            if reason is None:  # a bug, not a bad candidate: record what was tried, then stop the study
                write_trial_data(trial, {**state.attrs, "fail_reason": f"unexpected {type(exc).__name__}: {exc}"})
                raise
            if _is_oom(exc) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            return self._fail(trial, state, reason, build_s, eval_s, tracker.tokens_through(state.step))
        finally:
            if baseline and baseline.startswith(SOURCE_PREFIX):
                self.builder.release(baseline[len(SOURCE_PREFIX):])

        per_dataset = {name: score.perplexity for name, score in result.per_dataset.items()}
        values = [per_dataset.get(n, math.nan) for n in self.dataset_names] if self.multi else [result.perplexity]
        if not all(math.isfinite(v) for v in values):
            return self._fail(trial, state, f"non-finite fitness: perplexity {values}", build_s, eval_s, result.tokens,
                              {"per_dataset": per_dataset, "perplexity": result.perplexity})
        self._finish(trial, state, build_s, eval_s, result.tokens,
                     {"per_dataset": per_dataset, "perplexity": result.perplexity})
        return values if self.multi else values[0]

    def _on_batch(self, state: _EvalState, tracker: _BatchLosses) -> Callable[[int, float], None]:
        """Per batch: keep the running value, and ask the pruner (without touching the database)."""
        pruner = state.trial.study.pruner

        def on_batch(step: int, running: float) -> None:
            state.step, state.running = step, running
            batch_loss = tracker.update(step, running)
            if math.isnan(running):
                raise CandidateFailed(f"non-finite fitness: running perplexity is NaN after batch {step}")
            if not self.prune:
                return
            value = batch_loss if self.report_batch_loss else running
            state.intermediate[step] = value if math.isfinite(value) else 1e30  # overflow: hopeless
            # Baselines report (they are the pruners' reference) but are never pruned.
            if state.prune and pruner.prune(state.snapshot, state.frozen()):
                raise optuna.TrialPruned(f"pruned after batch {step}: running perplexity {running:.4g}")

        return on_batch

    def _finish(self, trial: optuna.Trial, state: _EvalState, build_s: float, eval_s: float, tokens: int,
                extra: dict[str, Any] | None = None) -> None:
        attrs = dict(state.attrs)
        attrs.update({"build_seconds": round(build_s, 6), "eval_seconds": round(eval_s, 6), "tokens": int(tokens)})
        attrs.update(extra or {})
        write_trial_data(trial, attrs, state.intermediate)

    def _fail(self, trial: optuna.Trial, state: _EvalState, reason: str, build_s: float, eval_s: float,
              tokens: int, extra: dict[str, Any] | None = None) -> float | list[float]:
        logger.warning("trial %d failed: %s", trial.number, reason)
        self._finish(trial, state, build_s, eval_s, tokens, {**(extra or {}), "fail_reason": reason})
        nan = float("nan")
        return [nan] * len(self.dataset_names) if self.multi else nan


class _EvalState:
    """What one trial's evaluation has seen so far (kept in memory; written once at the end)."""

    def __init__(self, trial: optuna.Trial, prune: bool, attrs: dict[str, Any]) -> None:
        self.trial = trial
        self.prune = prune
        self.attrs = attrs  # user attributes to write with the results
        self.step = -1
        self.running: float | None = None
        self.intermediate: dict[int, float] = {}
        self._snapshot: _StudySnapshot | None = None

    @property
    def snapshot(self) -> _StudySnapshot:
        if self._snapshot is None:
            self._snapshot = _StudySnapshot(self.trial.study)
        return self._snapshot

    def frozen(self) -> FrozenTrial:
        frozen = copy.copy(self.trial._cached_frozen_trial)
        frozen.intermediate_values = dict(self.intermediate)
        return frozen


