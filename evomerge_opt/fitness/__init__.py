"""Fitness: the perplexity evaluator and the method comparison (the data they score is in ``evomerge_opt.data``).

Public names: :class:`PerplexityEvaluator`, :class:`FitnessResult`, :class:`DatasetScore`.
``fitness.compare`` (``MergeComparison``) is imported on use.
"""

from evomerge_opt.fitness.perplexity import DatasetScore, FitnessResult, PerplexityEvaluator

__all__ = [
    "DatasetScore",
    "FitnessResult",
    "PerplexityEvaluator",
]
