"""FoldAffineIntoConv: Conv -> Mul(c) -> Add(d) becomes one Conv, equal up to float rounding."""

import numpy as np
import onnx

from helpers import op_types, parse_model, run
from qcompiler.config import QuantConfig
from qcompiler.context import CompileContext
from qcompiler.ir import Graph
from qcompiler.passes.ort_fold import FoldAffineIntoConv

rng = np.random.default_rng(5)


def apply(model):
    graph = Graph(model)
    result = FoldAffineIntoConv().run(graph, CompileContext(QuantConfig()))
    folded = graph.to_model()
    onnx.checker.check_model(folded, full_check=True)
    return folded, result, graph


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
