"""Minimum-MSE calibration: the clipping range that minimises expected int8 fake-quantization error."""

from __future__ import annotations

from typing import Callable

import numpy as np

from . import kernels
from .base import Range, symmetric_range
from .histogram import DEFAULT_VALUES_PER_UPDATE, HistogramCalibrator, SignedHistogram

_BLOCK = 16  # candidates per block: 16 x <=2049 float64 temporaries (256 KiB) stay in L2 cache
# Coarse-to-fine search: every _COARSE_STRIDE-th candidate first, then every candidate within one
# stride of the _REFINED best coarse ones. The error curve is smooth on the scale of 16 of 2048
# bins (0.8% of the range), so this finds the exhaustive minimum at an eighth of the cost, which
# matters because the search runs once per tensor and was as slow as a pass over 64 samples.
_COARSE_STRIDE = 16
_REFINED = 3


def _add_rounding_errors(totals: np.ndarray, edges: np.ndarray, density: np.ndarray, lows: np.ndarray,
                         highs: np.ndarray, step_sizes: np.ndarray, steps: int) -> None:
    """totals[c] += integral over the grid of candidate c of density(x) * (rounding error at x)^2.

    With y = (x - low)/step clipped to [0, steps], step^3 * G(y) is the integral of the squared
    rounding error from `low` to x, G(y) = k/12 + u^3/3 with k = round(y), u = y - k (each whole
    rounding cell contributes 1/12); G is constant beyond the grid, so bins outside add exactly 0.
    Per bin the integral is density * step^3 * (G(right edge) - G(left edge)); summed by parts it is
    step^3 * (G at the edges) @ (density[j-1] - density[j]), which needs no differenced matrix.
    Candidates go in blocks sorted by range, each block only over the edges its largest range
    reaches (about half the candidates x edges matrix), with temporaries updated in place and
    small enough to stay in cache (this loop is most of the search's time).
    """
    order = np.argsort(highs - lows, kind="stable")
    symmetric = not np.any(lows) and edges[0] >= 0.0
    for start in range(0, len(order), _BLOCK):
        rows = order[start:start + _BLOCK]
        reach_low = int(np.searchsorted(edges, lows[rows].min(), side="right")) - 1
        reach_high = int(np.searchsorted(edges, highs[rows].max(), side="left"))
        first, last = max(reach_low, 0), min(reach_high, len(edges) - 1)
        window = edges[first:last + 1]
        inverse_step = (1.0 / step_sizes[rows])[:, None]
        if symmetric:  # low = 0 and every edge >= 0: y >= 0 already
            y = np.multiply(window[None, :], inverse_step)
            np.minimum(y, steps, out=y)
        else:
            y = np.subtract(window[None, :], lows[rows, None])
            y *= inverse_step
            np.clip(y, 0.0, steps, out=y)
        k = np.add(y, 0.5)
        np.floor(k, out=k)
        y -= k  # u
        cube = np.multiply(y, y)
        cube *= y
        window_density = density[first:last]
        by_parts = np.zeros(len(window))
        by_parts[:-1] -= window_density
        by_parts[1:] += window_density
        totals[rows] += step_sizes[rows] ** 3 * ((k @ by_parts) * (1.0 / 12.0) + (cube @ by_parts) * (1.0 / 3.0))


def _error(x: np.ndarray, low: np.ndarray, step: np.ndarray, steps: int) -> np.ndarray:
    return x - (low + np.clip(np.round((x - low) / step), 0, steps) * step)


def expected_squared_errors(counts: np.ndarray, edges: np.ndarray, lows: np.ndarray,
                            highs: np.ndarray, steps: int) -> np.ndarray:
    """Total expected squared fake-quantization error of a histogram, for each candidate grid
    (`SquaredErrorModel`, built and used once)."""
    return SquaredErrorModel(counts, edges)(lows, highs, steps)


