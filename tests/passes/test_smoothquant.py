"""SmoothQuant on tiny hand-built graphs: one per producer form that absorbs 1/s, the forms that
must not fold, shared Q/K/V scales, idempotence, and the float outputs unchanged within 1e-5
relative (the pass is exact). Statistics come from the real calibration stage on real ORT runs."""

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import initializer, op_types, parse_model, run, sqnr_db
import qcompiler
from qcompiler.compiler import CalibrationStage
from qcompiler.config import QuantConfig
from qcompiler.context import CompileContext
from qcompiler.errors import ConfigError
from qcompiler.ir import Graph, infer_shapes
from qcompiler.pass_manager import PassManager
from qcompiler.passes.smoothquant import (ALPHA_GRID, SmoothQuant, layer_error, layer_errors, search_alpha,
                                          smoothing_scales, weight_row_extent)
from qcompiler.calibrators.rows import RowSampleCalibrator

K, N = 8, 6
rng = np.random.default_rng(5)


def outlier_samples(name="x", shape=(2, 5, K), count=6, seed=0):
    """Activations whose channel 2 is ~50x the others, the transformer outlier pattern."""
    generator = np.random.default_rng(seed)
    samples = []
    for _ in range(count):
        x = generator.standard_normal(shape).astype(np.float32)
        x[..., 2] *= 50.0
        samples.append({name: x})
    return samples


def weight(shape, seed):
    return (np.random.default_rng(seed).standard_normal(shape) * 0.5).astype(np.float32)


def smooth(model, samples, check=True, **options):
    """Run SmoothQuant alone with statistics from the calibration stage; returns (model, context).
    The guard is off unless asked for: these tests are about where and how 1/s folds, and the
    few Gaussian rows here rarely make smoothing pay on held-out rows (test_smoothquant_guard.py)."""
    config = QuantConfig(smoothquant=True, **{"smoothquant_guard": False, **options})
    graph = Graph(infer_shapes(model))  # as compile does: Reshape matching reads inferred shapes
    context = CompileContext(config)
    manager = PassManager([SmoothQuant()], statistics=CalibrationStage(samples, config))
    manager.run(graph, context)
    smoothed = graph.to_model()
    if check:
        onnx.checker.check_model(smoothed, full_check=True)
    return smoothed, context


def assert_exact(original, smoothed, samples):
    for sample in samples:
        for ref, out in zip(run(original, sample), run(smoothed, sample)):
            assert ref.shape == out.shape
            assert np.max(np.abs(ref - out)) <= 1e-5 * np.max(np.abs(ref)), np.max(np.abs(ref - out))


def actions(context):
    return [(decision.action, decision.detail) for decision in context.summary.smoothing]


def layer_norm_qkv_model(gamma_outlier=1.0):
    gamma = weight((K,), 1) + 1.0
    gamma[2] = gamma_outlier  # LayerNorm outputs get their outlier channels from gamma
    ln = {"gamma": gamma, "beta": weight((K,), 2)}
    return parse_model(f"""
    g (float[2, 5, {K}] x) => (float[2, 5, {N}] q, float[2, 5, {N}] k, float[2, 5, {N}] v) {{
        h = LayerNormalization <axis = -1, epsilon = 1e-5> (x, gamma, beta)
        q = MatMul (h, wq)
        k = MatMul (h, wk)
        v = MatMul (h, wv)
    }}""", {**ln, "wq": weight((K, N), 3), "wk": weight((K, N), 4), "wv": weight((K, N), 5)}, opset=17)


