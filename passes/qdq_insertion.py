"""QDQ insertion: the lossy pass that turns float Conv/ConvTranspose/MatMul/Gemm into their
quantized QuantizeLinear/DequantizeLinear form."""

from __future__ import annotations

import numpy as np

from ..config import BiasMode, QType
from ..context import CompileContext
from ..ir import Constant, Graph, Node, Tensor
from ..quant_params import (QuantParams, activation_params, bias_params, bias_scale_floor, quantize,
                            quantize_bias, weight_params)
from .base import Pass, PassKind, PassResult, StatisticRequest
from .quantizable import QuantizableNode, activation_tensors, plan

# reduce_range: |q| <= 63, so that vpmaddubsw's pair sums (2 x 255 x 63 = 32130) fit its saturating int16.
REDUCED_WEIGHT_MAX = 63


def reduced_range_floor(weights: np.ndarray, axis: int | None, bias_floor: np.ndarray | None) -> np.ndarray:
    """The scale floor that makes `weight_params` store 7-bit weights: abs-max / 63 per channel
    (per tensor with axis None), or the int32-bias floor where that is larger."""
    magnitudes = np.abs(np.asarray(weights, dtype=np.float32))
    if axis is None:
        abs_max = np.asarray(magnitudes.max() if magnitudes.size else 0.0)
    else:
        abs_max = magnitudes.max(axis=tuple(i for i in range(magnitudes.ndim) if i != axis))
    floor = abs_max.astype(np.float64) / REDUCED_WEIGHT_MAX
    return floor if bias_floor is None else np.maximum(floor, bias_floor)


def note_reduced_range(context: CompileContext) -> None:
    note = "weights quantized to 7 bits ([-63, 63], reduce_range) for CPUs without VNNI"
    if note not in context.summary.notes:
        context.summary.notes.append(note)


class InsertQDQ(Pass):
    """Wraps the inputs of quantizable ops in QuantizeLinear/DequantizeLinear.

    Matches: the nodes `quantizable.plan` accepts (Conv, ConvTranspose, MatMul, Gemm with a float
    constant weight; MatMul of two activations when enabled), excluding nodes and op types the
    config names.
    Rewrites: each activation input gets Q -> DQ with per-tensor parameters from its calibrated
    range (one pair per tensor, shared by all quantized consumers); each weight is stored as int8
    (symmetric, per channel along the op's output-channel axis; in [-63, 63] with reduce_range)
    behind a DequantizeLinear; a bias is stored as int32 (scale = input scale x weight scale)
    behind a DequantizeLinear when the config asks for it, else left in float.
    Guarantees: every scale is finite and > 0; graph inputs and outputs keep their names and types;
    nodes not matched are untouched; already-quantized inputs (fed by DequantizeLinear) are not
    matched again, so the pass is idempotent.
    """

    name = "insert-qdq"
    kind = PassKind.LOSSY

    def statistics_needed(self, graph: Graph, context: CompileContext) -> list[StatisticRequest]:
        return [StatisticRequest(name) for name in activation_tensors(graph, context.config)]

    def run(self, graph: Graph, context: CompileContext) -> PassResult:
        matches, decisions = plan(graph, context.config)
        # Keep earlier passes' decisions (per-token lowering) about nodes this plan no longer sees.
        planned = {decision.node for decision in decisions}
        context.summary.decisions = [d for d in context.summary.decisions if d.node not in planned] + decisions
        inserter = _Inserter(graph, context)
        changes = [inserter.quantize_node(match) for match in matches]
        if changes and context.config.resolved_reduce_range:
            note_reduced_range(context)
        if changes:
            graph.cleanup()
        return PassResult(bool(changes), changes)


