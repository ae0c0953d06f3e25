"""``ties``: magnitude trim, sign election (0 -> +), disjoint merge (Yadav et al. 2023)."""

from __future__ import annotations

from evomerge_opt.merge.methods._base import METHODS
from evomerge_opt.merge.methods.kernel import TrimMergeMethod


@METHODS.register("ties")
class Ties(TrimMergeMethod):
    name = "ties"
    default_sparsify = "magnitude"
    elect = True
