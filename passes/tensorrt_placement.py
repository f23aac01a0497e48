"""TensorRT placement: moves and adds Q/DQ pairs after `InsertQDQ` where TensorRT's fusions want
them. Every rule here was checked against the TensorRT(-RTX) builder's verbose layer table (see
tests/tensorrt/), not only against NVIDIA's documentation.

Every pair written here is int8, symmetric (zero point 0), per tensor; `fp8=True` re-encodes the
finished pairs as FP8 E4M3 at the same places (qcompiler/tensorrt/fp8.py). The helpers take a
`QType` and weights are matched only through "DQ feeds the op directly", so block-wise int4
weights (a later issue) can reuse this placement unchanged.
"""

from __future__ import annotations

import numpy as np

from ..config import QType
from ..context import CompileContext
from ..ir import Graph, Node, Tensor
from ..quant_params import activation_params
from .base import Pass, PassKind, PassResult, StatisticRequest

COMPUTE_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")
# Ops that only select, reorder or reshape values: a Q/DQ pair commutes with them exactly.
# MaxPool too: clipping its input to the output's range cannot change any window's maximum.
COMMUTING_OPS = ("MaxPool", "Reshape", "Transpose", "Slice", "Squeeze", "Unsqueeze", "Flatten")
SPLITTING_OPS = ("Slice", "Split", "Gather")
# Producers whose output TensorRT-RTX cannot write in Int8 (seen in the build log on PP-OCR's FPN
# and SE blocks: a pair after them becomes an extra standalone quantize layer and more bytes).
NO_INT8_OUTPUT_OPS = ("Resize", "Upsample", "GlobalAveragePool", "AveragePool", "ReduceMean")


def writes_int8_cheaply(graph: Graph, tensor: Tensor) -> bool:
    """Whether a pair on `tensor` can fuse into its producer (a graph input cannot)."""
    producer = graph.producer(tensor)
    return producer is not None and producer.op not in NO_INT8_OUTPUT_OPS


# ---- reading Q/DQ structure ----------------------------------------------------------------------
def quantized_copy(tensor: Tensor) -> Tensor | None:
    """The output of an existing `DQ(Q(tensor))` pair, if the graph has one."""
    for consumer in tensor.outputs:
        if consumer.op == "QuantizeLinear" and consumer.inputs[0].name == tensor.name:
            for user in consumer.outputs[0].outputs:
                if user.op == "DequantizeLinear":
                    return user.outputs[0]
    return None


def is_dequantized(tensor: Tensor) -> bool:
    return bool(tensor.inputs) and tensor.inputs[0].op == "DequantizeLinear"


def dequantized_source(tensor: Tensor) -> Tensor:
    """`x` for a tensor `DQ(Q(x))`, else the tensor itself."""
    if is_dequantized(tensor):
        q_output = tensor.inputs[0].inputs[0]
        if q_output.inputs and q_output.inputs[0].op == "QuantizeLinear":
            return q_output.inputs[0].inputs[0]
    return tensor


def single_consumer(graph: Graph, tensor: Tensor) -> Node | None:
    consumers = list(tensor.outputs)
    if len(consumers) != 1 or graph.is_graph_output(tensor):
        return None
    return consumers[0]


def quantized_compute_output(graph: Graph, tensor: Tensor) -> Node | None:
    """The quantized Conv/ConvTranspose/MatMul/Gemm whose output is `tensor`, directly or through a
    bias Add with a constant (how exporters write Linear layers), when nothing else reads it."""
    producer = graph.producer(tensor)
    if producer is not None and producer.op == "Add":
        values = [graph.constant_value(t) for t in producer.inputs]
        if sum(v is not None for v in values) == 1:
            activation = producer.inputs[0] if values[0] is None else producer.inputs[1]
            if single_consumer(graph, activation) is producer:
                producer = graph.producer(activation)
    if producer is None or producer.op not in COMPUTE_OPS or not is_dequantized(producer.inputs[0]):
        return None
    return producer


# ---- writing Q/DQ pairs --------------------------------------------------------------------------
def add_activation_qdq(graph: Graph, tensor: Tensor, scale: np.ndarray, qtype: QType = QType.INT8) -> Tensor:
    """A new `DQ(Q(tensor))` with the given per-tensor scale (zero point 0); returns the DQ output."""
    if qtype is not QType.INT8:
        raise NotImplementedError(f"TensorRT placement writes int8 pairs only, not {qtype.value}")
    scale_tensor = graph.add_initializer(f"{tensor.name}_scale", np.asarray(scale, dtype=np.float32))
    zero_point = graph.add_initializer(f"{tensor.name}_zero_point", np.zeros((), dtype=np.int8))
    q_node = graph.add_node("QuantizeLinear", [tensor, scale_tensor, zero_point], f"{tensor.name}_QuantizeLinear",
                            output_dtype=np.int8, output_shape=tensor.shape)
    dq_node = graph.add_node("DequantizeLinear", [q_node.outputs[0], scale_tensor, zero_point],
                             f"{tensor.name}_DequantizeLinear", output_dtype=np.float32, output_shape=tensor.shape)
    return dq_node.outputs[0]


