"""SmoothQuant's no-harm guard and the weight statistic its scales are computed from.

Guard: with a fixed alpha a group is smoothed only where that lowers its quantized output error on
held-out folds of the sampled calibration rows; otherwise it is left as it was and the summary
says why. Statistic: max|W_j| relative to the quantization range of each weight column (weights
per output channel), so rescaling a column, which per-channel quantization does not see, moves no
scale; with per-tensor weights it is the paper's plain row maximum (up to a constant)."""

import numpy as np
import onnx
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import parse_model, run, sqnr_db
import qcompiler
from qcompiler.calibrators.rows import RowSampleCalibrator
from qcompiler.compiler import CalibrationStage
from qcompiler.config import QuantConfig
from qcompiler.context import CompileContext
from qcompiler.ir import Graph, infer_shapes
from qcompiler.pass_manager import PassManager
from qcompiler.passes.smoothquant import SmoothQuant, layer_error, layer_errors, smoothing_scales, weight_row_extent

K, N = 8, 6
WEIGHT = (np.random.default_rng(3).standard_normal((K, N)) * 0.5).astype(np.float32)


def gained_input_model(channel_2_gain):
    """y = (x * c) @ W: the Mul by c absorbs 1/s; c's channel 2 is an outlier gain (1: none)."""
    gains = np.ones(K, np.float32)
    gains[2] = channel_2_gain
    return parse_model(f"""
    g (float[2, 5, {K}] x) => (float[2, 5, {N}] y) {{
        h = Mul (x, c)
        y = MatMul (h, w)
    }}""", {"c": gains, "w": WEIGHT})


def gaussian(count, seed):
    generator = np.random.default_rng(seed)
    return [{"x": generator.standard_normal((2, 5, K)).astype(np.float32)} for _ in range(count)]


def uniform(count, seed):
    generator = np.random.default_rng(seed)
    return [{"x": generator.uniform(-1.0, 1.0, (2, 5, K)).astype(np.float32)} for _ in range(count)]


def smooth(model, calibration, **options):
    config = QuantConfig(smoothquant=True, **options)
    graph = Graph(infer_shapes(model))
    context = CompileContext(config)
    PassManager([SmoothQuant()], statistics=CalibrationStage(calibration, config)).run(graph, context)
    smoothed = graph.to_model()
    onnx.checker.check_model(smoothed, full_check=True)
    return smoothed, context


def compiled_sqnr(model, calibration, evaluation, **options):
    compiled = qcompiler.compile(model, calibration, QuantConfig(**options))
    reference = np.concatenate([run(model, sample)[0] for sample in evaluation])
    return sqnr_db(reference, np.concatenate([run(compiled.model, sample)[0] for sample in evaluation]))


def test_guard_leaves_a_group_alone_where_smoothing_raises_its_error():
    # No outlier channel: dividing by s only brings every channel to the edge of the per-tensor
    # range, where values the 60 calibration rows did not reach are clipped.
    model = gained_input_model(1.0)
    calibration, evaluation = gaussian(6, seed=0), gaussian(50, seed=100)
    smoothed, context = smooth(model, calibration)
    [decision] = context.summary.smoothing
    assert (decision.action, decision.alpha) == ("unchanged", None)
    assert decision.detail.startswith("guard: alpha 0.5 does not lower the layer's quantized output error "
                                      "on 60 calibration rows ("), decision.detail
    assert smoothed.graph == Graph(infer_shapes(model)).to_model().graph  # must not change

    _, unguarded = smooth(model, calibration, smoothquant_guard=False)
    assert [d.action for d in unguarded.summary.smoothing] == ["folded"]
    # ... and the guard was right: on inputs calibration never saw, smoothing this group loses.
    plain = compiled_sqnr(model, calibration, evaluation)
    assert compiled_sqnr(model, calibration, evaluation, smoothquant=True) == plain
    assert compiled_sqnr(model, calibration, evaluation, smoothquant=True, smoothquant_guard=False) < plain - 6.0


