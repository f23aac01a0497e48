"""From ranges and weights to (scale, zero point): the arithmetic every quantizing pass shares.

Conventions follow ONNX QuantizeLinear (round half to even, saturate) and ONNX Runtime/TensorRT:
symmetric int8 uses [-127, 127] so that negation is exact and zero point is 0; asymmetric uint8
uses [0, 255]. Every scale produced here is finite and > 0, including for all-zero tensors and
dead weight channels, because TensorRT rejects scale 0 and a zero scale divides by zero in
QuantizeLinear.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import QType
from .calibrators.base import Range

INT32_MAX = np.iinfo(np.int32).max
# A range narrower than this is treated as empty: scale 1 then represents 0 exactly.
_SMALLEST_SCALE = float(np.finfo(np.float32).tiny) * 2**23


@dataclass(frozen=True)
class QuantParams:
    """Scale and zero point of one quantized tensor, per tensor (axis None) or per channel."""

    scale: np.ndarray        # float32, shape [] or [channels]
    zero_point: np.ndarray   # int8/uint8 (or int32 for bias), same shape as scale
    axis: int | None = None

    @property
    def numpy_dtype(self) -> np.dtype:
        return self.zero_point.dtype


def _integer_limits(qtype: QType) -> tuple[int, int, np.dtype]:
    if qtype is QType.UINT8:
        return 0, 255, np.dtype(np.uint8)
    return -127, 127, np.dtype(np.int8)


def _safe_scale(scale: np.ndarray) -> np.ndarray:
    scale = np.asarray(scale, dtype=np.float64)
    scale = np.where(np.isfinite(scale) & (scale > _SMALLEST_SCALE), scale, 1.0)
    return scale.astype(np.float32)


def activation_params(value_range: Range, qtype: QType) -> QuantParams:
    """Per-tensor parameters for an activation observed in `value_range`."""
    bounded = value_range.including_zero()
    low, high = float(bounded.low), float(bounded.high)
    qmin, qmax, dtype = _integer_limits(qtype)
    if qtype is QType.INT8:
        scale = _safe_scale(max(abs(low), abs(high)) / qmax)
        return QuantParams(scale, np.zeros((), dtype=dtype))
    scale = _safe_scale((high - low) / (qmax - qmin))
    zero_point = np.clip(np.rint(qmin - low / scale), qmin, qmax).astype(dtype)
    return QuantParams(scale, zero_point)


def weight_params(weights: np.ndarray, axis: int | None, bias_floor: np.ndarray | None = None) -> QuantParams:
    """Symmetric int8 parameters for a constant weight, per channel along `axis` or per tensor.

    `bias_floor` (per channel) raises a channel's scale where an int32 bias quantized with
    input_scale x weight_scale would overflow int32: the weight loses a little resolution rather
    than the bias saturating.
    """
    values = np.asarray(weights, dtype=np.float32)
    if axis is None:
        abs_max = np.asarray(np.max(np.abs(values)) if values.size else 0.0)
    else:
        reduce_axes = tuple(i for i in range(values.ndim) if i != axis)
        abs_max = np.max(np.abs(values), axis=reduce_axes) if values.size else np.zeros(values.shape[axis])
    scale = abs_max.astype(np.float64) / 127.0
    if bias_floor is not None:
        scale = np.maximum(scale, bias_floor)
    scale = _safe_scale(scale)
    return QuantParams(scale, np.zeros(scale.shape, dtype=np.int8), axis)


def quantize(values: np.ndarray, params: QuantParams) -> np.ndarray:
    """QuantizeLinear in numpy: round half to even, then saturate to the zero point's type."""
    values = np.asarray(values, dtype=np.float32)
    scale, zero_point = params.scale, params.zero_point.astype(np.float64)
    if params.axis is not None and scale.ndim == 1:
        shape = [1] * values.ndim
        shape[params.axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    info = np.iinfo(params.numpy_dtype)
    lowest = -127 if params.numpy_dtype == np.int8 else info.min
    quantized = np.rint(values.astype(np.float64) / scale.astype(np.float64)) + zero_point
    return np.clip(quantized, lowest, info.max).astype(params.numpy_dtype)


def bias_params(input_scale: np.ndarray, weight_scale: np.ndarray) -> QuantParams:
    """int32 bias parameters as ONNX Runtime's integer kernels expect: scale = x_scale * w_scale."""
    scale = (np.float32(input_scale) * weight_scale.astype(np.float32)).astype(np.float32)
    scale = _safe_scale(scale)
    axis = 0 if scale.ndim == 1 else None
    return QuantParams(scale, np.zeros(scale.shape, dtype=np.int32), axis)


def quantize_bias(bias: np.ndarray, params: QuantParams) -> np.ndarray:
    quantized = np.rint(np.asarray(bias, dtype=np.float64) / params.scale.astype(np.float64))
    return np.clip(quantized, -INT32_MAX, INT32_MAX).astype(np.int32)


def bias_scale_floor(bias: np.ndarray, input_scale: float) -> np.ndarray:
    """The smallest per-channel weight scale that keeps round(bias / (input_scale * w_scale)) in int32."""
    return np.abs(np.asarray(bias, dtype=np.float64)) / (float(input_scale) * INT32_MAX)
