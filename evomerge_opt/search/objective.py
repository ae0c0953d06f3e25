"""One trial of a search: genome -> recipe -> candidate built in memory -> perplexity (with pruning).

The candidate is built by :class:`~evomerge_opt.search.candidates.CandidateBuilder` (models loaded
once per worker); this module owns the trial: suggest the genome, decode it, build, evaluate, prune,
and record the results on the trial through Optuna's public API.

The evaluator reports a running value after every batch and the study's pruner decides at once
(-> :class:`optuna.TrialPruned`). The value at step ``k`` is the running perplexity, or with the
Wilcoxon pruner batch ``k``'s own mean loss (that pruner pairs instances between trials). Unlike
``trial.report``/``trial.should_prune`` (a write and a read of every trial of the study per batch), the
pruner sees a snapshot of the study taken at the first pruning check, and the intermediate values are
reported with the trial's other attributes when it ends (before Optuna records a pruned trial's last
value), so the per-batch cost is the pruner's arithmetic only.

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
from optuna.trial import FrozenTrial, TrialState

from evomerge_opt.config.space import SearchSpace
from evomerge_opt.errors import EvoMergeError
from evomerge_opt.search.baselines import SOURCE_PREFIX
from evomerge_opt.search.candidates import CandidateBuilder, CandidateFailed
from evomerge_opt.search.codec import SearchCodec

logger = logging.getLogger(__name__)
WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"

_SHAPE_WORDS = ("shape", "size mismatch", "must match the size", "dimension")


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


def write_trial_data(trial: optuna.Trial, user_attrs: dict[str, Any],
                     intermediate: dict[int, float] | None = None) -> None:
    """Set the trial's user attributes and intermediate values (Optuna's public per-call API: one
    storage write each; ``benchmarks/optuna_overhead.py`` measures what that costs per trial)."""
    for key, value in user_attrs.items():
        trial.set_user_attr(key, value)
    for step, value in sorted((intermediate or {}).items()):
        trial.report(value, step)


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
        genome = {name: trial.suggest_float(name, 0.0, 1.0) for name in self.codec.names}
        enqueued = trial.user_attrs  # the attributes the trial was enqueued with (a baseline's recipe)
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
        self._frozen: FrozenTrial | None = None

    @property
    def snapshot(self) -> _StudySnapshot:
        if self._snapshot is None:
            self._snapshot = _StudySnapshot(self.trial.study)
        return self._snapshot

    def frozen(self) -> FrozenTrial:
        """This trial as the pruner must see it: the snapshot's copy (params, state RUNNING) with the
        intermediate values reported so far (kept in memory until the trial ends)."""
        if self._frozen is None:
            number = self.trial.number
            self._frozen = next(t for t in self.snapshot.trials if t.number == number)
        frozen = copy.copy(self._frozen)
        frozen.intermediate_values = dict(self.intermediate)
        return frozen