def test_guard_smooths_where_smoothing_lowers_the_error():
    model = gained_input_model(50.0)
    calibration, evaluation = uniform(6, seed=1), uniform(50, seed=101)
    _, context = smooth(model, calibration)
    [decision] = context.summary.smoothing
    assert (decision.action, decision.alpha, decision.detail) == ("folded", 0.5, "into Mul Mul_0")
    plain = compiled_sqnr(model, calibration, evaluation)
    assert compiled_sqnr(model, calibration, evaluation, smoothquant=True) > plain + 6.0


def test_held_out_scoring_sees_the_clipping_that_in_sample_scoring_misses():
    # Scored on the rows that set the ranges, no value can exceed its channel's extreme, so the
    # group of the first test looks better smoothed; on held-out folds it is clearly worse.
    calibrator = RowSampleCalibrator()
    for sample in gaussian(6, seed=0):
        calibrator.update(sample["x"])
    sample, config = calibrator.sample(), QuantConfig()
    scales = smoothing_scales(sample.channel_absmax, weight_row_extent([WEIGHT], True), 0.5)
    reference = sample.rows @ WEIGHT
    in_sample = (layer_error(sample.rows, WEIGHT, reference, scales, sample, config)
                 / layer_error(sample.rows, WEIGHT, reference, np.ones(K, np.float32), sample, config))
    held_out = layer_errors(sample, [WEIGHT], (0.5,), config)
    assert in_sample < 1.0
    assert held_out[0.5] > 2.0 * held_out[None]


def test_one_large_weight_in_an_outlier_row_no_longer_protects_the_outlier():
    # MiniLM's FFN output projection: the outlier activation channel (2) also holds the single
    # largest weight (column 2). Measured by the plain row maximum, that row looks "hard", s_2 stays
    # small, channel 2 keeps setting the per-tensor range while the ordinary channels are divided
    # by more than the range shrinks: their quantization step, s_j * max_k(a_k / s_k), grows.
    act_absmax = np.array([1.0, 1.0, 20.0, 1.0])
    weight = np.full((4, 4), 0.1, np.float32)
    weight[2] = 0.005
    weight[2, 2] = 8.0

    def ordinary_step(extent):
        scales = smoothing_scales(act_absmax, extent, 0.5)
        return scales[0] * np.max(act_absmax / scales)

    unsmoothed_step = act_absmax.max()
    assert ordinary_step(weight_row_extent([weight], per_channel=False)) > 1.5 * unsmoothed_step
    assert ordinary_step(weight_row_extent([weight], per_channel=True)) < 0.5 * unsmoothed_step


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), layers=st.integers(1, 3), log_gain=st.floats(-6.0, 6.0))
def test_weight_extent_ignores_what_the_weight_quantization_ignores(seed, layers, log_gain):
    """Property: per output channel, rescaling any weight column leaves the extent (so s) unchanged;
    per tensor, rescaling a whole weight does, and the extent is the row maximum over the tensor's."""
    generator = np.random.default_rng(seed)
    weights = [(generator.standard_normal((K, N)) * generator.uniform(0.01, 3.0)).astype(np.float32) for _ in range(layers)]
    column_gains = [np.exp(generator.uniform(-abs(log_gain), abs(log_gain) + 1e-3, N)).astype(np.float32) for _ in weights]
    extent = weight_row_extent(weights, per_channel=True)
    assert extent.shape == (K,) and np.all(extent <= 1.0 + 1e-6) and np.isclose(extent.max(), 1.0)
    rescaled = [weight * gains for weight, gains in zip(weights, column_gains)]
    np.testing.assert_allclose(weight_row_extent(rescaled, per_channel=True), extent, rtol=1e-5)

    per_tensor = weight_row_extent(weights, per_channel=False)
    expected = np.max([np.abs(w).max(axis=1) / np.abs(w).max() for w in weights], axis=0)
    np.testing.assert_allclose(per_tensor, expected, rtol=1e-6)
    scaled_tensors = [weight * np.float32(np.exp(log_gain)) for weight in weights]
    np.testing.assert_allclose(weight_row_extent(scaled_tensors, per_channel=False), per_tensor, rtol=1e-5)
