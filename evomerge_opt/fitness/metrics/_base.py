"""The contract of a fitness metric, and its registry.

A metric class scores one dataset. It is built once per worker from the dataset's spec and the
tokenizer (records read, checked and tokenised; no model), cuts the dataset into ``batches`` in a fixed
order, and scores one batch at a time on a model, returning :class:`BatchStats`. The evaluator
(:mod:`evomerge_opt.fitness.evaluator`) interleaves the batches of every dataset, keeps the running
sums, reports after every batch and stops after a budget of batches.

To add a metric: subclass :class:`Metric`, set ``kind``/``direction``/``spec_keys``, implement
``check_spec`` (schema rules, nothing read), ``check_records`` (rules on the records, no model),
``__init__`` (prepare) and ``run_batch``, and register it with ``@METRICS.register("name")`` in a
module imported by ``fitness/metrics/__init__.py``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from evomerge_opt.errors import ConfigError
from evomerge_opt.fitness.records import load_records
from evomerge_opt.registry import Registry

if TYPE_CHECKING:
    from evomerge_opt.fitness.spec import Direction, FitnessDatasetSpec


@dataclass
class BatchStats:
    """What one batch adds to a dataset's running sums.

    ``total``/``count``: summed NLL (nats) / predicted tokens for perplexity; correct answers / questions
    for an accuracy. ``extracted``: answers that could be extracted (accuracy metrics; for perplexity the
    predicted tokens). ``tokens``: token positions the model processed (prompt, scored and generated
    tokens), the cost measure of an evaluation. ``finite``: False when the model produced NaN/inf.
    ``item_scores``: per question of the batch, in order, its score (1.0 right / 0.0 wrong; lm-eval: the
    document's metric value) — item-level results for estimators that model questions (e.g. IRT).
    """

    total: float
    count: int
    extracted: int = 0
    tokens: int = 0
    finite: bool = True
    item_scores: list[float] | None = None


class Metric(ABC):
    """One dataset prepared for scoring by one metric (see the module docstring)."""

    name: ClassVar[str] = ""
    kind: str = "accuracy"  # perplexity | accuracy | lower  (fitness.combine)
    direction: Direction = "maximize"
    # Keys of FitnessDatasetSpec (beyond DataSpec's common ones) this metric reads; others are refused.
    spec_keys: ClassVar[frozenset[str]] = frozenset()
    uses_records: ClassVar[bool] = True  # prompt/answer records (False: token windows)
    extracts: ClassVar[bool] = False  # answers are extracted from text (an extraction rate of 0 warns)

    def __init__(self, spec: FitnessDatasetSpec, tokenizer: Any, batch_size: int = 8,
                 cache_dir: str | None = None) -> None:
        self.spec = spec
        self.dataset_name = spec.name or spec.metric
        self.weight = float(spec.weight)
        self.batch_size = batch_size
        self.batches: list[Any] = []

    # ---- validation (classmethods: nothing loaded) --------------------------------------------

    @classmethod
    def check_spec(cls, spec: FitnessDatasetSpec) -> list[str]:
        """Problems of the spec's metric keys (schema level; no file is read)."""
        return []

    @classmethod
    def check_records(cls, spec: FitnessDatasetSpec, records: list[dict[str, Any]]) -> list[str]:
        """Problems of the records (fields, labels, answers); no model, no tokenizer."""
        return []

    @classmethod
    def checked_records(cls, spec: FitnessDatasetSpec,
                        records: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
        """The dataset's records (loaded unless given), checked by :meth:`check_records`; a problem is a
        :class:`~evomerge_opt.errors.ConfigError` listing the bad records."""
        if records is None:
            records = load_records(spec)
        problems = cls.check_records(spec, records)
        if problems:
            raise ConfigError(f"dataset {spec.name!r} cannot be scored by metric {spec.metric!r}:", problems)
        return records

    @property
    def metric_label(self) -> str:
        """The metric's name as results show it (``exact_match``, ``lm_eval:acc_norm``, ...)."""
        return self.name

    # ---- scoring -------------------------------------------------------------------------------

    @property
    def num_items(self) -> int:
        return sum(self.items_in(b) for b in self.batches)

    def items_in(self, batch: Any) -> int:
        """Questions (accuracy) or rows (perplexity) in ``batch``."""
        return len(batch)

    def begin(self, model: torch.nn.Module, device: torch.device) -> Any:
        """Per-evaluation state handed to every ``run_batch`` of one ``evaluate`` call."""
        return None

    @abstractmethod
    def run_batch(self, model: torch.nn.Module, batch: Any, device: torch.device, state: Any) -> BatchStats:
        """Score one batch (called under ``torch.inference_mode`` with the model in eval mode)."""

    def end(self, state: Any) -> None:
        """Release what ``begin`` made."""

    # ---- units -----------------------------------------------------------------------------------

    def value(self, total: float, count: int) -> float:
        """The dataset's value in its own unit from its running sums."""
        if count == 0:
            return math.nan
        return total / count

    def cost(self, total: float, count: int) -> float:
        """Lower-is-better cost (fitness.combine): ``1 - accuracy`` here."""
        return 1.0 - self.value(total, count)


METRICS: Registry[type[Metric]] = Registry("fitness metric")


def get_metric(name: str) -> type[Metric]:
    """The metric class registered as ``name`` (unknown -> error listing the valid ones)."""
    return METRICS.get(name)
