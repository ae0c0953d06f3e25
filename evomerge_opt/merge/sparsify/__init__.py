"""Sparsifiers: which entries of a task vector a merge keeps. ``SPARSIFIERS`` is the registry.

``magnitude`` keeps the top-k by ``|delta|`` (TIES), ``random`` draws ``Bernoulli(density)`` (DARE),
``sparsegpt`` keeps the top-k by SparseGPT importance (:mod:`evomerge_opt.merge.sparsify.importance`:
calibration Hessians, their cache and the :class:`HessianImportance` provider). Importing this package
registers all three (each module registers itself with ``@SPARSIFIERS.register``).
"""

from evomerge_opt.merge.sparsify import magnitude, random  # noqa: F401  (register themselves)
from evomerge_opt.merge.sparsify.importance import sparsegpt  # noqa: F401  (registers itself)
from evomerge_opt.merge.sparsify.magnitude import MagnitudeSparsifier
from evomerge_opt.merge.sparsify.random import RandomSparsifier
from evomerge_opt.merge.sparsify.registry import SPARSIFIERS, get_sparsifier

__all__ = ["SPARSIFIERS", "MagnitudeSparsifier", "RandomSparsifier", "get_sparsifier"]
