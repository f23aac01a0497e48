"""Percentile calibration over the streaming histogram."""

from __future__ import annotations

from .base import Range, symmetric_range
from .histogram import DEFAULT_VALUES_PER_UPDATE, HistogramCalibrator, SignedHistogram, quantile


class PercentileCalibrator(HistogramCalibrator):
    """Clip the tails: range from the `percentile`-th percentile of the data. Per tensor only.

    symmetric=True (the default, as in ONNX Runtime's calibrator factory): t = percentile of |x|,
    range [-t, t] clipped to the observed [min, max] as ONNX Runtime does. symmetric=False: range
    [(100 - percentile)-th percentile, percentile-th percentile] of x, i.e. each side cuts
    (100 - percentile)% (ONNX Runtime instead splits that share between the two sides).

    Percentiles follow numpy's default (linear) definition, read from the exact fine histogram
    (`histogram.quantile`): within one bin width (max|x|/2048 at most, usually half that) of
    `np.percentile` of the raw values. Defaults: 99.999 as ONNX Runtime and Intel Neural Compressor
    (pytorch-quantization uses 99.99).
    """

    name = "percentile"

    def __init__(self, percentile: float = 99.999, symmetric: bool = True,
                 values_per_update: int | None = DEFAULT_VALUES_PER_UPDATE) -> None:
        super().__init__(values_per_update)
        low_bound = 0.0 if symmetric else 50.0
        if not low_bound < percentile <= 100.0:
            raise ValueError(f"percentile must be in ({low_bound:g}, 100], got {percentile}")
        self.percentile = float(percentile)
        self.symmetric = bool(symmetric)

    def settings(self) -> dict:
        return {**super().settings(), "percentile": self.percentile, "symmetric": self.symmetric}

    def _range_from_histogram(self, histogram: SignedHistogram) -> Range:
        fraction = self.percentile / 100.0
        if self.symmetric:
            counts, edges = histogram.abs_bins()
            return symmetric_range(quantile(counts, edges, fraction), histogram.min, histogram.max)
        counts, edges = histogram.signed_bins()
        return Range(quantile(counts, edges, 1.0 - fraction), quantile(counts, edges, fraction))