class SquaredErrorModel:
    """Expected squared fake-quantization error of one histogram, for any candidate grids.

    Error model: values are uniformly spread inside each bin [edges[j], edges[j+1]] (a zero-width
    bin is a point mass), and each is rounded to the nearest point of the grid lows[c] + k*step
    (k = 0..steps, step = (highs[c] - lows[c]) / steps); values outside [lows[c], highs[c]] clip
    to the nearest end. The expectation over each bin is exact (closed form), so it is right both
    when bins are much finer than the grid step (uniform noise step^2/12) and when they are not
    (no aliasing, unlike evaluating bin centres).

    Cost: with the compiled kernels one call (`kernels.squared_errors`, without the GIL) does it
    all. The numpy code here is the reference: per-bin moments and their prefix/suffix sums,
    computed once per model so a coarse-to-fine search pays for them once; per call, clipping
    error O(candidates + bins) and rounding error from a candidates x edges matrix
    (`_add_rounding_errors`).
    """

    def __init__(self, counts: np.ndarray, edges: np.ndarray) -> None:
        self.counts = np.ascontiguousarray(counts, np.float64)
        self.edges = np.ascontiguousarray(edges, np.float64)
        self._sums: tuple | None = None

    def __call__(self, lows: np.ndarray, highs: np.ndarray, steps: int) -> np.ndarray:
        lows, highs = np.asarray(lows, np.float64), np.asarray(highs, np.float64)
        if kernels.COMPILED:
            return kernels.squared_errors(self.edges, self.counts, lows, highs, steps)
        if self._sums is None:
            self._sums = self._moment_sums()
        lower, upper, density, suffix, prefix, points = self._sums
        above = np.searchsorted(lower, highs, side="left")  # first bin with a >= T
        below = np.searchsorted(upper, lows, side="right")  # bins with b <= low
        totals = (suffix[2, above] - highs * suffix[1, above] + highs * highs * suffix[0, above]
                  + prefix[2, below] - lows * prefix[1, below] + lows * lows * prefix[0, below])
        cut_high = np.maximum(above - 1, 0)
        totals += np.where((above > 0) & (upper[cut_high] > highs),
                           density[cut_high] * np.maximum(upper[cut_high] - highs, 0.0) ** 3 / 3.0, 0.0)
        cut_low = np.minimum(below, len(lower) - 1)
        totals += np.where((below < len(lower)) & (lower[cut_low] < lows),
                           density[cut_low] * np.maximum(lows - lower[cut_low], 0.0) ** 3 / 3.0, 0.0)
        # Rounding inside the grid; G is constant beyond the grid, so bins outside add exactly 0.
        step_sizes = (highs - lows) / steps
        _add_rounding_errors(totals, self.edges, density, lows, highs, step_sizes, steps)
        if points.size:
            error = _error(self.edges[None, points], lows[:, None], step_sizes[:, None], steps)
            totals += (error * error) @ self.counts[points]
        return totals

    def _moment_sums(self) -> tuple:
        """(lower edges, upper edges, density, suffix sums, prefix sums, point-mass bins)."""
        lower, upper = self.edges[:-1], self.edges[1:]
        widths = upper - lower
        spread = widths > 0
        density = np.where(spread, self.counts / np.where(spread, widths, 1.0), 0.0)
        spread_counts = np.where(spread, self.counts, 0.0)
        # Clipping: a spread bin wholly beyond T contributes count * E[(x - T)^2]
        #   = c*(a^2 + ab + b^2)/3 - T*c*(a + b) + T^2*c; a bin cut by T contributes density*(b - T)^3/3.
        moments = np.stack([spread_counts, spread_counts * (lower + upper),
                            spread_counts * (lower * lower + lower * upper + upper * upper) / 3.0])
        suffix = np.concatenate([np.cumsum(moments[:, ::-1], axis=1)[:, ::-1], np.zeros((3, 1))], axis=1)
        prefix = np.concatenate([np.zeros((3, 1)), np.cumsum(moments, axis=1)], axis=1)
        points = np.flatnonzero(~spread & (self.counts > 0))
        return lower, upper, density, suffix, prefix, points


