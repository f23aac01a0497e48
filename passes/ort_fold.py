"""Exact float rewrites for the ONNX Runtime target.

FoldAffineIntoConv (before quantization): PP-OCRv4 (MobileOne-style blocks) follows 28 Convs with
`Mul(scalar) -> Add(scalar)`. Left alone, each becomes two extra int8 ops and a second rounding of
the Conv's output (ORT fuses only the Conv into QLinearConv); folded into the Conv's weight and bias
they cost nothing and the Conv output is quantized once.

KeepLayerNormUnfused (last): steers ORT away from a fusion whose kernel is slower than the ops it
replaces (SkipLayerNormalization on the residual Add of transformer blocks).
"""

from __future__ import annotations

import numpy as np

from ..context import CompileContext
from ..ir import Graph, Node, Tensor
from .base import Pass, PassKind, PassResult


def _channel_vector(graph: Graph, tensor: Tensor, channels: int) -> np.ndarray | None:
    """A float constant that broadcasts per output channel over NCHW ([], [1], [C], [1,C,1,1], ...)."""
    value = graph.constant_value(tensor)
    if value is None or value.dtype != np.float32 or not np.all(np.isfinite(value)):
        return None
    if value.size == 1:
        return np.full(channels, float(value.reshape(())), dtype=np.float32)
    squeezed = value.reshape(-1)
    # [C, 1, 1] or [1, C, 1, 1] broadcasts along axis 1 of an NCHW output; a bare [C] would not.
    if value.size == channels and value.ndim >= 3 and value.shape[-3] == channels:
        return squeezed.astype(np.float32)
    return None


def _single_consumer(graph: Graph, tensor: Tensor, op: str) -> Node | None:
    if graph.is_graph_output(tensor) or len(tensor.outputs) != 1 or tensor.outputs[0].op != op:
        return None
    node = tensor.outputs[0]
    return node if len(node.inputs) == 2 else None


class FoldAffineIntoConv(Pass):
    """Conv -> Mul(c) [-> Add(d)] with per-channel or scalar constants c, d becomes one Conv.

    Matches: a Conv with a constant float weight (and constant bias, or none) whose output feeds
    only a Mul by a constant broadcasting per output channel, optionally followed (as its only
    consumer) by an Add of such a constant; also Conv -> Add(d) alone.
    Rewrites: weight W[m] * c[m], bias B[m] * c[m] + d[m]; the Mul/Add disappear and the Conv
    (keeping its node name) writes the last tensor of the chain (keeping its name).
    Guarantees: equal to the float graph up to float32 rounding (a product of two floats is
    rounded once instead of twice); shared weights are copied, never modified; idempotent.
    """

    name = "fold-affine-into-conv"
    kind = PassKind.EXACT

    def run(self, graph: Graph, context: CompileContext) -> PassResult:
        changes = []
        for conv in list(graph.nodes):
            if conv.op != "Conv" or len(conv.inputs) < 2 or not conv.outputs:
                continue
            weight = graph.constant_value(conv.inputs[1])
            if weight is None or weight.dtype != np.float32 or weight.ndim < 3:
                continue
            channels = weight.shape[0]
            bias = np.zeros(channels, dtype=np.float32)
            if len(conv.inputs) > 2 and conv.inputs[2].name:
                value = graph.constant_value(conv.inputs[2])
                if value is None or value.dtype != np.float32 or value.shape != (channels,):
                    continue
                bias = value
            chain, scale, shift = self._chain(graph, conv.outputs[0], channels)
            if not chain:
                continue
            new_weight = graph.add_initializer(f"{conv.inputs[1].name}_folded",
                                               (weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(np.float32))
            new_bias = graph.add_initializer(f"{conv.name}_bias_folded", (bias * scale + shift).astype(np.float32))
            last = chain[-1].outputs[0]
            folded = graph.add_node("Conv", [conv.inputs[0], new_weight, new_bias], f"{conv.name}_folded",
                                    attrs=dict(conv.attrs), output_dtype=np.float32, output_shape=last.shape)
            graph.replace_all_uses(last, folded.outputs[0])
            graph.remove_nodes([conv, *chain])
            folded.outputs[0].name = last.name
            folded.name = conv.name  # exclude_nodes patterns and the summary use the model's names
            changes.append(f"{conv.name}: folded {', '.join(n.op for n in chain)}")
        if changes:
            graph.cleanup()
        return PassResult(bool(changes), changes)

    @staticmethod
    def _chain(graph: Graph, output: Tensor, channels: int) -> tuple[list[Node], np.ndarray, np.ndarray]:
        chain: list[Node] = []
        scale = np.ones(channels, dtype=np.float32)
        shift = np.zeros(channels, dtype=np.float32)
        mul = _single_consumer(graph, output, "Mul")
        if mul is not None:
            other = mul.inputs[1] if mul.inputs[0] is output else mul.inputs[0]
            factor = _channel_vector(graph, other, channels)
            if factor is not None:
                chain.append(mul)
                scale = factor
                output = mul.outputs[0]
        add = _single_consumer(graph, output, "Add")
        if add is not None:
            other = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
            offset = _channel_vector(graph, other, channels)
            if offset is not None:
                chain.append(add)
                shift = offset
        return chain, scale, shift


class KeepLayerNormUnfused(Pass):
    """Add -> LayerNormalization becomes Sum -> LayerNormalization, so ONNX Runtime keeps the two ops.

    ORT's SkipLayerNormFusion turns `Add(x, skip) -> LayerNormalization` (the residual of every
    transformer block) into com.microsoft SkipLayerNormalization, whose CPU kernel measured 4-7x
    slower than the Add plus LayerNormalization it replaces (onnxruntime 1.32, AVX-512, MiniLM:
    ~410 us against ~60 us + ~35 us per block at batch 8, 12% of the whole model; see
    benchmarks/results/latency.md). The fusion matches only an op named Add; Sum of two inputs is
    the same elementwise sum with the same broadcasting and CPU kernel family.
    Matches: a two-input Add whose output only a LayerNormalization reads, as its data input, and
    which is not a graph output.
    Rewrites: the Add becomes Sum (same inputs, same output name).
    Guarantees: exact (Sum of two tensors is their Add); idempotent; other Adds untouched.
    """

    name = "keep-layernorm-unfused"
    kind = PassKind.EXACT

    def run(self, graph: Graph, context: CompileContext) -> PassResult:
        changes = []
        for node in list(graph.nodes):
            if node.op != "Add" or node.domain not in (None, "", "ai.onnx") or len(node.inputs) != 2 or not node.outputs:
                continue
            output = node.outputs[0]
            readers = output.outputs
            if graph.is_graph_output(output) or len(readers) != 1 or readers[0].op != "LayerNormalization" \
                    or readers[0].inputs[0] is not output:
                continue
            node.op = "Sum"
            changes.append(f"{node.name}: Add -> Sum before {readers[0].name}")
        return PassResult(bool(changes), changes)