def range_scale(context: CompileContext, tensor: str) -> np.ndarray:
    value_range = context.activation_ranges.get(tensor)
    if value_range is None:
        raise KeyError(f"no calibrated range for activation '{tensor}'")
    return activation_params(value_range, QType.INT8).scale


def pair_scale(graph: Graph, dq_output: Tensor) -> np.ndarray | None:
    dq = graph.producer(dq_output)
    return None if dq is None else graph.constant_value(dq.inputs[1])


class QuantizeResidualSkip(Pass):
    """Q/DQ on the skip input of a residual Add that TensorRT fuses into the preceding layer.

    Matches: Add(a, b) of two float activations where `a` is the output of a quantized
    Conv/ConvTranspose/MatMul/Gemm (directly or after its constant bias Add) read by nothing else,
    and `b` is not yet dequantized.
    Rewrites: `b` is read through `DQ(Q(b))` (an existing pair on `b` is reused); `a` stays float.
    Build log: the Add then runs inside the conv's epilogue layer (its metadata lists the conv and
    the Add) reading the skip as Int8, and the layer producing the skip writes only Int8; without
    the pair it must also write a Float copy. A pair between the conv and the Add is never added.
    Guarantees: graph outputs untouched; idempotent (a dequantized skip is not matched again).
    """

    name = "tensorrt-residual-skip"
    kind = PassKind.LOSSY

    def _matches(self, graph: Graph) -> list[tuple[Node, int]]:
        matches = []
        for node in graph.nodes:
            if node.op != "Add" or len(node.inputs) != 2:
                continue
            if any(graph.constant_value(t) is not None for t in node.inputs):
                continue
            for branch in (0, 1):
                conv_side, skip = node.inputs[branch], node.inputs[1 - branch]
                if (single_consumer(graph, conv_side) is node and quantized_compute_output(graph, conv_side) is not None
                        and not is_dequantized(skip) and quantized_compute_output(graph, skip) is None):
                    matches.append((node, 1 - branch))
                    break
        return matches

    def statistics_needed(self, graph: Graph, context: CompileContext) -> list[StatisticRequest]:
        return [StatisticRequest(node.inputs[index].name) for node, index in self._matches(graph)
                if quantized_copy(node.inputs[index]) is None]

    def run(self, graph: Graph, context: CompileContext) -> PassResult:
        changes = []
        for node, index in self._matches(graph):
            skip = node.inputs[index]
            dequantized = quantized_copy(skip) or add_activation_qdq(graph, skip, range_scale(context, skip.name))
            graph.replace_input(node, skip, dequantized)
            changes.append(f"{node.name}: Q/DQ on skip input {skip.name}")
        if changes:
            graph.cleanup()
        return PassResult(bool(changes), changes)


class QuantizeStandaloneAdd(Pass):
    """Q/DQ on every input of an Add that sits in an INT8 region but fuses into no conv.

    Matches: Add of two float activations whose output is quantized (read by a QuantizeLinear),
    where neither input is the private output of a quantized compute op (that case is a residual,
    see QuantizeResidualSkip), some input is not yet dequantized, and every input's producer can
    write Int8 (not Resize / average pooling / a graph input).
    Rewrites: each input is read through `DQ(Q(x))` with its own calibrated scale (reusing a pair
    x already has).
    Build log: the producers then write Int8 (a MaxPool before the Add runs as an Int8 `maxpool`
    and the conv epilogue before it fuses the quantize) instead of Float.
    Guarantees: idempotent; Adds outside INT8 regions (e.g. before a LayerNorm) are untouched.
    """

    name = "tensorrt-standalone-add"
    kind = PassKind.LOSSY

    def _matches(self, graph: Graph) -> list[Node]:
        found = []
        for node in graph.nodes:
            if node.op != "Add" or len(node.inputs) != 2 or any(graph.constant_value(t) is not None for t in node.inputs):
                continue
            if not any(c.op == "QuantizeLinear" for c in node.outputs[0].outputs) or all(is_dequantized(t) for t in node.inputs):
                continue
            if any(single_consumer(graph, t) is node and quantized_compute_output(graph, t) is not None for t in node.inputs):
                continue
            if not all(is_dequantized(t) or writes_int8_cheaply(graph, t) for t in node.inputs):
                continue
            found.append(node)
        return found

    def statistics_needed(self, graph: Graph, context: CompileContext) -> list[StatisticRequest]:
        return [StatisticRequest(t.name) for node in self._matches(graph) for t in node.inputs
                if not is_dequantized(t) and quantized_copy(t) is None]

    def run(self, graph: Graph, context: CompileContext) -> PassResult:
        changes = []
        for node in self._matches(graph):
            for tensor in list(node.inputs):
                if not is_dequantized(tensor):
                    dequantized = quantized_copy(tensor) or add_activation_qdq(graph, tensor, range_scale(context, tensor.name))
                    graph.replace_input(node, tensor, dequantized)
            changes.append(f"{node.name}: Q/DQ on all inputs")
        if changes:
            graph.cleanup()
        return PassResult(bool(changes), changes)


