"""The one interface every calibrator shares.

A calibrator watches the values of one tensor over calibration batches (`update`), can absorb the
state of another calibrator of the same kind that watched other batches (`merge`, so calibration can
be split over processes and combined exactly), and finally answers one question: which range should
this tensor be quantized to (`compute_range`).

Calibrators never see the model or ONNX Runtime; the calibration stage feeds them arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Range:
    """A closed interval [low, high] of real values to map onto the integer grid.

    `low`/`high` are floats for a per-tensor range, or 1-D arrays (one entry per channel) for a
    per-channel range. A range always contains 0 after `Range.including_zero()`, which the
    quantization-parameter code applies, because zero must be exactly representable (padding, ReLU).
    """

    low: float | np.ndarray
    high: float | np.ndarray

    def including_zero(self) -> "Range":
        return Range(np.minimum(self.low, 0.0), np.maximum(self.high, 0.0))

    @property
    def abs_max(self) -> float | np.ndarray:
        return np.maximum(np.abs(self.low), np.abs(self.high))


@runtime_checkable
class Calibrator(Protocol):
    """Streaming range estimator for one tensor.

    Guarantees of every implementation:
    - memory does not grow with the number of batches fed;
    - `a.merge(b)` after feeding a and b disjoint batches gives the same state as one calibrator
      fed all batches (exactly for min-max; histogram calibrators re-bin onto a shared grid);
    - `compute_range()` returns finite bounds; an all-zero or constant tensor gives a valid range.

    Optional: `updates_commute = True` (attribute or property) promises that the state after a set
    of batches is the same in any order, so the calibration stage may feed batches as samples
    finish, from whichever thread ran them (one update at a time per calibrator). Without it the
    stage feeds batches in sample order from one thread. Likewise `search_releases_gil = True`
    says `compute_range` spends its time outside the GIL, so the stage runs several at once.
    """

    name: str

    def update(self, values: np.ndarray) -> None: ...

    def merge(self, other: "Calibrator") -> None: ...

    def compute_range(self) -> Range: ...


# --- Helpers shared by the implementations (not part of the protocol) ---------------------------


class NonFiniteValuesError(ValueError):
    """Raised by `update` when a batch holds NaN or +-inf; the state is left unchanged, so the
    calibration stage can decide (error naming the tensor for NaN, drop infinities) and retry."""

    def __init__(self) -> None:
        super().__init__("non-finite values")


def as_float_array(values: np.ndarray) -> np.ndarray:
    """`values` as a float32/float64 array without copying when it already is one.

    float16 widens to float32 and integers/bools to float64 (both exact), so every calibrator sees
    the same numbers whatever dtype the tensor had.
    """
    array = np.asarray(values)
    if array.dtype == np.float32 or array.dtype == np.float64:
        return array
    if array.dtype == np.float16:
        return array.astype(np.float32)
    if array.dtype.kind in "biuf":
        return array.astype(np.float64)
    raise TypeError(f"calibrator values must be real numbers, got dtype {array.dtype}")


def require_same_kind(calibrator: object, other: object) -> None:
    """Raise TypeError unless `other` is the same calibrator class with the same settings."""
    if type(other) is not type(calibrator) or other.settings() != calibrator.settings():  # type: ignore[attr-defined]
        raise TypeError(f"cannot merge {describe(other)} into {describe(calibrator)}")


def describe(calibrator: object) -> str:
    settings = getattr(calibrator, "settings", None)
    options = ", ".join(f"{k}={v!r}" for k, v in settings().items()) if callable(settings) else "?"
    return f"{type(calibrator).__name__}({options})"


def symmetric_range(threshold: float, low: float, high: float) -> Range:
    """[-threshold, threshold] clipped to the observed [low, high], as ONNX Runtime does.

    Clipping never widens the range past the data (a ReLU output keeps low=0). When every value
    lies beyond the threshold on one side (a constant tensor whose estimated threshold fell a hair
    below the constant), the range collapses onto the data's end nearest zero instead of inverting,
    so a constant tensor keeps a range that contains its value.
    """
    clipped_low, clipped_high = float(max(-threshold, low)), float(min(threshold, high))
    if clipped_low > clipped_high:
        nearest = float(low) if low > 0 else float(high)
        return Range(nearest, nearest)
    return Range(clipped_low, clipped_high)
