"""Per-token dynamic activation quantization: the MatMulInteger subgraph against an independent numpy
reference of per-row int8 quantization, the error bound the steps imply, Gemm forms, idempotence."""

import numpy as np
import onnx
import pytest

from helpers import op_types, parse_model, run, sqnr_db
import qcompiler
from qcompiler.config import QuantConfig
from qcompiler.context import CompileContext
from qcompiler.errors import ConfigError
from qcompiler.ir import Graph, infer_shapes
from qcompiler.passes.transformer_per_token import PerTokenDynamicQuant

K, N = 16, 6


def tokens(seed=0, shape=(2, 5, K)):
    """Rows whose magnitudes differ by up to 1000x: one static scale per tensor would crush the small ones."""
    generator = np.random.default_rng(seed)
    x = generator.standard_normal(shape).astype(np.float32)
    return x * np.logspace(-1.5, 1.5, shape[-2], dtype=np.float32)[:, None]


def lower(model, **options):
    graph = Graph(infer_shapes(model))
    context = CompileContext(QuantConfig(**options))
    result = PerTokenDynamicQuant().run(graph, context)
    lowered = graph.to_model()
    onnx.checker.check_model(lowered, full_check=True)
    return lowered, result, context


def per_token_reference(x, w):
    """Independent numpy form: symmetric int8 per row of x, per column of w, integer product."""
    x_scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True) / 127, 1e-12)
    w_scale = np.maximum(np.abs(w).max(axis=0) / 127, np.finfo(np.float32).tiny * 2**23)
    xq = np.rint(x / x_scale).astype(np.int64)
    wq = np.clip(np.rint(w / w_scale), -127, 127).astype(np.int64)
    return (xq @ wq).astype(np.float64) * x_scale * w_scale, x_scale, w_scale


@pytest.mark.parametrize("opset", [13, 18])  # ReduceMax takes axes as an attribute before 18, an input after
def test_matmul_matches_numpy_reference_and_step_bound(opset):
    w = (np.random.default_rng(1).standard_normal((K, N)) * 0.3).astype(np.float32)
    model = parse_model(f"g (float[2, 5, {K}] x) => (float[2, 5, {N}] y) {{ y = MatMul (x, w) }}", {"w": w}, opset=opset)
    lowered, result, context = lower(model)
    assert result.modified
    assert "MatMulInteger" in op_types(lowered) and "MatMul" not in op_types(lowered)
    assert [o.name for o in lowered.graph.output] == ["y"]
    assert [(d.node, d.quantized, d.detail) for d in context.summary.decisions] == [("MatMul_0", True, "per-token dynamic int8")]
    x = tokens()
    (out,) = run(lowered, {"x": x})
    (optimized,) = run(lowered, {"x": x}, optimize=True)
    expected, x_scale, w_scale = per_token_reference(x, w)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    np.testing.assert_allclose(optimized, out, rtol=1e-5, atol=1e-6)
    exact = x.astype(np.float64) @ w
    bound = (x_scale / 2) * np.abs(w).sum(axis=0) + np.abs(x) @ np.broadcast_to(w_scale / 2, w.shape) \
        + K * (x_scale / 2) * (w_scale / 2)
    assert np.all(np.abs(out - exact) <= bound * (1 + 1e-4) + 1e-6)
    # per token: the smallest rows keep their relative accuracy
    small_row = np.abs(exact[:, 0]).max()
    assert np.abs(out[:, 0] - exact[:, 0]).max() < 0.02 * small_row


def test_gemm_trans_b_alpha_beta_bias():
    generator = np.random.default_rng(2)
    b = (generator.standard_normal((N, K)) * 0.3).astype(np.float32)
    c = generator.standard_normal(N).astype(np.float32)
    model = parse_model(f"""
    g (float[5, {K}] x) => (float[5, {N}] y) {{ y = Gemm <transB = 1, alpha = 0.5, beta = 2.0> (x, b, c) }}""",
                        {"b": b, "c": c})
    lowered, _, _ = lower(model)
    assert "Gemm" not in op_types(lowered)
    x = tokens(shape=(5, K))
    (out,) = run(lowered, {"x": x})
    expected, _, _ = per_token_reference(x, b.T)
    np.testing.assert_allclose(out, 0.5 * expected + 2.0 * c, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_second_run_and_excluded_or_activation_matmuls_unchanged():
    w = np.ones((K, N), np.float32)
    model = parse_model(f"""
    g (float[2, 5, {K}] x, float[2, {K}, 5] z) => (float[2, 5, {N}] y, float[2, 5, 5] a) {{
        y = MatMul (x, w)
        a = MatMul (x, z)
    }}""", {"w": w})
    once, _, _ = lower(model, exclude_nodes=("nothing",))
    twice, result, _ = lower(once)
    assert not result.modified and list(twice.graph.node) == list(once.graph.node)
    untouched, result, _ = lower(model, exclude_nodes=("MatMul_0",))
    assert not result.modified and op_types(untouched) == ["MatMul", "MatMul"]


def test_compile_per_token_beats_static_per_tensor_on_uneven_tokens():
    w = (np.random.default_rng(3).standard_normal((K, N)) * 0.3).astype(np.float32)
    model = parse_model(f"g (float[2, 5, {K}] x) => (float[2, 5, {N}] y) {{ y = MatMul (x, w) }}", {"w": w})
    calibration = [{"x": tokens(seed)} for seed in range(4)]
    evaluation = [{"x": tokens(seed)} for seed in range(10, 13)]
    reference = np.concatenate([run(model, s)[0] for s in evaluation])
    results = {}
    for per_token in (False, True):
        compiled = qcompiler.compile(model, calibration, QuantConfig(per_token_activations=per_token))
        results[per_token] = sqnr_db(reference, np.concatenate([run(compiled.model, s)[0] for s in evaluation]))
        assert [(d.node, d.quantized) for d in compiled.summary.decisions] == [("MatMul_0", True)]
    assert results[True] > results[False] + 10.0, results


def test_per_token_needs_the_ort_target():
    with pytest.raises(ConfigError, match="per_token_activations"):
        QuantConfig(per_token_activations=True, target="tensorrt")
