"""Trimming: which entries of each task vector survive, chunk by chunk (a :class:`Keeper` per source).

Magnitude trimming is exact (the same mask as :func:`~evomerge_opt.merge._base.topk_mask`): its
threshold comes from a pre-pass (``known_topk``), a lookup in the sorted ``|d|`` (the resident
merger's magnitude index), a sampled band plus a selection inside it (:mod:`evomerge_opt.merge.topk`),
or a full selection. ``random`` and other sparsifiers give a precomputed boolean mask. Also the
``rescale`` rules (``inverse_density``, ``l1``, ``none``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from evomerge_opt.errors import ConfigError
from evomerge_opt.merge import topk
from evomerge_opt.merge._base import TensorContext
from evomerge_opt.merge.methods._base import TensorParams
from evomerge_opt.merge.methods.inputs import TensorInputs
from evomerge_opt.merge.methods.workspace import chunks, workspace
from evomerge_opt.merge.sparsify.magnitude import MagnitudeSparsifier
from evomerge_opt.merge.sparsify.random import RandomSparsifier
from evomerge_opt.merge.topk import TopK

# ---- trimming: which entries of a task vector survive -------------------------------------------------
# A keeper trims each chunk of a task vector, in increasing order. No bool tensors in the hot path:
# this torch build's comparison/bool kernels are ~10x slower than float ones, so `|d| > thr` trimming
# is one `hardshrink(d, thr)` (exactly: d if |d| > thr else 0), and precomputed bool masks are cast to
# float through numpy (vectorised).


class Keeper:
    """Keeps every entry: ``trim`` returns the task vector itself."""

    def trim(self, start: int, end: int, delta: torch.Tensor, buffer: torch.Tensor) -> torch.Tensor:
        """The trimmed chunk: ``delta`` itself (kept whole) or ``buffer`` filled with it."""
        return delta

    def mask(self, start: int, end: int, delta: torch.Tensor) -> torch.Tensor:
        """The boolean keep-mask of the chunk (slow path: l1 rescale and tests)."""
        return torch.ones(end - start, dtype=torch.bool, device=delta.device)


class MaskKeeper(Keeper):
    """A precomputed boolean mask (random / SparseGPT / custom sparsifiers)."""

    def __init__(self, mask: torch.Tensor) -> None:
        self._mask = mask.reshape(-1)
        self._numpy = self._mask.numpy() if self._mask.device.type == "cpu" else None

    def trim(self, start, end, delta, buffer):
        if self._numpy is not None:
            buffer.numpy()[:] = self._numpy[start:end]  # numpy's bool -> float cast is vectorised
        else:
            buffer.copy_(self._mask[start:end])
        return buffer.mul_(delta)

    def mask(self, start, end, delta):
        return self._mask[start:end]


class ThresholdKeeper(Keeper):
    """Keep ``|d| > thr`` plus the first ``ties`` entries (by index) with ``|d| == thr``.

    ``zeros_unsigned``: the task vector has no ``-0.0``; then at ``thr == 0`` the trimmed chunk is the
    task vector itself bit for bit (every nonzero kept, every zero ``+0.0`` kept or not), so
    :meth:`trim` returns it without locating the tied zeros.
    ``tied_positions``: the flat positions of those first ``ties`` tied entries (ascending int64),
    when the threshold search found them; otherwise each chunk is scanned for them, in order.
    """

    def __init__(self, threshold: float, ties: int, equal_total: int, zeros_unsigned: bool = False,
                 tied_positions: np.ndarray | None = None) -> None:
        self.threshold = threshold
        self.ties = ties
        self.whole = threshold == 0.0 and zeros_unsigned
        self.tied_positions = tied_positions
        if ties == equal_total:  # every tied entry is kept: |d| >= thr, i.e. |d| > the float below thr
            self.shrink = float(np.nextafter(np.float32(threshold), np.float32(-math.inf)))  # float32's step
            self.ties = 0
            self.tied_positions = None
        else:
            self.shrink = threshold

    @classmethod
    def from_topk(cls, topk: TopK, zeros_unsigned: bool = False) -> ThresholdKeeper:
        return cls(topk.threshold, topk.ties, topk.equal, zeros_unsigned, topk.tied_positions)

    def _tied(self, start: int, end: int, delta: torch.Tensor) -> torch.Tensor | None:
        """Chunk positions of the tied entries to keep in ``[start, end)``."""
        if self.tied_positions is not None:
            first, last = np.searchsorted(self.tied_positions, (start, end))
            return torch.from_numpy(self.tied_positions[first:last] - start).to(delta.device) if last > first else None
        if self.ties <= 0:
            return None
        # Scan (consumes the tie budget, so chunks must come in order).
        if delta.device.type == "cpu":
            space, length = workspace(delta.device), delta.numel()
            if length <= space.size:  # a chunk: reuse scratch buffers (fresh ones cost page faults)
                magnitude = np.abs(delta.numpy(), out=space("tied", length).numpy())
                equal = np.equal(magnitude, self.threshold, out=space.flags("tied", length))
            else:
                equal = np.abs(delta.numpy()) == self.threshold
            tied = torch.from_numpy(np.flatnonzero(equal)[: self.ties])
        else:
            tied = (delta.abs() == self.threshold).nonzero().squeeze(1)[: self.ties]
        self.ties -= tied.numel()
        return tied.to(delta.device)

    def trim(self, start, end, delta, buffer):
        if self.whole:
            return delta
        trimmed = torch.ops.aten.hardshrink.out(delta, self.shrink, out=buffer)
        tied = self._tied(start, end, delta)
        if tied is not None and tied.numel():
            trimmed[tied] = delta[tied]
        return trimmed

    def mask(self, start, end, delta):
        keep = delta.abs() > self.shrink
        tied = self._tied(start, end, delta)
        if tied is not None and tied.numel():
            keep[tied] = True
        return keep


class NoneKeeper(Keeper):
    def trim(self, start, end, delta, buffer):
        return buffer.zero_()

    def mask(self, start, end, delta):
        return torch.zeros(end - start, dtype=torch.bool, device=delta.device)


def magnitude_keeper(inputs: TensorInputs, index: int, density: float) -> Keeper:
    """Exactly the ``round(density * numel)`` largest ``|d|`` (= ``topk_mask(d.abs(), density)``)."""
    numel = inputs.numel
    k = round(density * numel)
    if k >= numel:
        return Keeper()
    if k <= 0:
        return NoneKeeper()
    known = inputs.known_topk(index, k)
    if known is not None:
        return ThresholdKeeper.from_topk(known)
    ordered = inputs.sorted_magnitude(index)
    if ordered is not None:
        return ThresholdKeeper(*_threshold_from_sorted(ordered, k), inputs.has_negative_zero(index) is False)
    if numel >= topk.BAND_MIN_NUMEL:
        found = _threshold_by_band(inputs, index, k)
        if found is not None:
            return found
    magnitude = inputs.delta_full(index).reshape(-1).abs()
    if magnitude.device.type == "cpu":
        return ThresholdKeeper.from_topk(topk.select_all(magnitude.numpy(), k))
    threshold = float(magnitude.kthvalue(numel - k + 1).values)
    above = int((magnitude > threshold).sum())
    equal = int((magnitude == threshold).sum())
    return ThresholdKeeper(threshold, k - above, equal)


def _threshold_from_sorted(ordered: torch.Tensor, k: int) -> tuple[float, int, int]:
    """(k-th largest, ties to keep, entries equal to it) from ascending ``ordered`` values: two binary
    searches, the same figures as the selection in :func:`magnitude_keeper`."""
    n = ordered.numel()
    if ordered.device.type == "cpu":
        values = ordered.numpy()
        threshold = values[n - k]
        left = int(np.searchsorted(values, threshold, "left"))
        right = int(np.searchsorted(values, threshold, "right"))
    else:
        point = ordered[n - k : n - k + 1]
        threshold = point.item()
        left = int(torch.searchsorted(ordered, point, right=False))
        right = int(torch.searchsorted(ordered, point, right=True))
    above = n - right
    return float(threshold), k - above, right - left


def _threshold_by_band(inputs: TensorInputs, index: int, k: int) -> ThresholdKeeper | None:
    """Sample |d| to bracket the k-th largest in ``(lo, hi]``, count above, select inside the band
    (:mod:`evomerge_opt.merge.topk`; on a GPU the same steps in torch, without tie positions)."""
    numel = inputs.numel
    offset, stride, count = topk.sample_layout(numel, int(inputs.shape[-1]) if len(inputs.shape) else 1)
    sample = inputs.delta_strided(index, offset, stride, count).abs().cpu().numpy()
    lo, hi = topk.band_bounds(sample, numel, k)
    space = workspace(inputs.device)
    if inputs.device.type == "cpu":
        scan = topk.BandScan(lo, hi, (space.flags("above", space.size), space.flags("inside", space.size)))
        for start, end in chunks(inputs):
            length = end - start
            base = inputs.base_chunk(start, end, space("base", length))
            delta = inputs.delta_chunk(index, start, end, base, space("d0", length))
            scan.add(start, torch.abs(delta, out=space("keep", length)).numpy())
        found = scan.result(k)
        return ThresholdKeeper.from_topk(found) if found is not None else None
    above_hi = 0
    band: list[torch.Tensor] = []
    for start, end in chunks(inputs):
        length = end - start
        base = inputs.base_chunk(start, end, space("base", length))
        magnitude = torch.abs(inputs.delta_chunk(index, start, end, base, space("d0", length)), out=space("keep", length))
        above_hi += int((magnitude > hi).sum())
        band.append(magnitude[(magnitude > lo) & (magnitude <= hi)])
    values = torch.cat(band)
    need = k - above_hi
    if not 0 < need <= values.numel():
        return None
    threshold = float(values.kthvalue(values.numel() - need + 1).values)
    above = above_hi + int((values > threshold).sum())
    return ThresholdKeeper(threshold, k - above, int((values == threshold).sum()))


def make_keeper(inputs: TensorInputs, index: int, density: float, params: TensorParams, ctx: TensorContext) -> Keeper:
    sparsifier = params.sparsifier
    if sparsifier is None or density >= 1.0:
        return Keeper()
    if type(sparsifier) is MagnitudeSparsifier:
        return magnitude_keeper(inputs, index, density)
    if type(sparsifier) is RandomSparsifier:
        # The random mask depends only on the shape (and the seeded generator): no task vector needed.
        stand_in = torch.zeros((), device=inputs.device).expand(inputs.shape)
        return MaskKeeper(sparsifier.mask(stand_in, density, ctx))
    delta = inputs.delta_full(index)
    return MaskKeeper(sparsifier.mask(delta, density, ctx).to(inputs.device))


def full_mask(inputs: TensorInputs, index: int, keeper: Keeper) -> torch.Tensor:
    """A keeper's whole mask as a bool tensor (consumes a ThresholdKeeper's tie budget)."""
    space = workspace(inputs.device)
    parts = []
    for start, end in chunks(inputs):
        length = end - start
        delta = inputs.delta_chunk(index, start, end, inputs.base_chunk(start, end, space("base", length)),
                                   space("d0", length))
        parts.append(keeper.mask(start, end, delta).clone())
    return torch.cat(parts)


def rescale_factor(inputs: TensorInputs, index: int, density: float, keeper: Keeper, rescale: str) -> float:
    if rescale == "none" or isinstance(keeper, NoneKeeper) or type(keeper) is Keeper:
        return 1.0
    if rescale == "inverse_density":
        return 1.0 / density
    if rescale == "l1":
        # |d|_1 / |d * m|_1 so the kept entries keep the task vector's L1 norm (0 kept -> factor 1).
        mask = full_mask(inputs, index, keeper)
        delta = inputs.delta_full(index).reshape(-1)
        total = float(delta.abs().sum(dtype=torch.float64))
        kept = float((delta * mask).abs().sum(dtype=torch.float64))
        return total / kept if kept > 0 else 1.0
    raise ConfigError(f"Unknown rescale {rescale!r}; valid ones are: inverse_density, l1, none.")
