"""Entropy (KL-divergence) calibration: TensorRT's EntropyCalibration2 algorithm."""

from __future__ import annotations

import functools

import numpy as np

from . import kernels
from .base import Range, symmetric_range
from .histogram import DEFAULT_VALUES_PER_UPDATE, HistogramCalibrator, SignedHistogram

_BLOCK = 64  # candidates per block when summing their levels: 64 x 128 values, 64 KiB


@functools.lru_cache(maxsize=8)
def _level_spans(start_bin: int, num_bins: int, num_quantized_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The distinct bin spans the levels of all candidates cover, and which span each level is.

    Level l of candidate i = start_bin .. num_bins covers bins [ceil(l*i/levels), ceil((l+1)*i/levels)).
    Those 1921 x 128 levels (TensorRT's grid) are only 18,748 distinct spans, each one bin
    start and a width of at most ceil(i/levels), so a level's term is computed once per span and
    gathered. Returns (first bins, end bins, span index of each level as a candidates x levels
    array, uint16 when the spans allow). The same for every tensor, so computed once (read-only:
    shared between threads).
    """
    candidates = np.arange(start_bin, num_bins + 1)
    levels = np.arange(num_quantized_bins + 1)
    bounds = -((-levels[None, :] * candidates[:, None]) // num_quantized_bins)
    widths = bounds[:, 1:] - bounds[:, :-1]
    key_stride = int(widths.max()) + 1
    keys = bounds[:, :-1] * key_stride + widths  # (first bin, width) -> one small integer
    present = np.zeros((num_bins + 1) * key_stride, bool)  # direct addressing: faster than np.unique
    present[keys] = True
    distinct = np.flatnonzero(present)
    first_bins = distinct // key_stride
    span_of_level = (np.cumsum(present) - 1)[keys]
    if len(distinct) <= np.iinfo(np.uint16).max:  # TensorRT's grid: 18,748; the gathers then stay in L2 cache
        span_of_level = span_of_level.astype(np.uint16)
    spans = (first_bins, first_bins + distinct % key_stride, span_of_level)
    for array in spans:
        array.flags.writeable = False
    return spans


def entropy_divergences(counts: np.ndarray, num_quantized_bins: int = 128,
                        start_bin: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """KL(P || Q) of every candidate i = start_bin .. len(counts) (inclusive), vectorised.

    For candidate i: P = counts[:i] with the outliers counts[i:] added to P[i-1]; Q = counts[:i]
    split into `num_quantized_bins` levels (bin j goes to level floor(j * levels / i), as
    pytorch-quantization's linspace/digitize does), each level's mass shared equally by its
    non-empty bins and 0 on empty ones; both normalised. counts[0] is replaced by counts[1] first
    (pytorch-quantization does this, so a ReLU spike at 0 does not dominate). KL is +inf when
    P > 0 where Q = 0 (counts[i-1] empty but outliers present), as scipy.stats.entropy gives.

    Instead of building P and Q per candidate (O(candidates x bins)), KL is expanded into sums that
    prefix sums give for all candidates at once (O(candidates x levels) additions, one log per
    distinct level span, `_level_spans`):
        KL(i) = sum_{j<i-1} p_j log p_j + P_{i-1} log P_{i-1} - sum_l m_l log(m_l / n_l)
                - o_i log(m_last / n_last) + log(sum_{j<i} p_j)
    with p the normalised counts, o_i the normalised outlier mass, m_l / n_l the mass / non-empty
    bin count of level l.
    Returns (candidates, divergences). With the compiled kernels the same sums run in C
    (`kernels.entropy_divergences`), which frees the GIL for the range searches of other tensors.
    """
    first_bins, end_bins, span_of_level = _level_spans(start_bin, len(counts), num_quantized_bins)
    if kernels.COMPILED and span_of_level.dtype == np.uint16:
        return (np.arange(start_bin, len(counts) + 1),
                kernels.entropy_divergences(counts, first_bins, end_bins, span_of_level, start_bin))
    bins = np.asarray(counts, np.float64).copy()
    bins[0] = bins[1]
    p = bins / bins.sum()
    n = len(p)
    candidates = np.arange(start_bin, n + 1)

    with np.errstate(divide="ignore", invalid="ignore"):
        mass_below = np.concatenate([[0.0], np.cumsum(p)])                 # sum p[:i]
        mass_from = np.concatenate([np.cumsum(p[::-1])[::-1], [0.0]])      # sum p[i:], exact tail
        nonempty_below = np.concatenate([[0], np.cumsum(p > 0)])
        plogp_below = np.concatenate([[0.0], np.cumsum(np.where(p > 0, p * np.log(p), 0.0))])

        span_mass = mass_below[end_bins] - mass_below[first_bins]
        span_log = np.log(span_mass / (nonempty_below[end_bins] - nonempty_below[first_bins]))
        span_term = span_log * span_mass  # m log(m / n) of one level
        span_term[span_mass <= 0] = 0.0
        level_term = np.empty(len(candidates))
        for start in range(0, len(candidates), _BLOCK):  # blocks: temporaries stay in cache
            level_term[start:start + _BLOCK] = span_term[span_of_level[start:start + _BLOCK]].sum(axis=1)
        last_level_log = span_log[span_of_level[:, -1]]  # log(m_last / n_last)

        outliers = mass_from[candidates]
        p_last = p[candidates - 1] + outliers
        q_last_log = np.where(p[candidates - 1] > 0, last_level_log, -np.inf)
        outlier_term = np.where(outliers > 0, outliers * q_last_log, 0.0)
        divergences = (plogp_below[candidates - 1] + np.where(p_last > 0, p_last * np.log(p_last), 0.0)
                       - level_term - outlier_term + np.log(mass_below[candidates]))
    divergences[~np.isfinite(divergences)] = np.inf  # nothing inside the candidate's range
    return candidates, divergences


class KLCalibrator(HistogramCalibrator):
    """TensorRT entropy calibration (IInt8EntropyCalibrator2's published algorithm). Per tensor.

    From the |x| histogram resampled to `num_bins` = 2048 equal bins over [0, max|x|] (TensorRT
    and pytorch-quantization both use 2048 |x| bins), every candidate clip point i = `start_bin`
    (128, pytorch-quantization's start_bin) .. 2048 with stride 1 is scored by KL(P || Q) between
    the clipped histogram P and its `num_quantized_bins` = 128-level version Q (int8: 127 levels +
    zero; see `entropy_divergences`). The threshold is T = (m + 0.5) * bin width at the minimising
    candidate m, as in NVIDIA's published algorithm (pytorch-quantization uses m * width; the
    difference is half a bin, max|x|/4096). Ties go to the LAST minimum, as pytorch-quantization
    does. The range is [-T, T] clipped to the observed [min, max] (ONNX Runtime's entropy
    calibrator clips the same way; TensorRT is symmetric anyway).

    The 2048-bin histogram is resampled from the exact 4096-bin |x| histogram (stated
    approximation in `SignedHistogram.resampled_abs`: each value lands within one bin of a direct
    2048-bin histogram); unlike ONNX Runtime's and ModelOpt's entropy calibrators, the result
    does not depend on batch size or order. Differences from ONNX Runtime's entropy calibrator
    (128 bins, smoothing eps=1e-4, candidates from half the bins): deliberate, to match TensorRT.
    """

    name = "kl"

    @property
    def search_releases_gil(self) -> bool:
        """True when `compute_range` runs in the compiled kernels, without the GIL."""
        return kernels.COMPILED

    def __init__(self, num_bins: int = 2048, num_quantized_bins: int = 128,
                 start_bin: int = 128,
                 values_per_update: int | None = DEFAULT_VALUES_PER_UPDATE) -> None:
        super().__init__(values_per_update)
        if not 0 < num_quantized_bins <= start_bin <= num_bins:
            raise ValueError("need 0 < num_quantized_bins <= start_bin <= num_bins, got "
                             f"{num_quantized_bins}, {start_bin}, {num_bins}")
        self.num_bins = int(num_bins)
        self.num_quantized_bins = int(num_quantized_bins)
        self.start_bin = int(start_bin)

    def settings(self) -> dict:
        return {**super().settings(), "num_bins": self.num_bins, "num_quantized_bins": self.num_quantized_bins,
                "start_bin": self.start_bin}

    def threshold(self) -> float:
        """The clip threshold T on |x| (before clipping the range to [min, max])."""
        self.compute_range()  # ValueError("no data") before any update
        if self.histogram.abs_max == 0.0:
            return 0.0
        counts, width = self.histogram.resampled_abs(self.num_bins)
        return self._threshold(counts, width)

    def _threshold(self, counts: np.ndarray, width: float) -> float:
        candidates, divergences = entropy_divergences(counts, self.num_quantized_bins, self.start_bin)
        best = len(divergences) - 1 - int(np.argmin(divergences[::-1]))
        return (candidates[best] + 0.5) * width

    def _range_from_histogram(self, histogram: SignedHistogram) -> Range:
        counts, width = histogram.resampled_abs(self.num_bins)
        return symmetric_range(self._threshold(counts, width), histogram.min, histogram.max)
