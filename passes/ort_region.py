"""Which tensors the ONNX Runtime target quantizes: the int8 region OrtQuantizeOutputs closes.

Planning only (no graph edits): grown forward from InsertQDQ's quantized inputs over the ops ORT has
integer kernels for, pruned where nothing integer reads the result, extended over data movement up
to the float ops that read it, and, per Concat, the inputs that may take the Concat's own scale so
ORT's QLinearConcat copies their bytes instead of re-quantizing them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from ..calibrators.base import Range
from ..ir import Graph, Node, Tensor

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
# Kept on uint8 up to a float consumer when every input is int8 anyway (the output of a kept
# integer op): moving 1-byte elements and dequantizing once after them costs less than
# dequantizing each input and moving 4-byte floats (YOLOv8's head: per-level Concat, Reshape and the
# Concat of the levels, between the last Convs and the Split feeding the DFL Softmax / class Sigmoid).
PASSTHROUGH_OPS = SAME_SCALE_OPS + ("Concat",)
# A Concat re-quantizes its inputs to one scale covering all of them; where one input's range is
# this many times narrower than the union (box pixels next to class probabilities), it would lose
# more than two bits, so that Concat stays float.
MAX_CONCAT_WIDENING = 4.0
# Ops ONNX Runtime's QDQ propagation moves a DequantizeLinear forward through (qdq_propagation.cc).
DQ_PROPAGATING_OPS = ("MaxPool", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Slice")


def plan_pruned(graph: Graph, ranges: Mapping[str, Range] | None = None) -> Placement:
    """plan_placement without Q/DQ pairs that feed only float ops: an elementwise op whose output no
    integer op reads stays in float, and so does the output of a MatMul/Gemm (ORT then runs
    MatMulIntegerToFloat: integer GEMM, float output, no output rounding). Conv outputs are always
    quantized, because QLinearConv is ORT's only integer Conv kernel. Data-movement ops and Concats
    whose inputs all come out of the int8 region stay int8 even when only float ops read them (see
    PASSTHROUGH_OPS); with `ranges` (calibrated), not a Concat that would widen an input's range
    more than MAX_CONCAT_WIDENING times (without ranges, while planning statistics, it is kept)."""
    excluded: set[str] = set()
    float_outputs: set[str] = set()
    passthrough: set[str] = set()
    while True:
        placement = plan_placement(graph, frozenset(excluded), frozenset(float_outputs))
        dropped, floated = _prune_once(graph, placement, float_outputs, passthrough)
        if not dropped and not floated:
            readded = _int8_passthroughs(graph, placement, excluded, ranges)
            if not readded:
                return placement
            passthrough |= readded
            excluded -= readded
            continue
        excluded |= dropped
        float_outputs |= floated


def _prune_once(graph: Graph, placement: Placement, float_outputs: set[str], passthrough: set[str]) -> tuple[set[str], set[str]]:
    """Nodes of the planned region whose outputs feed no integer op: (to exclude, to give a float output)."""
    names = {p.name for p in placement.tensors}
    int8_nodes = {name for name, role in placement.roles.items() if role in INT8_ROLES}
    tensors = graph.tensors()
    dropped, floated = set(), set()
    for node in graph.nodes:
        role = placement.roles.get(node.name)
        if role not in ("own", "same", "scaled", "compute") or (role == "compute" and node.op in KEEP_CONV_OUTPUT):
            continue
        if (role == "compute" and node.name in float_outputs) or node.name in passthrough:
            continue
        output_names = {t.name for t in node.outputs}
        if node.outputs and len(node.outputs[0].outputs) == 1 and placement.roles.get(node.outputs[0].outputs[0].name) == "fused":
            output_names = {t.name for t in node.outputs[0].outputs[0].outputs}
        outputs = [tensors[name] for name in output_names if name in names]
        feeds_int8 = any(c.name in int8_nodes and placement.roles.get(c.name) != "fused" or c.op == "QuantizeLinear"
                         for t in outputs for c in t.outputs)
        if not feeds_int8:
            (floated if role == "compute" else dropped).add(node.name)
    return dropped, floated


def _int8_passthroughs(graph: Graph, placement: Placement, excluded: set[str],
                       ranges: Mapping[str, Range] | None) -> set[str]:
    """Excluded PASSTHROUGH_OPS nodes, in graph order, whose activation inputs are all produced in
    the int8 region (or by an earlier node of this set)."""
    planned = {p.name: p for p in placement.tensors}
    region = set(planned)
    known: dict[str, Range] = {}

    def value_range(name: str) -> Range | None:
        if name in known:
            return known[name]
        if ranges is not None and name in ranges:
            return ranges[name]
        item = planned.get(name)
        if item is not None and item.copy_from is not None:
            source = value_range(item.copy_from)
            if source is not None:
                return Range(source.low * item.factor, source.high * item.factor)
        return None

    readded: set[str] = set()
    for node in graph.nodes:
        if node.name not in excluded or node.op not in PASSTHROUGH_OPS:
            continue
        if any(_reaches_quantized_softmax(graph, output) for output in node.outputs):
            continue
        activations = [t for t in node.inputs if t.name and graph.constant_value(t) is None]
        if node.op in SAME_SCALE_OPS:
            activations = activations[:1]
        elif len(activations) != len([t for t in node.inputs if t.name]):
            continue  # a Concat with a constant input has no integer kernel
        if not activations or not all(t.name in region and _is_float(t) for t in activations):
            continue
        if node.op == "Concat":
            combined = _concat_range([value_range(t.name) for t in activations], ranges is not None)
            if combined is False:
                continue
        for output in node.outputs:
            if graph.is_graph_output(output) or not _is_float(output):
                break
        else:
            readded.add(node.name)
            for output in node.outputs:
                region.add(output.name)
                source = combined if node.op == "Concat" else value_range(activations[0].name)
                if source is not None:
                    known[output.name] = source
    return readded


def _reaches_quantized_softmax(graph: Graph, tensor: Tensor) -> bool:
    """Whether a DequantizeLinear on `tensor` would end up right before a Softmax whose output is
    quantized. ORT moves a DQ forward through DQ_PROPAGATING_OPS and then fuses DQ -> Softmax -> Q
    into QLinearSoftmax, which measured 2-3.5x slower than the float Softmax plus its Q on YOLOv8's
    DFL head (benchmarks/results/latency.md)."""
    for consumer in tensor.outputs:
        if consumer.op == "Softmax" and consumer.outputs and _existing_q(consumer.outputs[0]) is not None:
            return True
        if consumer.op in DQ_PROPAGATING_OPS and consumer.inputs and consumer.inputs[0] is tensor \
                and any(_reaches_quantized_softmax(graph, output) for output in consumer.outputs):
            return True
    return False


def _concat_range(inputs: list[Range | None], checked: bool) -> Range | None | bool:
    """The union of a Concat's input ranges; False if `checked` and one input is much narrower."""
    if any(r is None for r in inputs):
        return False if checked else None
    low = min(min(float(r.low), 0.0) for r in inputs)
    high = max(max(float(r.high), 0.0) for r in inputs)
    for r in inputs:
        width = max(float(r.high), 0.0) - min(float(r.low), 0.0)
        if checked and (high - low) > MAX_CONCAT_WIDENING * max(width, 1e-12):
            return False
    return Range(low, high)


