"""The calibration cache for TensorRT's implicit-quantization path, from a compiled model.

The scales are the ones qcompiler put on the activation QuantizeLinear nodes (amax = 127 x scale,
or 448 x scale for FP8),
written by `ranges_io.write_tensorrt_cache` (header, then `tensor: <big-endian float32 hex>`).
"""

from __future__ import annotations

import os

import numpy as np
import onnx

from ..calibrators.base import Range
from ..ranges_io import write_tensorrt_cache


def quantized_activation_ranges(model: onnx.ModelProto) -> dict[str, Range]:
    """Symmetric ranges (-amax, amax) of every per-tensor int8-quantized activation."""
    initializers = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    ranges = {}
    for node in model.graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in initializers:
            continue
        scale = initializers.get(node.input[1])
        if scale is None or np.asarray(scale).size != 1:
            continue
        zero_point = initializers.get(node.input[2]) if len(node.input) > 2 else None
        largest = 448.0 if zero_point is not None and zero_point.dtype.name.startswith("float8") else 127.0  # FP8 E4M3 or INT8
        amax = float(np.asarray(scale).reshape(())) * largest
        previous = ranges.get(node.input[0])
        if previous is None or amax > previous.high:
            ranges[node.input[0]] = Range(-amax, amax)
    return ranges


def write_calibration_cache(model: onnx.ModelProto, path: str | os.PathLike) -> int:
    ranges = quantized_activation_ranges(model)
    write_tensorrt_cache(ranges, path)
    return len(ranges)
