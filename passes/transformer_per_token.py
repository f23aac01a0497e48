"""Per-token dynamic activation quantization of linear layers, lowered to MatMulInteger.

Transformer activations vary a lot between tokens; one static scale per tensor wastes int8 range
on every token but the largest. Per token means one scale per row of X, computed at run time.

ONNX cannot express that as one QuantizeLinear below opset 21 (its scale is a scalar or a 1-D
per-axis vector, never [batch, seq, 1]; opset 21's blocked form needs the model upgraded and has no
integer MatMul after it in ONNX Runtime), and ONNX Runtime's dynamic ops do not cover it either
(DynamicQuantizeLinear is per tensor; MatMulIntegerToFloat's a_scale is per tensor or per column
of A). So the pass writes the subgraph, for X [..., K] @ W [K, N]:

    scale = max(ReduceMax(|X|, last axis) / 127, tiny)                 [..., 1]   per token
    Xq    = Cast<uint8>(Round(X / scale) + 128)                         |X/scale| <= 127: no Clip
    Y     = Cast<float>(MatMulInteger(Xq, Wq, 128)) * w_scale * scale   Wq int8 [K, N], per column

Symmetric per token (zero point 128 is the int8 grid shifted into uint8): ONNX Runtime's integer
GEMM is u8 x s8 (VNNI's native form); its s8 x s8 MatMulInteger measured 20x slower here. The extra
cost over static QDQ is the elementwise work on X (Abs, ReduceMax, Div, Round, Add, Cast where a
static QuantizeLinear makes one pass) and two Muls on Y instead of one dequantization.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..context import CompileContext, NodeDecision
from ..ir import Graph, Node
from ..quant_params import quantize, weight_params
from .base import Pass, PassKind, PassResult
from .quantizable import match_node

INT8_MAX = 127.0
ZERO_POINT = 128
# Keeps all-zero rows (padding) at scale > 0, so Div never sees 0; any positive floor works
# because such rows quantize to 0 whatever the scale.
_SMALLEST_SCALE = np.float32(1e-12)


class PerTokenDynamicQuant(Pass):
    """Lowers constant-weight MatMul/Gemm layers to per-token symmetric 8-bit activations (uint8,
    zero point 128) x per-column int8 weights through MatMulInteger (subgraph in the module docstring).

    Matches: what `quantizable.match_node` accepts with a 2-D constant weight (MatMul; Gemm with
    transA=0), i.e. the layers static QDQ insertion would quantize, honouring exclusions.
    Guarantees: each layer's output tensor keeps its name, so graph outputs are untouched; Gemm's
    alpha, transB and bias C are kept (C added in float); the result differs from the float layer
    by at most the quantization step of each token and weight column (a lossy pass); matched layers
    become MatMulInteger, which QDQ insertion does not match, so the pass is idempotent.
    """

    name = "per-token-dynamic"
    kind = PassKind.LOSSY

    def run(self, graph: Graph, context: CompileContext) -> PassResult:
        changes = []
        for node in list(graph.nodes):
            if node.op not in ("MatMul", "Gemm"):
                continue
            match = match_node(graph, node, context.config)
            if isinstance(match, str) or match.weight_input != 1:
                continue
            weight = graph.constant_value(node.inputs[1])
            if weight.ndim != 2 or (node.op == "Gemm" and int(node.attrs.get("transA", 0))):
                continue
            self._lower(graph, node, weight.astype(np.float32))
            context.summary.decisions.append(NodeDecision(node.name, node.op, True, "per-token dynamic int8"))
            changes.append(f"{node.name}: per-token int8 activations, MatMulInteger")
        if changes:
            graph.cleanup()
        return PassResult(bool(changes), changes)

    @staticmethod
    def _lower(graph: Graph, node: Node, weight: np.ndarray) -> None:
        x, output = node.inputs[0], node.outputs[0]
        name = node.name
        alpha = 1.0
        if node.op == "Gemm":
            weight = weight.T if int(node.attrs.get("transB", 0)) else weight
            alpha = float(node.attrs.get("alpha", 1.0))
        params = weight_params(weight, axis=1)
        quantized_weight = graph.add_initializer(f"{node.inputs[1].name}_per_token_quantized", quantize(weight, params))
        column_scale = graph.add_initializer(f"{name}_weight_scale", (params.scale * np.float32(alpha)).astype(np.float32))

        def add(op, inputs, suffix, dtype=np.float32, **attrs):
            return graph.add_node(op, inputs, f"{name}_{suffix}", attrs=attrs, output_dtype=dtype).outputs[0]

        magnitude = add("Abs", [x], "abs")
        if graph.opset >= 18:
            row_max = add("ReduceMax", [magnitude, graph.add_initializer(f"{name}_last_axis", np.array([-1], np.int64))],
                          "row_max", keepdims=1)
        else:
            row_max = add("ReduceMax", [magnitude], "row_max", axes=[-1], keepdims=1)
        scale = add("Max", [add("Div", [row_max, graph.add_initializer(f"{name}_int8_max", np.array(INT8_MAX, np.float32))],
                                "divide"),
                            graph.add_initializer(f"{name}_smallest_scale", np.array(_SMALLEST_SCALE))], "token_scale")
        rounded = add("Round", [add("Div", [x, scale], "scaled")], "round")
        shifted = add("Add", [rounded, graph.add_initializer(f"{name}_uint8_offset", np.array(ZERO_POINT, np.float32))],
                      "shift")
        quantized = add("Cast", [shifted], "to_uint8", dtype=np.uint8, to=onnx.TensorProto.UINT8)
        zero_point = graph.add_initializer(f"{name}_zero_point", np.array(ZERO_POINT, np.uint8))
        accumulated = add("MatMulInteger", [quantized, quantized_weight, zero_point], "matmul_integer", dtype=np.int32)
        as_float = add("Cast", [accumulated], "to_float", to=onnx.TensorProto.FLOAT)
        per_column = add("Mul", [as_float, column_scale], "weight_scale")
        bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name else None
        last = graph.add_node("Mul", [per_column, scale], f"{name}_token_scale_mul", output_dtype=np.float32)
        if bias is not None:
            beta = float(node.attrs.get("beta", 1.0))
            if beta != 1.0:
                bias = add("Mul", [bias, graph.add_initializer(f"{name}_beta", np.array(beta, np.float32))], "beta")
            last = graph.add_node("Add", [last.outputs[0], bias], f"{name}_bias", output_dtype=np.float32)
        # The last node takes over the layer's output tensor, so its name (and graph outputs) stay.
        node.outputs.clear()
        last.outputs.clear()
        last.outputs.append(output)
        graph.remove_nodes([node])
        graph.toposort()

