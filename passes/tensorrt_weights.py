"""Weight layout for TensorRT: the weight's DequantizeLinear must feed the Conv/ConvTranspose/
MatMul/Gemm directly. A Transpose between a constant weight and the op hides the weight from
`InsertQDQ` (not a constant any more) and, after quantization, keeps TensorRT from fusing the
weight DQ into the kernel, so the transpose is done once on the initializer instead."""

from __future__ import annotations

import numpy as np

from ..context import CompileContext
from ..ir import Graph, Node
from .base import Pass, PassKind, PassResult

WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


class FoldWeightTranspose(Pass):
    """Pre-transposes constant weights.

    Matches: Transpose(W) feeding input 1 of Conv/ConvTranspose/MatMul/Gemm, where W is a float
    constant, or DequantizeLinear(Wq, per-tensor or per-axis) of a constant integer weight.
    Rewrites: the op reads a new initializer holding transpose(W) (for the quantized form,
    DequantizeLinear of transpose(Wq) with the per-channel axis permuted accordingly). The old
    Transpose stays only if something else reads it.
    Guarantees: exact (a transpose moves values); idempotent; other inputs untouched.
    """

    name = "tensorrt-fold-weight-transpose"
    kind = PassKind.EXACT

    def _matches(self, graph: Graph) -> list[tuple[Node, Node]]:
        found = []
        for node in graph.nodes:
            if node.op not in WEIGHTED_OPS or len(node.inputs) < 2:
                continue
            transpose = graph.producer(node.inputs[1])
            if transpose is None or transpose.op != "Transpose":
                continue
            source = transpose.inputs[0]
            value = graph.constant_value(source)
            dq = graph.producer(source)
            if value is not None and value.dtype == np.float32:
                found.append((node, transpose))
            elif dq is not None and dq.op == "DequantizeLinear" and graph.constant_value(dq.inputs[0]) is not None:
                found.append((node, transpose))
        return found

    def run(self, graph: Graph, context: CompileContext) -> PassResult:
        changes = []
        for node, transpose in self._matches(graph):
            source = transpose.inputs[0]
            value = graph.constant_value(source)
            perm = transpose.attrs.get("perm")
            if value is not None:
                perm = list(perm) if perm is not None else list(range(value.ndim))[::-1]
                folded = graph.add_initializer(f"{source.name}_transposed", np.ascontiguousarray(np.transpose(value, perm)))
            else:
                dq = graph.producer(source)
                quantized = graph.constant_value(dq.inputs[0])
                perm = list(perm) if perm is not None else list(range(quantized.ndim))[::-1]
                stored = graph.add_initializer(f"{dq.inputs[0].name}_transposed", np.ascontiguousarray(np.transpose(quantized, perm)))
                attrs = dict(dq.attrs)
                scale = graph.constant_value(dq.inputs[1])
                if scale is not None and np.asarray(scale).size > 1:
                    axis = int(attrs.get("axis", 1)) % quantized.ndim
                    attrs["axis"] = perm.index(axis)
                new_dq = graph.add_node("DequantizeLinear", [stored, *dq.inputs[1:]], f"{dq.name}_transposed", attrs=attrs,
                                        output_dtype=np.float32, output_shape=list(np.transpose(quantized, perm).shape))
                folded = new_dq.outputs[0]
            graph.replace_input(node, node.inputs[1], folded)
            changes.append(f"{node.name}: weight {source.name} pre-transposed {perm}")
        if changes:
            graph.cleanup()
        return PassResult(bool(changes), changes)
