"""``linear``: ``out = sum_i w_i x_i / W`` (normalize, default) or ``sum_i w_i x_i``; the base is only a reference."""

from __future__ import annotations

from evomerge_opt.merge.methods._base import METHODS
from evomerge_opt.merge.methods.kernel import TrimMergeMethod


@METHODS.register("linear")
class Linear(TrimMergeMethod):
    name = "linear"
    needs_base = False
    linear = True
