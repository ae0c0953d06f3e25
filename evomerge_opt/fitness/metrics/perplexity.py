"""``metric: perplexity`` (the default): token-weighted NLL on fixed windows, today's evaluator per batch.

The windows and batches are exactly :class:`~evomerge_opt.fitness.perplexity.PerplexityEvaluator`'s
(rows sorted by length, longest first) and each batch is scored by its ``_batch_nll``, so a fitness of
perplexity datasets only gives bit for bit the values that evaluator gives.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from evomerge_opt.fitness.combine import safe_exp
from evomerge_opt.fitness.metrics._base import METRICS, BatchStats, Metric
from evomerge_opt.fitness.perplexity import PerplexityEvaluator
from evomerge_opt.fitness.spec import WINDOW_KEYS


@METRICS.register("perplexity")
class PerplexityMetric(Metric):
    name = "perplexity"
    kind = "perplexity"
    direction = "minimize"
    spec_keys = WINDOW_KEYS
    uses_records = False

    def __init__(self, spec, tokenizer, batch_size: int = 8, cache_dir: str | None = None, windows=None) -> None:
        from evomerge_opt.data.windows import load_windows

        super().__init__(spec, tokenizer, batch_size, cache_dir)
        if windows is None:
            windows = load_windows(spec.data_spec(), tokenizer, cache_dir)
        self.windows = windows
        self._evaluator = PerplexityEvaluator([(self.dataset_name, windows, self.weight)], batch_size=batch_size)
        self.batches = self._evaluator.batches

    def items_in(self, batch: Any) -> int:
        return int(batch.input_ids.shape[0])

    def run_batch(self, model: torch.nn.Module, batch: Any, device: torch.device, state: Any) -> BatchStats:
        nll, count = PerplexityEvaluator._batch_nll(model, batch, device)
        # NaN/inf losses flow through the sums as in PerplexityEvaluator (inf perplexity stays inf).
        return BatchStats(total=nll, count=count, extracted=count, tokens=count)

    def value(self, total: float, count: int) -> float:
        return safe_exp(total / count) if count else math.nan

    def cost(self, total: float, count: int) -> float:
        return total / count if count else math.nan
