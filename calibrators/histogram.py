"""A streaming, mergeable histogram of signed values, and the base of the histogram calibrators.

Grid. 8192 bins cover [-E, E) where E = 2**exponent is the smallest power of two strictly above
every |x| seen (and at least 2**-100). Bins are sign-magnitude: with width w = E/4096, a value x
lands in magnitude bin k = floor(|x|/w), stored at index 4096 + k when x >= +0 (bin [kw, (k+1)w))
and at 4095 - k when x < 0 or x is -0.0 (bin (-(k+1)w, -kw]). So the array is in value order, and
the |x| histogram (`folded_abs`) is exactly the sum of the two halves: no value sits on the wrong
side of an edge after folding.

Why the result cannot depend on batching or order: w is a power of two, so |x|/w is computed
exactly (one multiply by a power of two) and each value's bin depends only on x and E. When a batch
needs a larger E, E doubles (as often as needed) and each pair of magnitude bins merges into one:
the grid at 2E is the grid at E with every second edge removed, so the counts are exactly those a
pass at 2E would have produced. The final E depends only on the largest |x| overall. `merge`
brings both histograms to the larger E the same way and adds the counts, so it is exact too. Exact
min and max ride along.

Resolution. max|x| always lies in the upper half of [0, E), so between 2049 and 4096 of the 4096
|x| bins lie at or below max|x|, whatever the data's scale: enough to resample to TensorRT's 2048
bins over [0, max|x|] without inventing resolution (`resampled_abs`). State: 64 KiB
of int64 counts plus four numbers, independent of how many batches were fed; without the compiled
kernels, in memory also up to 32768 values waiting to be binned together (pickled states have them
binned).
"""

from __future__ import annotations

import functools
import math

import numpy as np

from . import kernels
from .base import NonFiniteValuesError, Range, as_float_array, require_same_kind
from .kernels import NUM_BINS, bin_strided, observe

_HALF = NUM_BINS // 2
_HALF_LOG2 = _HALF.bit_length() - 1
MIN_EXPONENT = -100  # values below 2**-112 share bin 0; they are zero for any int8 grid
# By default histogram calibrators bin every value; the calibration stage sets a limit
# (QuantConfig.histogram_values_per_sample) to keep calibration about as fast as inference.
DEFAULT_VALUES_PER_UPDATE: int | None = None
# Without the compiled kernels, values wait until this many have arrived and are binned together:
# numpy binning has a fixed cost per call (two 8192-bin arrays) that dominated updates with a few
# thousand values, and since a value's bin depends only on the value and the final grid, deferring
# changes no count. The compiled kernel bins each batch where it lies, with no copy.
_PENDING_VALUES = 1 << 15


