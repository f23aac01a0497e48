"""The calibrators' hot loops, compiled when possible, with numpy fallbacks.

Per sample, on every calibrated activation: `extremes` (exact min and max), `bin_strided` (every
stride-th value into the histogram grid) and `observe` (both at once). Once per tensor:
`rounding_errors` (the MSE search) and `level_sums` (the KL search). The compiled module `_kernels`
(built from `_kernels.c` at install time, see there why) does the per-sample work in one pass over
memory; without it (no C compiler at install) numpy code gives the same results (bit for bit for
the per-sample passes, to rounding for the searches), more slowly: here for the per-sample passes,
in mse.py and kl.py for the searches. `COMPILED` says which one runs; it is read at each call, so
tests can switch it off.
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


def rounding_errors(edges: np.ndarray, density: np.ndarray, lows: np.ndarray, highs: np.ndarray,
                    steps: int) -> np.ndarray:
    """Compiled only: each candidate grid's expected squared rounding error over the histogram
    (`mse._add_rounding_errors` is the numpy reference)."""
    as_doubles = [np.ascontiguousarray(array, np.float64) for array in (edges, density, lows, highs)]
    return np.frombuffer(_kernels.rounding_errors(*as_doubles, float(steps)), np.float64)


def level_sums(terms: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Compiled only: terms[index].sum(axis=1) for a 2-D int64 `index`."""
    return np.frombuffer(_kernels.level_sums(np.ascontiguousarray(terms, np.float64),
                                             np.ascontiguousarray(index, np.int64), index.shape[0]), np.float64)
