"""OrtQuantizeOutputs (format qoperator): tiny graphs where each integer kernel must appear in ONNX
Runtime's optimized graph, and the lowered result (ORT_ENABLE_ALL, integer kernels) must match the
QDQ form (ORT_DISABLE_ALL, float simulation) within one quantization step of the output."""

import numpy as np

from helpers import parse_model, random_samples, run, sqnr_db
from ort_helpers import compile_tiny, ort_optimized_ops, output_step, q_inputs
from qcompiler.config import QuantConfig
from qcompiler.context import CompileContext
from qcompiler.ir import Graph
from qcompiler.passes.ort_placement import OrtQuantizeOutputs, plan_pruned

rng = np.random.default_rng(7)


def weights(*shapes):
    return [(rng.standard_normal(shape) * 0.3).astype(np.float32) for shape in shapes]


def check_lowered_matches_qdq(model, samples, steps: float = 1.0):
    """Integer kernels vs the same QDQ graph run in float: within `steps` output steps."""
    step = output_step(model, model.graph.output[0].name)
    for sample in samples:
        qdq_form = run(model, sample)[0]
        lowered = run(model, sample, optimize=True)[0]
        assert np.max(np.abs(qdq_form - lowered)) <= steps * step * (1 + 1e-5) + 1e-6


def conv_relu_conv_silu():
    w1, b1, w2, b2, w3, b3 = weights((8, 4, 3, 3), (8,), (8, 8, 3, 3), (8,), (4, 8, 1, 1), (4,))
    return parse_model("""
    g (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (a)
        c = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
        s = Sigmoid (c)
        m = Mul (c, s)
        y = Conv (m, w3, b3)
    }""", {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3, "b3": b3})


def test_conv_chain_runs_as_integer_kernels_within_one_step_of_qdq_form():
    model = conv_relu_conv_silu()
    samples = random_samples({"x": (1, 4, 8, 8)}, 4)
    compiled = compile_tiny(model, samples, format="qoperator")
    quantized = q_inputs(compiled)
    assert "r" in quantized and "a" not in quantized  # Relu folded into the first Conv's group
    assert {"c", "s", "m"} <= quantized
    ops = ort_optimized_ops(compiled)
    assert ops["QLinearConv"] == 2 and ops["QLinearSigmoid"] == 1 and ops["QLinearMul"] == 1
    assert ops["Conv"] == 1 and ops["Sigmoid"] == 0  # the graph-output Conv
    # the last Conv writes the graph output: its output stays float, so ORT keeps it as a float Conv
    assert "y" not in quantized
    check_lowered_matches_qdq(compiled, samples, steps=1.0)
    reference = [run(model, s)[0] for s in samples]
    lowered = [run(compiled, s, optimize=True)[0] for s in samples]
    assert sqnr_db(np.concatenate(reference), np.concatenate(lowered)) > 25


def test_hard_swish_becomes_integer_add_and_mul_with_div_folded_into_the_scale():
    w1, b1, w2, b2 = weights((8, 4, 1, 1), (8,), (4, 8, 1, 1), (4,))
    model = parse_model("""
    g (float[1, 4, 6, 6] x) => (float[1, 4, 6, 6] y) {
        c = Conv (x, w1, b1)
        three = Constant <value = float {3.0}> ()
        zero = Constant <value = float {0.0}> ()
        six = Constant <value = float {6.0}> ()
        a = Add (c, three)
        k = Clip (a, zero, six)
        d = Div (k, six)
        h = Mul (c, d)
        y = Conv (h, w2, b2)
    }""", {"w1": w1, "b1": b1, "w2": w2, "b2": b2})
    samples = random_samples({"x": (1, 4, 6, 6)}, 4, scale=3.0)
    compiled = compile_tiny(model, samples, format="qoperator")
    assert "Div" not in [n.op_type for n in compiled.graph.node]
    ops = ort_optimized_ops(compiled)
    assert ops["QLinearAdd"] == 1 and ops["QLinearMul"] == 1 and ops["QLinearConv"] == 1
    assert ops["Add"] == ops["Mul"] == ops["Div"] == 0
    check_lowered_matches_qdq(compiled, samples, steps=1.0)
    reference = np.concatenate([run(model, s)[0] for s in samples])
    assert sqnr_db(reference, np.concatenate([run(compiled, s, optimize=True)[0] for s in samples])) > 25


