"""The calibrators' hot loops, compiled when possible, with numpy fallbacks.

Per sample, on every calibrated activation: `extremes` (exact min and max), `bin_strided` (every
stride-th value into the histogram grid) and `observe` (both at once). Once per tensor:
`squared_errors` (the MSE search) and `entropy_divergences` (the KL search). The compiled module `_kernels`
(built from `_kernels.c` at install time, see there why) does the per-sample work in one pass over
memory; without it (no C compiler at install) numpy code gives the same results (bit for bit for
the per-sample passes, to rounding for the searches), more slowly: here for the per-sample passes,
in mse.py and kl.py for the searches. The search kernels run without the GIL, so the calibration
stage spreads the searches of several tensors over the cores. `COMPILED` says which code runs; it
is read at each call, so tests can switch it off.
"""

from __future__ import annotations

import math

import numpy as np

try:
    from . import _kernels
except ImportError:  # installed without a C compiler
    _kernels = None

COMPILED = _kernels is not None
NUM_BINS = 8192
_HALF = NUM_BINS // 2
_CHUNK = 1 << 16  # elements per numpy indexing pass: temporaries stay in cache


def extremes(values: np.ndarray) -> tuple[float, float]:
    """(min, max) of a non-empty float32/float64 array as Python floats; (nan, nan) if it holds NaN.

    A zero extreme is +0.0 whatever the sign of the zeros seen, so ranges do not depend on it.
    """
    if COMPILED and values.flags.c_contiguous:
        return _kernels.extremes(values)
    low, high = float(values.min()), float(values.max())
    if math.isnan(low) or math.isnan(high):
        return math.nan, math.nan
    return low + 0.0, high + 0.0


def observe(values: np.ndarray, stride: int, scale: float, with_extremes: bool,
            counts: np.ndarray) -> tuple[float, float, bool]:
    """(low, high, binned): `extremes(values)`, and when every value lies on the grid of `scale`
    (|x| * scale < 4096, no NaN/inf), values[::stride] added to `counts` as `bin_strided` does, and
    low and high too when `with_extremes`. When binned is False the counts are unchanged: the caller
    grows the grid and bins (the numpy fallback always leaves that to the caller)."""
    if COMPILED and values.flags.c_contiguous:
        return _kernels.observe(values, stride, scale, with_extremes, counts)
    return (*extremes(values), False)


def bin_strided(values: np.ndarray, stride: int, scale: float, counts: np.ndarray) -> None:
    """Add values[::stride] to `counts`, the 8192 int64 sign-magnitude bins of
    `histogram.SignedHistogram`: `values` 1-D float32/float64, `scale` = 1 / bin width, a power of
    two with every |x| * scale < 4096."""
    if COMPILED and values.flags.c_contiguous:
        _kernels.bin_strided(values, stride, scale, counts)
        return
    values = values[::stride]
    if values.dtype == np.float32 and scale < math.ldexp(1.0, -108):
        values = values.astype(np.float64)  # keep the scale far from float32's subnormals
    scale = values.dtype.type(scale)
    buffer = np.empty(min(values.size, _CHUNK), values.dtype)
    for start in range(0, values.size, _CHUNK):
        chunk = values[start:start + _CHUNK]
        scaled = buffer[:chunk.size]
        np.multiply(chunk, scale, out=scaled)  # exact: scale is a power of two; |scaled| < 4096
        index = scaled.astype(np.int16)  # truncation toward zero: +-k, the signed magnitude bin
        index += _HALF
        index -= np.signbit(chunk)  # 4096 + k for x >= +0, 4095 - k for x < 0 or -0.0
        counts += np.bincount(index, minlength=NUM_BINS)


def squared_errors(edges: np.ndarray, counts: np.ndarray, lows: np.ndarray, highs: np.ndarray,
                   steps: int) -> np.ndarray:
    """Compiled only: `mse.SquaredErrorModel(counts, edges)(lows, highs, steps)`, each candidate
    grid's expected squared fake-quantization error over the histogram (the numpy code there is
    the reference)."""
    as_doubles = [np.ascontiguousarray(array, np.float64) for array in (edges, counts, lows, highs)]
    return np.frombuffer(_kernels.squared_errors(*as_doubles, float(steps)), np.float64)


def entropy_divergences(counts: np.ndarray, first_bins: np.ndarray, end_bins: np.ndarray,
                        span_of_level: np.ndarray, start_bin: int) -> np.ndarray:
    """Compiled only: the divergences of `kl.entropy_divergences` (its numpy code is the reference)
    from the level spans of `kl._level_spans` (uint16 `span_of_level`)."""
    return np.frombuffer(_kernels.entropy_divergences(
        np.ascontiguousarray(counts, np.float64), np.ascontiguousarray(first_bins, np.int64),
        np.ascontiguousarray(end_bins, np.int64), np.ascontiguousarray(span_of_level, np.uint16), start_bin), np.float64)