class PropagateQDQBackward(Pass):
    """Moves quantization backward through ops TensorRT commutes Q/DQ with, so the layer before
    them can write Int8 instead of leaving a float-only gap.

    Matches: `Q(op(y))` where op is MaxPool/Reshape/Transpose/Slice/Squeeze/Unsqueeze/Flatten,
    its output is read only by that Q, and `y` is either read only by op or already has a pair
    with the same scale (elsewhere it would cost a float copy), and is not yet dequantized.
    Rewrites: op reads `DQ(Q(y))` with the same scale (reusing y's pair); the later pair stays
    (Q(DQ(q)) with equal scales is exact and TensorRT folds it). Exact on values: these ops select or move values, and
    MaxPool's maximum is unchanged by clipping its input to the output's range.
    Guarantees: idempotent; graph inputs/outputs untouched.
    """

    name = "tensorrt-propagate-qdq"
    kind = PassKind.EXACT

    def run(self, graph: Graph, context: CompileContext) -> PassResult:
        changes = []
        progress = True
        while progress:  # a chain (MaxPool -> MaxPool -> Q) moves one op per round
            progress = False
            for q_node in [n for n in graph.nodes if n.op == "QuantizeLinear"]:
                source = q_node.inputs[0]
                op = graph.producer(source)
                if op is None or op.op not in COMMUTING_OPS or single_consumer(graph, source) is not q_node:
                    continue
                data = op.inputs[0]
                scale = graph.constant_value(q_node.inputs[1])
                if is_dequantized(data) or graph.constant_value(data) is not None or scale is None or np.asarray(scale).size != 1:
                    continue
                existing = quantized_copy(data)
                if existing is not None and np.array_equal(pair_scale(graph, existing), scale):
                    # e.g. YOLO's SPPF: x and MaxPool(x) both feed one Concat with a shared scale
                    graph.replace_input(op, data, existing)
                elif single_consumer(graph, data) is op:
                    graph.replace_input(op, data, add_activation_qdq(graph, data, np.asarray(scale).reshape(())))
                else:
                    continue
                changes.append(f"{op.name}: reads its input {data.name} through Q/DQ")
                progress = True
        if changes:
            graph.cleanup()
        return PassResult(bool(changes), changes)