def test_residual_add_concat_maxpool_stay_in_int8():
    w1, b1, w2, b2, w3, b3 = weights((8, 4, 3, 3), (8,), (8, 8, 3, 3), (8,), (4, 16, 1, 1), (4,))
    model = parse_model("""
    g (float[1, 4, 8, 8] x) => (float[1, 4, 4, 4] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        b = Conv <pads = [1, 1, 1, 1]> (a, w2, b2)
        s = Add (a, b)
        c = Concat <axis = 1> (s, a)
        p = MaxPool <kernel_shape = [2, 2], strides = [2, 2]> (c)
        y = Conv (p, w3, b3)
    }""", {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3, "b3": b3})
    samples = random_samples({"x": (1, 4, 8, 8)}, 4)
    compiled = compile_tiny(model, samples, format="qoperator")
    ops = ort_optimized_ops(compiled)
    assert ops["QLinearAdd"] == 1 and ops["QLinearConcat"] == 1 and ops["QLinearConv"] == 2
    # MaxPool's Q/DQ share its input's scale, so ORT runs it on uint8; the only Q left is the graph input's
    assert ops["MaxPool"] == 0 and ops["NhwcMaxPool"] == 1 and ops["QuantizeLinear"] == 1
    check_lowered_matches_qdq(compiled, samples, steps=1.0)


def test_matmul_feeding_float_ops_keeps_a_float_output():
    w, b = weights((16, 8), (8,))
    model = parse_model("""
    g (float[2, 4, 16] x) => (float[2, 4, 8] y) {
        m = MatMul (x, w)
        a = Add (m, b)
        y = Softmax (a)
    }""", {"w": w, "b": b})
    compiled = compile_tiny(model, random_samples({"x": (2, 4, 16)}, 3), format="qoperator")
    assert q_inputs(compiled) == {"x"}  # ORT runs MatMulIntegerToFloat: no output rounding
    assert ort_optimized_ops(compiled)["MatMulIntegerToFloat"] == 1


def test_idempotent_and_must_not_change():
    model = conv_relu_conv_silu()
    samples = random_samples({"x": (1, 4, 8, 8)}, 2)
    compiled = compile_tiny(model, samples, format="qoperator")
    graph = Graph(compiled)
    context = CompileContext(QuantConfig(format="qoperator"))
    assert OrtQuantizeOutputs().statistics_needed(graph, context) == []
    assert not OrtQuantizeOutputs().run(graph, context).modified
    # a float graph (nothing quantized yet) has no int8 region to grow
    float_graph = Graph(model)
    assert plan_pruned(float_graph).tensors == []
    assert not OrtQuantizeOutputs().run(float_graph, context).modified


def test_format_qdq_keeps_todays_layout():
    model = conv_relu_conv_silu()
    samples = random_samples({"x": (1, 4, 8, 8)}, 2)
    compiled = compile_tiny(model, samples, format="qdq")
    assert q_inputs(compiled) == {"x", "r", "m"}  # activation inputs of the three Convs only


def test_squeeze_excite_gate_keeps_the_mul_int8():
    w1, b1, w2, b2, w3, b3 = weights((8, 4, 3, 3), (8,), (8, 8, 1, 1), (8,), (4, 8, 1, 1), (4,))
    model = parse_model("""
    g (float[1, 4, 8, 8] x) => (float[1, 4, 6, 6] y) {
        a = Conv (x, w1, b1)
        p = GlobalAveragePool (a)
        e = Conv (p, w2, b2)
        h = HardSigmoid <alpha = 0.2, beta = 0.5> (e)
        m = Mul (a, h)
        y = Conv (m, w3, b3)
    }""", {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3, "b3": b3})
    samples = random_samples({"x": (1, 4, 8, 8)}, 4)
    compiled = compile_tiny(model, samples, format="qoperator")
    ops = ort_optimized_ops(compiled)
    # HardSigmoid has no integer kernel and runs in float on the [1, 8, 1, 1] gate; the Mul on the
    # full feature map does not
    assert ops["QLinearMul"] == 1 and ops["Mul"] == 0 and ops["QLinearGlobalAveragePool"] == 1
    check_lowered_matches_qdq(compiled, samples, steps=1.0)
