"""Merge methods (exact semantics in shared/DESIGN.md section 4). ``METHODS`` is the registry.

Notation: base ``b``, task vectors ``d_i = x_i - b``, weights ``w_i``, densities ``k_i``, scale ``lam``,
``W = sum_i w_i``. Everything is computed in float32 whatever the stored dtype.

* ``linear``:          ``out = sum_i w_i x_i / W`` (normalize, default) or ``sum_i w_i x_i``;
  computed as ``b + sum_i w_i d_i / W`` (resp. ``W b + sum_i w_i d_i``), the same value.
* ``task_arithmetic``: ``out = b + lam * sum_i w_i d_i`` (``/ W`` only when normalize is set).
* ``ties``:            trim ``t_i`` = the ``round(k_i * numel)`` largest ``|d_i|`` (ties at the threshold
  broken by index, as :func:`~evomerge_opt.merge._base.topk_mask`); elect ``s = sign(sum_i w_i t_i)``
  with 0 -> +; disjoint merge over ``m_i = [sign(w_i t_i) == s]`` (a pruned zero never agrees):
  ``out = b + lam * sum_i w_i t_i m_i / sum_i w_i m_i`` (den 0 -> 1), or ``b + lam * num`` without
  normalize.
* ``dare_ties`` / ``dare_linear``: mask ``~ Bernoulli(k_i)`` (seeded per tensor and source), rescale
  (``inverse_density``: ``/ k_i``; ``l1``: ``* |d_i|_1 / |d_i m_i|_1``; ``none``), then TIES' elect +
  disjoint merge, or ``b + lam * sum_i w_i d'_i`` (``/ W`` with normalize, its default).

Trimming uses the sparsifier named by ``parameters.sparsify`` (``sparsegpt`` importance plugs in here
for every trimming method) and ``parameters.rescale`` applies to every trimming method.

How it is computed (the reason for the shape of this module): a merge is ~30 elementwise passes
over each tensor. Done on whole tensors (the 28M-entry embedding of a 135M model is 113 MB in
float32 per operand) every pass streams through main memory and the temporaries cost gigabytes.
So the kernel works on flat chunks of :data:`CHUNK` entries that stay in cache, reading the task
vectors chunk by chunk from :class:`TensorInputs` (the streaming path derives them from the stored
bf16/fp16 tensors on the fly, the resident path slices its float32 copies) and writing the result
straight into the output dtype. Magnitude trimming finds its exact threshold by sampling a band
around it and selecting inside the band (``kthvalue`` on ~1% of the entries), so no full sort or
full-size selection is needed; when the inputs hold the sorted ``|d|`` (the resident merger's
magnitude index) the threshold is a lookup plus two binary searches instead. Every step is
elementwise or an ordered count, so the result does not depend on the chunk size and both paths
produce identical tensors.
"""

from __future__ import annotations

import math
import threading
from abc import ABC
from dataclasses import dataclass

import numpy as np
import torch

from evomerge_opt.errors import ConfigError, NonFiniteResultError
from evomerge_opt.merge import topk
from evomerge_opt.merge._base import Sparsifier, TensorContext
from evomerge_opt.merge.sparsify import MagnitudeSparsifier, RandomSparsifier
from evomerge_opt.merge.topk import TopK
from evomerge_opt.registry import Registry

CHUNK = 1 << 17  # entries per chunk on CPU: ~10 float32 buffers of 512 KB stay in L2/L3
GPU_CHUNK = 1 << 24
FP16_MAX = 65504.0
TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32: den floor when all weights are positive


@dataclass
class TensorParams:
    """Parameters of one tensor's merge, already resolved for its layer (one entry per source)."""

    weights: list[float]
    densities: list[float]
    normalize: bool = True
    lam: float = 1.0
    rescale: str = "none"
    sparsifier: Sparsifier | None = None


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


