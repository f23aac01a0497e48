"""Calibrators: streaming range estimators, one module per method, plus the shared histogram.

Every calibrator has `name`, `update(values)`, `merge(other)`, `compute_range() -> Range`, and
pickles (states are merged across processes). `make_calibrator("kl")` builds one by name.
"""

from __future__ import annotations

from .base import Calibrator, Range
from .histogram import SignedHistogram
from .kl import KLCalibrator
from .minmax import ChannelAbsMaxCalibrator, MinMaxCalibrator
from .mse import MSECalibrator
from .percentile import PercentileCalibrator
from .rows import RowSample, RowSampleCalibrator

CALIBRATORS: dict[str, type] = {
    "minmax": MinMaxCalibrator,
    "percentile": PercentileCalibrator,
    "mse": MSECalibrator,
    "kl": KLCalibrator,
    "entropy": KLCalibrator,  # TensorRT's and ONNX Runtime's name for the same method
}


def make_calibrator(name: str, **options) -> Calibrator:
    """A new calibrator of method `name` (see CALIBRATORS), built with `options`."""
    try:
        cls = CALIBRATORS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown calibrator {name!r}; valid names: {', '.join(CALIBRATORS)}") from None
    return cls(**options)


__all__ = [
    "CALIBRATORS", "Calibrator", "ChannelAbsMaxCalibrator", "KLCalibrator", "MSECalibrator",
    "MinMaxCalibrator", "PercentileCalibrator", "Range", "RowSample", "RowSampleCalibrator", "SignedHistogram", "make_calibrator",
]
