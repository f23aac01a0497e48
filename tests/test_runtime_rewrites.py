"""Rewrites of the calibration session's model: decomposed hard swish becomes x * HardSigmoid(x), a
constant scale and shift after a Conv fold into it, a Softmax off the last axis becomes five ops."""

import numpy as np
import onnx
import pytest

from helpers import op_types, parse_model, run
from qcompiler.runtime_rewrites import (RUNTIME_REWRITES, decompose_softmax_off_last_axis, delete_in_place,
                                       fold_scale_shift_into_conv, fuse_decomposed_hard_swish)

HARD_SWISH = """
g (float[2, 8] x) => (float[2, 8] y) {{
    three = Constant <value = float {{{three}}}> ()
    low = Constant <value = float {{0.0}}> ()
    high = Constant <value = float {{6.0}}> ()
    six = Constant <value = float {{6.0}}> ()
    shifted = Add ({add_inputs})
    clipped = Clip (shifted, low, high)
    product = Mul ({mul_inputs})
    y = Div (product, six)
}}"""


def hard_swish_model(three="3.0", add_inputs="x, three", mul_inputs="x, clipped"):
    return parse_model(HARD_SWISH.format(three=three, add_inputs=add_inputs, mul_inputs=mul_inputs))


def feed():
    return {"x": np.linspace(-5.0, 5.0, 16, dtype=np.float32).reshape(2, 8)}


