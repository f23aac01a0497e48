"""Dynamic mode (OrtDynamicMatMul): no calibration data, DynamicQuantizeMatMul with the bias folded,
error within the bound that one run-time activation step and the weight steps imply."""

import numpy as np
import onnx
import pytest

import qcompiler
from helpers import op_types, parse_model, run
from qcompiler.config import QuantConfig
from qcompiler.context import CompileContext
from qcompiler.errors import ConfigError
from qcompiler.ir import Graph
from qcompiler.passes.ort_dynamic import OrtDynamicMatMul

rng = np.random.default_rng(11)


def dynamic_bound(x, weights):
    """Worst case |x'w' - xw|: x rounded to a uint8 step over [min(x,0), max(x,0)] (per tensor, at run
    time), w to per-column int8 steps max|w|/127."""
    x_step = (max(float(x.max()), 0.0) - min(float(x.min()), 0.0)) / 255
    w_steps = np.abs(weights).max(axis=0) / 127
    flat = x.reshape(-1, x.shape[-1])
    bound = (np.abs(flat) @ np.broadcast_to(w_steps / 2, weights.shape) + (x_step / 2) * np.abs(weights).sum(axis=0)
             + weights.shape[0] * (x_step / 2) * (w_steps / 2))
    return bound.reshape(x.shape[:-1] + (weights.shape[1],)) * (1 + 1e-4) + 1e-5


def compile_dynamic(model, **options):
    compiled = qcompiler.compile(model, None, QuantConfig(mode="dynamic", **options)).model
    onnx.checker.check_model(compiled, full_check=True)
    return compiled


def test_matmul_plus_bias_becomes_one_dynamic_op_within_bound():
    w = rng.standard_normal((32, 16)).astype(np.float32)
    w[:, 5] *= 10  # per-column scales: a wide column must not coarsen the others
    b = rng.standard_normal(16).astype(np.float32)
    model = parse_model("g (float[2, 3, 32] x) => (float[2, 3, 16] y) { m = MatMul (x, w)\n y = Add (m, b) }", {"w": w, "b": b})
    compiled = compile_dynamic(model)
    assert op_types(compiled) == ["DynamicQuantizeMatMul"]
    assert compiled.graph.node[0].output[0] == "y"
    for _ in range(3):
        x = (rng.standard_normal((2, 3, 32)) * 2 + 0.5).astype(np.float32)
        expected = run(model, {"x": x})[0]
        actual = run(compiled, {"x": x})[0]
        assert np.all(np.abs(actual - expected) <= dynamic_bound(x, w))
    second = Graph(compiled)
    assert not OrtDynamicMatMul().run(second, CompileContext(QuantConfig(mode="dynamic"))).modified


def test_gemm_with_transposed_weight():
    w = rng.standard_normal((16, 32)).astype(np.float32)  # [N, K] with transB
    c = rng.standard_normal(16).astype(np.float32)
    model = parse_model("g (float[4, 32] x) => (float[4, 16] y) { y = Gemm <transB = 1> (x, w, c) }", {"w": w, "c": c})
    compiled = compile_dynamic(model)
    assert op_types(compiled) == ["DynamicQuantizeMatMul"]
    x = rng.standard_normal((4, 32)).astype(np.float32)
    assert np.all(np.abs(run(compiled, {"x": x})[0] - run(model, {"x": x})[0]) <= dynamic_bound(x, w.T))


def test_must_not_change_activation_matmul_conv_or_excluded():
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    model = parse_model("""
    g (float[2, 4, 8] a, float[2, 8, 4] b, float[1, 4, 6, 6] x) => (float[2, 4, 4] y, float[1, 8, 4, 4] z) {
        y = MatMul (a, b)
        z = Conv (x, w)
    }""", {"w": w})
    compiled = compile_dynamic(model)
    assert op_types(compiled) == ["MatMul", "Conv"]
    w2 = rng.standard_normal((8, 4)).astype(np.float32)
    excluded = parse_model("g (float[2, 8] x) => (float[2, 4] y) { y = MatMul (x, w2) }", {"w2": w2})
    assert op_types(compile_dynamic(excluded, exclude_op_types=("MatMul",))) == ["MatMul"]


def test_dynamic_needs_no_calibration_and_rejects_tensorrt():
    with pytest.raises(ConfigError):
        QuantConfig(mode="dynamic", target="tensorrt")


def test_cli_dynamic_mode_needs_no_calibration_data(tmp_path):
    import subprocess
    import sys
    w = rng.standard_normal((8, 4)).astype(np.float32)
    source = tmp_path / "linear.onnx"
    onnx.save(parse_model("g (float[2, 8] x) => (float[2, 4] y) { y = MatMul (x, w) }", {"w": w}), str(source))
    target = tmp_path / "linear.int8.onnx"
    result = subprocess.run([sys.executable, "-m", "qcompiler", "compile", str(source), "-o", str(target), "--mode", "dynamic"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert op_types(onnx.load(str(target))) == ["DynamicQuantizeMatMul"]
    bad = subprocess.run([sys.executable, "-m", "qcompiler", "compile", str(source), "-o", str(tmp_path / "x.onnx"),
                          "--format", "fast"], capture_output=True, text=True)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr


def test_shared_activation_is_quantized_once():
    wq, wk = (rng.standard_normal((16, 8)).astype(np.float32) for _ in range(2))
    model = parse_model("""
    g (float[2, 5, 16] x) => (float[2, 5, 8] q, float[2, 5, 8] k) {
        q = MatMul (x, wq)
        k = MatMul (x, wk)
    }""", {"wq": wq, "wk": wk})
    compiled = compile_dynamic(model)
    assert sorted(op_types(compiled)) == ["DynamicQuantizeLinear", "MatMulIntegerToFloat", "MatMulIntegerToFloat"]
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    for expected, actual, w in zip(run(model, {"x": x}), run(compiled, {"x": x}), (wq, wk)):
        assert np.all(np.abs(actual - expected) <= dynamic_bound(x, w))
