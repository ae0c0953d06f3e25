"""Fitness: evaluation data (tokenised, cached windows), the perplexity evaluator, and the method comparison.

Public names: :class:`DataSpec`, :class:`TokenWindows`, :func:`load_windows`, :class:`PerplexityEvaluator`,
:class:`FitnessResult`, :class:`DatasetScore`. ``fitness.compare`` (``MergeComparison``) is imported on use.
"""

from evomerge_opt.fitness.data import DataSpec, HubDataset, TokenWindows, load_windows
from evomerge_opt.fitness.perplexity import DatasetScore, FitnessResult, PerplexityEvaluator

__all__ = [
    "DataSpec",
    "DatasetScore",
    "FitnessResult",
    "HubDataset",
    "PerplexityEvaluator",
    "TokenWindows",
    "load_windows",
]