def coarse_to_fine_argmin(errors_of: Callable[[np.ndarray], np.ndarray], count: int,
                          stride: int = _COARSE_STRIDE, refined: int = _REFINED) -> int:
    """Index in range(count) of the smallest errors_of(indices) (ties: the smallest index), found
    from every `stride`-th index (and the last) and then all indices within one stride of the
    `refined` best of those. Exhaustive when count <= stride * refined."""
    if count <= stride * refined:
        return int(np.argmin(errors_of(np.arange(count))))
    coarse = np.unique(np.append(np.arange(0, count, stride), count - 1))
    best_coarse = coarse[np.argsort(errors_of(coarse), kind="stable")[:refined]]
    fine = np.unique(np.concatenate([np.arange(max(c - stride + 1, 0), min(c + stride, count)) for c in best_coarse]))
    return int(fine[np.argmin(errors_of(fine))])


class MSECalibrator(HistogramCalibrator):
    """Range minimising the expected squared error of int8 fake quantization. Per tensor only.

    symmetric=True (TensorRT, and symmetric int8 in ONNX Runtime): grid k*T/127, k = -127..127,
    i.e. 2**(num_bits-1) - 1 steps on |x|. Candidates T: every edge of the exact |x| histogram
    (grouped to <= `num_bins` = 2048 bins) from `start_bin`/`num_bins` of max|x| up to max|x|
    itself, i.e. pytorch-quantization's grid (start bin 128, stride 1). Range: [-T, T] clipped to
    the observed [min, max].

    symmetric=False (uint8 with zero point): grid of 2**num_bits - 1 steps over
    [a*min(min, 0), a*max(max, 0)] for a = k/num_bins, k = start_bin..num_bins, so both ends shrink
    by the same fraction and 0 stays inside; the zero point's rounding to an integer is ignored
    (it moves the grid by under half a step). Range: that interval clipped to [min, max].

    Error model (see `SquaredErrorModel`): values uniform inside each exact histogram bin,
    rounding error integrated in closed form per bin, clipping error (|x| - T)^2 beyond T. Ties go
    to the smallest T, as pytorch-quantization's argmin does. Search: `coarse_to_fine_argmin`.
    """

    name = "mse"

    @property
    def search_releases_gil(self) -> bool:
        """True when `compute_range` runs in the compiled kernels, without the GIL."""
        return kernels.COMPILED

    def __init__(self, symmetric: bool = True, num_bits: int = 8, num_bins: int = 2048,
                 start_bin: int = 128,
                 values_per_update: int | None = DEFAULT_VALUES_PER_UPDATE) -> None:
        super().__init__(values_per_update)
        if not 2 <= num_bits <= 16:
            raise ValueError(f"num_bits must be in [2, 16], got {num_bits}")
        if not 0 < start_bin <= num_bins:
            raise ValueError(f"need 0 < start_bin <= num_bins, got {start_bin}, {num_bins}")
        self.symmetric = bool(symmetric)
        self.num_bits = int(num_bits)
        self.num_bins = int(num_bins)
        self.start_bin = int(start_bin)

    def settings(self) -> dict:
        return {**super().settings(), "symmetric": self.symmetric, "num_bits": self.num_bits, "num_bins": self.num_bins,
                "start_bin": self.start_bin}

    def _range_from_histogram(self, histogram: SignedHistogram) -> Range:
        if self.symmetric:
            counts, edges = histogram.abs_bins(max_bins=self.num_bins)
            abs_max = histogram.abs_max
            thresholds = edges[edges >= abs_max * (self.start_bin / self.num_bins)]
            steps = 2 ** (self.num_bits - 1) - 1
            errors = SquaredErrorModel(counts, edges)
            best = coarse_to_fine_argmin(lambda pick: errors(np.zeros(len(pick)), thresholds[pick], steps),
                                         len(thresholds))
            return symmetric_range(float(thresholds[best]), histogram.min, histogram.max)
        counts, edges = histogram.signed_bins(max_bins=self.num_bins)
        fractions = np.arange(self.start_bin, self.num_bins + 1) / self.num_bins
        lows = fractions * min(histogram.min, 0.0)
        highs = fractions * max(histogram.max, 0.0)
        steps = 2 ** self.num_bits - 1
        errors = SquaredErrorModel(counts, edges)
        best = coarse_to_fine_argmin(lambda pick: errors(lows[pick], highs[pick], steps), len(fractions))
        return Range(float(max(lows[best], histogram.min)), float(min(highs[best], histogram.max)))
