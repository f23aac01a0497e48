"""Explicit lowering of QDQ groups to ONNX Runtime integer operators, where relying on ORT's own
fusion is fragile.

`DQ(x) -> MatMul(DQ(W)) -> Add(bias)` with a float output: ORT fuses it into MatMulIntegerToFloat
only when its float MatMul+Add -> Gemm fusion does not fire first; with static 2-D/3-D shapes it
does, and the MatMul then runs as a float Gemm behind a runtime weight DequantizeLinear (see
tests/passes/test_ort_lowering.py). Emitting com.microsoft MatMulIntegerToFloat directly makes the
integer GEMM certain and folds the bias into it.
"""

from __future__ import annotations

import numpy as np

from ..context import CompileContext
from ..ir import Graph, Node, Tensor, string_attribute
from .base import Pass, PassKind, PassResult

MS_DOMAIN = "com.microsoft"


def _dq_parts(graph: Graph, tensor: Tensor) -> tuple[Node, Tensor, Tensor, Tensor] | None:
    producer = graph.producer(tensor)
    if producer is None or producer.op != "DequantizeLinear" or len(producer.inputs) < 3:
        return None
    return producer, producer.inputs[0], producer.inputs[1], producer.inputs[2]


def match_matmul(graph: Graph, node: Node) -> tuple | None:
    """(activation DQ parts, weight DQ parts, bias Add or None, bias value) for a lowerable MatMul."""
    if node.op != "MatMul" or len(node.inputs) != 2 or node.domain not in (None, "", "ai.onnx"):
        return None
    activation, weight = _dq_parts(graph, node.inputs[0]), _dq_parts(graph, node.inputs[1])
    if activation is None or weight is None:
        return None
    a_scale = graph.constant_value(activation[2])
    if a_scale is None or a_scale.size != 1 or graph.constant_value(activation[1]) is not None:
        return None
    w_value = graph.constant_value(weight[1])
    w_scale = graph.constant_value(weight[2])
    if w_value is None or w_value.ndim != 2 or w_scale is None or w_value.dtype != np.int8:
        return None
    if w_scale.size != 1 and not (w_scale.ndim == 1 and int(weight[0].attrs.get("axis", 1)) in (1, -1)):
        return None  # MatMulIntegerToFloat takes per-tensor or per-column weight scales only
    output = node.outputs[0]
    if any(c.op == "QuantizeLinear" for c in output.outputs):
        return None  # a closed group: ORT lowers it to QLinearMatMul itself
    add, bias = None, None
    if len(output.outputs) == 1 and not graph.is_graph_output(output) and output.outputs[0].op == "Add":
        candidate = output.outputs[0]
        other = candidate.inputs[1] if candidate.inputs[0] is output else candidate.inputs[0]
        value = graph.constant_value(other)
        if value is not None and value.dtype == np.float32 and value.shape == (w_value.shape[1],):
            add, bias = candidate, value
    return activation, weight, add, bias


class LowerMatMulIntegerToFloat(Pass):
    """DQ(x) -> MatMul(., DQ(W int8)) [-> Add(bias)] with a float output -> MatMulIntegerToFloat.

    Matches: MatMul whose activation input is DequantizeLinear(QuantizeLinear(x)) per tensor and
    whose weight is a constant 2-D int8 behind a DequantizeLinear (per tensor or per column), whose
    output is not re-quantized; a lone consumer Add of a constant [N] is folded in as the bias.
    Rewrites: one com.microsoft MatMulIntegerToFloat reading the integers directly.
    Guarantees: same integers and scales as the QDQ form, so equal within float rounding of the
    accumulation (the QDQ form multiplies dequantized floats, the kernel accumulates in int32);
    the output keeps its name; a second run matches nothing.
    """

    name = "lower-matmul-integer-to-float"
    kind = PassKind.LOWERING

    def run(self, graph: Graph, context: CompileContext) -> PassResult:
        changes = []
        for node in list(graph.nodes):
            matched = match_matmul(graph, node)
            if matched is None:
                continue
            (_, a_int, a_scale, a_zero), (_, w_int, w_scale, w_zero), add, bias = matched
            inputs = [a_int, w_int, a_scale, w_scale, a_zero, w_zero]
            if bias is not None:
                inputs.append(graph.add_initializer(f"{node.name}_bias", bias.astype(np.float32)))
            output = add.outputs[0] if add is not None else node.outputs[0]
            lowered = graph.add_node("MatMulIntegerToFloat", inputs, f"{node.name}_MatMulIntegerToFloat",
                                     output_dtype=np.float32, output_shape=output.shape, domain=MS_DOMAIN)
            graph.replace_all_uses(output, lowered.outputs[0])
            graph.remove_nodes([node] + ([add] if add is not None else []))
            lowered.outputs[0].name = output.name
            changes.append(f"{node.name}: MatMulIntegerToFloat{' + bias' if bias is not None else ''}")
        if changes:
            graph.cleanup()
        return PassResult(bool(changes), changes)


def _repeats_pixels(resize: Node) -> bool:
    """Whether this nearest Resize with integer scale factors copies each input pixel k x k times.

    Output index o = k*i + j (0 <= j < k) reads input i when its source coordinate rounds to i:
    asymmetric gives i + j/k, which only floor maps to i; half_pixel gives i + (j + 0.5)/k - 0.5,
    strictly inside (i - 0.5, i + 0.5), which every rounding mode maps to i.
    """
    if string_attribute(resize, "mode", "nearest") != "nearest" or resize.attrs.get("axes") is not None:
        return False
    if int(resize.attrs.get("antialias", 0)) or string_attribute(resize, "keep_aspect_ratio_policy", "stretch") != "stretch":
        return False
    transform = string_attribute(resize, "coordinate_transformation_mode", "half_pixel")
    if transform == "asymmetric":
        return string_attribute(resize, "nearest_mode", "round_prefer_floor") == "floor"
    return transform in ("half_pixel", "pytorch_half_pixel")


