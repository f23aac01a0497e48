"""InsertQDQ on tiny hand-built graphs: checker, ONNX Runtime, and error within the bound that the
quantization steps imply."""

import numpy as np
import onnx
import pytest

from helpers import initializer, op_types, parse_model, run, sqnr_db
from qcompiler.calibration import expose_tensors
from qcompiler.calibrators.base import Range
from qcompiler.config import QuantConfig
from qcompiler.context import CompileContext
from qcompiler.ir import Graph
from qcompiler.passes import InsertQDQ
from qcompiler.passes.quantizable import activation_tensors

rng = np.random.default_rng(42)


def quantize_graph(model, samples, **options):
    """Apply InsertQDQ with exact min-max ranges of `samples`; returns (model, context)."""
    config = QuantConfig(**options)
    graph = Graph(model)
    names = activation_tensors(graph, config)
    exposed = expose_tensors(model, names)
    observed = [run(exposed, sample)[len(model.graph.output):] for sample in samples]
    ranges = {}
    for index, name in enumerate(names):
        values = np.concatenate([outputs[index].ravel() for outputs in observed])
        ranges[name] = Range(float(values.min()), float(values.max()))
    context = CompileContext(config, ranges)
    result = InsertQDQ().run(graph, context)
    quantized = graph.to_model()
    onnx.checker.check_model(quantized, full_check=True)
    return quantized, context, result, graph


def dequantize_node_for(model, tensor_name):
    return next(n for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == tensor_name)


def linear_error_bound(x, weights, x_step, w_steps):
    """Worst-case |x'w' - xw| when |x'-x| <= x_step/2 and |w'-w| <= w_steps/2 (per output column)."""
    half_w = np.broadcast_to(w_steps / 2, weights.shape)
    return (np.abs(x) @ half_w + (x_step / 2) * np.abs(weights).sum(axis=0)
            + weights.shape[0] * (x_step / 2) * (w_steps / 2)) * (1 + 1e-5) + 1e-6


def test_matmul_weights_per_channel_and_error_within_step_bound():
    weights = rng.standard_normal((16, 8)).astype(np.float32)
    weights[:, 3] *= 20  # one wide channel must not coarsen the others (per-channel)
    model = parse_model("g (float[4, 16] x) => (float[4, 8] y) { y = MatMul (x, w) }", {"w": weights})
    samples = [{"x": rng.standard_normal((4, 16)).astype(np.float32)} for _ in range(3)]
    quantized, _, result, _ = quantize_graph(model, samples)
    assert result.modified
    assert op_types(quantized).count("QuantizeLinear") == 1
    assert initializer(quantized, "w_quantized").dtype == np.int8
    w_dq = dequantize_node_for(quantized, "w_quantized")
    assert onnx.helper.get_attribute_value(w_dq.attribute[0]) == 1  # output channels of a [K, N] weight
    x_step = float(initializer(quantized, "x_scale"))
    w_steps = initializer(quantized, "w_quantized_scale")
    assert w_steps.shape == (8,) and np.all(w_steps > 0)
    for sample in samples:
        reference = run(model, sample)[0]
        actual = run(quantized, sample)[0]
        bound = linear_error_bound(sample["x"], weights, x_step, w_steps)
        assert np.all(np.abs(actual - reference) <= bound)
        assert np.abs(actual - reference).max() > 0  # it really is quantized


@pytest.mark.parametrize("trans_b, axis", [(1, 0), (0, 1)])
def test_gemm_axis_and_int32_bias(trans_b, axis):
    weights = rng.standard_normal((8, 16) if trans_b else (16, 8)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    model = parse_model(f"g (float[4, 16] x) => (float[4, 8] y) {{ y = Gemm <transB = {trans_b}> (x, w, b) }}",
                        {"w": weights, "b": bias})
    samples = [{"x": rng.standard_normal((4, 16)).astype(np.float32)}]
    quantized, _, _, _ = quantize_graph(model, samples)
    assert onnx.helper.get_attribute_value(dequantize_node_for(quantized, "w_quantized").attribute[0]) == axis
    assert initializer(quantized, "b_quantized").dtype == np.int32
    x_step = float(initializer(quantized, "x_scale"))
    w_steps = initializer(quantized, "w_quantized_scale")
    np.testing.assert_allclose(initializer(quantized, "b_quantized_scale"), x_step * w_steps, rtol=1e-6)
    reference, actual = run(model, samples[0])[0], run(quantized, samples[0])[0]
    column_weights = weights.T if trans_b else weights
    bound = linear_error_bound(samples[0]["x"], column_weights, x_step, w_steps) + x_step * w_steps / 2
    assert np.all(np.abs(actual - reference) <= bound)


def test_float_bias_mode_keeps_bias_untouched(conv_model):
    samples = [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)}]
    quantized, _, _, _ = quantize_graph(conv_model, samples, bias="float")
    conv_inputs = [list(n.input) for n in quantized.graph.node if n.op_type == "Conv"]
    assert [inputs[2] for inputs in conv_inputs] == ["b1", "b2"]


