"""Min-max calibrators: the observed extremes, per tensor or per channel.

`MinMaxCalibrator` is ONNX Runtime's default (`CalibrationMethod.MinMax`: per-tensor, no moving
average, averaging constant 0.01). `ChannelAbsMaxCalibrator` gives per-channel max|x| of an
activation, the statistic SmoothQuant balances against the weights' per-channel max|w|.
"""

from __future__ import annotations

import copy
import math

import numpy as np

from .base import NonFiniteValuesError, Range, as_float_array, require_same_kind
from .kernels import extremes


Bound = float | np.ndarray  # a float per tensor, a float64 array per channel


def _reduce_min_max(values: np.ndarray, axis: int | None) -> tuple[Bound, Bound] | None:
    """Batch (min, max): Python floats for axis None, else float64 arrays over `axis`; None for an
    empty batch. Raises NonFiniteValuesError on NaN/inf: they show up in min or max, so the
    reductions check every value."""
    if axis is None:
        if values.size == 0:
            return None
        low, high = extremes(values)
        if not (math.isfinite(low) and math.isfinite(high)):
            raise NonFiniteValuesError()
        return low, high
    if values.ndim == 0 or not -values.ndim <= axis < values.ndim:
        raise ValueError(f"channel axis {axis} is out of range for a tensor of rank {values.ndim}")
    if values.size == 0:
        return None
    channel_axis = axis % values.ndim
    others = tuple(i for i in range(values.ndim) if i != channel_axis)
    low = values.min(axis=others).astype(np.float64)
    high = values.max(axis=others).astype(np.float64)
    if not (np.isfinite(low).all() and np.isfinite(high).all()):
        raise NonFiniteValuesError()
    return low, high


def _lower(a: Bound, b: Bound) -> Bound:
    return min(a, b) if isinstance(a, float) else np.minimum(a, b)


def _higher(a: Bound, b: Bound) -> Bound:
    return max(a, b) if isinstance(a, float) else np.maximum(a, b)


def _as_range_bound(bound: Bound) -> Bound:
    return bound if isinstance(bound, float) else bound.copy()


class MinMaxCalibrator:
    """Range = [min, max] of everything seen (per tensor), or per channel along `axis`.

    Per channel, each channel's range reduces over all other axes, and every batch must have the
    same number of channels. `compute_range` returns float bounds per tensor, 1-D float64 arrays
    (one entry per channel) per channel.

    With `moving_average=True` each batch's extremes are blended in as
    ``m <- m + averaging_constant * (batch_m - m)`` (first batch initialises), like ONNX Runtime and
    torch's MovingAverageMinMaxObserver. That result depends on batching and order by design.
    `a.merge(b)` then means "a's batches followed by b's batches": exact up to float rounding,
    because the average is linear in its starting value (the state keeps b's first batch extremes
    to undo b's initialisation). Plain min-max merges exactly and in any order.
    """

    name = "minmax"

    def __init__(self, axis: int | None = None, moving_average: bool = False,
                 averaging_constant: float = 0.01) -> None:
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        self.axis = axis
        self.moving_average = bool(moving_average)
        self.averaging_constant = float(averaging_constant)
        self._low: Bound | None = None
        self._high: Bound | None = None
        self._first_low: Bound | None = None  # moving average only: the first batch's extremes
        self._first_high: Bound | None = None
        self._num_batches = 0

    def settings(self) -> dict:
        return {"axis": self.axis, "moving_average": self.moving_average,
                "averaging_constant": self.averaging_constant}

    @property
    def updates_commute(self) -> bool:
        return not self.moving_average

    def update(self, values: np.ndarray) -> None:
        extremes = _reduce_min_max(as_float_array(values), self.axis)
        if extremes is None:
            return
        low, high = extremes
        if self._low is None:
            self._low, self._high = low, high
            if self.moving_average:
                self._first_low, self._first_high = _as_range_bound(low), _as_range_bound(high)
        else:
            self._check_channels(low)
            if self.moving_average:
                self._low = self._low + self.averaging_constant * (low - self._low)
                self._high = self._high + self.averaging_constant * (high - self._high)
            else:
                self._low = _lower(self._low, low)
                self._high = _higher(self._high, high)
        self._num_batches += 1

    def merge(self, other: "MinMaxCalibrator") -> None:
        require_same_kind(self, other)
        if other._low is None:
            return
        if self._low is None:
            self.__dict__.update(copy.deepcopy(other.__dict__))
            return
        self._check_channels(other._low)
        if self.moving_average:
            # Replaying b's batches from a's state instead of from b's first batch shifts b's
            # average by (1-c)^n_b * (a_state - b_first).
            decay = (1.0 - self.averaging_constant) ** other._num_batches
            self._low = other._low + decay * (self._low - other._first_low)
            self._high = other._high + decay * (self._high - other._first_high)
        else:
            self._low = _lower(self._low, other._low)
            self._high = _higher(self._high, other._high)
        self._num_batches += other._num_batches

    def compute_range(self) -> Range:
        if self._low is None:
            raise ValueError("no data")
        return Range(_as_range_bound(self._low), _as_range_bound(self._high))

    def _check_channels(self, bound: Bound) -> None:
        if isinstance(bound, float):
            return
        if bound.shape != self._low.shape:
            raise ValueError(f"channel count changed from {self._low.size} to {bound.size} "
                             f"along axis {self.axis}")


class ChannelAbsMaxCalibrator:
    """Per-channel max|x| along `axis` (reducing over all other axes), merged exactly.

    SmoothQuant needs this activation statistic: its smoothing factor per input channel is
    max|X_j|^alpha / max|W_j|^(1-alpha). `compute_range` returns Range(-absmax, absmax) with 1-D
    float64 arrays; `abs_max()` returns the array itself. The default axis -1 is the hidden
    dimension of a [batch, sequence, hidden] activation; use 1 for NCHW convolution inputs.
    """

    name = "channel_absmax"
    updates_commute = True

    def __init__(self, axis: int = -1) -> None:
        self.axis = int(axis)
        self._abs_max: np.ndarray | None = None

    def settings(self) -> dict:
        return {"axis": self.axis}

    def update(self, values: np.ndarray) -> None:
        extremes = _reduce_min_max(as_float_array(values), self.axis)
        if extremes is None:
            return
        low, high = extremes
        batch_abs_max = np.maximum(-low, high)  # max|x| without materialising |x|
        if self._abs_max is None:
            self._abs_max = batch_abs_max
        else:
            self._check_channels(batch_abs_max)
            self._abs_max = np.maximum(self._abs_max, batch_abs_max)

    def merge(self, other: "ChannelAbsMaxCalibrator") -> None:
        require_same_kind(self, other)
        if other._abs_max is None:
            return
        if self._abs_max is None:
            self._abs_max = other._abs_max.copy()
            return
        self._check_channels(other._abs_max)
        self._abs_max = np.maximum(self._abs_max, other._abs_max)

    def abs_max(self) -> np.ndarray:
        if self._abs_max is None:
            raise ValueError("no data")
        return self._abs_max.copy()

    def compute_range(self) -> Range:
        abs_max = self.abs_max()
        return Range(-abs_max, abs_max)

    def _check_channels(self, abs_max: np.ndarray) -> None:
        if abs_max.shape != self._abs_max.shape:
            raise ValueError(f"channel count changed from {self._abs_max.size} to {abs_max.size} "
                             f"along axis {self.axis}")