def _chunks(inputs: TensorInputs):
    step = GPU_CHUNK if inputs.device.type == "cuda" else CHUNK
    for start in range(0, inputs.numel, step):
        yield start, min(start + step, inputs.numel)


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
        for start, end in _chunks(inputs):
            length = end - start
            base = inputs.base_chunk(start, end, space("base", length))
            delta = inputs.delta_chunk(index, start, end, base, space("d0", length))
            scan.add(start, torch.abs(delta, out=space("keep", length)).numpy())
        found = scan.result(k)
        return ThresholdKeeper.from_topk(found) if found is not None else None
    above_hi = 0
    band: list[torch.Tensor] = []
    for start, end in _chunks(inputs):
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


def _full_mask(inputs: TensorInputs, index: int, keeper: Keeper) -> torch.Tensor:
    """A keeper's whole mask as a bool tensor (consumes a ThresholdKeeper's tie budget)."""
    space = workspace(inputs.device)
    parts = []
    for start, end in _chunks(inputs):
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
        mask = _full_mask(inputs, index, keeper)
        delta = inputs.delta_full(index).reshape(-1)
        total = float(delta.abs().sum(dtype=torch.float64))
        kept = float((delta * mask).abs().sum(dtype=torch.float64))
        return total / kept if kept > 0 else 1.0
    raise ConfigError(f"Unknown rescale {rescale!r}; valid ones are: inverse_density, l1, none.")


# ---- the methods ---------------------------------------------------------------------------------------


def total_weight(weights: list[float], what: str) -> float:
    total = float(sum(weights))
    if total <= 0:
        raise ConfigError(
            f"With normalize on the total weight must be > 0 (it divides the merge), but the weights "
            f"{weights} sum to {total:g} for tensor {what!r}; make the total positive or set "
            "parameters.normalize: false."
        )
    return total


class MergeMethod(ABC):
    """A merge rule. The generic kernel below covers trim -> (elect + disjoint merge | weighted sum).

    Subclasses set the class attributes; a new method may override :meth:`merge` entirely (it gets
    :class:`TensorInputs` and must fill ``out``, a flat tensor of the output dtype).
    """

    name: str = ""
    default_sparsify: str | None = None  # None: the method does not trim unless asked
    default_rescale: str = "none"
    default_normalize: bool = True
    needs_base: bool = True  # False: base_model is only a reference (linear)
    elect: bool = False  # TIES sign election + disjoint merge, else a weighted sum
    linear: bool = False  # normalize off means W*b + sum (linear) instead of b + lam*sum

    def merge(self, inputs: TensorInputs, params: TensorParams, ctxs: list[TensorContext], out: torch.Tensor) -> None:
        """Write the merged tensor into ``out`` (flat, output dtype, on ``inputs.device``)."""
        name = ctxs[0].name
        keepers, scales = [], []
        for i, (density, weight, ctx) in enumerate(zip(params.densities, params.weights, ctxs)):
            keeper = make_keeper(inputs, i, density, params, ctx)
            if params.rescale == "l1" and isinstance(keeper, ThresholdKeeper):
                keeper = MaskKeeper(_full_mask(inputs, i, keeper))  # l1 needs two passes: a stateless mask
            keepers.append(keeper)
            scales.append(weight * rescale_factor(inputs, i, density, keeper, params.rescale))
        divisor = total_weight(params.weights, name) if params.normalize and not self.elect else 1.0
        lam = 1.0 if self.linear else params.lam
        base_scale = float(sum(params.weights)) if self.linear and not params.normalize else 1.0
        space = workspace(inputs.device)
        finite = True
        for start, end in _chunks(inputs):
            length = end - start
            base = inputs.base_chunk(start, end, space("base", length))
            terms = []
            for i, keeper in enumerate(keepers):
                delta = inputs.delta_chunk(i, start, end, base, space(f"d{i}", length))
                trimmed = keeper.trim(start, end, delta, space(f"t{i}", length))
                if trimmed is delta:  # kept whole: never write into (possibly resident) task vectors
                    term = torch.mul(delta, scales[i], out=space(f"t{i}", length))
                else:
                    term = trimmed.mul_(scales[i]) if scales[i] != 1.0 else trimmed
                terms.append(term)  # w_i * rescale_i * trim(d_i)
            if self.elect:
                mixed = _elect_and_merge(terms, params.weights, params.normalize, space, length)
            else:
                mixed = terms[0]
                for term in terms[1:]:
                    mixed.add_(term)
                if divisor != 1.0:
                    mixed.div_(divisor)
            if lam != 1.0:
                mixed.mul_(lam)
            # float32 output: the last add writes straight into it (the same kernel, no extra copy).
            target = out[start:end] if out.dtype == torch.float32 else mixed
            if base_scale != 1.0:
                torch.add(mixed, base, alpha=base_scale, out=target)
            else:
                torch.add(mixed, base, out=target)
            # NaN/inf check at the cost of one reduction: a non-finite sum flags the chunk
            # (a false alarm from overflowing huge values is settled by the exact check below).
            if not math.isfinite(float(target.sum())) or (
                out.dtype == torch.float16 and float(target.abs().max()) > FP16_MAX
            ):
                finite = False
            if target is mixed:
                out[start:end].copy_(mixed)
        if not finite:
            _raise_if_not_finite(name, out)