def test_layernorm_folds_one_shared_scale_into_qkv():
    model = layer_norm_qkv_model(gamma_outlier=40.0)
    gamma = initializer(model, "gamma")
    samples = outlier_samples()
    smoothed, context = smooth(model, samples)
    assert actions(context) == [("folded", "into LayerNormalization LayerNormalization_0")]
    assert op_types(smoothed) == op_types(model)  # nothing inserted: folding costs nothing at run time
    folded = initializer(smoothed, "gamma_folded")
    scales = gamma / folded
    assert scales[2] > 2.0  # the outlier channel really was divided
    for name in ("wq", "wk", "wv"):  # one s for all three projections
        ratio = initializer(smoothed, f"{name}_smoothed") / initializer(model, name)
        np.testing.assert_allclose(ratio, np.broadcast_to(scales[:, None], ratio.shape), rtol=1e-5)
    np.testing.assert_allclose(initializer(smoothed, "beta_folded"), initializer(model, "beta") / scales, rtol=1e-5)
    assert_exact(model, smoothed, samples)


def test_second_run_changes_nothing():
    model = layer_norm_qkv_model()
    samples = outlier_samples()
    once, _ = smooth(model, samples)
    twice, context = smooth(once, samples)
    assert context.summary.smoothing == []
    assert twice.graph == once.graph


@pytest.mark.parametrize("op, opset", [("SimplifiedLayerNormalization", 17), ("RMSNormalization", 23)])
def test_rms_norms_fold_into_their_scale(op, opset):
    # ONNX Runtime registers SimplifiedLayerNormalization in the ONNX domain (a contrib op that
    # onnx.checker does not know); RMSNormalization is its ONNX standard form since opset 23.
    header = f'<ir_version: 10, opset_import: ["" : {opset}]>\n'
    model = onnx.parser.parse_model(header + f"""
    g (float[2, 5, {K}] x) => (float[2, 5, {N}] y) {{
        h = {op} <axis = -1, epsilon = 1e-5> (x, gamma)
        y = MatMul (h, w)
    }}""")
    for name, value in {"gamma": weight((K,), 1) + 1.0, "w": weight((K, N), 2)}.items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(value, name))
    samples = outlier_samples()
    smoothed, context = smooth(model, samples, check=op == "RMSNormalization")
    assert actions(context) == [("folded", f"into {op} {op}_0")]
    assert_exact(model, smoothed, samples)


def test_decomposed_layernorm_folds_into_gamma_and_beta_and_ignores_shape_reads():
    model = parse_model(f"""
    g (float[2, 5, {K}] x) => (float[2, 5, {N}] y, int64[3] s) {{
        mean = ReduceMean <axes = [-1]> (x)
        centred = Sub (x, mean)
        squared = Pow (centred, two)
        variance = ReduceMean <axes = [-1]> (squared)
        shifted = Add (variance, eps)
        deviation = Sqrt (shifted)
        normed = Div (centred, deviation)
        scaled = Mul (normed, gamma)
        h = Add (scaled, beta)
        s = Shape (h)
        y = MatMul (h, w)
    }}""", {"two": np.array(2.0, np.float32), "eps": np.array(1e-5, np.float32), "gamma": weight((K,), 1) + 1.0,
            "beta": weight((K,), 2), "w": weight((K, N), 3)})
    samples = outlier_samples()
    smoothed, context = smooth(model, samples)
    assert actions(context) == [("folded", "into Mul Mul_7, Add Add_8")]
    assert_exact(model, smoothed, samples)


def test_matmul_with_bias_add_folds_into_weight_columns_and_bias():
    model = parse_model(f"""
    g (float[2, 5, {K}] x) => (float[2, 5, {N}] y) {{
        p = MatMul (x, w1)
        h = Add (b1, p)
        y = MatMul (h, w2)
    }}""", {"w1": weight((K, K), 1), "b1": weight((K,), 2), "w2": weight((K, N), 3)})
    samples = outlier_samples()
    smoothed, context = smooth(model, samples, smoothquant_unfoldable="skip")
    # w1's own group reads a graph input (unfoldable, skipped); w2's folds into MatMul + Add.
    assert ("folded", "into MatMul MatMul_0, Add Add_1") in actions(context)
    assert ("skipped", "x is a graph input") in actions(context)
    assert_exact(model, smoothed, samples)