def shared_concat_ranges(graph: Graph, placement: Placement, ranges: Mapping[str, Range]) -> dict[str, Range]:
    """Concat inputs quantized with their Concat's own range where that costs nothing: ORT's
    QLinearConcat then copies their bytes (it re-quantizes through a lookup table, single-threaded,
    otherwise) and the Concat adds no second rounding.

    Matches each input of a Concat of the region whose value reaches nothing but that Concat: the
    tensor that sets its parameters (a calibrated planned tensor, followed back through same-scale
    ops) and the tensors copying them are read only by this Concat, by the same-scale ops between,
    and by Shape/Size. Such an input is re-quantized to the Concat's scale anyway, so taking that
    scale directly only removes a rounding. An input that other ops read keeps its own scale:
    giving YOLOv8's C2f inputs the Concat's scale even where that widened their range by at most
    10% cost 0.3 dB SQNR and 3 points of box agreement on 128 images. Concats are visited last to first, so a Concat feeding
    another (YOLOv8's head: per-level Concat -> Reshape -> Concat) takes the later one's range.
    Returns {tensor whose parameters are set: range}."""
    planned = {p.name: p for p in placement.tensors}
    copies: dict[str, list[str]] = {}
    for item in placement.tensors:
        if item.copy_from is not None and item.factor == 1.0:
            copies.setdefault(item.copy_from, []).append(item.name)
    tensors = graph.tensors()
    shared: dict[str, Range] = {}
    for node in reversed(graph.nodes):
        if placement.roles.get(node.name) != "own" or node.op != "Concat" or node.outputs[0].name not in planned:
            continue
        target = shared.get(node.outputs[0].name, ranges.get(node.outputs[0].name))
        if target is None:
            continue
        for tensor in node.inputs:
            root = _parameter_source(tensor.name, planned)
            if root is not None and root in ranges and _reaches_only(tensors, root, copies, node):
                shared[root] = target
    return shared


def _parameter_source(name: str, planned: Mapping[str, PlannedTensor]) -> str | None:
    """The planned, calibrated tensor whose scale `name` copies (itself if calibrated), or None."""
    while name in planned:
        item = planned[name]
        if item.factor != 1.0:
            return None
        if item.copy_from is None:
            return name
        name = item.copy_from
    return None


def _reaches_only(tensors: Mapping[str, Tensor], root: str, copies: Mapping[str, list[str]], concat: Node) -> bool:
    """Whether `root` and the tensors copying its scale are read only by `concat`, by the same-scale
    ops producing those copies, and by Shape/Size."""
    pending, seen = [root], set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        descendants = set(copies.get(name, ()))
        for reader in tensors[name].outputs:
            if reader is concat or reader.op in ("Shape", "Size"):
                continue
            produced = {t.name for t in reader.outputs}
            if reader.op not in SAME_SCALE_OPS or not produced <= descendants:
                return False
        pending.extend(descendants)
    return True
