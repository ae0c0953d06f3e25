"""The merge-method contract: :class:`MergeMethod`, :class:`TensorParams`, the ``METHODS`` registry.

Each method family lives in its own module of this package and registers its classes with
``@METHODS.register("name")``; importing :mod:`evomerge_opt.merge.methods` registers them all.
``config.names.METHOD_NAMES`` lists the same names for torch-free validation (a test keeps them equal).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from evomerge_opt.merge._base import Sparsifier, TensorContext
from evomerge_opt.merge.methods.inputs import ResidentInputs, TensorInputs
from evomerge_opt.registry import Registry


@dataclass
class TensorParams:
    """Parameters of one tensor's merge, already resolved for its layer (one entry per source)."""

    weights: list[float]
    densities: list[float]
    normalize: bool = True
    lam: float = 1.0
    rescale: str = "none"
    sparsifier: Sparsifier | None = None


class MergeMethod(ABC):
    """A merge rule: fills one output tensor from its :class:`TensorInputs`.

    The class attributes declare the method's defaults once (recipe validation, ``RecipeParams`` and
    the mergekit export read them). :class:`~evomerge_opt.merge.methods.kernel.TrimMergeMethod` is
    the generic chunked kernel (trim -> elect + disjoint merge | weighted sum) that the built-in
    methods configure with ``elect``/``linear``; a new method may subclass it or implement
    :meth:`merge` itself (it gets :class:`TensorInputs` and must fill ``out``, a flat tensor of the
    output dtype).
    """

    name: str = ""
    default_sparsify: str | None = None  # None: the method does not trim unless asked
    default_rescale: str = "none"
    default_normalize: bool = True
    needs_base: bool = True  # False: base_model is only a reference (linear)
    elect: bool = False  # TIES sign election + disjoint merge, else a weighted sum
    linear: bool = False  # normalize off means W*b + sum (linear) instead of b + lam*sum

    @abstractmethod
    def merge(self, inputs: TensorInputs, params: TensorParams, ctxs: list[TensorContext], out: torch.Tensor) -> None:
        """Write the merged tensor into ``out`` (flat, output dtype, on ``inputs.device``)."""


METHODS: Registry[type[MergeMethod]] = Registry("merge method")


def get_method(name: str) -> MergeMethod:
    """An instance of the registered method ``name`` (unknown -> error listing the valid ones)."""
    return METHODS.get(name)()


def merge_tensors(
    method: str, base: torch.Tensor, deltas: list[torch.Tensor], params: TensorParams,
    ctxs: list[TensorContext] | None = None, name: str = "tensor",
) -> torch.Tensor:
    """Convenience for tests and callers with whole tensors: float32 result of ``method``."""
    ctxs = ctxs or [TensorContext(name=name, source_index=i) for i in range(len(deltas))]
    out = torch.empty(base.numel(), dtype=torch.float32, device=base.device)
    inputs = ResidentInputs(base.float(), [d.float() for d in deltas])
    get_method(method).merge(inputs, params, ctxs, out)
    return out.reshape(base.shape)
