"""One evaluator over many datasets, each scored by its metric, with directions and one combined value.

``FitnessEvaluator.from_specs(datasets, tokenizer, lm_eval=..., batch_size=..., multi_objective=...)``
prepares every dataset (records read and checked, tokenised; lm-eval tasks loaded) BEFORE any model is
needed; ``evaluate(model, on_batch=..., limit=...)`` then scores a model:

* the batches of all datasets are interleaved in proportion to their counts (batch ``j`` of dataset
  ``d`` at ``(j + 0.5) / n_d`` of the run, ties by dataset order), so the running value covers every
  dataset early; the order is fixed (the same for every model);
* after every batch ``on_batch(step, running)`` gets the running single-objective value (the combined
  rule of :mod:`evomerge_opt.fitness.combine` over the datasets seen so far), and ``on_report`` (if
  given) a :class:`BatchReport` with the batch's own cost; what they raise (``optuna.TrialPruned``)
  propagates;
* ``limit`` = a budget of batches (the first ``limit`` of the interleaved order, i.e. the first
  questions of each dataset): ``result.complete`` is False then (successive halving, cheap screening);
* everything runs under ``torch.inference_mode`` on the model's device (or ``device``), the model in
  eval mode (its training flag is restored).

With only perplexity datasets the value, the running values and the batch order are exactly
:class:`~evomerge_opt.fitness.perplexity.PerplexityEvaluator`'s.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from evomerge_opt.errors import ConfigError
from evomerge_opt.fitness.checks import fitness_problems, parse_fitness_dataset
from evomerge_opt.fitness.combine import combine, objective_for
from evomerge_opt.fitness.forward import model_device
from evomerge_opt.fitness.metrics import METRICS, Metric
from evomerge_opt.fitness.spec import Direction, parse_lm_eval_task

logger = logging.getLogger(__name__)

OnBatch = Callable[[int, float], None]


@dataclass
class BatchReport:
    """What ``on_report`` gets after batch ``step``: the batch's dataset and own cost (for pruners that
    compare batch by batch, e.g. Wilcoxon), the running single-objective value, tokens so far."""

    step: int
    dataset: str
    items: int
    batch_cost: float
    running: float
    tokens: int


@dataclass
class DatasetResult:
    """One dataset's result, ``value`` in its own unit (perplexity, or a fraction for accuracies).

    ``n``: questions (accuracy), rows (perplexity) or documents (lm-eval) scored; ``tokens``: token
    positions the model processed. ``extracted``: the fraction of answers that could be extracted (None
    for perplexity; 1 where nothing is extracted: exact_match, choice, log-likelihood tasks); ``cost`` the
    lower-is-better cost the combined rule averages; ``warning`` e.g. an extraction rate of 0.
    """

    metric: str
    value: float
    n: int
    extracted: float | None
    tokens: int
    cost: float
    direction: Direction
    kind: str
    warning: str | None = None

    def to_attrs(self) -> dict[str, Any]:
        """``trial.user_attrs["per_dataset"][name]``: ``{metric, value, n, extracted}`` (+ ``warning``)."""
        out: dict[str, Any] = {"metric": self.metric, "value": self.value, "n": self.n, "extracted": self.extracted}
        if self.warning:
            out["warning"] = self.warning
        return out


@dataclass
class EvaluationResult:
    """``value``: the single objective (``objective_names[0]`` when not multi-objective); ``values``: what
    the study's objective returns, in ``objective_names`` order (one per dataset when multi-objective)."""

    value: float
    values: list[float]
    objective_names: list[str]
    directions: list[Direction]
    per_dataset: dict[str, DatasetResult]
    tokens: int
    seconds: float
    complete: bool
    batches: int
    warnings: list[str] = field(default_factory=list)
    item_scores: dict[str, list[float]] = field(default_factory=dict)

    @property
    def per_dataset_attrs(self) -> dict[str, dict[str, Any]]:
        return {name: r.to_attrs() for name, r in self.per_dataset.items()}

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["per_dataset"] = {name: asdict(r) for name, r in self.per_dataset.items()}
        return out


@dataclass
class PlannedBatch:
    step: int
    dataset: int  # index into evaluator.datasets
    batch: int  # index into that dataset's batches
    items: int


