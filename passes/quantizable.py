"""Which nodes can be quantized, and how: the matching half of QDQ insertion.

Shared by the planning step (which tensors must be calibrated) and by the insertion pass, so both
always agree. Matches Conv, ConvTranspose, MatMul and Gemm whose weight is a float constant (or, on
request, MatMuls of two float activations) and decides the per-channel axis of each weight:
Conv 0 (weight [M, C/g, kH, kW]); ConvTranspose 1 (weight [C, M/g, kH, kW]); Gemm 0 with transB=1
(B is [N, K]) else 1; MatMul the last axis (B is [..., K, N]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import QuantConfig
from ..context import NodeDecision
from ..ir import Graph, Node, Tensor, matches_any

@dataclass(frozen=True)
class QuantizableNode:
    """A matched node: which inputs are activations, which is the weight and along which axis."""

    node: Node
    activation_inputs: tuple[int, ...]
    weight_input: int | None = None
    weight_axis: int | None = None
    bias_input: int | None = None


def _is_float(tensor: Tensor) -> bool:
    """True for float32 tensors and for tensors whose type shape inference could not tell."""
    if tensor.dtype is None:
        return True
    try:
        return np.dtype(tensor.dtype) == np.float32
    except TypeError:  # graphsurgeon keeps non-numpy types (bfloat16, float8) as TensorProto enums
        return False


def _is_dequantized(tensor: Tensor) -> bool:
    return bool(tensor.inputs) and tensor.inputs[0].op == "DequantizeLinear"


def _weight_axis(node: Node, weight: np.ndarray) -> int:
    if node.op == "Conv":
        return 0
    if node.op == "ConvTranspose":
        return 1
    if node.op == "Gemm":
        return 0 if int(node.attrs.get("transB", 0)) else 1
    return weight.ndim - 1  # MatMul


def match_input_op(graph: Graph, node: Node, config: QuantConfig) -> QuantizableNode | str:
    """A weightless op named in `config.quantize_input_op_types`: its float, non-constant,
    not yet dequantized inputs are the activations to quantize."""
    if node.op in config.exclude_op_types:
        return f"op type {node.op} excluded"
    if matches_any(node.name, config.exclude_nodes):
        return "excluded by name"
    indices = tuple(index for index, tensor in enumerate(node.inputs)
                    if tensor.name and _is_float(tensor) and graph.constant_value(tensor) is None
                    and not _is_dequantized(tensor))
    return QuantizableNode(node, activation_inputs=indices) if indices else "no float activation input left to quantize"


def match_node(graph: Graph, node: Node, config: QuantConfig) -> QuantizableNode | str:
    """The match for `node`, or a one-line reason it is left in float."""
    if node.op in config.quantize_input_op_types:
        return match_input_op(graph, node, config)
    if node.op not in config.op_types:
        return f"{node.op} is not a quantizable op type"
    if node.op in config.exclude_op_types:
        return f"op type {node.op} excluded"
    if matches_any(node.name, config.exclude_nodes):
        return "excluded by name"
    inputs = [t for t in node.inputs]
    if len(inputs) < 2 or any(not t.name for t in inputs[:2]):
        return "missing inputs"
    data, weight = inputs[0], inputs[1]
    if any(_is_dequantized(t) for t in (data, weight)):
        return "already quantized"
    if not _is_float(data):
        return f"input is {data.dtype}, not float32"
    if graph.constant_value(data) is not None:
        return "first input is a constant"
    weight_value = graph.constant_value(weight)
    if weight_value is None:
        if node.op == "MatMul":
            if not config.quantize_activation_matmul:
                return "both inputs are activations (enable quantize_activation_matmul)"
            if not _is_float(weight):
                return f"input is {weight.dtype}, not float32"
            return QuantizableNode(node, activation_inputs=(0, 1))
        return "weight is not a constant"
    if weight_value.dtype != np.float32:
        return f"weight is {weight_value.dtype.name}, not float32"
    if weight_value.ndim < 2:
        return "weight has fewer than 2 dimensions"
    bias_input = None
    if node.op in ("Conv", "ConvTranspose", "Gemm") and len(inputs) > 2 and inputs[2].name:
        bias_value = graph.constant_value(inputs[2])
        if bias_value is not None and bias_value.dtype == np.float32:
            bias_input = 2
    axis = _weight_axis(node, weight_value) if config.per_channel else None
    return QuantizableNode(node, activation_inputs=(0,), weight_input=1, weight_axis=axis, bias_input=bias_input)


def plan(graph: Graph, config: QuantConfig) -> tuple[list[QuantizableNode], list[NodeDecision]]:
    """All matches in graph order, plus a decision record for every candidate op."""
    matches: list[QuantizableNode] = []
    decisions: list[NodeDecision] = []
    for node in graph.nodes:
        if node.op not in ("Conv", "ConvTranspose", "MatMul", "Gemm") and node.op not in config.quantize_input_op_types:
            continue
        outcome = match_node(graph, node, config)
        if isinstance(outcome, str):
            decisions.append(NodeDecision(node.name, node.op, False, outcome))
        else:
            matches.append(outcome)
            detail = ("per-channel" if outcome.weight_axis is not None else
                      "per-tensor" if outcome.weight_input is not None else "activation inputs")
            decisions.append(NodeDecision(node.name, node.op, True, detail))
    return matches, decisions


def activation_tensors(graph: Graph, config: QuantConfig) -> list[str]:
    """Names of the activations whose ranges the insertion pass will need, in graph order."""
    names: list[str] = []
    for match in plan(graph, config)[0]:
        for index in match.activation_inputs:
            name = match.node.inputs[index].name
            if name not in names:
                names.append(name)
    return names
