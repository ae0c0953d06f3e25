"""Exact top-k selection of task-vector magnitudes on the CPU, in numpy only (no torch import).

Magnitude trimming keeps exactly the ``k = round(density * numel)`` largest ``|d|`` of a tensor, ties
at the threshold broken by index (shared/DESIGN.md section 4). The answer is a :class:`TopK`: the
k-th largest magnitude, how many entries equal to it are kept and which ones. It is found without a
sort or a full-size selection (:class:`BandScan`): a small strided sample brackets the threshold in a
band ``(lo, hi]``, one pass over the chunks counts the entries above ``hi`` and collects the few inside
the band (values and positions), and a selection inside the band gives the exact threshold. Small
tensors are selected whole (:func:`select_all`).

The merge kernel (:mod:`evomerge_opt.merge.methods`) feeds it chunks computed with torch; the
``apply`` pre-pass (:mod:`evomerge_opt.merge.prepass`) feeds it chunks computed with numpy while torch
is still being imported. Both get the same exact answer (it does not depend on the sample or chunks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SAMPLE = 1 << 18  # most entries sampled to bracket a magnitude threshold (see sample_layout)
MIN_SAMPLE = 1 << 10  # fewest
BAND_MIN_NUMEL = 1 << 15  # smaller task vectors are selected whole (cheaper than sample + band)
SIGMAS = 4.5  # band half-width in standard deviations of the sample rank (a miss costs a full selection)


@dataclass(frozen=True)
class TopK:
    """The exact top-``k`` of ``|d|``: keep ``|d| > threshold`` plus the first ``ties`` entries (by
    index) equal to it, of ``equal`` such entries; ``tied_positions`` are those ``ties`` flat positions
    (ascending), or ``None`` when not collected (then the trimming scans for them)."""

    k: int
    threshold: float
    ties: int
    equal: int
    tied_positions: np.ndarray | None = None


def sample_layout(numel: int, row: int) -> tuple[int, int, int]:
    """``(offset, stride, count)`` of the magnitude sample of a ``numel``-entry tensor with rows of ``row``.

    An evenly strided sample, so it is a view (no random draw, no gather): the stride is made coprime
    to the row length so the sample walks every column instead of a few. Any sample gives the same
    exact threshold (it only places the band); a sample that misses costs a full selection, not a
    wrong answer.
    """
    # Cost ~ count (sample) + numel * band share, where the band share falls as 1/sqrt(count):
    # the sum is smallest near count = (2 numel)^(2/3) (~13k entries for 1M, ~150k for 30M).
    count = int(min(SAMPLE, max(MIN_SAMPLE, (2 * numel) ** (2 / 3))))
    stride = max(1, numel // count)
    while stride > 1 and math.gcd(stride, row) != 1:
        stride -= 1
    return stride // 2, stride, count


def band_bounds(sample: np.ndarray, numel: int, k: int) -> tuple[float, float]:
    """``(lo, hi)`` bracketing the k-th largest of ``numel`` magnitudes, from a sample of them."""
    count = sample.size
    share = k / numel
    rank = share * count  # expected sample entries above the threshold
    margin = SIGMAS * math.sqrt(count * share * (1 - share)) + 32
    hi_rank, lo_rank = int(rank - margin), int(rank + margin)  # ranks from the top
    order = [count - 1 - r for r in (hi_rank, lo_rank) if 0 <= r < count]
    picked = np.partition(sample, order) if order else sample
    hi = float(picked[count - 1 - hi_rank]) if hi_rank >= 0 else math.inf
    lo = float(picked[count - 1 - lo_rank]) if lo_rank < count else -1.0
    return lo, hi


class BandScan:
    """One pass over a task vector's magnitude chunks (in increasing position order) for the band
    ``(lo, hi]``: counts entries above ``hi``, keeps the values and positions inside the band."""

    def __init__(self, lo: float, hi: float, flags: tuple[np.ndarray, np.ndarray]) -> None:
        """``flags``: two bool scratch arrays at least a chunk long (reused: fresh ones cost page faults)."""
        self.lo, self.hi = lo, hi
        self.above_hi = 0
        self._values: list[np.ndarray] = []
        self._positions: list[np.ndarray] = []
        self._above, self._inside = flags

    def add(self, start: int, magnitude: np.ndarray) -> None:
        """Scan float32 ``|d|`` of positions ``[start, start + len(magnitude))``."""
        length = magnitude.size
        above, inside = self._above[:length], self._inside[:length]
        self.above_hi += int(np.count_nonzero(np.greater(magnitude, self.hi, out=above)))
        np.greater(magnitude, self.lo, out=above)
        np.less_equal(magnitude, self.hi, out=inside)
        np.logical_and(above, inside, out=inside)
        where = np.flatnonzero(inside)  # + take: ~2x faster than magnitude[inside]
        self._values.append(magnitude.take(where))
        self._positions.append(where + start)

    def result(self, k: int) -> TopK | None:
        """The exact top-``k``, or ``None`` when the band missed the threshold (select all instead)."""
        values = np.concatenate(self._values) if self._values else np.empty(0, np.float32)
        need = k - self.above_hi  # entries still to take from the band
        if not 0 < need <= values.size:
            return None  # the sample missed (rare): fall back to a full selection
        threshold = kth_largest(values, need)
        above = self.above_hi + int(np.count_nonzero(values > threshold))
        equal_mask = values == threshold
        tied = np.concatenate(self._positions)[equal_mask][: k - above]  # ascending positions
        return TopK(k, threshold, k - above, int(np.count_nonzero(equal_mask)), tied)


def select_all(magnitude: np.ndarray, k: int) -> TopK:
    """The exact top-``k`` of a whole flat float32 magnitude array (``0 < k < size``)."""
    threshold = kth_largest(magnitude, k)
    above = int(np.count_nonzero(magnitude > threshold))
    equal_mask = magnitude == threshold
    return TopK(k, threshold, k - above, int(np.count_nonzero(equal_mask)), np.flatnonzero(equal_mask)[: k - above])


def kth_largest(values: np.ndarray, k: int) -> float:
    """The k-th largest entry of a flat float32 array, by selection (introselect)."""
    n = values.size
    return float(np.partition(values, n - k)[n - k])