def test_conv_chain_fidelity_and_axes(conv_model):
    samples = [{"x": rng.standard_normal((1, 4, 8, 8)).astype(np.float32)} for _ in range(4)]
    quantized, context, _, _ = quantize_graph(conv_model, samples)
    # Conv weights [M, C, kh, kw] are per output channel: axis 0.
    for weight in ("w1", "w2"):
        assert onnx.helper.get_attribute_value(dequantize_node_for(quantized, f"{weight}_quantized").attribute[0]) == 0
    assert [d.quantized for d in context.summary.decisions] == [True, True]
    for sample in samples:
        assert sqnr_db(run(conv_model, sample)[0], run(quantized, sample)[0]) > 30


def test_conv_transpose_axis_one_and_grouped_bias_stays_float():
    weights = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)  # [C_in, C_out / group, kh, kw]
    model = parse_model("""
    g (float[1, 4, 6, 6] x) => (float[1, 6, 13, 13] y) {
        y = ConvTranspose <strides = [2, 2], group = 2> (x, w, b)
    }""", {"w": weights, "b": rng.standard_normal(6).astype(np.float32)})
    samples = [{"x": rng.standard_normal((1, 4, 6, 6)).astype(np.float32)}]
    quantized, _, _, _ = quantize_graph(model, samples)
    assert onnx.helper.get_attribute_value(dequantize_node_for(quantized, "w_quantized").attribute[0]) == 1
    conv = next(n for n in quantized.graph.node if n.op_type == "ConvTranspose")
    assert conv.input[2] == "b"
    assert sqnr_db(run(model, samples[0])[0], run(quantized, samples[0])[0]) > 30


def test_shared_activation_gets_one_qdq_pair():
    model = parse_model("""
    g (float[2, 8] x) => (float[2, 4] y, float[2, 4] z) {
        y = MatMul (x, w1)
        z = MatMul (x, w2)
    }""", {"w1": rng.standard_normal((8, 4)).astype(np.float32), "w2": rng.standard_normal((8, 4)).astype(np.float32)})
    quantized, _, _, _ = quantize_graph(model, [{"x": rng.standard_normal((2, 8)).astype(np.float32)}])
    assert op_types(quantized).count("QuantizeLinear") == 1
    matmul_inputs = {n.input[0] for n in quantized.graph.node if n.op_type == "MatMul"}
    assert len(matmul_inputs) == 1


def test_exclusions_by_name_pattern_and_op_type():
    model = parse_model("""
    g (float[2, 8] x) => (float[2, 4] y, float[2, 4] z) {
        y = MatMul (x, w1)
        z = Gemm (x, w2)
    }""", {"w1": rng.standard_normal((8, 4)).astype(np.float32), "w2": rng.standard_normal((8, 4)).astype(np.float32)})
    samples = [{"x": rng.standard_normal((2, 8)).astype(np.float32)}]
    matmul_name = model.graph.node[0].name or "MatMul_0"
    _, context, _, _ = quantize_graph(model, samples, exclude_nodes=("MatMul*",), exclude_op_types=("Gemm",))
    details = {d.op_type: d.detail for d in context.summary.decisions}
    assert details == {"MatMul": "excluded by name", "Gemm": "op type Gemm excluded"}
    assert matmul_name.startswith("MatMul")


