"""Chunking and reusable float32 buffers of the merge kernel.

A merge is ~30 elementwise passes over each tensor; done on whole tensors every pass streams through
main memory and the temporaries cost gigabytes. So the kernel works on flat chunks of :data:`CHUNK`
entries that stay in cache, in buffers of this thread's :class:`Workspace`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import numpy as np
import torch

from evomerge_opt.merge.methods.inputs import TensorInputs

CHUNK = 1 << 17  # entries per chunk on CPU: ~10 float32 buffers of 512 KB stay in L2/L3
GPU_CHUNK = 1 << 24


class Workspace:
    """Reusable float32 chunk buffers. Fresh 512 KB temporaries would cost a page-faulting mmap each
    (glibc serves them with mmap), which made out-of-place ops ~10x slower than the arithmetic."""

    def __init__(self, device: torch.device, size: int) -> None:
        self.device, self.size = device, size
        self._buffers: dict[str, torch.Tensor] = {}
        self._views: dict[tuple[str, int], torch.Tensor] = {}
        self._flags: dict[str, np.ndarray] = {}

    def __call__(self, key: str, length: int) -> torch.Tensor:
        view = self._views.get((key, length))  # a dict hit is ~20x cheaper than slicing a tensor
        if view is None:
            buffer = self._buffers.get(key)
            if buffer is None:
                buffer = self._buffers[key] = torch.empty(self.size, dtype=torch.float32, device=self.device)
            view = self._views[key, length] = buffer[:length]
        return view

    def ones(self, length: int) -> torch.Tensor:
        """A buffer of ones (never written to)."""
        buffer = self._buffers.get("\0ones")
        if buffer is None:
            buffer = self._buffers["\0ones"] = torch.ones(self.size, dtype=torch.float32, device=self.device)
        return buffer[:length]

    def flags(self, key: str, length: int) -> np.ndarray:
        """A reusable numpy bool buffer (CPU comparisons write their results here)."""
        buffer = self._flags.get(key)
        if buffer is None:
            buffer = self._flags[key] = np.empty(self.size, dtype=bool)
        return buffer[:length]


_WORKSPACES = threading.local()


def workspace(device: torch.device) -> Workspace:
    """This thread's workspace for ``device`` (threads merging different tensors never share one)."""
    spaces = getattr(_WORKSPACES, "spaces", None)
    if spaces is None:
        spaces = _WORKSPACES.spaces = {}
    key = str(device)
    if key not in spaces:
        spaces[key] = Workspace(device, GPU_CHUNK if device.type == "cuda" else CHUNK)
    return spaces[key]


def chunks(inputs: TensorInputs) -> Iterator[tuple[int, int]]:
    """``(start, end)`` of each chunk of ``inputs`` (:data:`CHUNK` on CPU, :data:`GPU_CHUNK` on CUDA)."""
    step = GPU_CHUNK if inputs.device.type == "cuda" else CHUNK
    for start in range(0, inputs.numel, step):
        yield start, min(start + step, inputs.numel)
