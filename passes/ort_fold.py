"""Exact float rewrites for the ONNX Runtime target.

FoldAffineIntoConv (before quantization): PP-OCRv4 (MobileOne-style blocks) follows 28 Convs with
`Mul(scalar) -> Add(scalar)`. Left alone, each becomes two extra int8 ops and a second rounding of
the Conv's output (ORT fuses only the Conv into QLinearConv); folded into the Conv's weight and bias
they cost nothing and the Conv output is quantized once.

FoldAffineIntoNextConv (before quantization, after FoldAffineIntoConv): the same blocks end their
hardswish with `Div(6) -> Mul(scalar) -> Add(scalar)` read only by Convs (26 chains in PP-OCRv4
det); the 10 read only by unpadded Convs fold into their weights and biases, and ONNX Runtime then
runs 10 QLinearMul and 10 QLinearAdd fewer (12 chains fold in PP-OCRv4 rec).

KeepLayerNormUnfused (last): steers ORT away from a fusion whose kernel is slower than the ops it
replaces (SkipLayerNormalization on the residual Add of transformer blocks).
"""

from __future__ import annotations

import numpy as np

from ..context import CompileContext
from ..ir import Graph, Node, Tensor, string_attribute
from .base import Pass, PassKind, PassResult


def _channel_vector(graph: Graph, tensor: Tensor, channels: int, spatial_rank: int) -> np.ndarray | None:
    """A float constant that broadcasts per channel over an [N, C, *spatial] tensor without changing
    its rank: a scalar, or C values along axis -(spatial_rank + 1) ([C,1,1] or [1,C,1,1] for 2-D
    convs; a [C,1,1] against a 3-D conv's NCDHW would broadcast along D instead)."""
    value = graph.constant_value(tensor)
    if value is None or value.dtype != np.float32 or not np.all(np.isfinite(value)) or value.ndim > spatial_rank + 2:
        return None
    if value.size == 1:
        return np.full(channels, float(value.reshape(())), dtype=np.float32)
    if value.size == channels and value.ndim >= spatial_rank + 1 and value.shape[-(spatial_rank + 1)] == channels:
        return value.reshape(-1).astype(np.float32)
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
            chain, scale, shift = self._chain(graph, conv.outputs[0], channels, weight.ndim - 2)
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
    def _chain(graph: Graph, output: Tensor, channels: int, spatial_rank: int) -> tuple[list[Node], np.ndarray, np.ndarray]:
        chain: list[Node] = []
        scale = np.ones(channels, dtype=np.float32)
        shift = np.zeros(channels, dtype=np.float32)
        mul = _single_consumer(graph, output, "Mul")
        if mul is not None:
            other = mul.inputs[1] if mul.inputs[0] is output else mul.inputs[0]
            factor = _channel_vector(graph, other, channels, spatial_rank)
            if factor is not None:
                chain.append(mul)
                scale = factor
                output = mul.outputs[0]
        add = _single_consumer(graph, output, "Add")
        if add is not None:
            other = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
            offset = _channel_vector(graph, other, channels, spatial_rank)
            if offset is not None:
                chain.append(add)
                shift = offset
        return chain, scale, shift


def _zero_padded(conv: Node) -> bool:
    """Whether `conv` reads no padding (explicit pads all zero, or auto_pad VALID)."""
    auto_pad = string_attribute(conv, "auto_pad", "NOTSET")
    if auto_pad == "VALID":
        return True
    return auto_pad == "NOTSET" and not any(conv.attrs.get("pads", []))


def _has_channels(tensor: Tensor, channels: int, spatial_rank: int) -> bool:
    """Whether `tensor` is known to be [N, channels, *spatial] (its inferred shape)."""
    shape = tensor.shape
    return shape is not None and len(shape) == spatial_rank + 2 and shape[1] == channels


_AFFINE_OPS = ("Mul", "Div", "Add", "Sub")


