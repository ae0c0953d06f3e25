"""Contracts of the merge engine's plug-in points: sparsifiers, importance providers, merge methods.

Shapes: a task vector ``delta`` has the shape of its tensor, e.g. ``[out_features, in_features]`` for
a Linear weight, ``[vocab, hidden]`` for embeddings, ``[hidden]`` for norms.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class ImportanceProvider(Protocol):
    """Gives SparseGPT's per-input-column scale for a source model's Linear weight.

    ``column_scale(i, name)`` returns ``diag(U)^2`` of shape ``[in_features]`` (``U = cholesky(H^-1)``
    upper, ``H`` the damped Hessian of that Linear's input on source ``i``), or ``None`` when the
    tensor is not a Linear weight (embeddings, norms), in which case magnitude is used.
    """

    def column_scale(self, source_index: int, tensor_name: str) -> torch.Tensor | None: ...


def tensor_seed(seed: int, tensor_name: str, source_index: int) -> int:
    """A 63-bit seed from (recipe seed, tensor name, source index): same on every machine and device."""
    digest = hashlib.sha256(f"{seed}\x00{tensor_name}\x00{source_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class TensorContext:
    """What a sparsifier or merge method may need to know about the tensor being merged.

    ``generator`` is a CPU generator seeded by :func:`tensor_seed`; random masks are drawn on the CPU
    and moved to the tensor's device, so they reproduce bit for bit regardless of device.
    """

    name: str
    source_index: int
    seed: int = 0
    layer: int | None = None
    num_layers: int | None = None
    importance: ImportanceProvider | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def generator(self) -> torch.Generator:
        return torch.Generator(device="cpu").manual_seed(tensor_seed(self.seed, self.name, self.source_index))


class Sparsifier(ABC):
    """Chooses which entries of a task vector to keep (``True`` = kept)."""

    name: str = ""

    @abstractmethod
    def mask(self, delta: torch.Tensor, density: float, ctx: TensorContext) -> torch.Tensor:
        """Boolean mask with ``delta``'s shape keeping a ``density`` fraction of entries."""


def topk_mask(scores: torch.Tensor, density: float) -> torch.Tensor:
    """Mask of the ``round(density * numel)`` largest ``scores``, found by selection, not a full sort.

    Uses ``kthvalue`` on the flattened scores (O(n)), then breaks ties at the threshold by index so
    exactly ``k`` entries are kept.
    """
    numel = scores.numel()
    k = round(density * numel)
    if k >= numel:
        return torch.ones_like(scores, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    flat = scores.reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.float()  # kthvalue has no bf16/fp16 kernel on CPU
    # The k-th largest is the (numel - k + 1)-th smallest.
    threshold = flat.kthvalue(numel - k + 1).values
    mask = flat > threshold
    missing = k - int(mask.sum())
    if missing > 0:  # ties at the threshold: keep the first `missing` of them
        tied = (flat == threshold).nonzero().squeeze(1)[:missing]
        mask[tied] = True
    return mask.reshape(scores.shape)
