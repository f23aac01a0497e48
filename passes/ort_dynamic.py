"""Dynamic quantization for ONNX Runtime: int8 weights at compile time, activations at run time.

Lowers float MatMul/Gemm with a constant weight to com.microsoft DynamicQuantizeMatMul, the fused
kernel ONNX Runtime's own optimizer builds from DynamicQuantizeLinear + MatMulInteger + Cast + Mul:
it quantizes the activation to uint8 (asymmetric, per tensor, range measured on the fly) and runs
the u8 x s8 GEMM (VNNI's vpdpbusd form on AVX-512 VNNI, vpmaddubsw on AVX2) with per-column weight
scales, adding the bias in float. Conv stays in float: ONNX Runtime's CPU ConvInteger only exists
for u8 x u8 and, with a DynamicQuantizeLinear in front, measures slower than the float Conv.
"""

from __future__ import annotations

import numpy as np

from ..config import QuantMode
from ..context import CompileContext
from ..ir import Graph, Node, matches_any
from ..quant_params import quantize, weight_params
from .base import Pass, PassKind, PassResult
from .qdq_insertion import note_reduced_range, reduced_range_floor

MS_DOMAIN = "com.microsoft"


def _is_float(tensor) -> bool:
    try:
        return tensor.dtype is None or np.dtype(tensor.dtype) == np.float32
    except TypeError:
        return False


def match_dynamic(graph: Graph, node: Node, config) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(weight as [K, N], float bias [N] or None) for a MatMul/Gemm this pass lowers, else None."""
    if node.op not in ("MatMul", "Gemm") or node.op not in config.op_types or node.op in config.exclude_op_types:
        return None
    if matches_any(node.name, config.exclude_nodes) or len(node.inputs) < 2 or not _is_float(node.inputs[0]):
        return None
    if graph.constant_value(node.inputs[0]) is not None:
        return None
    weight = graph.constant_value(node.inputs[1])
    if weight is None or weight.dtype != np.float32 or weight.ndim != 2:
        return None
    bias = None
    if node.op == "Gemm":
        attrs = node.attrs
        if float(attrs.get("alpha", 1.0)) != 1.0 or int(attrs.get("transA", 0)):
            return None
        if int(attrs.get("transB", 0)):
            weight = weight.T
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias = graph.constant_value(node.inputs[2])
            if bias is None or bias.dtype != np.float32 or float(attrs.get("beta", 1.0)) != 1.0:
                return None
            bias = np.broadcast_to(bias, (weight.shape[1],)) if bias.size in (1, weight.shape[1]) and bias.ndim <= 1 else None
            if bias is None:
                return None
    return np.ascontiguousarray(weight), bias


def _following_bias(graph: Graph, node: Node, columns: int) -> tuple[Node, np.ndarray] | None:
    """A MatMul's single consumer `Add(out, constant[N])`, foldable into the fused op's bias."""
    output = node.outputs[0]
    if graph.is_graph_output(output) or len(output.outputs) != 1:
        return None
    add = output.outputs[0]
    if add.op != "Add" or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
    value = graph.constant_value(other)
    if value is None or value.dtype != np.float32 or value.shape != (columns,):
        return None
    return add, value


class OrtDynamicMatMul(Pass):
    """MatMul/Gemm with a constant 2-D float weight -> DynamicQuantizeMatMul (weights s8 per column,
    7-bit with reduce_range);
    where several such ops read one activation, one DynamicQuantizeLinear feeds a MatMulIntegerToFloat each.

    Matches: MatMul(A, W) and Gemm(A, W[, C]) (alpha 1, no transA, beta 1 when C is given) with W a
    float32 constant, A a float activation, not excluded by the config. A MatMul's lone consumer
    Add(out, constant[N]) is folded into the op's bias input.
    Guarantees: the result equals MatMul(A, dequantized W) (+ bias) computed with A quantized per
    tensor to uint8 at run time, i.e. within one activation quantization step times |W| of the
    float op; graph inputs/outputs keep their names; a second run matches nothing.
    """

    name = "ort-dynamic-matmul"
    kind = PassKind.LOSSY

    def run(self, graph: Graph, context: CompileContext) -> PassResult:
        config = context.config
        if config.mode is not QuantMode.DYNAMIC:
            return PassResult(False)
        matches = [(node, matched) for node in list(graph.nodes)
                   if (matched := match_dynamic(graph, node, config)) is not None]
        readers: dict[str, int] = {}
        for node, _ in matches:
            readers[node.inputs[0].name] = readers.get(node.inputs[0].name, 0) + 1
        shared: dict[str, list] = {}  # activation -> [uint8, scale, zero point] of one DynamicQuantizeLinear
        changes = []
        for node, (weight, bias) in matches:
            activation = node.inputs[0]
            axis = 1 if config.per_channel else None
            params = weight_params(weight, axis, reduced_range_floor(weight, axis, None) if config.resolved_reduce_range else None)
            quantized = graph.add_initializer(f"{node.inputs[1].name}_quantized", quantize(weight, params))
            scale = graph.add_initializer(f"{node.inputs[1].name}_scale", params.scale)
            zero_point = graph.add_initializer(f"{node.inputs[1].name}_zero_point", params.zero_point)
            output = node.outputs[0]
            folded = None
            if bias is None and node.op == "MatMul":
                folded = _following_bias(graph, node, weight.shape[1])
                if folded is not None:
                    output = folded[0].outputs[0]
                    bias = folded[1]
            bias_inputs = [] if bias is None else [
                graph.add_initializer(f"{node.name}_bias", np.ascontiguousarray(bias, dtype=np.float32))]
            if readers[activation.name] > 1:
                # Q, K and V projections read one activation: quantize it once (as ORT's own
                # quantize_dynamic output does) and run MatMulIntegerToFloat for each reader.
                if activation.name not in shared:
                    quantizer = graph.add_node("DynamicQuantizeLinear", [activation], f"{activation.name}_DynamicQuantizeLinear",
                                               num_outputs=3)
                    for tensor, dtype in zip(quantizer.outputs, (np.uint8, np.float32, np.uint8)):
                        tensor.dtype = dtype
                    shared[activation.name] = quantizer.outputs
                a_int, a_scale, a_zero = shared[activation.name]
                op, inputs = "MatMulIntegerToFloat", [a_int, quantized, a_scale, scale, a_zero, zero_point, *bias_inputs]
            else:
                op, inputs = "DynamicQuantizeMatMul", [activation, quantized, scale, zero_point, *bias_inputs]
            fused = graph.add_node(op, inputs, f"{node.name}_{op}", output_dtype=np.float32, output_shape=output.shape,
                                   domain=MS_DOMAIN)
            graph.replace_all_uses(output, fused.outputs[0])
            graph.remove_nodes([node] + ([folded[0]] if folded else []))
            fused.outputs[0].name = output.name  # the fused op writes the original tensor name
            changes.append(f"{node.name}: {op}{' + bias' if bias is not None else ''}")
        if changes:
            if config.resolved_reduce_range:
                note_reduced_range(context)
            graph.cleanup()
        return PassResult(bool(changes), changes)
