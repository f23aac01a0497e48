"""Output and activation-op placement for the ONNX Runtime target: close every QDQ group.

ONNX Runtime's CPU optimizer turns `DQ -> Conv -> Q` into QLinearConv only when the op's output
is quantized too (and its bias is an int32 DQ); the same holds for MatMul (QLinearMatMul), Gemm
(QGemm), Add/Mul (QLinearAdd/QLinearMul), Sigmoid/LeakyRelu/pooling (QLinear* lookup and pooling
kernels) and Concat (QLinearConcat). Data-movement ops (MaxPool, Resize, Reshape, Transpose, ...)
run directly on uint8 when the Q/DQ around them share one scale. InsertQDQ quantizes inputs only,
so without this pass the Convs stay in float behind runtime weight dequantization (measured in
benchmarks/results/latency.md). This pass extends the int8 region over those ops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import QType
from ..context import CompileContext
from ..ir import Graph, Node, Tensor
from ..calibrators.base import Range
from ..quant_params import activation_params, bias_params, quantize, quantize_bias
from .base import Pass, PassKind, PassResult, StatisticRequest

# Ops whose QDQ group ORT fuses into an integer kernel with its own output scale.
COMPUTE_OPS = ("Conv", "MatMul", "Gemm")
OWN_SCALE_OPS = {"Add": "all", "Mul": "all", "Concat": "all", "Sigmoid": "first", "LeakyRelu": "first",
                 "GlobalAveragePool": "first", "AveragePool": "first",
                 # no integer kernel: ORT runs it in float between its DQ and Q, but in squeeze-excite
                 # blocks it works on [N, C, 1, 1] gates, and quantizing it keeps the Mul/Add after it int8
                 "HardSigmoid": "first"}
# Ops ORT runs on uint8 directly when input and output share scale and zero point.
SAME_SCALE_OPS = ("MaxPool", "Resize", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Split", "Slice")
# Activations ORT removes when a Q with zero point at the activation's lower bound follows them.
FUSED_ACTIVATIONS = ("Relu", "Clip")


@dataclass(frozen=True)
class PlannedTensor:
    """A float activation to be quantized: with a calibrated range (copy_from None) or with the
    same scale and zero point as `copy_from`."""

    name: str
    copy_from: str | None = None
    factor: float = 1.0   # a Mul/Div by a positive scalar folds into the scale: DQ(q, s) * c == DQ(q, s * c)


def _is_float(tensor: Tensor) -> bool:
    try:
        return tensor.dtype is not None and np.dtype(tensor.dtype) == np.float32
    except TypeError:
        return False


def _activation_dq(tensor: Tensor) -> Node | None:
    """The DequantizeLinear producing `tensor` from a run-time quantized activation, if any."""
    producer = tensor.inputs[0] if tensor.inputs else None
    if producer is None or producer.op != "DequantizeLinear":
        return None
    source = producer.inputs[0]
    return producer if source.inputs and source.inputs[0].op == "QuantizeLinear" else None


def _existing_q(tensor: Tensor) -> Node | None:
    for consumer in tensor.outputs:
        if consumer.op == "QuantizeLinear" and consumer.inputs[0] is tensor:
            return consumer
    return None


def _is_dequantized(tensor: Tensor) -> bool:
    producer = tensor.inputs[0] if tensor.inputs else None
    return producer is not None and producer.op == "DequantizeLinear"


def _positive_scalar(graph: Graph, tensor: Tensor) -> float | None:
    value = graph.constant_value(tensor)
    if value is None or value.size != 1 or value.dtype != np.float32:
        return None
    number = float(value.reshape(()))
    return number if np.isfinite(number) and number > 0 else None


def _small_float_constant(graph: Graph, tensor: Tensor) -> bool:
    value = graph.constant_value(tensor)
    return value is not None and value.dtype == np.float32 and 0 < value.size <= 4096 and bool(np.all(np.isfinite(value)))


@dataclass
class Placement:
    """What OrtQuantizeOutputs will do: tensors to quantize (graph order), the role of every node in
    the int8 region, and the constant inputs (node name, input index) to store as uint8."""

    tensors: list[PlannedTensor]
    roles: dict[str, str]
    constants: list[tuple[str, int]]


def plan_placement(graph: Graph, excluded: frozenset[str] = frozenset(), float_compute_outputs: frozenset[str] = frozenset()) -> Placement:
    """The int8 region grown forward from InsertQDQ's quantized inputs, in graph order."""
    quantized: set[str] = set()
    planned: dict[str, PlannedTensor] = {}
    roles: dict[str, str] = {}
    constants: list[tuple[str, int]] = []

    def available(tensor: Tensor) -> bool:
        return tensor.name in quantized or _activation_dq(tensor) is not None or _existing_q(tensor) is not None

    def add(tensor: Tensor, copy_from: str | None, factor: float = 1.0) -> None:
        if graph.is_graph_output(tensor) or not _is_float(tensor) or _activation_dq(tensor) is not None:
            return
        quantized.add(tensor.name)
        planned.setdefault(tensor.name, PlannedTensor(tensor.name, copy_from, factor))

    def with_fused_activation(node: Node) -> Tensor:
        output = node.outputs[0]
        consumers = output.outputs
        if (len(consumers) == 1 and consumers[0].op in FUSED_ACTIVATIONS and not graph.is_graph_output(output)
                and consumers[0].name not in excluded and _fusable_activation(graph, consumers[0])):
            roles[consumers[0].name] = "fused"
            return consumers[0].outputs[0]
        return output

    for node in graph.nodes:
        if node.name in excluded or not node.outputs or node.domain not in (None, "", "ai.onnx"):
            continue
        inputs = [t for t in node.inputs if t.name]
        if node.op in COMPUTE_OPS:
            if len(inputs) < 2 or not (_is_dequantized(inputs[0]) and _is_dequantized(inputs[1])):
                continue
            roles[node.name] = "compute"
            if node.name not in float_compute_outputs:
                add(with_fused_activation(node), None)
        elif node.op in ("Mul", "Div") and len(inputs) == 2 and available(inputs[0]) and _is_float(inputs[0]) \
                and _positive_scalar(graph, inputs[1]) is not None:
            factor = _positive_scalar(graph, inputs[1])
            roles[node.name] = "scaled"
            add(node.outputs[0], inputs[0].name, factor if node.op == "Mul" else 1.0 / factor)
        elif node.op in OWN_SCALE_OPS:
            checked = inputs if OWN_SCALE_OPS[node.op] == "all" else inputs[:1]
            if not checked or not all(_is_float(t) for t in checked):
                continue
            constant_slots = [i for i, t in enumerate(node.inputs) if t in checked and graph.constant_value(t) is not None]
            activations = [t for t in checked if graph.constant_value(t) is None]
            if not activations or not all(available(t) for t in activations):
                continue
            # Add/Mul with a small constant (PP-OCR's hard-swish adds 3.0): store the constant as uint8.
            if constant_slots and (node.op not in ("Add", "Mul")
                                   or not all(_small_float_constant(graph, node.inputs[i]) for i in constant_slots)):
                continue
            roles[node.name] = "own"
            constants += [(node.name, i) for i in constant_slots]
            add(with_fused_activation(node), None)
        elif node.op in SAME_SCALE_OPS:
            source = inputs[0] if inputs else None
            if source is None or not _is_float(source) or not available(source):
                continue
            roles[node.name] = "same"
            for output in node.outputs:
                add(output, source.name)
    return Placement([planned[name] for name in planned], roles, constants)