def _raise_if_not_finite(name: str, out: torch.Tensor) -> None:
    bad = int((~torch.isfinite(out)).sum())
    if bad:
        raise NonFiniteResultError(
            f"The merge of tensor {name!r} produced {bad} NaN/inf values (dtype {out.dtype}); check the "
            "sources for NaN/inf, the weights/lambda for overflow, or choose a wider output dtype."
        )


def _elect_and_merge(terms: list[torch.Tensor], weights: list[float], normalize: bool, space: Workspace,
                     length: int) -> torch.Tensor:
    """TIES steps 2-3 on one chunk of ``w_i t_i``: sign election (0 counts as +), disjoint mean."""
    sign = torch.add(terms[0], terms[1], out=space("total", length)) if len(terms) > 1 else \
        space("total", length).copy_(terms[0])
    for term in terms[2:]:
        sign.add_(term)
    # s = copysign(1, sum): +1 for +0.0 as the rule says. The sum is -0.0 only when every term is a
    # zero (x + (-x) rounds to +0.0), and then no term agrees whatever s is.
    torch.copysign(space.ones(length), sign, out=sign)
    num = space("num", length)
    den = space("den", length)
    agree = space("keep", length)
    for j, (term, weight) in enumerate(zip(terms, weights)):
        # [sign(w t) == s] = [w t * s > 0] as 1.0/0.0; a zero (pruned) entry never agrees.
        torch.gt(torch.mul(term, sign, out=agree), 0.0, out=agree)
        if j == 0:
            torch.mul(term, agree, out=num)
            torch.mul(agree, weight, out=den)
        else:
            num.addcmul_(term, agree)
            den.add_(agree, alpha=weight)
    if not normalize:
        return num
    if min(weights) >= TINY:
        # Positive weights: den is 0 exactly where no term agrees, and there num is a zero, so raising
        # den to TINY gives num / 1's result (a zero of num's sign) in one pass.
        den.clamp_(min=TINY)
    else:
        # den 0 -> 1 without bool kernels: add (1 - sign|den|), which is 1 exactly where den == 0, else 0.
        torch.abs(den, out=agree).sign_().neg_().add_(1.0)
        den.add_(agree)
    return num.div_(den)


METHODS: Registry[type[MergeMethod]] = Registry("merge method")


@METHODS.register("linear")
class Linear(MergeMethod):
    name = "linear"
    needs_base = False
    linear = True


@METHODS.register("task_arithmetic")
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    default_normalize = False


@METHODS.register("ties")
class Ties(MergeMethod):
    name = "ties"
    default_sparsify = "magnitude"
    elect = True


@METHODS.register("dare_ties")
class DareTies(Ties):
    name = "dare_ties"
    default_sparsify = "random"
    default_rescale = "inverse_density"


@METHODS.register("dare_linear")
class DareLinear(TaskArithmetic):
    name = "dare_linear"
    default_sparsify = "random"
    default_rescale = "inverse_density"
    default_normalize = True


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
