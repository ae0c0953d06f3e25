"""Read access to one tensor's base and task vectors, flat, in float32, chunk by chunk.

:class:`StreamInputs` derives ``d_i = float32(x_i) - float32(b)`` on the fly from the stored tensors
(the ``apply`` path); :class:`ResidentInputs` slices float32 copies held in memory (the search).
"""

from __future__ import annotations

import torch

from evomerge_opt.merge.topk import TopK


class TensorInputs:
    """Read access to one tensor's base and task vectors, flat and in float32 (never mutate results).

    ``*_chunk`` methods may return a view of resident data or fill the given scratch ``buffer``.
    """

    shape: torch.Size
    numel: int
    device: torch.device
    num_sources: int

    def base_chunk(self, start: int, end: int, buffer: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_chunk(self, index: int, start: int, end: int, base: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def delta_strided(self, index: int, offset: int, stride: int, count: int) -> torch.Tensor:
        """``d_index`` at flat positions ``offset + i * stride`` for ``i < count`` (a magnitude sample)."""
        raise NotImplementedError

    def delta_full(self, index: int) -> torch.Tensor:
        """The whole task vector, shaped (may allocate; used by sparsifiers that need the tensor)."""
        raise NotImplementedError

    def sorted_magnitude(self, index: int) -> torch.Tensor | None:
        """``|d_index|`` flat and sorted ascending (``None``: not available). When an input can give it
        (the resident merger keeps it), magnitude trimming finds its exact threshold by a lookup."""
        return None

    def known_topk(self, index: int, k: int) -> TopK | None:
        """The top-``k`` of ``|d_index|`` when it was computed ahead (the ``apply`` pre-pass), else ``None``."""
        return None

    def has_negative_zero(self, index: int) -> bool | None:
        """Whether ``d_index`` holds a ``-0.0`` entry (``None``: unknown). Lets magnitude trimming at a
        threshold of 0 skip its tie bookkeeping: without ``-0.0`` keeping a zero or trimming it to
        ``+0.0`` gives the same bits."""
        return None


class ResidentInputs(TensorInputs):
    """Inputs over float32 tensors held in memory: ``base`` and ``deltas[i]`` (same shape)."""

    def __init__(self, base: torch.Tensor, deltas: list[torch.Tensor]) -> None:
        self.shape = base.shape
        self.numel = base.numel()
        self.device = base.device
        self.num_sources = len(deltas)
        self._base = base.reshape(-1)
        self._deltas = [d.reshape(-1) for d in deltas]
        self._shaped = deltas

    def base_chunk(self, start, end, buffer):
        return self._base[start:end]

    def delta_chunk(self, index, start, end, base, buffer):
        return self._deltas[index][start:end]

    def delta_strided(self, index, offset, stride, count):
        return self._deltas[index][offset : offset + stride * count : stride]

    def delta_full(self, index):
        return self._shaped[index]


class StreamInputs(TensorInputs):
    """Inputs over the stored tensors (any float dtype): ``d_i = float32(x_i) - float32(b)`` on the fly.

    ``known``: per source, a top-k of ``|d_i|`` computed ahead (or ``None``)."""

    def __init__(self, base: torch.Tensor, sources: list[torch.Tensor], known: list[TopK | None] | None = None) -> None:
        self.shape = base.shape
        self.numel = base.numel()
        self.device = base.device
        self.num_sources = len(sources)
        self._base = base.reshape(-1)
        self._sources = [x.reshape(-1) for x in sources]
        self._known = known or [None] * len(sources)

    def known_topk(self, index, k):
        known = self._known[index]
        return known if known is not None and known.k == k else None

    def base_chunk(self, start, end, buffer):
        chunk = self._base[start:end]
        return chunk if chunk.dtype == torch.float32 else buffer.copy_(chunk)

    def delta_chunk(self, index, start, end, base, buffer):
        return torch.sub(self._sources[index][start:end], base, out=buffer)  # upcast + subtract in one pass

    def delta_strided(self, index, offset, stride, count):
        span = slice(offset, offset + stride * count, stride)
        return torch.sub(self._sources[index][span], self._base[span].float())

    def delta_full(self, index):
        return torch.sub(self._sources[index], self._base.float()).reshape(self.shape)