def _fusable_activation(graph: Graph, node: Node) -> bool:
    if node.op == "Relu":
        return True
    # Clip is fused only with constant bounds (a Q whose range lies inside them makes it a no-op).
    return all(not t.name or graph.constant_value(t) is not None for t in node.inputs[1:]) and "min" not in node.attrs


KEEP_CONV_OUTPUT = ("Conv",)
INT8_ROLES = ("compute", "own", "same", "fused", "scaled")


def plan_pruned(graph: Graph) -> Placement:
    """plan_placement without Q/DQ pairs that feed only float ops: an elementwise op whose output no
    integer op reads stays in float, and so does the output of a MatMul/Gemm (ORT then runs
    MatMulIntegerToFloat: integer GEMM, float output, no output rounding). Conv outputs are always
    quantized, because QLinearConv is ORT's only integer Conv kernel."""
    excluded: set[str] = set()
    float_outputs: set[str] = set()
    while True:
        placement = plan_placement(graph, frozenset(excluded), frozenset(float_outputs))
        names = {p.name for p in placement.tensors}
        int8_nodes = {name for name, role in placement.roles.items() if role in INT8_ROLES}
        tensors = graph.tensors()
        dropped, floated = set(), set()
        for node in graph.nodes:
            role = placement.roles.get(node.name)
            if role not in ("own", "same", "scaled", "compute") or (role == "compute" and node.op in KEEP_CONV_OUTPUT):
                continue
            if role == "compute" and node.name in float_outputs:
                continue
            output_names = {t.name for t in node.outputs}
            if node.outputs and len(node.outputs[0].outputs) == 1 and placement.roles.get(node.outputs[0].outputs[0].name) == "fused":
                output_names = {t.name for t in node.outputs[0].outputs[0].outputs}
            outputs = [tensors[name] for name in output_names if name in names]
            feeds_int8 = any(c.name in int8_nodes and placement.roles.get(c.name) != "fused" or c.op == "QuantizeLinear"
                             for t in outputs for c in t.outputs)
            if not feeds_int8:
                (floated if role == "compute" else dropped).add(node.name)
        if not dropped and not floated:
            return placement
        excluded |= dropped
        float_outputs |= floated


