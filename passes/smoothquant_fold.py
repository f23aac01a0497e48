"""The matching half of SmoothQuant: which linear layers share an input, and where 1/s can go.

Matches (top to bottom):
- a *group*: the constant-weight MatMul/Gemm layers reading one root activation R, directly or
  through Reshape/Transpose/Identity that keep the last (channel) axis in place, e.g. the Q, K and
  V projections of one LayerNorm output. A group shares one smoothing scale, because 1/s applied
  to R reaches all of them.
- a *fold*: the ops that can absorb a per-channel factor on their output exactly, walking up from
  R's producer:
    LayerNormalization (last axis)      gamma, beta     x (1/s)
    SimplifiedLayerNormalization / RMSNormalization   gamma x (1/s)
    MatMul with a constant weight       weight columns  x (1/s)
    Gemm with a constant B (transB 0/1) B's output channels and bias C x (1/s)
    Mul by a constant                   the constant    x (1/s)   (a new initializer: a shared
                                                        scalar must not change, INC #2050)
    Div by a constant                   the constant    x s
    Add/Sub with a constant             the constant x (1/s), then fold into the other input's
                                        producer (this is how the decomposed LayerNorm
                                        ReduceMean..Mul(gamma)..Add(beta) and MatMul + Add bias fold)
  A fold is possible only when every consumer of R (and of each tensor on the way) is one of the
  group's layers, a channel-preserving reshape leading to them, or Shape (which reads no values),
  and none of them is a graph output; otherwise 1/s would leak into a residual Add or an output.

Everything here only plans: `FoldPlan` lists the constant edits, applied by the pass after all
checks passed, so a failed match never leaves a half-folded graph.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from ..config import QuantConfig
from ..ir import Graph, Node, Tensor
from .quantizable import match_node

CHANNEL_PRESERVING = ("Reshape", "Transpose", "Identity")
SHAPE_ONLY = ("Shape",)
LAYER_NORMS = ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization")
SMOOTHED_SUFFIX = "_smoothed"


@dataclass
class Linear:
    """A smoothable layer: input channel j of its activation meets `weight_rows()[j]`."""

    node: Node

    @property
    def weight(self) -> Tensor:
        return self.node.inputs[1]

    @property
    def input_channel_axis(self) -> int:
        # MatMul B is [K, N]; Gemm B is [K, N], or [N, K] with transB=1.
        return 1 if self.node.op == "Gemm" and int(self.node.attrs.get("transB", 0)) else 0

    def weight_rows(self, graph: Graph) -> np.ndarray:
        """The weight as [K, N]: row j multiplies input channel j."""
        value = graph.constant_value(self.weight).astype(np.float32)
        return value.T if self.input_channel_axis == 1 else value


@dataclass
class Group:
    """Layers sharing the root activation `root`; `inputs` are the tensors they read directly."""

    root: Tensor
    linears: list[Linear]
    inputs: list[Tensor]
    fold: "FoldPlan | None" = None
    unfoldable_reason: str = ""

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(linear.node.name for linear in self.linears)


@dataclass
class ConstantEdit:
    """Replace input `index` of `node` by (its constant value) * factor(s), broadcast on the last axis."""

    node: Node
    index: int
    transform: str  # "output_channels": multiply by 1/s on the op's output channels; "times_s": by s


@dataclass
class FoldPlan:
    producer: Node
    edits: list[ConstantEdit] = field(default_factory=list)
    changed_tensors: list[str] = field(default_factory=list)  # values change: drop stale statistics

    def describe(self) -> str:
        edited = dict.fromkeys(f"{edit.node.op} {edit.node.name}" for edit in self.edits)
        return "into " + ", ".join(edited)


def is_smoothable(graph: Graph, node: Node, config: QuantConfig) -> bool:
    """A MatMul/Gemm that QDQ insertion will quantize, with a 2-D constant weight and X as [.., K]."""
    if node.op not in ("MatMul", "Gemm"):
        return False
    match = match_node(graph, node, config)
    if isinstance(match, str) or match.weight_input != 1:
        return False
    if is_smoothed(node.inputs[1]):
        return False
    weight = graph.constant_value(node.inputs[1])
    if weight is None or weight.ndim != 2:
        return False
    return not (node.op == "Gemm" and int(node.attrs.get("transA", 0)))


def is_smoothed(weight: Tensor) -> bool:
    """Weights this pass already scaled carry the suffix, which keeps the pass idempotent."""
    return re.search(f"{SMOOTHED_SUFFIX}(_[0-9]+)?$", weight.name) is not None


def preserves_channels(node: Node) -> bool:
    """Reshape/Transpose/Identity that keep element (..., j) in channel j of the last axis."""
    if node.op == "Identity":
        return True
    if node.op == "Transpose":
        perm = node.attrs.get("perm")
        return perm is not None and int(perm[-1]) == len(perm) - 1
    if node.op == "Reshape":
        # Row-major reshape keeps channel j whenever the last dimension keeps its size.
        before, after = node.inputs[0].shape, node.outputs[0].shape
        return (bool(before) and bool(after) and isinstance(before[-1], int) and before[-1] > 0
                and before[-1] == after[-1])
    return False


def find_groups(graph: Graph, config: QuantConfig) -> list[Group]:
    """Every group of smoothable layers, in graph order of their first layer, with its fold plan."""
    smoothable = {node.name for node in graph.nodes if is_smoothable(graph, node, config)}
    groups: dict[str, Group] = {}
    for node in graph.nodes:
        if node.name not in smoothable:
            continue
        root = node.inputs[0]
        while root.inputs and preserves_channels(root.inputs[0]):
            root = root.inputs[0].inputs[0]
        group = groups.setdefault(root.name, Group(root, [], []))
        group.linears.append(Linear(node))
        if all(t.name != node.inputs[0].name for t in group.inputs):
            group.inputs.append(node.inputs[0])
    for group in groups.values():
        members = set(group.names)
        leak = _leak(graph, group.root, members)
        if leak:
            group.unfoldable_reason = leak
            continue
        channels = group.linears[0].weight_rows(graph).shape[0]
        plan = plan_fold(graph, group.root, channels)
        if isinstance(plan, str):
            group.unfoldable_reason = plan
        else:
            plan.changed_tensors += _tree_tensors(group.root)
            group.fold = plan
    return list(groups.values())


def _leak(graph: Graph, tensor: Tensor, members: set[str]) -> str:
    """Why dividing `tensor` by s would reach something other than the group, or ""."""
    if graph.is_graph_output(tensor):
        return f"{tensor.name} is a graph output"
    for consumer in tensor.outputs:
        if consumer.name in members and consumer.inputs[0] is tensor:
            continue
        if consumer.op in SHAPE_ONLY:
            continue
        if preserves_channels(consumer) and consumer.inputs[0] is tensor:
            leak = _leak(graph, consumer.outputs[0], members)
            if leak:
                return leak
            continue
        return f"{tensor.name} also feeds {consumer.op} {consumer.name}"
    return ""


def _tree_tensors(root: Tensor) -> list[str]:
    names, pending = [], [root]
    while pending:
        tensor = pending.pop()
        names.append(tensor.name)
        pending += [c.outputs[0] for c in tensor.outputs if preserves_channels(c) and c.inputs[0] is tensor]
    return names


def plan_fold(graph: Graph, tensor: Tensor, channels: int) -> FoldPlan | str:
    """How the producer of `tensor` ([..., channels]) absorbs 1/s on its last axis, or why it cannot."""
    node = graph.producer(tensor)
    if node is None:
        return f"{tensor.name} is a graph input"
    const = [index for index, t in enumerate(node.inputs) if t.name and graph.constant_value(t) is not None]
    if node.op in LAYER_NORMS:
        rank = len(tensor.shape) if tensor.shape else None
        axis = int(node.attrs.get("axis", -1))
        if not (axis == -1 or (rank is not None and axis == rank - 1)):
            return f"{node.op} {node.name} normalises over more than the last axis"
        indices = [i for i in (1, 2) if i < len(node.inputs) and node.inputs[i].name]
        if any(i not in const for i in indices) or (node.op != "LayerNormalization" and 2 in indices):
            return f"{node.op} {node.name} has a non-constant scale or bias"
        return FoldPlan(node, [ConstantEdit(node, i, "output_channels") for i in indices])
    if node.op == "MatMul" and const == [1] and graph.constant_value(node.inputs[1]).ndim >= 2:
        return FoldPlan(node, [ConstantEdit(node, 1, "output_channels")])
    if node.op == "Gemm" and 1 in const and 0 not in const:
        edits = [ConstantEdit(node, 1, "output_channels")]
        if len(node.inputs) > 2 and node.inputs[2].name:
            if 2 not in const:
                return f"Gemm {node.name} has a non-constant bias"
            edits.append(ConstantEdit(node, 2, "output_channels"))
        return FoldPlan(node, edits)
    if node.op in ("Mul", "Div", "Add", "Sub") and len(const) == 1 and len(node.inputs) == 2:
        index = const[0]
        value = graph.constant_value(node.inputs[index])
        if value.ndim and value.shape[-1] not in (1, channels):
            return f"{node.op} {node.name}'s constant does not broadcast over the channels"
        if node.op == "Mul":
            return FoldPlan(node, [ConstantEdit(node, index, "output_channels")])
        if node.op == "Div":
            if index != 1:
                return f"Div {node.name} divides a constant by the activation"
            return FoldPlan(node, [ConstantEdit(node, 1, "times_s")])
        other = node.inputs[1 - index]
        if graph.is_graph_output(other) or len(other.outputs) != 1:
            return f"{other.name}, the other input of {node.op} {node.name}, has other consumers"
        inner = plan_fold(graph, other, channels)
        if isinstance(inner, str):
            return inner
        inner.edits.append(ConstantEdit(node, index, "output_channels"))
        inner.changed_tensors.append(other.name)
        return inner
    return f"{node.op} {node.name} cannot absorb a per-channel scale"
