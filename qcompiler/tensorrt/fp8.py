"""FP8 (E4M3FN) instead of INT8 for the tensorrt target: an emitter step on the finished graph.

Every int8 Q/DQ pair that the placement passes produced becomes an FP8 pair at the same place:
the range stays the same (amax = 127 x int8 scale) and the scale becomes amax / 448, E4M3's
largest finite value; zero points become FP8 zeros. Int8 weights are re-encoded as
round_fp8(q x 448/127) with the new per-channel scales (one extra rounding of the int8 grid, far
below E4M3's own 3-bit mantissa step). Needs opset 19 (compile upgrades the model first) and a
GPU of compute capability 8.9+ to run; TensorRT-RTX builds it anywhere (the layer table shows
`Datatype: FP8` on the conv/gemm input and weight).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
from onnx import numpy_helper

E4M3_MAX = 448.0
INT8_MAX = 127.0


def convert_int8_qdq_to_fp8(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose int8 Q/DQ pairs are FP8 E4M3FN pairs covering the same ranges."""
    result = onnx.ModelProto()
    result.CopyFrom(model)
    graph = result.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    qdq = [node for node in graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")]
    int8_zero_points = {node.input[2] for node in qdq if len(node.input) > 2 and node.input[2] in initializers
                        and initializers[node.input[2]].data_type == onnx.TensorProto.INT8}
    scales, weights = set(), set()
    for node in qdq:
        if len(node.input) > 2 and node.input[2] in int8_zero_points:
            scales.add(node.input[1])
            if node.op_type == "DequantizeLinear" and node.input[0] in initializers:
                weights.add(node.input[0])
    replaced = {}
    for name in weights:
        quantized = numpy_helper.to_array(initializers[name]).astype(np.float32)
        replaced[name] = numpy_helper.from_array((quantized * (E4M3_MAX / INT8_MAX)).astype(ml_dtypes.float8_e4m3fn), name)
    for name in scales:
        scale = numpy_helper.to_array(initializers[name]).astype(np.float64)
        replaced[name] = numpy_helper.from_array((scale * (INT8_MAX / E4M3_MAX)).astype(np.float32), name)
    for name in int8_zero_points:
        shape = numpy_helper.to_array(initializers[name]).shape
        replaced[name] = numpy_helper.from_array(np.zeros(shape, dtype=ml_dtypes.float8_e4m3fn), name)
    for index, tensor in enumerate(graph.initializer):
        if tensor.name in replaced:
            graph.initializer[index].CopyFrom(replaced[tensor.name])
    # value_info recorded for the int8 Q outputs would now contradict the graph
    quantized_outputs = {node.output[0] for node in qdq if node.op_type == "QuantizeLinear"}
    kept = [info for info in graph.value_info if info.name not in quantized_outputs]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    return result