class FitnessEvaluator:
    """Scores models on prepared datasets (:class:`~evomerge_opt.fitness.metrics.Metric` instances)."""

    def __init__(self, datasets: Sequence[Metric], multi_objective: bool = False,
                 device: str | torch.device | None = None) -> None:
        if not datasets:
            raise ConfigError("The fitness evaluator needs at least one dataset or lm-eval task, but got none.")
        names = [d.dataset_name for d in datasets]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"Dataset names must be unique, but {duplicates} appear more than once; set `name:`.")
        for d in datasets:
            if not d.weight > 0:
                raise ConfigError(f"`weight > 0` must hold, but got weight={d.weight} for dataset {d.dataset_name!r}.")
            if not d.batches:
                raise ConfigError(f"Dataset {d.dataset_name!r} has nothing to score.")
        self.datasets = list(datasets)
        self.names = names
        self.weights = [d.weight for d in datasets]
        self.kinds = [d.kind for d in datasets]
        self.multi_objective = multi_objective
        self.device = torch.device(device) if device is not None else None
        self.plan = self._interleave()

    @classmethod
    def from_specs(
        cls,
        datasets: Sequence[Any],
        tokenizer: Any,
        *,
        lm_eval: Sequence[Any] = (),
        batch_size: int = 8,
        multi_objective: bool = False,
        device: str | torch.device | None = None,
        cache_dir: str | None = None,
    ) -> FitnessEvaluator:
        """Prepare ``datasets`` (FitnessDatasetSpec / mappings / paths) and ``lm_eval`` tasks; no model."""
        if batch_size < 1:
            raise ConfigError(f"`batch_size >= 1` must hold, but got batch_size={batch_size}.")
        problems = fitness_problems(datasets, lm_eval, multi_objective)
        if problems:
            raise ConfigError("invalid fitness datasets:", problems)
        prepared: list[Metric] = []
        for entry in datasets:
            spec = parse_fitness_dataset(entry)
            prepared.append(METRICS.get(spec.metric)(spec, tokenizer, batch_size, cache_dir))
        for entry in lm_eval:
            from evomerge_opt.fitness.lmeval import LMEvalTask

            prepared.append(LMEvalTask(parse_lm_eval_task(entry), tokenizer, batch_size, cache_dir))
        return cls(prepared, multi_objective=multi_objective, device=device)

    @classmethod
    def from_section(cls, section: Any, tokenizer: Any, device: str | torch.device | None = None,
                     cache_dir: str | None = None) -> FitnessEvaluator:
        """From a search space's ``fitness:`` section (a mapping or an object with ``datasets``,
        ``lm_eval``, ``batch_size``, ``multi_objective``)."""
        get = section.get if isinstance(section, dict) else (lambda k, d=None: getattr(section, k, d))
        return cls.from_specs(get("datasets") or [], tokenizer, lm_eval=get("lm_eval") or [],
                              batch_size=get("batch_size", 8) or 8, multi_objective=bool(get("multi_objective", False)),
                              device=device, cache_dir=cache_dir)

    # ---- what the study needs ----------------------------------------------------------------

    @property
    def objective_names(self) -> list[str]:
        if self.multi_objective:
            return list(self.names)
        return [objective_for(self.kinds)[0]]

    @property
    def directions(self) -> list[Direction]:
        """Optuna directions in ``objective_names`` order."""
        if self.multi_objective:
            return [d.direction for d in self.datasets]
        return [objective_for(self.kinds)[1]]

    @property
    def direction(self) -> Direction:
        """The single objective's direction (also the direction of ``on_batch``'s running value)."""
        return objective_for(self.kinds)[1]

    @property
    def num_batches(self) -> int:
        return len(self.plan)

    def items_through(self, step: int) -> dict[str, int]:
        """Items (questions / rows / documents) of each dataset scored after batch ``step``."""
        out = dict.fromkeys(self.names, 0)
        for planned in self.plan[: step + 1]:
            out[self.names[planned.dataset]] += planned.items
        return out

    def _interleave(self) -> list[PlannedBatch]:
        keyed = [((j + 0.5) / len(d.batches), i, j)
                 for i, d in enumerate(self.datasets) for j in range(len(d.batches))]
        keyed.sort(key=lambda item: (item[0], item[1]))
        return [PlannedBatch(step, i, j, self.datasets[i].items_in(self.datasets[i].batches[j]))
                for step, (_, i, j) in enumerate(keyed)]

    # ---- scoring ---------------------------------------------------------------------------------

    def _running(self, totals: list[float], counts: list[int], finite: list[bool]) -> float:
        seen = [i for i, c in enumerate(counts) if c]
        if not seen:
            return math.nan
        if not all(finite[i] for i in seen):
            return math.nan
        values = [self.datasets[i].value(totals[i], counts[i]) for i in seen]
        costs = [self.datasets[i].cost(totals[i], counts[i]) for i in seen]
        return combine([self.kinds[i] for i in seen], values, costs, [self.weights[i] for i in seen])

    def evaluate(
        self,
        model: torch.nn.Module,
        on_batch: OnBatch | None = None,
        limit: int | None = None,
        on_report: Callable[[BatchReport], None] | None = None,
        max_batches: int | None = None,
        record_items: bool = False,
    ) -> EvaluationResult:
        """Score ``model`` (see the module docstring). ``max_batches`` is an alias of ``limit``.
        ``record_items``: also return each question's score (``result.item_scores[name]``, in the
        dataset's order) for accuracy datasets and mean-aggregated lm-eval tasks."""
        if limit is None:
            limit = max_batches
        if limit is not None and limit < 1:
            raise ConfigError(f"`limit >= 1` (batches) must hold, but got limit={limit}.")
        device = self.device or model_device(model)
        n = len(self.datasets)
        totals, counts, extracted, tokens, items = [0.0] * n, [0] * n, [0] * n, [0] * n, [0] * n
        finite = [True] * n
        states: dict[int, Any] = {}
        item_scores: dict[str, list[float]] = {}
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        steps = 0
        try:
            with torch.inference_mode():
                for planned in self.plan:
                    if limit is not None and planned.step >= limit:
                        break
                    d = planned.dataset
                    metric = self.datasets[d]
                    if d not in states:
                        states[d] = metric.begin(model, device)
                    stats = metric.run_batch(model, metric.batches[planned.batch], device, states[d])
                    totals[d] += stats.total
                    counts[d] += stats.count
                    extracted[d] += stats.extracted
                    tokens[d] += stats.tokens
                    items[d] += planned.items
                    if record_items and stats.item_scores is not None:
                        item_scores.setdefault(metric.dataset_name, []).extend(stats.item_scores)
                    finite[d] = finite[d] and stats.finite
                    steps = planned.step + 1
                    if on_batch is not None or on_report is not None:
                        running = self._running(totals, counts, finite)
                        if on_report is not None:
                            batch_cost = metric.cost(stats.total, stats.count) if stats.finite else math.nan
                            on_report(BatchReport(planned.step, metric.dataset_name, planned.items, batch_cost,
                                                  running, sum(tokens)))
                        if on_batch is not None:
                            on_batch(planned.step, running)
        finally:
            for d, state in states.items():
                self.datasets[d].end(state)
            if was_training:
                model.train()
        seconds = time.perf_counter() - start
        result = self._result(totals, counts, extracted, tokens, items, finite, steps, seconds)
        result.item_scores = item_scores
        return result

    def _result(self, totals, counts, extracted, tokens, items, finite, steps, seconds) -> EvaluationResult:
        per_dataset: dict[str, DatasetResult] = {}
        warnings: list[str] = []
        for i, metric in enumerate(self.datasets):
            if not counts[i]:
                continue
            value = metric.value(totals[i], counts[i]) if finite[i] else math.nan
            cost = metric.cost(totals[i], counts[i]) if finite[i] else math.nan
            rate = None if metric.kind == "perplexity" else extracted[i] / counts[i]
            warning = None
            if metric.extracts and extracted[i] == 0:
                warning = (f"dataset {metric.dataset_name!r}: no answer could be extracted from any of the {counts[i]} "
                           "generations, so its accuracy of 0 says nothing; check the prompt format, `extract`, "
                           "`stop` and `max_new_tokens`.")
                logger.warning("%s", warning)
                warnings.append(warning)
            if not finite[i]:
                warnings.append(f"dataset {metric.dataset_name!r}: the model produced NaN/inf logits.")
            per_dataset[metric.dataset_name] = DatasetResult(
                metric=metric.metric_label, value=value,
                n=items[i], extracted=rate, tokens=tokens[i], cost=cost, direction=metric.direction,
                kind=metric.kind, warning=warning,
            )
        value = self._running(totals, counts, finite)
        if self.multi_objective:
            values = [per_dataset[name].value if name in per_dataset else math.nan for name in self.names]
        else:
            values = [value]
        if not math.isfinite(value):
            logger.warning("non-finite fitness %s: the model produces NaN/inf logits", value)
        return EvaluationResult(value=value, values=values, objective_names=self.objective_names,
                                directions=self.directions, per_dataset=per_dataset, tokens=sum(tokens),
                                seconds=seconds, complete=steps == len(self.plan), batches=steps, warnings=warnings)