class OrtQuantizeOutputs(Pass):
    """Closes QDQ groups for ONNX Runtime: quantizes op outputs and the activation ops between them.

    Matches: Conv/MatMul/Gemm whose data and weight inputs are already dequantized (InsertQDQ's
    output), with a Relu or constant-bound Clip that is their only consumer folded into the group;
    then, in graph order: Add/Mul/Concat whose activation inputs are all quantized (Add/Mul may
    also take a small float constant, stored as uint8); Sigmoid, LeakyRelu, HardSigmoid,
    Global/AveragePool (first input quantized); Mul/Div by a positive scalar constant; and the
    data-movement ops MaxPool, Resize, Reshape, Transpose, Squeeze, Unsqueeze, Flatten, Split,
    Slice. An elementwise op whose output feeds no integer op stays float, and so does the output
    of a MatMul/Gemm that feeds only float ops (LowerMatMulIntegerToFloat handles those).
    Rewrites: each such output gets Q -> DQ with calibrated per-tensor parameters; data-movement
    outputs reuse their input's parameters (also an existing Q from InsertQDQ, whose consumers'
    int32 biases are re-quantized for the new input scale) so ORT runs them on uint8; a Mul/Div by
    c > 0 becomes a DQ of its input's integers with scale s*c (the op disappears). An output that
    already has a Q is reused, not quantized twice.
    Guarantees: graph outputs and their names are untouched; every new scale is finite and > 0;
    results equal the float graph within one step of each quantized tensor; a second run changes
    nothing.
    """

    name = "ort-quantize-outputs"
    kind = PassKind.LOSSY

    def statistics_needed(self, graph: Graph, context: CompileContext) -> list[StatisticRequest]:
        tensors = graph.tensors()
        return [StatisticRequest(p.name) for p in plan_pruned(graph).tensors
                if p.copy_from is None and _existing_q(tensors[p.name]) is None]

    def run(self, graph: Graph, context: CompileContext) -> PassResult:
        placement = plan_pruned(graph)
        changes = []
        qtype = context.config.activation_type
        for node_name, index in placement.constants:
            node = graph.node_by_name(node_name)
            node.inputs[index] = _dequantized_constant(graph, node.inputs[index], qtype)
            changes.append(f"{node_name}: constant input {index} stored as {qtype.value}")
        for item in placement.tensors:
            tensor = graph.tensors()[item.name]
            dq_output = self._dequantized(graph, context, tensor, item, qtype)
            if dq_output is None:
                continue
            dq_node = dq_output.inputs[0]
            q_node = dq_node.inputs[0].inputs[0]
            floats = [c for c in tensor.outputs if c.name not in (q_node.name, dq_node.name)]
            if not floats:
                continue
            for consumer in floats:
                graph.replace_input(consumer, tensor, dq_output)
            changes.append(f"{item.name}: quantized for {', '.join(c.name for c in floats)}")
        if changes:
            graph.cleanup()
        return PassResult(bool(changes), changes)

    @staticmethod
    def _dequantized(graph: Graph, context: CompileContext, tensor: Tensor, item: PlannedTensor, qtype: QType) -> Tensor | None:
        existing = _existing_q(tensor)
        if existing is not None:
            if item.copy_from is not None and item.factor == 1.0:
                _share_source_params(graph, existing, item.copy_from)
            for consumer in existing.outputs[0].outputs:
                if consumer.op == "DequantizeLinear":
                    return consumer.outputs[0]
        if item.factor != 1.0:
            # Mul/Div by a positive scalar: read the source's integers with a rescaled DQ; the Mul/Div
            # itself becomes dead and is removed, so no op runs at all.
            integers, scale, zero_point = _quantized_source(graph, item.copy_from)
            if integers is None:
                return None
            new_scale = graph.add_initializer(f"{tensor.name}_scale",
                                              (graph.constant_value(scale).astype(np.float64) * item.factor).astype(np.float32))
            dq_node = graph.add_node("DequantizeLinear", [integers, new_scale, zero_point], f"{tensor.name}_DequantizeLinear",
                                     output_dtype=np.float32, output_shape=tensor.shape)
            for consumer in list(tensor.outputs):
                graph.replace_input(consumer, tensor, dq_node.outputs[0])
            return None
        if item.copy_from is not None:
            _, scale, zero_point = _quantized_source(graph, item.copy_from)
            if scale is None:
                return None
        else:
            value_range = context.activation_ranges.get(tensor.name)
            if value_range is None:
                raise KeyError(f"no calibrated range for activation '{tensor.name}'")
            params = activation_params(value_range, qtype)
            scale = graph.add_initializer(f"{tensor.name}_scale", params.scale)
            zero_point = graph.add_initializer(f"{tensor.name}_zero_point", params.zero_point)
        quantized_dtype = np.uint8 if qtype is QType.UINT8 else np.int8
        q_node = graph.add_node("QuantizeLinear", [tensor, scale, zero_point], f"{tensor.name}_QuantizeLinear",
                                output_dtype=quantized_dtype, output_shape=tensor.shape)
        dq_node = graph.add_node("DequantizeLinear", [q_node.outputs[0], scale, zero_point],
                                 f"{tensor.name}_DequantizeLinear", output_dtype=np.float32, output_shape=tensor.shape)
        return dq_node.outputs[0]