@pytest.mark.parametrize("add_inputs, mul_inputs", [("x, three", "x, clipped"), ("three, x", "clipped, x")])
def test_decomposed_hard_swish_becomes_x_times_hard_sigmoid(add_inputs, mul_inputs):
    model = hard_swish_model(add_inputs=add_inputs, mul_inputs=mul_inputs)
    reference = run(model, feed())[0]
    assert fuse_decomposed_hard_swish(model, observed={"x"}) == 1
    assert [op for op in op_types(model) if op != "Constant"] == ["HardSigmoid", "Mul"]
    assert [output.name for output in model.graph.output] == ["y"]
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_allclose(run(model, feed())[0], reference, rtol=1e-6, atol=1e-7)
    x = feed()["x"]
    np.testing.assert_allclose(reference, x * np.clip(x + 3, 0, 6) / 6, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dropped", [[], [9], [9, 8, 7], [9, 7, 5, 4, 0], list(range(9, -1, -1))])
def test_delete_in_place_removes_exactly_the_given_indices(dropped):
    items = list(range(10))
    delete_in_place(items, dropped)
    assert items == [index for index in range(10) if index not in dropped]


def test_an_observed_intermediate_keeps_the_pattern():
    model = hard_swish_model()
    assert fuse_decomposed_hard_swish(model, observed={"clipped"}) == 0
    assert "Clip" in op_types(model)


def test_other_constants_keep_the_pattern():
    model = hard_swish_model(three="2.0")
    assert fuse_decomposed_hard_swish(model, observed=set()) == 0
    assert "Div" in op_types(model)


def test_an_intermediate_with_another_consumer_keeps_the_pattern():
    model = parse_model("""
    g (float[4] x) => (float[4] y, float[4] z) {
        three = Constant <value = float {3.0}> ()
        low = Constant <value = float {0.0}> ()
        high = Constant <value = float {6.0}> ()
        shifted = Add (x, three)
        clipped = Clip (shifted, low, high)
        product = Mul (x, clipped)
        y = Div (product, high)
        z = Neg (clipped)
    }""")
    assert fuse_decomposed_hard_swish(model, observed=set()) == 0


CONV_SCALE_SHIFT = """
g (float[1, 3, 6, 6] x) => (float[1, 4, 6, 6] y) {{
    z = Conv <pads = [1, 1, 1, 1]{group}> (x, w{bias})
    scaled = Mul ({mul_inputs})
    y = Add (scaled, shift)
}}"""


def conv_scale_shift_model(scale, shift, bias=True, mul_inputs="z, scale", group=1):
    rng = np.random.default_rng(3)
    weights = {"w": rng.standard_normal((4, 3 // group, 3, 3)).astype(np.float32), "scale": scale, "shift": shift}
    if bias:
        weights["b"] = rng.standard_normal(4).astype(np.float32)
    text = CONV_SCALE_SHIFT.format(group=f", group = {group}" if group > 1 else "", bias=", b" if bias else "",
                                   mul_inputs=mul_inputs)
    return parse_model(text, weights)


def conv_feed():
    return {"x": np.random.default_rng(4).standard_normal((1, 3, 6, 6)).astype(np.float32)}


@pytest.mark.parametrize("scale, shift, bias, mul_inputs", [
    (np.array([1.7], np.float32), np.array([0.3], np.float32), True, "z, scale"),
    (np.array([1.7], np.float32), np.array([0.3], np.float32), False, "scale, z"),
    (np.arange(1, 5, dtype=np.float32).reshape(4, 1, 1), np.full((1, 4, 1, 1), -0.5, np.float32), True, "z, scale"),
])
def test_scale_and_shift_after_a_conv_fold_into_its_weights(scale, shift, bias, mul_inputs):
    model = conv_scale_shift_model(scale, shift, bias, mul_inputs)
    reference = run(model, conv_feed())[0]
    assert fold_scale_shift_into_conv(model, observed={"x"}) == 1
    assert op_types(model) == ["Conv"]
    assert [output.name for output in model.graph.output] == ["y"]
    assert {tensor.name for tensor in model.graph.initializer} == {"y.folded_weight", "y.folded_bias", "scale", "shift"}
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_allclose(run(model, conv_feed())[0], reference, rtol=1e-5, atol=1e-5)


def test_a_scale_along_the_wrong_axis_is_not_folded():
    model = conv_scale_shift_model(np.arange(6, dtype=np.float32), np.array([0.3], np.float32))  # broadcasts along W
    assert fold_scale_shift_into_conv(model, observed=set()) == 0
    assert op_types(model) == ["Conv", "Mul", "Add"]


def test_an_observed_conv_output_is_not_folded():
    model = conv_scale_shift_model(np.array([2.0], np.float32), np.array([1.0], np.float32))
    assert fold_scale_shift_into_conv(model, observed={"z"}) == 0
    assert op_types(model) == ["Conv", "Mul", "Add"]


SOFTMAX = """
g (float[2, 3, 4] x) => (float[{out_shape}] y) {{
    t = {producer}
    y = Softmax <axis = {axis}> (t)
}}"""
TRANSPOSE = "Transpose <perm = [0, 2, 1]> (x)"
RESHAPE = "Reshape (x, shape)"


def softmax_model(axis, producer=TRANSPOSE, opset=13, out_shape="2, 4, 3"):
    weights = {"shape": np.array([6, 2, 2], np.int64)} if producer == RESHAPE else None
    return parse_model(SOFTMAX.format(axis=axis, producer=producer, out_shape=out_shape), weights, opset=opset)


def softmax_feed():
    return {"x": np.random.default_rng(5).standard_normal((2, 3, 4)).astype(np.float32) * 4}


@pytest.mark.parametrize("axis, producer, opset, out_shape", [
    (1, TRANSPOSE, 13, "2, 4, 3"),   # ReduceMax with an axes attribute
    (-2, TRANSPOSE, 18, "2, 4, 3"),  # ReduceMax with an axes input
    (0, RESHAPE, 17, "6, 2, 2"),
])
def test_a_softmax_off_the_last_axis_becomes_five_ops(axis, producer, opset, out_shape):
    model = softmax_model(axis, producer, opset, out_shape)
    reference = run(model, softmax_feed())[0]
    assert decompose_softmax_off_last_axis(model, observed={"y"}) == 1
    assert op_types(model)[1:] == ["ReduceMax", "Sub", "Exp", "ReduceSum", "Div"]
    assert [output.name for output in model.graph.output] == ["y"]
    onnx.checker.check_model(model, full_check=True)
    np.testing.assert_allclose(run(model, softmax_feed())[0], reference, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(run(model, softmax_feed(), optimize=True)[0], reference, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("axis, producer, opset", [
    (2, TRANSPOSE, 13),   # the last axis: ONNX Runtime's own kernel is the fast one
    (-1, TRANSPOSE, 13),
    (1, "Identity (x)", 13),  # rank unknown without shape inference
    (1, TRANSPOSE, 12),   # before opset 13 the axis means "flatten from here"
])
def test_other_softmaxes_stay(axis, producer, opset):
    model = softmax_model(axis, producer, opset, out_shape="2, 4, 3" if producer == TRANSPOSE else "2, 3, 4")
    assert decompose_softmax_off_last_axis(model, observed=set()) == 0
    assert op_types(model) == [producer.split()[0], "Softmax"]


@pytest.mark.realmodel
@pytest.mark.parametrize("model_id, expected", [("ocr-det", (24, 28, 0)), ("ocr-rec", (28, 28, 0)), ("yolo", (0, 0, 1))])
def test_real_models_calibrate_to_the_same_ranges_with_the_rewrites(model_id, expected, monkeypatch):
    """On the tensors compile calibrates, every hard swish and every MobileOne scale and shift of the
    Paddle OCR models, and yolo's DFL Softmax, are rewritten, and the ranges move by float rounding
    only."""
    import qcompiler
    import qcompiler.calibration as calibration
    from qcompiler.calibrators import make_calibrator
    from qcompiler.ir import Graph, ensure_opset, infer_shapes, load_model
    from qcompiler.passes.quantizable import activation_tensors
    from qcompiler.zoo.data import calibration_samples
    from qcompiler.zoo.models import fetch_model

    graph = Graph(infer_shapes(ensure_opset(load_model(fetch_model(model_id)), 13)[0]))
    names = activation_tensors(graph, qcompiler.QuantConfig())
    samples = calibration_samples(model_id, 4)

    def ranges(rewrites):
        monkeypatch.setattr(calibration, "RUNTIME_REWRITES", rewrites)
        observers = [(name, make_calibrator("minmax")) for name in names]
        model, weights = graph.to_runtime_model()
        calibration.collect_statistics(model, observers, samples, owns_model=True, weights=weights)
        return {name: calibrator.compute_range() for name, calibrator in observers}

    counts = []

    def counted(rewrite):
        return lambda model, observed: counts.append(rewrite(model, observed))

    rewritten = ranges(tuple(counted(rewrite) for rewrite in RUNTIME_REWRITES))
    plain = ranges(())
    assert tuple(counts) == expected
    for name, found in plain.items():
        scale = max(abs(found.low), abs(found.high))
        assert abs(rewritten[name].low - found.low) <= 1e-5 * scale and abs(rewritten[name].high - found.high) <= 1e-5 * scale, name
