"""Clean-up after quantization and lowering: exact rewrites that leave fewer nodes for ONNX Runtime
to execute and keep the graph topologically sorted."""

from __future__ import annotations

import numpy as np

from ..context import CompileContext
from ..ir import Graph, Node
from .base import Pass, PassKind, PassResult


def _same_constant(graph: Graph, a, b) -> bool:
    if a is b or (a.name and a.name == b.name):
        return True
    va, vb = graph.constant_value(a), graph.constant_value(b)
    return va is not None and vb is not None and va.dtype == vb.dtype and va.shape == vb.shape and np.array_equal(va, vb)


def _dtype_name(tensor) -> str | None:
    try:
        return None if tensor.dtype is None else np.dtype(tensor.dtype).name
    except TypeError:
        return None


class RemoveRedundantQDQ(Pass):
    """Removes DequantizeLinear -> QuantizeLinear round trips that restore the same integers.

    Matches: Q(DQ(q, s, zp), s', zp') with s' == s and zp' == zp (same values, per tensor or same
    axis) -- the identity on q, left behind where two quantized regions meet with shared parameters.
    Rewrites: consumers of the Q's output read q; the Q (and the DQ, if now unused) disappear.
    Guarantees: exact (the integers are unchanged); graph outputs are never rewired; idempotent.
    """

    name = "remove-redundant-qdq"
    kind = PassKind.EXACT

    def run(self, graph: Graph, context: CompileContext) -> PassResult:
        changes = []
        for node in list(graph.nodes):
            if node.op != "QuantizeLinear" or len(node.inputs) < 3:
                continue
            producer = graph.producer(node.inputs[0])
            if producer is None or producer.op != "DequantizeLinear" or len(producer.inputs) < 3:
                continue
            if producer.attrs.get("axis", 1) != node.attrs.get("axis", 1) or graph.is_graph_output(node.outputs[0]):
                continue
            if not all(_same_constant(graph, producer.inputs[i], node.inputs[i]) for i in (1, 2)):
                continue
            integers = producer.inputs[0]
            if _dtype_name(integers) is not None and _dtype_name(node.outputs[0]) not in (None, _dtype_name(integers)):
                continue
            graph.replace_all_uses(node.outputs[0], integers)
            changes.append(f"{producer.name} -> {node.name}: identity removed")
        if changes:
            graph.cleanup()
        return PassResult(bool(changes), changes)


class RemoveIdentities(Pass):
    """Removes Identity nodes and Casts to the type their input already has.

    Matches: Identity, and Cast whose `to` equals the input's known element type; not when the
    node produces a graph output (its name must survive).
    Rewrites: consumers read the node's input. Guarantees: exact; topologically sorted; idempotent.
    """

    name = "remove-identities"
    kind = PassKind.EXACT

    def run(self, graph: Graph, context: CompileContext) -> PassResult:
        changes = []
        for node in list(graph.nodes):
            if not self._is_identity(node) or graph.is_graph_output(node.outputs[0]) or not node.inputs:
                continue
            graph.replace_all_uses(node.outputs[0], node.inputs[0])
            changes.append(f"{node.name}: {node.op} removed")
        if changes:
            graph.cleanup()
        return PassResult(bool(changes), changes)

    @staticmethod
    def _is_identity(node: Node) -> bool:
        if node.op == "Identity" and len(node.outputs) == 1:
            return True
        if node.op != "Cast" or not node.inputs:
            return False
        source = _dtype_name(node.inputs[0])
        if source is None:
            return False
        try:
            import onnx.helper
            target = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"]))).name
        except (KeyError, TypeError, ValueError):
            return False
        return source == target


class ShapeBeforeDequantize(Pass):
    """Reads Shape/Size from the integers instead of the dequantized tensor.

    Matches: Shape or Size whose input is a DequantizeLinear output. YOLOv8 reads the shapes of its
    head's feature maps to build the anchor grid; once those maps are int8, a DequantizeLinear that
    only Shape reads would run at full size just to report a shape.
    Rewrites: the Shape/Size reads the DequantizeLinear's integer input (same shape); a
    DequantizeLinear left without consumers disappears.
    Guarantees: exact (DequantizeLinear never changes the shape); idempotent.
    """

    name = "shape-before-dequantize"
    kind = PassKind.EXACT

    def run(self, graph: Graph, context: CompileContext) -> PassResult:
        changes = []
        for node in list(graph.nodes):
            if node.op not in ("Shape", "Size") or not node.inputs:
                continue
            producer = graph.producer(node.inputs[0])
            if producer is None or producer.op != "DequantizeLinear":
                continue
            graph.replace_input(node, node.inputs[0], producer.inputs[0])
            changes.append(f"{node.name}: reads {producer.inputs[0].name}")
        if changes:
            graph.cleanup()
        return PassResult(bool(changes), changes)
