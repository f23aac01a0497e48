"""A bounded, deterministic sample of an activation's rows, plus its exact per-channel extremes.

SmoothQuant's alpha search scores each candidate by the error of one quantized layer, X @ W, on
real activations. Keeping every row of X would grow with the calibration set, so this keeps a
reservoir of at most `capacity` rows (vectors along `axis`, the channel axis), chosen uniformly
over everything seen with a seeded generator (Vitter's algorithm R, vectorised per batch), and the
exact per-channel min and max, which the search needs for the per-tensor activation range even when
an outlier row is not in the sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import NonFiniteValuesError, Range, as_float_array, require_same_kind

DEFAULT_CAPACITY = 1024


@dataclass(frozen=True)
class RowSample:
    """What the calibrator answers: sampled rows [n, channels] and exact per-channel extremes."""

    rows: np.ndarray
    channel_min: np.ndarray
    channel_max: np.ndarray
    rows_seen: int

    @property
    def channel_absmax(self) -> np.ndarray:
        return np.maximum(-self.channel_min, self.channel_max)


class RowSampleCalibrator:
    """Uniform reservoir of at most `capacity` rows along `axis` plus exact per-channel min/max.

    Memory is capacity x channels whatever the number of samples. The same batches in the same
    order always give the same sample (the generator is seeded); `merge` keeps the extremes exact
    and draws the combined sample from both reservoirs in proportion to the rows each saw, which
    is uniform in distribution but not the sample one calibrator fed all batches would keep.
    """

    name = "row_sample"

    def __init__(self, axis: int = -1, capacity: int = DEFAULT_CAPACITY, seed: int = 0) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.axis = int(axis)
        self.capacity = int(capacity)
        self.seed = int(seed)
        self._rng = np.random.default_rng(seed)
        self._rows: np.ndarray | None = None  # [capacity, channels], first `_filled` valid
        self._filled = 0
        self._seen = 0
        self._low: np.ndarray | None = None
        self._high: np.ndarray | None = None

    def settings(self) -> dict:
        return {"axis": self.axis, "capacity": self.capacity, "seed": self.seed}

    def update(self, values: np.ndarray) -> None:
        array = as_float_array(values)
        if array.ndim == 0 or not -array.ndim <= self.axis < array.ndim:
            raise ValueError(f"channel axis {self.axis} is out of range for a tensor of rank {array.ndim}")
        rows = np.moveaxis(array, self.axis, -1).reshape(-1, array.shape[self.axis])
        if rows.shape[0] == 0:
            return
        if not np.isfinite(rows).all():
            raise NonFiniteValuesError()
        low, high = rows.min(axis=0).astype(np.float64), rows.max(axis=0).astype(np.float64)
        if self._rows is None:
            self._rows = np.zeros((self.capacity, rows.shape[1]), np.float32)
            self._low, self._high = low, high
        else:
            if rows.shape[1] != self._rows.shape[1]:
                raise ValueError(f"channel count changed from {self._rows.shape[1]} to {rows.shape[1]} along axis {self.axis}")
            self._low, self._high = np.minimum(self._low, low), np.maximum(self._high, high)
        self._insert(rows.astype(np.float32, copy=False))

    def _insert(self, rows: np.ndarray) -> None:
        free = min(self.capacity - self._filled, rows.shape[0])
        if free:
            self._rows[self._filled:self._filled + free] = rows[:free]
            self._filled += free
        rest = rows[free:]
        if rest.shape[0]:
            # Algorithm R: the row with global index t replaces slot j ~ U[0, t] when j < capacity.
            positions = self._seen + free + np.arange(rest.shape[0])
            slots = self._rng.integers(0, positions + 1)
            chosen = np.flatnonzero(slots < self.capacity)
            # Later rows overwrite earlier ones in the same slot, as the sequential algorithm does.
            last_per_slot = {int(slots[i]): int(i) for i in chosen}
            if last_per_slot:
                targets = np.fromiter(last_per_slot.keys(), np.int64)
                sources = np.fromiter(last_per_slot.values(), np.int64)
                self._rows[targets] = rest[sources]
        self._seen += rows.shape[0]

    def merge(self, other: "RowSampleCalibrator") -> None:
        require_same_kind(self, other)
        if other._rows is None:
            return
        if self._rows is None:
            self._rows, self._filled, self._seen = other._rows.copy(), other._filled, other._seen
            self._low, self._high = other._low.copy(), other._high.copy()
            return
        if other._rows.shape[1] != self._rows.shape[1]:
            raise ValueError("cannot merge row samples with different channel counts")
        self._low, self._high = np.minimum(self._low, other._low), np.maximum(self._high, other._high)
        total = self._seen + other._seen
        pool = np.concatenate([self._rows[:self._filled], other._rows[:other._filled]])
        weights = np.concatenate([np.full(self._filled, self._seen / max(self._filled, 1)),
                                  np.full(other._filled, other._seen / max(other._filled, 1))])
        keep = min(self.capacity, pool.shape[0])
        picked = self._rng.choice(pool.shape[0], size=keep, replace=False, p=weights / weights.sum())
        self._rows[:keep] = pool[np.sort(picked)]
        self._filled, self._seen = keep, total

    def sample(self) -> RowSample:
        if self._rows is None:
            raise ValueError("no data")
        return RowSample(self._rows[:self._filled].copy(), self._low.copy(), self._high.copy(), self._seen)

    def compute_range(self) -> Range:
        if self._low is None:
            raise ValueError("no data")
        return Range(self._low.copy(), self._high.copy())