class FoldAffineIntoNextConv(Pass):
    """A chain of Mul/Div/Add/Sub by per-channel constants read only by Convs folds into the Convs.

    Matches: a chain of one or more Mul(c), Div(x, c), Add(d), Sub(x, d) nodes, each the only reader
    of the previous one's output, whose constants are float scalars or per-channel vectors
    (`_channel_vector`); together they compute x * scale + shift with no zero in scale.
    The chain's result is not a graph output and is read only, as data input, by Convs with
    constant float weights (and bias) whose input channel count is C; with per-channel constants
    the chain's input must be known to have C channels already (no broadcast widening it).
    A nonzero shift folds only when no Conv reads padding (it would see the shift where the
    original saw 0). Rewriting such a chain as Add(shift / scale) before the padded Conv would save
    one more int8 op, but measured 0.3-2.5 dB lower SQNR on ocr-rec (min-max, percentile, MSE) and
    no gain on ocr-det, so those chains stay as they are. ocr-rec's SQNR moves by +-2 dB with any
    change of its quantization points; over five calibration sets this fold averaged 1.0-1.7 dB
    lower there (12.4 -> 10.6 auto, 11.8 -> 10.9 qoperator), and within +-0.4 dB on ocr-det.
    Rewrites: each Conv's weight W[m, j] * scale[k] (k the input channel of j in m's group), its
    bias B[m] + sum W[m, j, ...] * shift[k]; the chain disappears and the Convs read its input.
    Guarantees: equal to the float graph up to float32 rounding; shared weights are copied, never
    modified; idempotent.
    """

    name = "fold-affine-into-next-conv"
    kind = PassKind.EXACT

    def run(self, graph: Graph, context: CompileContext) -> PassResult:
        changes = []
        for node in list(graph.nodes):
            match = self._match(graph, node)
            if match is None:
                continue
            source, chain, scale, shift, convs = match
            last = chain[-1].outputs[0]
            for conv in convs:
                self._fold_into(graph, conv, last, source, scale, shift)
            graph.remove_nodes(chain)
            changes.append(f"{chain[0].name}: folded {', '.join(n.op for n in chain)} into {', '.join(c.name for c in convs)}")
        if changes:
            graph.cleanup()
        return PassResult(bool(changes), changes)

    @staticmethod
    def _affine_constant(graph: Graph, node: Node) -> tuple[Tensor, Tensor] | None:
        """(data input, constant input) of an affine op, or None."""
        if node.op not in _AFFINE_OPS or len(node.inputs) != 2 or len(node.outputs) != 1:
            return None
        constant = [graph.constant_value(tensor) is not None for tensor in node.inputs]
        if constant[1] and not constant[0]:
            return node.inputs[0], node.inputs[1]
        if constant[0] and not constant[1] and node.op in ("Mul", "Add"):  # commutative only
            return node.inputs[1], node.inputs[0]
        return None

    @classmethod
    def _match(cls, graph: Graph, first: Node):
        operands = cls._affine_constant(graph, first)
        if operands is None:
            return None
        source = operands[0]
        chain, constants = [first], [operands[1]]
        while True:
            output = chain[-1].outputs[0]
            readers = list(output.outputs)
            if graph.is_graph_output(output) or not readers:
                return None
            following = cls._affine_constant(graph, readers[0]) if len(readers) == 1 else None
            if following is None or following[0] is not output:
                break
            chain.append(readers[0])
            constants.append(following[1])
        last = chain[-1].outputs[0]
        convs = list(last.outputs)
        channels = spatial_rank = None
        for conv in convs:
            weight = graph.constant_value(conv.inputs[1]) if conv.op == "Conv" and len(conv.inputs) > 1 else None
            if weight is None or weight.dtype != np.float32 or weight.ndim < 3 or conv.inputs[0] is not last \
                    or any(tensor is last for tensor in conv.inputs[1:]):
                return None
            if len(conv.inputs) > 2 and conv.inputs[2].name:
                bias = graph.constant_value(conv.inputs[2])
                if bias is None or bias.dtype != np.float32 or bias.shape != (weight.shape[0],):
                    return None
            conv_channels = weight.shape[1] * int(conv.attrs.get("group", 1))
            if channels not in (None, conv_channels) or spatial_rank not in (None, weight.ndim - 2):
                return None
            channels, spatial_rank = conv_channels, weight.ndim - 2
        scale = np.ones(channels, dtype=np.float64)
        shift = np.zeros(channels, dtype=np.float64)
        for node, constant in zip(chain, constants):
            value = _channel_vector(graph, constant, channels, spatial_rank)
            if value is None:
                return None
            if node.op == "Mul":
                scale, shift = scale * value, shift * value
            elif node.op == "Div":
                scale, shift = scale / value, shift / value
            else:
                shift = shift + value if node.op == "Add" else shift - value
        if not np.all(np.isfinite(scale)) or not np.all(scale != 0) or not np.all(np.isfinite(shift)):
            return None
        if np.any(shift) and not all(_zero_padded(conv) for conv in convs):
            return None  # the padding would see the shift where the original saw 0
        per_channel = any(graph.constant_value(constant).size > 1 for constant in constants)
        if per_channel and not _has_channels(source, channels, spatial_rank):
            return None  # a [C,1,1] constant could be widening a one-channel input to C channels
        return source, chain, scale, shift, convs

    @staticmethod
    def _fold_into(graph: Graph, conv: Node, old_input: Tensor, new_input: Tensor, scale: np.ndarray,
                   shift: np.ndarray) -> None:
        weight = graph.constant_value(conv.inputs[1])
        out_channels, group_channels = weight.shape[:2]
        groups = int(conv.attrs.get("group", 1))
        # input channel of weight[m, j]: (m's group) * group_channels + j
        channel = (np.arange(out_channels) // (out_channels // groups))[:, None] * group_channels + np.arange(group_channels)
        spatial = (1,) * (weight.ndim - 2)
        new_weight = (weight * scale[channel].reshape(channel.shape + spatial)).astype(np.float32)
        graph.replace_input(conv, old_input, new_input)
        conv.inputs[1] = graph.add_initializer(f"{conv.inputs[1].name}_input_folded", new_weight)
        if not np.any(shift):
            return
        has_bias = len(conv.inputs) > 2 and conv.inputs[2].name
        bias = graph.constant_value(conv.inputs[2]) if has_bias else np.zeros(out_channels, dtype=np.float32)
        contribution = (weight.astype(np.float64) * shift[channel].reshape(channel.shape + spatial)).reshape(out_channels, -1)
        new_bias = graph.add_initializer(f"{conv.name}_bias_input_folded", (bias + contribution.sum(axis=1)).astype(np.float32))
        if len(conv.inputs) > 2:
            conv.inputs[2] = new_bias
        else:
            conv.inputs.append(new_bias)


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
