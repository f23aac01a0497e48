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

from typing import Mapping

import numpy as np

from ..calibrators.base import Range
from ..config import QType
from ..context import CompileContext
from ..ir import Graph, Node, Tensor
from ..quant_params import activation_params, bias_params, quantize, quantize_bias
from .base import Pass, PassKind, PassResult, StatisticRequest
from .ort_region import COMPUTE_OPS, PlannedTensor, _activation_dq, _existing_q, plan_pruned, shared_concat_ranges

__all__ = ["OrtQuantizeOutputs", "plan_pruned"]

class OrtQuantizeOutputs(Pass):
    """Closes QDQ groups for ONNX Runtime: quantizes op outputs and the activation ops between them.

    Matches: Conv/MatMul/Gemm whose data and weight inputs are already dequantized (InsertQDQ's
    output), with a Relu or constant-bound Clip that is their only consumer folded into the group;
    then, in graph order: Add/Mul/Concat whose activation inputs are all quantized (Add/Mul may
    also take a small float constant, stored as uint8); Sigmoid, LeakyRelu, HardSigmoid,
    Global/AveragePool (first input quantized); Mul/Div by a positive scalar constant; and the
    data-movement ops MaxPool, Resize, Reshape, Transpose, Squeeze, Unsqueeze, Flatten, Split,
    Slice. An elementwise op whose output feeds no integer op stays float, and so does the output
    of a MatMul/Gemm that feeds only float ops (LowerMatMulIntegerToFloat handles those);
    data-movement ops and Concats fed only by the int8 region stay int8 up to their float readers
    (not a Concat widening an input's range > 4x, not where ORT would then form QLinearSoftmax;
    see ort_region.plan_pruned).
    Rewrites: each such output gets Q -> DQ with calibrated per-tensor parameters; data-movement
    outputs reuse their input's parameters (also an existing Q from InsertQDQ, whose consumers'
    int32 biases are re-quantized for the new input scale) so ORT runs them on uint8; a Concat
    input that nothing else reads is quantized with the Concat's range (ort_region.
    shared_concat_ranges); a Mul/Div by c > 0 becomes a DQ of its input's integers with scale s*c
    (the op disappears). An output that already has a Q is reused, not quantized twice.
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
        placement = plan_pruned(graph, context.activation_ranges)
        changes = []
        qtype = context.config.activation_type
        for node_name, index in placement.constants:
            node = graph.node_by_name(node_name)
            node.inputs[index] = _dequantized_constant(graph, node.inputs[index], qtype)
            changes.append(f"{node_name}: constant input {index} stored as {qtype.value}")
        shared = shared_concat_ranges(graph, placement, context.activation_ranges)
        for name, value_range in shared.items():
            existing = _existing_q(graph.tensors()[name])
            if existing is not None and _set_params(graph, existing, activation_params(value_range, qtype)):
                changes.append(f"{name}: shares its Concat's scale")
        for item in placement.tensors:
            tensor = graph.tensors()[item.name]
            dq_output = self._dequantized(graph, context, tensor, item, qtype, shared)
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
    def _dequantized(graph: Graph, context: CompileContext, tensor: Tensor, item: PlannedTensor, qtype: QType,
                     shared: Mapping[str, Range]) -> Tensor | None:
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
            value_range = shared.get(tensor.name, context.activation_ranges.get(tensor.name))
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
    zero point, so ORT runs the data-movement op on uint8 instead of dequantizing around it."""
    _, scale, zero_point = _quantized_source(graph, source)
    if scale is None or (q_node.inputs[1] is scale and q_node.inputs[2] is zero_point):
        return
    new_scale = graph.constant_value(scale)
    if graph.constant_value(q_node.inputs[1]) is None or new_scale is None or new_scale.size != 1:
        return
    _replace_params(graph, q_node, scale, zero_point)


def _set_params(graph: Graph, q_node: Node, params) -> bool:
    """Give an existing per-tensor Q/DQ pair new parameters (a Concat scale group's); False if it
    already has them."""
    old_scale, old_zero_point = graph.constant_value(q_node.inputs[1]), graph.constant_value(q_node.inputs[2])
    if old_scale is None or old_zero_point is None or old_scale.size != 1:
        return False
    if np.array_equal(old_scale, params.scale) and np.array_equal(old_zero_point, params.zero_point):
        return False
    name = q_node.inputs[0].name
    _replace_params(graph, q_node, graph.add_initializer(f"{name}_shared_scale", params.scale),
                    graph.add_initializer(f"{name}_shared_zero_point", params.zero_point))
    return True


def _replace_params(graph: Graph, q_node: Node, scale: Tensor, zero_point: Tensor) -> None:
    """Point a Q and the DQs reading it at `scale` and `zero_point`.

    The int32 biases of the ops reading those DQs were quantized with the old input scale; they are
    re-quantized for the new one (bias scale = input scale x weight scale), which changes each
    bias by at most half a bias step."""
    new_scale = graph.constant_value(scale)
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
