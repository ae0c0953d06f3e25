"""``task_arithmetic``: ``out = b + lam * sum_i w_i d_i`` (``/ W`` only when normalize is set)."""

from __future__ import annotations

from evomerge_opt.merge.methods._base import METHODS
from evomerge_opt.merge.methods.kernel import TrimMergeMethod


@METHODS.register("task_arithmetic")
class TaskArithmetic(TrimMergeMethod):
    name = "task_arithmetic"
    default_normalize = False