class _Inserter:
    def __init__(self, graph: Graph, context: CompileContext):
        self.graph = graph
        self.context = context
        self.config = context.config
        self.activation_dq: dict[str, tuple[Tensor, QuantParams]] = {}
        self.weight_dq: dict[tuple[str, int | None, bytes], Tensor] = {}

    def quantize_node(self, match: QuantizableNode) -> str:
        node = match.node
        activation_scale = None
        for index in match.activation_inputs:
            dequantized, params = self._activation(node.inputs[index])
            self.graph.replace_input(node, node.inputs[index], dequantized)
            activation_scale = params.scale if activation_scale is None else activation_scale
        if match.weight_input is None:
            return f"{node.name}: activations"
        weight = node.inputs[match.weight_input]
        weight_value = self.graph.constant_value(weight).astype(np.float32)
        bias_floor, bias_value = None, None
        if match.bias_input is not None and self.config.resolved_bias is BiasMode.INT32:
            bias_value = self.graph.constant_value(node.inputs[match.bias_input]).astype(np.float32)
            if not self._bias_fits_channels(node, match, weight_value, bias_value):
                bias_value = None
        quantize_bias_int32 = bias_value is not None
        if quantize_bias_int32:
            bias_floor = bias_scale_floor(bias_value, float(activation_scale))
        weight_dq, weight_quant = self._weight(weight, weight_value, match.weight_axis, bias_floor)
        self.graph.replace_input(node, weight, weight_dq)
        if quantize_bias_int32:
            bias = node.inputs[match.bias_input]
            params = bias_params(activation_scale, weight_quant.scale)
            bias_dq = self._dequantize_constant(f"{bias.name}_quantized", quantize_bias(bias_value, params), params)
            self.graph.replace_input(node, bias, bias_dq)
        return f"{node.name}: weight axis {match.weight_axis}, bias {'int32' if quantize_bias_int32 else 'float'}"

    @staticmethod
    def _bias_fits_channels(node: Node, match: QuantizableNode, weight: np.ndarray, bias: np.ndarray) -> bool:
        # int32 bias needs exactly one weight scale per output channel; grouped ConvTranspose
        # weights share scales across groups and Gemm may broadcast a 2-D bias, so those stay float.
        if node.op == "ConvTranspose" and int(node.attrs.get("group", 1)) != 1:
            return False
        if bias.ndim != 1:
            return False
        return match.weight_axis is None or bias.shape[0] == weight.shape[match.weight_axis]

    def _activation(self, tensor: Tensor) -> tuple[Tensor, QuantParams]:
        if tensor.name in self.activation_dq:
            return self.activation_dq[tensor.name]
        value_range = self.context.activation_ranges.get(tensor.name)
        if value_range is None:
            raise KeyError(f"no calibrated range for activation '{tensor.name}'")
        qtype = self.config.activation_type
        params = activation_params(value_range, qtype)
        scale = self.graph.add_initializer(f"{tensor.name}_scale", params.scale)
        zero_point = self.graph.add_initializer(f"{tensor.name}_zero_point", params.zero_point)
        quantized_dtype = np.uint8 if qtype is QType.UINT8 else np.int8
        q_node = self.graph.add_node("QuantizeLinear", [tensor, scale, zero_point], f"{tensor.name}_QuantizeLinear",
                                     output_dtype=quantized_dtype, output_shape=tensor.shape)
        dq_node = self.graph.add_node("DequantizeLinear", [q_node.outputs[0], scale, zero_point],
                                      f"{tensor.name}_DequantizeLinear", output_dtype=np.float32, output_shape=tensor.shape)
        self.activation_dq[tensor.name] = (dq_node.outputs[0], params)
        return self.activation_dq[tensor.name]

    def _weight(self, weight: Tensor, value: np.ndarray, axis: int | None, bias_floor: np.ndarray | None) -> tuple[Tensor, QuantParams]:
        if self.config.resolved_reduce_range:
            bias_floor = reduced_range_floor(value, axis, bias_floor)
        params = weight_params(value, axis, bias_floor)
        key = (weight.name, axis, params.scale.tobytes())
        if key not in self.weight_dq:
            self.weight_dq[key] = self._dequantize_constant(f"{weight.name}_quantized", quantize(value, params), params)
        return self.weight_dq[key], params

    def _dequantize_constant(self, base_name: str, quantized: np.ndarray, params: QuantParams) -> Tensor:
        """An integer initializer behind a DequantizeLinear; returns the float output tensor."""
        stored: Constant = self.graph.add_initializer(base_name, quantized)
        scale = self.graph.add_initializer(f"{base_name}_scale", params.scale)
        zero_point = self.graph.add_initializer(f"{base_name}_zero_point", params.zero_point)
        attrs = {"axis": params.axis} if params.axis is not None else {}
        dq_node = self.graph.add_node("DequantizeLinear", [stored, scale, zero_point], f"{base_name}_DequantizeLinear",
                                      attrs=attrs, output_dtype=np.float32, output_shape=list(quantized.shape))
        return dq_node.outputs[0]
