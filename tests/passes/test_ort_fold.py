"""FoldAffineIntoConv: Conv -> Mul(c) -> Add(d) becomes one Conv, equal up to float rounding.
KeepLayerNormUnfused: the residual Add before a LayerNormalization becomes Sum (bit-exact), so ONNX
Runtime no longer fuses the pair into its slower SkipLayerNormalization."""

import numpy as np
import onnx

from helpers import op_types, parse_model, run
from ort_helpers import apply_pass, ort_optimized_ops
from qcompiler.config import QuantConfig
from qcompiler.context import CompileContext
from qcompiler.ir import Graph, infer_shapes
from qcompiler.passes.ort_fold import FoldAffineIntoConv, FoldAffineIntoNextConv, KeepLayerNormUnfused

rng = np.random.default_rng(5)


def apply(model):
    return apply_pass(FoldAffineIntoConv(), model)


def test_scalar_mul_and_channel_add_fold_into_the_conv():
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    model = parse_model("""
    g (float[1, 4, 6, 6] x) => (float[1, 8, 4, 4] y) {
        c = Conv (x, w, b)
        s = Constant <value = float[1] {1.9}> ()
        m = Mul (s, c)
        y = Add (m, d)
    }""", {"w": w, "b": b, "d": rng.standard_normal((8, 1, 1)).astype(np.float32)})
    folded, result, graph = apply(model)
    assert result.modified and op_types(folded) == ["Conv"] and folded.graph.node[0].output[0] == "y"
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    expected, actual = run(model, {"x": x})[0], run(folded, {"x": x})[0]
    assert np.allclose(actual, expected, rtol=1e-5, atol=1e-5)
    assert not FoldAffineIntoConv().run(graph, CompileContext(QuantConfig())).modified


def test_must_not_fold_shared_outputs_or_non_channel_constants():
    w = rng.standard_normal((8, 4, 1, 1)).astype(np.float32)
    model = parse_model("""
    g (float[1, 4, 6, 6] x) => (float[1, 8, 6, 6] y, float[1, 8, 6, 6] z, float[1, 8, 6, 6] v) {
        c = Conv (x, w)
        y = Mul (c, s)
        z = Relu (c)
        e = Conv (x, w)
        v = Mul (e, t)
    }""", {"w": w, "s": np.float32([2.0]), "t": rng.standard_normal((1, 1, 6, 6)).astype(np.float32)})
    folded, result, _ = apply(model)
    assert not result.modified
    assert op_types(folded) == op_types(model)


def test_residual_add_before_layernorm_becomes_sum_and_ort_keeps_layernorm():
    gamma, beta = rng.standard_normal(16).astype(np.float32), rng.standard_normal(16).astype(np.float32)
    model = parse_model("""
    g (float[2, 5, 16] x, float[2, 5, 16] skip) => (float[2, 5, 16] y, float[2, 5, 16] z) {
        a = Add (x, skip)
        y = LayerNormalization <axis = -1, epsilon = 1e-5> (a, gamma, beta)
        b = Add (y, x)
        c = Relu (b)
        z = LayerNormalization <axis = -1> (c, gamma, beta)
    }""", {"gamma": gamma, "beta": beta}, opset=17)
    # ORT itself fuses the first Add + LayerNormalization into SkipLayerNormalization
    assert ort_optimized_ops(model)["SkipLayerNormalization"] == 1
    graph = Graph(model)
    result = KeepLayerNormUnfused().run(graph, CompileContext(QuantConfig()))
    rewritten = graph.to_model()
    onnx.checker.check_model(rewritten, full_check=True)
    assert result.modified and op_types(rewritten) == ["Sum", "LayerNormalization", "Add", "Relu", "LayerNormalization"]
    ops = ort_optimized_ops(rewritten)
    assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] == 2
    feeds = {"x": rng.standard_normal((2, 5, 16)).astype(np.float32), "skip": rng.standard_normal((2, 5, 16)).astype(np.float32)}
    for expected, actual in zip(run(model, feeds), run(rewritten, feeds)):
        assert np.array_equal(expected, actual)
    assert not KeepLayerNormUnfused().run(graph, CompileContext(QuantConfig())).modified


def fold_next(model):
    return apply_pass(FoldAffineIntoNextConv(), infer_shapes(model))  # as compile does: it checks channel counts


def assert_same_outputs(model, folded, shape):
    x = rng.standard_normal(shape).astype(np.float32)
    for expected, actual in zip(run(model, {"x": x}), run(folded, {"x": x})):
        assert np.allclose(actual, expected, rtol=1e-4, atol=1e-4)