def test_gemm_trans_b_with_bias_folds_and_gemm_consumer_scales_its_columns():
    model = parse_model(f"""
    g (float[4, {K}] x) => (float[4, {N}] y) {{
        h = Gemm <transB = 1> (x, b1, c1)
        y = Gemm <transB = 1> (h, b2, c2)
    }}""", {"b1": weight((K, K), 1), "c1": weight((K,), 2), "b2": weight((N, K), 3), "c2": weight((N,), 4)})
    samples = outlier_samples(shape=(4, K))
    smoothed, context = smooth(model, samples, smoothquant_unfoldable="skip")
    assert ("folded", "into Gemm Gemm_0") in actions(context)
    scales = initializer(smoothed, "b2_smoothed") / initializer(model, "b2")  # [N, K]: s along columns
    np.testing.assert_allclose(scales, np.broadcast_to(scales[:1], scales.shape), rtol=1e-5)
    assert_exact(model, smoothed, samples)


def test_mul_by_shared_constant_gets_its_own_copy():
    # c is used by two Muls; only the one feeding the layer may change (INC #2050).
    model = parse_model(f"""
    g (float[2, 5, {K}] x) => (float[2, 5, {N}] y, float[2, 5, {K}] z) {{
        r = Relu (x)
        h = Mul (r, c)
        y = MatMul (h, w)
        z = Mul (x, c)
    }}""", {"c": np.array(0.5, np.float32), "w": weight((K, N), 1)})
    samples = outlier_samples()
    smoothed, context = smooth(model, samples)
    assert actions(context) == [("folded", "into Mul Mul_1")]
    assert initializer(smoothed, "c").shape == () and initializer(smoothed, "c_folded").shape == (K,)
    assert_exact(model, smoothed, samples)


def test_div_by_constant_folds():
    model = parse_model(f"""
    g (float[2, 5, {K}] x) => (float[2, 5, {N}] y) {{
        r = Relu (x)
        h = Div (r, d)
        y = MatMul (h, w)
    }}""", {"d": np.array(1.5, np.float32), "w": weight((K, N), 1)})
    samples = outlier_samples()
    smoothed, context = smooth(model, samples)
    assert actions(context) == [("folded", "into Div Div_1")]
    assert_exact(model, smoothed, samples)


def test_reshape_and_transpose_between_producer_and_matmul():
    model = parse_model(f"""
    g (float[2, 5, {K}] x) => (float[10, {N}] y, float[5, 2, {N}] t) {{
        h = LayerNormalization <axis = -1> (x, gamma, beta)
        flat = Reshape (h, shape)
        y = MatMul (flat, w1)
        swapped = Transpose <perm = [1, 0, 2]> (h)
        t = MatMul (swapped, w2)
    }}""", {"gamma": weight((K,), 1) + 1.0, "beta": weight((K,), 2), "shape": np.array([-1, K], np.int64),
            "w1": weight((K, N), 3), "w2": weight((K, N), 4)}, opset=17)
    samples = outlier_samples()
    smoothed, context = smooth(model, samples)
    assert actions(context) == [("folded", "into LayerNormalization LayerNormalization_0")]
    assert_exact(model, smoothed, samples)


def test_residual_consumer_blocks_folding_and_gets_a_mul():
    # Post-LN BERT: the LayerNorm output feeds Q/K/V and the residual Add, so 1/s cannot go into it.
    model = parse_model(f"""
    g (float[2, 5, {K}] x) => (float[2, 5, {K}] y) {{
        h = LayerNormalization <axis = -1> (x, gamma, beta)
        p = MatMul (h, w)
        y = Add (p, h)
    }}""", {"gamma": weight((K,), 1) + 1.0, "beta": weight((K,), 2), "w": weight((K, K), 3)}, opset=17)
    samples = outlier_samples()
    smoothed, context = smooth(model, samples)
    assert actions(context) == [("mul", "Mul inserted: h also feeds Add Add_2")]
    assert op_types(smoothed).count("Mul") == 1
    np.testing.assert_array_equal(initializer(smoothed, "gamma"), initializer(model, "gamma"))
    assert_exact(model, smoothed, samples)

    skipped, context = smooth(model, samples, smoothquant_unfoldable="skip")
    assert [d.action for d in context.summary.smoothing] == ["skipped"]
    assert skipped.graph == Graph(infer_shapes(model)).to_model().graph  # must not change


