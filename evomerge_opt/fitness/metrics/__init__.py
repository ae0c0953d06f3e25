"""Fitness metrics: one module per metric, registered in :data:`METRICS` (the contract is in ``_base``).

``perplexity`` (default), ``exact_match`` (teacher-forced greedy check), ``generate`` (greedy generation
+ answer extraction), ``choice`` (multiple-choice log-likelihood, lm-eval's acc/acc_norm).
"""

from evomerge_opt.fitness.metrics import choice, exact_match, generate, perplexity  # noqa: F401  (registration)
from evomerge_opt.fitness.metrics._base import METRICS, BatchStats, Metric, get_metric

__all__ = ["METRICS", "BatchStats", "Metric", "get_metric"]