def test_div_mul_add_before_unpadded_convs_fold_away():
    w1 = rng.standard_normal((6, 4, 1, 1)).astype(np.float32)
    w2 = rng.standard_normal((4, 2, 2, 2)).astype(np.float32)  # two groups of 2 input channels
    model = parse_model("""
    g (float[1, 4, 6, 6] x) => (float[1, 6, 6, 6] y, float[1, 4, 5, 5] z) {
        r = Relu (x)
        six = Constant <value = float[1] {6.0}> ()
        q = Div (r, six)
        m = Mul (q, s)
        a = Add (d, m)
        y = Conv (a, w1)
        z = Conv <group = 2> (a, w2, b2)
    }""", {"s": rng.uniform(0.5, 2.0, (1, 4, 1, 1)).astype(np.float32), "d": rng.standard_normal((4, 1, 1)).astype(np.float32),
           "w1": w1, "w2": w2, "b2": rng.standard_normal(4).astype(np.float32)})
    folded, result, graph = fold_next(model)
    assert result.modified and op_types(folded) == ["Relu", "Conv", "Conv"]
    assert_same_outputs(model, folded, (1, 4, 6, 6))
    assert not FoldAffineIntoNextConv().run(graph, CompileContext(QuantConfig())).modified


def test_before_a_padded_conv_a_scale_folds_but_a_shift_does_not():
    w = rng.standard_normal((3, 1, 3, 3)).astype(np.float32)  # depthwise, padded: the border would see the shift
    model = parse_model("""
    g (float[1, 3, 5, 5] x) => (float[1, 3, 5, 5] y, float[1, 3, 5, 5] z) {
        m = Mul (x, s)
        n = Div (m, s)
        y = Conv <group = 3, pads = [1, 1, 1, 1]> (n, w)
        a = Mul (x, s)
        b = Sub (a, e)
        z = Conv <group = 3, pads = [1, 1, 1, 1]> (b, w)
    }""", {"s": np.float32([1.7]), "e": np.float32([0.1]), "w": w})
    folded, result, graph = fold_next(model)
    assert result.modified and op_types(folded) == ["Conv", "Mul", "Sub", "Conv"]
    assert_same_outputs(model, folded, (1, 3, 5, 5))
    assert not FoldAffineIntoNextConv().run(graph, CompileContext(QuantConfig())).modified


def test_must_not_fold_into_other_readers_zero_scales_or_graph_outputs():
    w = rng.standard_normal((4, 4, 1, 1)).astype(np.float32)
    model = parse_model("""
    g (float[1, 4, 6, 6] x) => (float[1, 4, 6, 6] y, float[1, 4, 6, 6] z, float[1, 4, 6, 6] v, float[1, 4, 6, 6] t,
                                 float[1, 4, 6, 6] u) {
        m = Mul (x, s)
        y = Conv (m, w)
        z = Relu (m)
        n = Mul (x, zero)
        v = Conv (n, w)
        k = Div (s, x)
        u = Conv (k, w)
        t = Mul (x, s)
    }""", {"s": np.float32([2.0]), "zero": np.float32([0.0, 1.0, 1.0, 1.0]).reshape(4, 1, 1), "w": w})
    folded, result, _ = fold_next(model)
    assert not result.modified
    assert op_types(folded) == op_types(model)


def test_constants_must_broadcast_along_the_channel_axis_of_the_conv():
    # [C,1,1] against a 3-D conv's NCDHW input broadcasts along D, not C: neither pass may fold it
    w = rng.standard_normal((4, 4, 1, 1, 1)).astype(np.float32)
    along_depth = rng.uniform(0.5, 2.0, (4, 1, 1)).astype(np.float32)
    model = parse_model("""
    g (float[1, 4, 4, 3, 3] x) => (float[1, 4, 4, 3, 3] y, float[1, 4, 4, 3, 3] z) {
        m = Mul (x, s)
        y = Conv (m, w)
        c = Conv (x, w)
        z = Mul (c, s)
    }""", {"w": w, "s": along_depth})
    for fold in (FoldAffineIntoNextConv(), FoldAffineIntoConv()):
        graph = Graph(model)
        assert not fold.run(graph, CompileContext(QuantConfig())).modified
    per_channel = along_depth.reshape(4, 1, 1, 1)
    model.graph.initializer[-1].CopyFrom(onnx.numpy_helper.from_array(per_channel, "s"))
    folded, result, _ = fold_next(model)
    assert result.modified and op_types(folded).count("Mul") == 1
    assert_same_outputs(model, folded, (1, 4, 4, 3, 3))


def test_a_per_channel_constant_that_widens_a_one_channel_input_does_not_fold():
    w = rng.standard_normal((2, 4, 1, 1)).astype(np.float32)
    model = parse_model("""
    g (float[1, 1, 3, 3] x) => (float[1, 2, 3, 3] y) {
        m = Mul (x, s)
        y = Conv (m, w)
    }""", {"w": w, "s": rng.uniform(0.5, 2.0, (4, 1, 1)).astype(np.float32)})
    folded, result, _ = fold_next(model)
    assert not result.modified and op_types(folded) == ["Mul", "Conv"]
