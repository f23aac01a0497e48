"""Explicit lowering of QDQ groups to ONNX Runtime integer operators, where relying on ORT's own
fusion is fragile.

`DQ(x) -> MatMul(DQ(W)) -> Add(bias)` with a float output: ORT fuses it into MatMulIntegerToFloat
only when its float MatMul+Add -> Gemm fusion does not fire first; with static 2-D/3-D shapes it
does, and the MatMul then runs as a float Gemm behind a runtime weight DequantizeLinear (see
tests/passes/test_ort_lowering.py). Emitting com.microsoft MatMulIntegerToFloat directly makes the
integer GEMM certain and folds the bias into it.
"""

from __future__ import annotations

import numpy as np

from ..context import CompileContext
from ..ir import Graph, Node, Tensor
from .base import Pass, PassKind, PassResult

MS_DOMAIN = "com.microsoft"


def _dq_parts(graph: Graph, tensor: Tensor) -> tuple[Node, Tensor, Tensor, Tensor] | None:
    producer = graph.producer(tensor)
    if producer is None or producer.op != "DequantizeLinear" or len(producer.inputs) < 3:
        return None
    return producer, producer.inputs[0], producer.inputs[1], producer.inputs[2]


def match_matmul(graph: Graph, node: Node) -> tuple | None:
    """(activation DQ parts, weight DQ parts, bias Add or None, bias value) for a lowerable MatMul."""
    if node.op != "MatMul" or len(node.inputs) != 2 or node.domain not in (None, "", "ai.onnx"):
        return None
    activation, weight = _dq_parts(graph, node.inputs[0]), _dq_parts(graph, node.inputs[1])
    if activation is None or weight is None:
        return None
    a_scale = graph.constant_value(activation[2])
    if a_scale is None or a_scale.size != 1 or graph.constant_value(activation[1]) is not None:
        return None
    w_value = graph.constant_value(weight[1])
    w_scale = graph.constant_value(weight[2])
    if w_value is None or w_value.ndim != 2 or w_scale is None or w_value.dtype != np.int8:
        return None
    if w_scale.size != 1 and not (w_scale.ndim == 1 and int(weight[0].attrs.get("axis", 1)) in (1, -1)):
        return None  # MatMulIntegerToFloat takes per-tensor or per-column weight scales only
    output = node.outputs[0]
    if any(c.op == "QuantizeLinear" for c in output.outputs):
        return None  # a closed group: ORT lowers it to QLinearMatMul itself
    add, bias = None, None
    if len(output.outputs) == 1 and not graph.is_graph_output(output) and output.outputs[0].op == "Add":
        candidate = output.outputs[0]
        other = candidate.inputs[1] if candidate.inputs[0] is output else candidate.inputs[0]
        value = graph.constant_value(other)
        if value is not None and value.dtype == np.float32 and value.shape == (w_value.shape[1],):
            add, bias = candidate, value
    return activation, weight, add, bias


class LowerMatMulIntegerToFloat(Pass):
    """DQ(x) -> MatMul(., DQ(W int8)) [-> Add(bias)] with a float output -> MatMulIntegerToFloat.

    Matches: MatMul whose activation input is DequantizeLinear(QuantizeLinear(x)) per tensor and
    whose weight is a constant 2-D int8 behind a DequantizeLinear (per tensor or per column), whose
    output is not re-quantized; a lone consumer Add of a constant [N] is folded in as the bias.
    Rewrites: one com.microsoft MatMulIntegerToFloat reading the integers directly.
    Guarantees: same integers and scales as the QDQ form, so equal within float rounding of the
    accumulation (the QDQ form multiplies dequantized floats, the kernel accumulates in int32);
    the output keeps its name; a second run matches nothing.
    """

    name = "lower-matmul-integer-to-float"
    kind = PassKind.LOWERING

    def run(self, graph: Graph, context: CompileContext) -> PassResult:
        changes = []
        for node in list(graph.nodes):
            matched = match_matmul(graph, node)
            if matched is None:
                continue
            (_, a_int, a_scale, a_zero), (_, w_int, w_scale, w_zero), add, bias = matched
            inputs = [a_int, w_int, a_scale, w_scale, a_zero, w_zero]
            if bias is not None:
                inputs.append(graph.add_initializer(f"{node.name}_bias", bias.astype(np.float32)))
            output = add.outputs[0] if add is not None else node.outputs[0]
            lowered = graph.add_node("MatMulIntegerToFloat", inputs, f"{node.name}_MatMulIntegerToFloat",
                                     output_dtype=np.float32, output_shape=output.shape, domain=MS_DOMAIN)
            graph.replace_all_uses(output, lowered.outputs[0])
            graph.remove_nodes([node] + ([add] if add is not None else []))
            lowered.outputs[0].name = output.name
            changes.append(f"{node.name}: MatMulIntegerToFloat{' + bias' if bias is not None else ''}")
        if changes:
            graph.cleanup()
        return PassResult(bool(changes), changes)