@functools.lru_cache(maxsize=4096)  # the same few tensor sizes come back on every sample
def subsample_stride(size: int, limit: int | None) -> int:
    """Stride that keeps at most `limit` of `size` values: 1 when all fit, else the smallest prime
    p >= 7 that suffices.

    Binning costs more than running the layer that produced the tensor, so large tensors are
    thinned, deterministically. A prime stride other than 2, 3 and 5 never lines up with image
    rows or channel blocks (their sizes are products of those), so the kept values spread over all
    rows, columns and channels instead of repeating the same few columns.
    """
    if limit is None or size <= limit:
        return 1
    stride = max(-(-size // limit), 7)
    while any(stride % p == 0 for p in range(2, math.isqrt(stride) + 1)):
        stride += 1
    return stride


def _coarsen(counts: np.ndarray, doublings: int) -> np.ndarray:
    """`counts` re-expressed on the grid with E multiplied by 2**doublings (exact)."""
    if doublings <= 0:
        return counts.copy()
    factor = 1 << min(doublings, _HALF_LOG2)  # beyond 4096 every magnitude collapses into bin 0
    by_magnitude = np.stack([counts[_HALF - 1::-1], counts[_HALF:]])  # rows: negative, positive
    merged = by_magnitude.reshape(2, _HALF // factor, factor).sum(axis=2)
    out = np.zeros_like(counts)
    kept = _HALF // factor
    out[_HALF:_HALF + kept] = merged[1]
    out[_HALF - kept:_HALF] = merged[0][::-1]
    return out


def _group_factor(first: int, last: int, max_bins: int | None) -> int:
    """Smallest power-of-two group size g with bins first..last spanning <= max_bins groups."""
    group = 1
    while max_bins is not None and last // group - first // group + 1 > max_bins:
        group *= 2
    return group


class SignedHistogram:
    """Streaming histogram of signed values (see the module docstring for the grid).

    `update` raises ValueError("non-finite values") on NaN/inf before changing any state.
    """

    def __init__(self, values_per_update: int | None = None) -> None:
        if values_per_update is not None and values_per_update < 1:
            raise ValueError(f"values_per_update must be >= 1 or None, got {values_per_update}")
        self.values_per_update = values_per_update
        self._counts = np.zeros(NUM_BINS, np.int64)
        self._pending: list[np.ndarray] = []
        self._pending_size = 0
        self.exponent = MIN_EXPONENT
        self.count = 0
        self.min = math.inf
        self.max = -math.inf

    @property
    def counts(self) -> np.ndarray:
        """The 8192 bin counts on the current grid, every value fed so far included."""
        self._bin_pending()
        return self._counts

    def __getstate__(self) -> dict:
        self._bin_pending()
        return self.__dict__.copy()

    @property
    def bin_width(self) -> float:
        return math.ldexp(1.0, self.exponent - _HALF_LOG2)

    @property
    def abs_max(self) -> float:
        return max(-self.min, self.max, 0.0) if self.count else 0.0

    def update(self, values: np.ndarray) -> None:
        flat = as_float_array(values).reshape(-1)
        if flat.size == 0:
            return
        stride = 1
        with_extremes = self.values_per_update is not None and flat.size > self.values_per_update
        if with_extremes:
            # The extremes always count, so the histogram's span agrees with the exact min and max.
            stride = subsample_stride(flat.size, self.values_per_update - 2)
        low, high, binned = observe(flat, stride, self._scale(), with_extremes, self._counts)
        counted = -(-flat.size // stride) + (2 if with_extremes else 0)
        if binned:  # the usual case: finite, on the current grid, already counted
            self.count += counted
            if low < self.min:
                self.min = low
            if high > self.max:
                self.max = high
            return
        if not (math.isfinite(low) and math.isfinite(high)):  # NaN/inf show up in one of these
            raise NonFiniteValuesError()
        abs_max = max(-low, high)
        if abs_max > 0:
            self._grow_to(math.frexp(abs_max)[1])  # abs_max < 2**e, the smallest such power
        self.count += counted
        self.min = min(self.min, low)
        self.max = max(self.max, high)
        also = flat.dtype.type([low, high]) if with_extremes else None
        if kernels.COMPILED:
            self._bin(flat, stride)
            if also is not None:
                self._bin(also)
            return
        if also is not None:
            flat = np.concatenate([flat[::stride], also])
        if flat.size >= _PENDING_VALUES:
            self._bin_pending()
            self._bin(flat)
            return
        # A view of the caller's array (often ONNX Runtime's output) is copied: it must not be kept alive.
        self._pending.append(flat if flat.flags.owndata else flat.copy())
        self._pending_size += flat.size
        if self._pending_size >= _PENDING_VALUES:
            self._bin_pending()

    def _scale(self) -> float:
        return math.ldexp(1.0, _HALF_LOG2 - self.exponent)  # 1 / bin width

    def _bin(self, values: np.ndarray, stride: int = 1) -> None:
        bin_strided(values, stride, self._scale(), self._counts)

    def _bin_pending(self) -> None:
        """Bin the waiting values on the current grid (each is below 2**exponent: the grid only grows)."""
        if not self._pending:
            return
        by_dtype: dict[np.dtype, list[np.ndarray]] = {}
        for values in self._pending:
            by_dtype.setdefault(values.dtype, []).append(values)
        for arrays in by_dtype.values():
            self._bin(np.concatenate(arrays) if len(arrays) > 1 else arrays[0])
        self._pending.clear()
        self._pending_size = 0

    def merge(self, other: "SignedHistogram") -> None:
        if other.count == 0:
            return
        self._bin_pending()
        self._grow_to(other.exponent)
        self._counts += _coarsen(other.counts, self.exponent - other.exponent)
        self.count += other.count
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    def _grow_to(self, exponent: int) -> None:
        exponent = max(exponent, MIN_EXPONENT)
        if exponent > self.exponent:
            self._counts = _coarsen(self._counts, exponent - self.exponent)  # waiting values are binned later, on the new grid
            self.exponent = exponent

    # --- Views ----------------------------------------------------------------------------------

    def folded_abs(self) -> tuple[np.ndarray, float]:
        """Exact |x| histogram: 4096 counts of bins [k*w, (k+1)*w) over [0, E), and w."""
        return self.counts[_HALF:] + self.counts[_HALF - 1::-1], self.bin_width

    def abs_bins(self, max_bins: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact |x| histogram trimmed to its non-empty span, as (counts, edges).

        Bins are groups of g grid bins (g the smallest power of two giving <= max_bins bins), so
        their counts are exact; the last edge is clamped to max|x| (that bin may be narrower, or
        of zero width when max|x| sits exactly on an edge: then it holds only values == max|x|).
        """
        folded, width = self.folded_abs()
        nonzero = np.flatnonzero(folded)
        group = _group_factor(nonzero[0], nonzero[-1], max_bins)
        counts = folded.reshape(-1, group).sum(axis=1)
        first, last = nonzero[0] // group, nonzero[-1] // group
        edges = np.arange(first, last + 2, dtype=np.float64) * (group * width)
        edges[-1] = self.abs_max
        return counts[first:last + 1], edges

    def signed_bins(self, max_bins: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Exact signed histogram trimmed to [min, max], as (counts, edges); grouping as `abs_bins`.

        Groups never straddle 0 (4096 is a multiple of every g), so they stay exact.
        """
        nonzero = np.flatnonzero(self.counts)
        group = _group_factor(nonzero[0], nonzero[-1], max_bins)
        counts = self.counts.reshape(-1, group).sum(axis=1)
        first, last = nonzero[0] // group, nonzero[-1] // group
        edges = (np.arange(first, last + 2, dtype=np.float64) * group - _HALF) * self.bin_width
        edges[0], edges[-1] = self.min, self.max
        return counts[first:last + 1], edges

    def resampled_abs(self, num_bins: int) -> tuple[np.ndarray, float]:
        """|x| histogram of `num_bins` equal bins over [0, max|x|] (float counts), and their width.

        Stated approximation: values are taken as uniformly spread inside each grid bin (the last
        one ending at max|x|), and each grid bin's count is split over the new bins it overlaps in
        proportion to overlap. Grid bins are never wider than the new bins (the data reaches the
        upper half of [0, E) and there are 4096 magnitude bins), so every value lands within one
        new bin of where a direct histogram over [0, max|x|] would put it; totals are exact.
        """
        folded, width = self.folded_abs()
        abs_max = self.abs_max
        last = int(np.flatnonzero(folded)[-1])
        knots = np.arange(last + 2, dtype=np.float64) * width
        knots[-1] = abs_max  # nothing lies above max|x|
        cumulative = np.concatenate([[0.0], np.cumsum(folded[:last + 1], dtype=np.float64)])
        new_edges = np.arange(num_bins + 1, dtype=np.float64) * (abs_max / num_bins)
        new_cumulative = np.interp(new_edges, knots, cumulative)
        new_cumulative[-1] = cumulative[-1]  # a point mass exactly at max|x| belongs to the last bin
        return np.diff(new_cumulative), abs_max / num_bins


def quantile(counts: np.ndarray, edges: np.ndarray, fraction: float) -> float:
    """The `fraction` quantile with numpy's default ("linear") definition, read off a histogram.

    numpy interpolates between the order statistics of rank floor(p) and ceil(p), p = fraction *
    (n - 1). Here each order statistic is placed inside the bin that holds it (the c values of a
    bin evenly at (i + 0.5)/c of its width; the overall first and last at the outer edges, which
    the histograms clamp to the exact min and max), so each is off by less than its bin's width,
    and so is the interpolated quantile.
    """
    cumulative = np.cumsum(counts)
    total = int(cumulative[-1])
    position = fraction * (total - 1)
    rank = min(int(math.floor(position)), total - 1)
    weight = position - rank
    low = _order_statistic(cumulative, edges, rank, total)
    if weight == 0.0:
        return low
    return float(low + weight * (_order_statistic(cumulative, edges, min(rank + 1, total - 1), total) - low))


def _order_statistic(cumulative: np.ndarray, edges: np.ndarray, rank: int, total: int) -> float:
    if rank == 0:
        return float(edges[0])
    if rank == total - 1:
        return float(edges[-1])
    j = int(np.searchsorted(cumulative, rank, side="right"))  # cumulative[j-1] <= rank < cumulative[j]
    before = int(cumulative[j - 1]) if j else 0
    inside = (rank - before + 0.5) / (int(cumulative[j]) - before)
    return float(edges[j] + inside * (edges[j + 1] - edges[j]))


class HistogramCalibrator:
    """Shared plumbing of the histogram calibrators: one `SignedHistogram`, per tensor only.

    Subclasses implement `_range_from_histogram`, called only when data was seen and max|x| > 0
    (an all-zero tensor gives Range(0.0, 0.0)). Merge requires the same class and settings.
    """

    name = "histogram"
    updates_commute = True  # integer counts on a grid that depends only on the final max|x|

    def __init__(self, values_per_update: int | None = DEFAULT_VALUES_PER_UPDATE) -> None:
        self.histogram = SignedHistogram(values_per_update)

    def settings(self) -> dict:
        return {"values_per_update": self.histogram.values_per_update}

    def update(self, values: np.ndarray) -> None:
        self.histogram.update(values)

    def merge(self, other: "HistogramCalibrator") -> None:
        require_same_kind(self, other)
        self.histogram.merge(other.histogram)

    def compute_range(self) -> Range:
        if self.histogram.count == 0:
            raise ValueError("no data")
        if self.histogram.abs_max == 0.0:
            return Range(0.0, 0.0)
        return self._range_from_histogram(self.histogram)

    def _range_from_histogram(self, histogram: SignedHistogram) -> Range:
        raise NotImplementedError