class NearestUpsampleAsExpand(Pass):
    """DQ -> nearest Resize by integer factors -> Q (same parameters) becomes an int8 Expand.

    ONNX Runtime runs such a group as a uint8 Resize in its channels-last (NHWC) layout, between
    the NHWC QLinearConvs, where its per-element nearest path measured 4x slower than the float
    model's NCHWc Upsample (the six FPN Resizes of PP-OCRv4 det: 0.75 ms per run at batch 1, 15%
    of the int8 model). Repeating pixels is Unsqueeze + Expand + Reshape on channels-last data, a
    run of contiguous copies; the rewrite wraps that in Transpose to NHWC and back, which ORT's
    layout optimizer cancels against its own NHWC transposes (0.2 ms in all).
    Matches: Resize (opset >= 11) of a per-tensor DequantizeLinear, read only by one QuantizeLinear
    with the same scale and zero point, with constant 4-D scales [1, 1, kh, kw] (positive integers,
    not both 1), no sizes, nearest mode that repeats pixels (`_repeats_pixels`).
    Rewrites: Transpose(0,2,3,1) -> Unsqueeze(2,4) -> Expand(1,1,kh,1,kw,1) -> Reshape(shape * [1,kh,kw,1])
    -> Transpose(0,3,1,2) on the integers; the QuantizeLinear's output keeps its name.
    Guarantees: exact (the same integers the Resize copies); a second run matches nothing.
    """

    name = "nearest-upsample-as-expand"
    kind = PassKind.LOWERING

    def run(self, graph: Graph, context: CompileContext) -> PassResult:
        changes = []
        for resize in list(graph.nodes):
            matched = self._match(graph, resize)
            if matched is None:
                continue
            dequantize, quantize, factors = matched
            integers, output = dequantize.inputs[0], quantize.outputs[0]
            kh, kw = factors
            name = resize.name
            channels_last = graph.add_node("Transpose", [integers], f"{name}_to_nhwc", attrs={"perm": [0, 2, 3, 1]})
            axes = [2, 4]
            if graph.opset >= 13:
                spread = graph.add_node("Unsqueeze", [channels_last.outputs[0], graph.add_initializer(f"{name}_axes", np.int64(axes))],
                                        f"{name}_unsqueeze")
            else:
                spread = graph.add_node("Unsqueeze", [channels_last.outputs[0]], f"{name}_unsqueeze", attrs={"axes": axes})
            repeated = graph.add_node("Expand", [spread.outputs[0], graph.add_initializer(f"{name}_repeats", np.int64([1, 1, kh, 1, kw, 1]))],
                                      f"{name}_expand")
            shape = graph.add_node("Shape", [channels_last.outputs[0]], f"{name}_shape", output_dtype=np.int64)
            target = graph.add_node("Mul", [shape.outputs[0], graph.add_initializer(f"{name}_factors", np.int64([1, kh, kw, 1]))],
                                    f"{name}_target_shape", output_dtype=np.int64)
            merged = graph.add_node("Reshape", [repeated.outputs[0], target.outputs[0]], f"{name}_reshape")
            back = graph.add_node("Transpose", [merged.outputs[0]], f"{name}_to_nchw", attrs={"perm": [0, 3, 1, 2]},
                                  output_dtype=output.dtype, output_shape=output.shape)
            graph.replace_all_uses(output, back.outputs[0])
            removed = [resize, quantize] + ([dequantize] if len(dequantize.outputs[0].outputs) == 1 else [])
            graph.remove_nodes(removed)
            back.outputs[0].name = output.name
            changes.append(f"{name}: nearest x{kh}x{kw} as Expand on channels-last integers")
        if changes:
            graph.cleanup()
            graph.toposort()
        return PassResult(bool(changes), changes)

    @staticmethod
    def _match(graph: Graph, resize: Node) -> tuple[Node, Node, tuple[int, int]] | None:
        if resize.op != "Resize" or resize.domain not in (None, "", "ai.onnx") or graph.opset < 11:
            return None
        if len(resize.inputs) < 3 or (len(resize.inputs) > 3 and resize.inputs[3].name) or not _repeats_pixels(resize):
            return None
        scales = graph.constant_value(resize.inputs[2])
        if scales is None or scales.shape != (4,) or not np.array_equal(scales[:2], [1, 1]):
            return None
        if not np.all(scales == np.round(scales)) or np.any(scales < 1) or np.all(scales == 1):
            return None
        dequantize = _dq_parts(graph, resize.inputs[0])
        readers = resize.outputs[0].outputs
        if dequantize is None or len(readers) != 1 or readers[0].op != "QuantizeLinear" or len(readers[0].inputs) < 3:
            return None
        quantize = readers[0]
        if graph.is_graph_output(resize.outputs[0]):
            return None
        for index in (1, 2):
            ours, theirs = graph.constant_value(dequantize[0].inputs[index]), graph.constant_value(quantize.inputs[index])
            if ours is None or theirs is None or ours.size != 1 or theirs.size != 1 or ours.dtype != theirs.dtype \
                    or not np.array_equal(ours.reshape(()), theirs.reshape(())):
                return None
        return dequantize[0], quantize, (int(scales[2]), int(scales[3]))