def test_activation_matmul_left_alone_by_default_and_pass_is_idempotent():
    model = parse_model("""
    g (float[2, 8] a, float[8, 3] b) => (float[2, 4] y, float[2, 3] z) {
        y = MatMul (a, w)
        z = MatMul (a, b)
    }""", {"w": rng.standard_normal((8, 4)).astype(np.float32)})
    samples = [{"a": rng.standard_normal((2, 8)).astype(np.float32), "b": rng.standard_normal((8, 3)).astype(np.float32)}]
    quantized, context, _, graph = quantize_graph(model, samples)
    assert [d.quantized for d in context.summary.decisions] == [True, False]
    again = InsertQDQ().run(graph, context)
    assert not again.modified
    assert graph.to_model().SerializeToString() == quantized.SerializeToString()


def test_activation_matmul_quantized_when_enabled():
    model = parse_model("g (float[2, 8] a, float[8, 3] b) => (float[2, 3] z) { z = MatMul (a, b) }")
    samples = [{"a": rng.standard_normal((2, 8)).astype(np.float32), "b": rng.standard_normal((8, 3)).astype(np.float32)}]
    quantized, _, _, _ = quantize_graph(model, samples, quantize_activation_matmul=True)
    assert op_types(quantized).count("QuantizeLinear") == 2
    assert sqnr_db(run(model, samples[0])[0], run(quantized, samples[0])[0]) > 30


def test_no_quantizable_node_means_no_change():
    model = parse_model("g (float[2, 8] a) => (float[2, 8] y) { y = Relu (a) }")
    quantized, _, result, _ = quantize_graph(model, [{"a": np.ones((2, 8), np.float32)}])
    assert not result.modified and op_types(quantized) == ["Relu"]


def test_int8_symmetric_activations_and_dead_channels_have_positive_scales():
    weights = rng.standard_normal((8, 4)).astype(np.float32)
    weights[:, 2] = 0.0  # a dead output channel
    model = parse_model("g (float[2, 8] x) => (float[2, 4] y) { y = MatMul (x, w) }", {"w": weights})
    samples = [{"x": np.zeros((2, 8), np.float32)}]  # an all-zero activation: zero-width range
    quantized, _, _, _ = quantize_graph(model, samples, activation_type="int8")
    assert initializer(quantized, "x_zero_point").dtype == np.int8 and int(initializer(quantized, "x_zero_point")) == 0
    scales = np.concatenate([initializer(quantized, "x_scale").ravel(), initializer(quantized, "w_quantized_scale")])
    assert np.all(np.isfinite(scales)) and np.all(scales > 0)
    np.testing.assert_array_equal(run(quantized, samples[0])[0], np.zeros((2, 4), np.float32))


def test_weightless_ops_get_input_qdq_only_when_asked():
    gamma, beta = np.ones(8, np.float32), np.zeros(8, np.float32)
    model = parse_model("""
    g (float[2, 8] x, float[2, 8] skip) => (float[2, 8] y) {
        s = Add (x, skip)
        n = LayerNormalization <axis = -1> (s, gamma, beta)
        y = Softmax <axis = -1> (n)
    }""", {"gamma": gamma, "beta": beta}, opset=17)
    samples = [{"x": rng.standard_normal((2, 8)).astype(np.float32), "skip": rng.standard_normal((2, 8)).astype(np.float32)}]
    untouched, _, result, _ = quantize_graph(model, samples)
    assert not result.modified and "QuantizeLinear" not in op_types(untouched)
    asked = ("Add", "LayerNormalization", "Softmax")
    quantized, context, _, graph = quantize_graph(model, samples, quantize_input_op_types=asked)
    # x, skip (Add), s (LayerNorm), n (Softmax): one pair each; gamma and beta stay float constants
    assert op_types(quantized).count("QuantizeLinear") == 4
    assert [(d.op_type, d.detail) for d in context.summary.decisions] == [(op, "activation inputs") for op in asked]
    assert sqnr_db(run(model, samples[0])[0], run(quantized, samples[0])[0]) > 30
    assert not InsertQDQ().run(graph, context).modified


def test_weighted_op_types_cannot_be_listed_as_input_only():
    from qcompiler.errors import ConfigError
    with pytest.raises(ConfigError, match="weighted op types"):
        QuantConfig(quantize_input_op_types=("MatMul",))