class ShareConcatScale(Pass):
    """One scale for all inputs and the output of a quantized Concat, so the pairs cancel.

    Matches: Concat whose output is quantized (read by a per-tensor QuantizeLinear) with float
    activation inputs, each dequantized already or produced by an op that can write Int8 (not
    Resize / pooling-to-average / a graph input: there the build log shows an extra quantize layer).
    Rewrites: every input is read through `DQ(Q(x))` and the output's pair uses the same scale,
    the widest of the inputs' and the output's calibrated ranges (nothing clips). An input that
    already has a pair with another scale gets its own new pair.
    Build log: the Concat disappears into Int8 copies (no float concat, no requantize kernel).
    Guarantees: idempotent; all pairs of one Concat share one scale, finite and > 0.
    """

    name = "tensorrt-concat-scale"
    kind = PassKind.LOSSY

    @staticmethod
    def _output_quantizers(node: Node) -> list[Node]:
        return [c for c in node.outputs[0].outputs if c.op == "QuantizeLinear"]

    def _matches(self, graph: Graph) -> list[Node]:
        found = []
        for node in graph.nodes:
            if node.op != "Concat" or not self._output_quantizers(node):
                continue
            if any(graph.constant_value(t) is not None for t in node.inputs):
                continue
            if not all(is_dequantized(t) or writes_int8_cheaply(graph, t) for t in node.inputs):
                continue
            scales = {float(np.asarray(pair_scale(graph, t)).reshape(-1)[0]) if is_dequantized(t) else None for t in node.inputs}
            output_scales = {float(np.asarray(graph.constant_value(q.inputs[1])).reshape(-1)[0]) for q in self._output_quantizers(node)}
            if len(scales | output_scales) == 1 and None not in scales:
                continue  # already shared
            found.append(node)
        return found

    def statistics_needed(self, graph: Graph, context: CompileContext) -> list[StatisticRequest]:
        names = []
        for node in self._matches(graph):
            names += [dequantized_source(t).name for t in node.inputs] + [node.outputs[0].name]
        return [StatisticRequest(name) for name in dict.fromkeys(names)]

    def run(self, graph: Graph, context: CompileContext) -> PassResult:
        changes = []
        for node in self._matches(graph):
            names = [dequantized_source(t).name for t in node.inputs]
            scale = max(float(range_scale(context, name)) for name in names + [node.outputs[0].name]
                        if name in context.activation_ranges)
            shared = np.asarray(scale, dtype=np.float32)
            for tensor in list(node.inputs):
                graph.replace_input(node, tensor, add_activation_qdq(graph, dequantized_source(tensor), shared))
            for q_node in self._output_quantizers(node):
                q_node.inputs[1] = graph.add_initializer(f"{node.outputs[0].name}_shared_scale", shared)
                for dq in q_node.outputs[0].outputs:
                    if dq.op == "DequantizeLinear":
                        dq.inputs[1] = q_node.inputs[1]
            changes.append(f"{node.name}: {len(node.inputs)} inputs and output share scale {scale:.6g}")
        if changes:
            graph.cleanup()
        return PassResult(bool(changes), changes)


class QuantizeProjectionSplit(Pass):
    """Q/DQ on a fused projection's output before it is split (e.g. one QKV MatMul then Slices).

    Matches: a quantized MatMul/Gemm whose output (after its constant bias Add) reaches, through
    Reshape/Transpose only, a tensor read by two or more Slice/Split/Gather nodes.
    Rewrites: that MatMul-side tensor (bias Add output) is read through `DQ(Q(.))`.
    Build log: without it TensorRT-RTX moves the reshape/transpose/slices onto the weight, which
    it then dequantizes apart, and the MatMul runs with a Float weight (`runtime_fusion`,
    `CastMulFc`); with the pair it stays an Int8 `gemm`.
    Guarantees: idempotent; nothing else changes.
    """

    name = "tensorrt-projection-split"
    kind = PassKind.LOSSY

    def _matches(self, graph: Graph) -> list[Tensor]:
        found = []
        for node in graph.nodes:
            if node.op not in ("MatMul", "Gemm") or not is_dequantized(node.inputs[0]):
                continue
            if graph.constant_value(node.inputs[1]) is None and not is_dequantized(node.inputs[1]):
                continue
            tensor = node.outputs[0]
            consumer = single_consumer(graph, tensor)
            if consumer is not None and consumer.op == "Add" and any(graph.constant_value(t) is not None for t in consumer.inputs):
                tensor = consumer.outputs[0]
            projected = tensor
            while True:
                consumer = single_consumer(graph, tensor)
                if consumer is None or consumer.op not in ("Reshape", "Transpose"):
                    break
                tensor = consumer.outputs[0]
            splits = [c for c in tensor.outputs if c.op in SPLITTING_OPS]
            if len(splits) >= 2 and single_consumer(graph, projected) is not None and projected.outputs[0].op != "QuantizeLinear":
                found.append(projected)
        return found

    def statistics_needed(self, graph: Graph, context: CompileContext) -> list[StatisticRequest]:
        return [StatisticRequest(t.name) for t in self._matches(graph)]

    def run(self, graph: Graph, context: CompileContext) -> PassResult:
        changes = []
        for tensor in self._matches(graph):
            consumer = tensor.outputs[0]
            graph.replace_input(consumer, tensor, add_activation_qdq(graph, tensor, range_scale(context, tensor.name)))
            changes.append(f"{tensor.name}: Q/DQ before the split")
        if changes:
            graph.cleanup()
        return PassResult(bool(changes), changes)


def tensorrt_passes() -> list[Pass]:
    """Section 3 of the pipeline for `target="tensorrt"`, in order."""
    return [QuantizeProjectionSplit(), QuantizeResidualSkip(), ShareConcatScale(), QuantizeStandaloneAdd(),
            PropagateQDQBackward()]