def test_nonlinear_producer_is_not_folded():
    model = parse_model(f"""
    g (float[2, 5, {K}] x) => (float[2, 5, {N}] y) {{
        h = Tanh (x)
        y = MatMul (h, w)
    }}""", {"w": weight((K, N), 1)})
    samples = outlier_samples()
    smoothed, context = smooth(model, samples)
    assert actions(context) == [("mul", "Mul inserted: Tanh Tanh_0 cannot absorb a per-channel scale")]
    assert_exact(model, smoothed, samples)


def test_smoothing_scales_formula_and_dead_channels():
    act = np.array([4.0, 0.0, 9.0, 1.0])
    wts = np.array([1.0, 2.0, 0.25, 0.0])
    scales = smoothing_scales(act, wts, 0.5)
    np.testing.assert_allclose(scales, [2.0, 1.0, 6.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(smoothing_scales(act[:1], wts[:1], 1.0), [4.0], rtol=1e-6)


def test_alpha_search_beats_no_smoothing_and_is_no_worse_than_half():
    calibrator = RowSampleCalibrator(capacity=1024)
    for sample in outlier_samples(count=100):
        calibrator.update(sample["x"])
    sample = calibrator.sample()
    w = weight((K, N), 9)
    config = QuantConfig()
    errors = layer_errors(sample, [w], ALPHA_GRID, config)  # what the search minimises
    chosen = search_alpha(sample, [w], config)
    assert chosen is not None
    assert errors[chosen] == min(errors.values())
    assert errors[chosen] <= errors[0.5]
    assert errors[chosen] < 0.5 * errors[None]  # a 50x outlier channel: smoothing must help a lot
    # the held-out score is no in-sample score in disguise: on these rows alone it is lower
    scales = smoothing_scales(sample.channel_absmax, weight_row_extent([w], config.per_channel), chosen)
    in_sample = layer_error(sample.rows, w, sample.rows @ w, scales, sample, config)
    assert in_sample < errors[chosen]


def test_compile_with_smoothquant_is_more_accurate_on_outlier_activations():
    model = parse_model(f"""
    g (float[2, 5, {K}] x) => (float[2, 5, {N}] y) {{
        h = LayerNormalization <axis = -1> (x, gamma, beta)
        y = MatMul (h, w)
    }}""", {"gamma": np.where(np.arange(K) == 2, 60.0, 1.0).astype(np.float32), "beta": weight((K,), 2),
            "w": weight((K, N), 3)}, opset=17)
    calibration, evaluation = outlier_samples(count=8), outlier_samples(count=4, seed=1)
    reference = np.concatenate([run(model, s)[0] for s in evaluation])
    results = {}
    for alpha in (None, 0.5, "search"):
        options = {} if alpha is None else {"smoothquant": True, "smoothquant_alpha": alpha}
        compiled = qcompiler.compile(model, calibration, QuantConfig(**options))
        results[alpha] = sqnr_db(reference, np.concatenate([run(compiled.model, s)[0] for s in evaluation]))
    assert results[0.5] > results[None] + 6.0, results
    assert results["search"] >= results[0.5] - 0.5, results


def test_config_validation():
    assert QuantConfig(smoothquant_alpha="0.25").smoothquant_alpha == 0.25
    with pytest.raises(ConfigError, match="smoothquant_alpha"):
        QuantConfig(smoothquant_alpha=1.5)
    with pytest.raises(ConfigError, match="smoothquant_alpha"):
        QuantConfig(smoothquant_alpha="auto")
    with pytest.raises(ConfigError, match="smoothquant_unfoldable"):
        QuantConfig(smoothquant_unfoldable="drop")


def test_command_line_flags(tmp_path):
    import subprocess
    import sys

    model = layer_norm_qkv_model(gamma_outlier=40.0)
    onnx.save(model, tmp_path / "model.onnx")
    (tmp_path / "calib").mkdir()
    for index, sample in enumerate(outlier_samples(count=3)):
        np.savez(tmp_path / "calib" / f"sample_{index}.npz", **sample)
    common = [sys.executable, "-m", "qcompiler", "compile", tmp_path / "model.onnx", "--calib", tmp_path / "calib"]
    result = subprocess.run([*map(str, common), "-o", str(tmp_path / "out.onnx"), "--smoothquant",
                             "--smoothquant-alpha", "search", "--per-token"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "smoothquant layer groups: 1 folded" in result.stderr
    written = onnx.load(tmp_path / "out.onnx")
    assert "MatMulInteger" in op_types(written) and "gamma_folded" in [t.name for t in written.graph.initializer]
    bad = subprocess.run([*map(str, common), "-o", str(tmp_path / "bad.onnx"), "--smoothquant", "--smoothquant-alpha", "2"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "error: smoothquant_alpha must be" in bad.stderr and "Traceback" not in bad.stderr


PRODUCERS = {
    "layernorm": ("h = LayerNormalization <axis = -1> (x, c1, c2)", {"c1": (None,), "c2": (None,)}),
    "matmul_bias": ("p = MatMul (x, c1)\n        h = Add (p, c2)", {"c1": (None, None), "c2": (None,)}),
    "mul_const": ("h = Mul (x, c1)", {"c1": (None,)}),
    "div_const": ("r = Relu (x)\n        h = Div (r, c1)", {"c1": ()}),
}


@settings(max_examples=15, deadline=None)
@given(producer=st.sampled_from(sorted(PRODUCERS)), channels=st.integers(2, 12), layers=st.integers(1, 3),
       alpha=st.floats(0.0, 1.0), outlier=st.floats(1.0, 1e3), seed=st.integers(0, 2**16))
def test_any_alpha_any_producer_stays_exact(producer, channels, layers, alpha, outlier, seed):
    """Property: whatever alpha, width, outlier size or number of consumers, the float graph is unchanged
    (guard off, so every group is smoothed at that alpha and the folding itself is what is tested)."""
    generator = np.random.default_rng(seed)
    body, constants = PRODUCERS[producer]
    values = {name: (generator.uniform(0.5, 2.0, [channels] * len(shape)) if shape else np.array(1.7)).astype(np.float32)
              for name, shape in constants.items()}
    outputs = ", ".join(f"float[3, {N}] y{i}" for i in range(layers))
    matmuls = "\n        ".join(f"y{i} = MatMul (h, w{i})" for i in range(layers))
    values |= {f"w{i}": (generator.standard_normal((channels, N)) * generator.uniform(0.01, 3.0)).astype(np.float32)
               for i in range(layers)}
    model = parse_model(f"""
    g (float[3, {channels}] x) => ({outputs}) {{
        {body}
        {matmuls}
    }}""", values, opset=17)
    samples = []
    for _ in range(3):
        x = generator.standard_normal((3, channels)).astype(np.float32)
        x[:, generator.integers(channels)] *= outlier
        samples.append({"x": x})
    smoothed, context = smooth(model, samples, smoothquant_alpha=alpha, smoothquant_guard=False)
    # the h group folds; matmul_bias's own MatMul reads the graph input and gets a Mul
    assert [d.action for d in context.summary.smoothing] == (["mul", "folded"] if producer == "matmul_bias" else ["folded"])
    assert_exact(model, smoothed, samples)