def _quantized_source(graph: Graph, name: str) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """(integer tensor, scale, zero point) of an already quantized activation."""
    tensor = graph.tensors()[name]
    dq = _activation_dq(tensor)
    if dq is not None:
        return dq.inputs[0], dq.inputs[1], dq.inputs[2]
    q = _existing_q(tensor)
    if q is not None:
        return q.outputs[0], q.inputs[1], q.inputs[2]
    return None, None, None


def _dequantized_constant(graph: Graph, tensor: Tensor, qtype: QType) -> Tensor:
    """A float constant stored as uint8/int8 (per tensor, range including 0) behind a DequantizeLinear."""
    value = graph.constant_value(tensor).astype(np.float32)
    params = activation_params(Range(float(value.min()), float(value.max())), qtype)
    stored = graph.add_initializer(f"{tensor.name}_quantized", quantize(value, params))
    scale = graph.add_initializer(f"{tensor.name}_quantized_scale", params.scale)
    zero_point = graph.add_initializer(f"{tensor.name}_quantized_zero_point", params.zero_point)
    dq_node = graph.add_node("DequantizeLinear", [stored, scale, zero_point], f"{tensor.name}_DequantizeLinear",
                             output_dtype=np.float32, output_shape=list(value.shape))
    return dq_node.outputs[0]


def _share_source_params(graph: Graph, q_node: Node, source: str) -> None:
    """Give an existing Q/DQ pair (InsertQDQ's, on a MaxPool/Resize/... output) its input's scale and
    zero point, so ORT runs the data-movement op on uint8 instead of dequantizing around it.

    The int32 biases of the ops reading that DQ were quantized with the old input scale; they are
    re-quantized for the new one (bias scale = input scale x weight scale), which changes each
    bias by at most half a bias step."""
    _, scale, zero_point = _quantized_source(graph, source)
    if scale is None or (q_node.inputs[1] is scale and q_node.inputs[2] is zero_point):
        return
    new_scale = graph.constant_value(scale)
    if graph.constant_value(q_node.inputs[1]) is None or new_scale is None or new_scale.size != 1:
        return
    dequantizers = [c for c in q_node.outputs[0].outputs if c.op == "DequantizeLinear"]
    for dq in dequantizers:
        for consumer in dq.outputs[0].outputs:
            if consumer.op not in COMPUTE_OPS or len(consumer.inputs) < 3 or consumer.inputs[0] is not dq.outputs[0]:
                continue
            bias_dq = graph.producer(consumer.inputs[2])
            weight_dq = graph.producer(consumer.inputs[1])
            if bias_dq is None or bias_dq.op != "DequantizeLinear" or weight_dq is None or weight_dq.op != "DequantizeLinear":
                continue
            bias_int = graph.constant_value(bias_dq.inputs[0])
            bias_scale = graph.constant_value(bias_dq.inputs[1])
            weight_scale = graph.constant_value(weight_dq.inputs[1])
            if bias_int is None or bias_scale is None or weight_scale is None:
                continue
            bias = bias_int.astype(np.float64) * bias_scale.astype(np.float64)
            params = bias_params(new_scale, weight_scale)
            stored = graph.add_initializer(f"{bias_dq.inputs[0].name}_requantized", quantize_bias(bias, params))
            scale_tensor = graph.add_initializer(f"{bias_dq.inputs[0].name}_requantized_scale", params.scale)
            new_bias_dq = graph.add_node("DequantizeLinear", [stored, scale_tensor, bias_dq.inputs[2]],
                                         f"{bias_dq.name}_requantized", attrs=dict(bias_dq.attrs),
                                         output_dtype=np.float32, output_shape=bias_dq.outputs[0].shape)
            graph.replace_input(consumer, consumer.inputs[2], new_bias_dq.outputs[0])
    for node in (q_node, *dequantizers):
        graph.replace_input(node, node.inputs[1], scale)
        graph.replace_input(node, node.inputs[2], zero_point)
