"""LowerMatMulIntegerToFloat: the explicit integer GEMM equals the QDQ form it replaces."""

import numpy as np
import onnx

from helpers import op_types, parse_model, random_samples, run
from ort_helpers import compile_tiny, ort_optimized_ops
from qcompiler.config import QuantConfig
from qcompiler.context import CompileContext
from qcompiler.ir import Graph
from qcompiler.passes.ort_lowering import LowerMatMulIntegerToFloat

rng = np.random.default_rng(3)


def linear_model(bias: bool = True, extra_consumer: bool = False):
    w = (rng.standard_normal((16, 8)) * 0.3).astype(np.float32)
    b = rng.standard_normal(8).astype(np.float32)
    body = "m = MatMul (x, w)\n" + ("a = Add (m, b)\n y = Softmax <axis = -1> (a)" if bias else "y = Softmax <axis = -1> (m)")
    outputs = "float[2, 4, 8] y" + (", float[2, 4, 8] z" if extra_consumer else "")
    if extra_consumer:
        body += "\n z = Relu (m)"
    return parse_model(f"g (float[2, 4, 16] x) => ({outputs}) {{ {body} }}", {"w": w, "b": b} if bias else {"w": w})


def qdq_form(model, samples):
    """InsertQDQ's output without any ort lowering (format qdq)."""
    return compile_tiny(model, samples, format="qdq")


def test_lowered_matmul_matches_qdq_form_and_folds_the_bias():
    model = linear_model()
    samples = random_samples({"x": (2, 4, 16)}, 3)
    reference = qdq_form(model, samples)
    graph = Graph(reference)
    result = LowerMatMulIntegerToFloat().run(graph, CompileContext(QuantConfig()))
    lowered = graph.to_model()
    onnx.checker.check_model(lowered, full_check=True)
    assert result.modified
    assert op_types(lowered).count("MatMulIntegerToFloat") == 1
    assert "MatMul" not in op_types(lowered) and "Add" not in op_types(lowered)
    for sample in samples:
        # both with ORT's optimizations off: the integer kernel vs the float simulation of the same integers
        expected, actual = run(reference, sample)[0], run(lowered, sample)[0]
        assert np.allclose(actual, expected, rtol=1e-5, atol=1e-6)
    # second run: nothing left to match
    assert not LowerMatMulIntegerToFloat().run(graph, CompileContext(QuantConfig())).modified


def test_without_the_lowering_ort_runs_a_float_gemm():
    """Why the pass exists: ORT's MatMul+Add->Gemm fusion wins over its QDQ fusion on static shapes."""
    model = linear_model()
    samples = random_samples({"x": (2, 4, 16)}, 2)
    assert ort_optimized_ops(qdq_form(model, samples))["Gemm"] == 1
    lowered_ops = ort_optimized_ops(compile_tiny(model, samples, format="qoperator"))
    assert lowered_ops["MatMulIntegerToFloat"] == 1 and lowered_ops["Gemm"] == 0


def test_must_not_change_a_matmul_whose_output_is_quantized_or_float_only():
    w = (rng.standard_normal((16, 8)) * 0.3).astype(np.float32)
    float_model = parse_model("g (float[2, 4, 16] x) => (float[2, 4, 8] y) { y = MatMul (x, w) }", {"w": w})
    graph = Graph(float_model)
    assert not LowerMatMulIntegerToFloat().run(graph, CompileContext(QuantConfig())).modified
    # a MatMul with two consumers keeps its bias-free form but is still lowered; its Relu reader survives
    model = linear_model(bias=False, extra_consumer=True)
    samples = random_samples({"x": (2, 4, 16)}, 2)
    lowered = compile_tiny(model, samples, format="qoperator")
    assert op_types(lowered).count("MatMulIntegerToFloat") == 1 and "Relu" in op_types(lowered)
    reference = qdq_form(model, samples)
    for sample in samples:
        for expected, actual in zip(run(reference, sample), run(lowered, sample)):
            assert np.allclose(actual, expected, rtol=1e-5, atol=1e-6)
