"""Merge methods (exact semantics in shared/DESIGN.md section 4). ``METHODS`` is the registry.

Layout: ``_base.py`` (the :class:`MergeMethod` contract, :class:`TensorParams`, ``METHODS``,
:func:`get_method`, :func:`merge_tensors`), ``inputs.py`` (:class:`TensorInputs`,
:class:`StreamInputs`, :class:`ResidentInputs`), ``workspace.py`` (chunks, reusable buffers),
``keepers.py`` (trimming and rescale), ``kernel.py`` (:class:`TrimMergeMethod`, the generic chunked
kernel), and one module per method family, each registering itself: ``linear``, ``task_arithmetic``,
``ties``, ``dare`` (``dare_ties``, ``dare_linear``). See ``kernel.py`` for the formulas.
"""

from evomerge_opt.merge.methods import dare, linear, task_arithmetic, ties  # noqa: F401  (register themselves)
from evomerge_opt.merge.methods._base import METHODS, MergeMethod, TensorParams, get_method, merge_tensors
from evomerge_opt.merge.methods.inputs import ResidentInputs, StreamInputs, TensorInputs
from evomerge_opt.merge.methods.kernel import TrimMergeMethod

__all__ = [
    "METHODS",
    "MergeMethod",
    "ResidentInputs",
    "StreamInputs",
    "TensorInputs",
    "TensorParams",
    "TrimMergeMethod",
    "get_method",
    "merge_tensors",
]
