"""OrtQuantizeOutputs (format qoperator): tiny graphs where each integer kernel must appear in ONNX
Runtime's optimized graph, and the lowered result (ORT_ENABLE_ALL, integer kernels) must match the
QDQ form (ORT_DISABLE_ALL, float simulation) within one quantization step of the output."""

import numpy as np
import onnx

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


def detection_head(box_gain: float = 1.0):
    """YOLOv8's head in miniature: two Convs concatenated, reshaped, read only by float ops (a
    Sigmoid writing the output, and a Shape as the anchor grid does)."""
    w1, b1, w2, b2 = weights((4, 4, 1, 1), (4,), (4, 4, 1, 1), (4,))
    target = np.array([1, 8, 64], dtype=np.int64)
    return parse_model("""
    g (float[1, 4, 8, 8] x) => (float[1, 8, 64] y, int64[4] n) {
        a = Conv (x, w1, b1)
        b = Conv (x, w2, b2)
        c = Concat <axis = 1> (a, b)
        n = Shape (c)
        r = Reshape (c, target)
        y = Sigmoid (r)
    }""", {"w1": w1, "b1": b1, "w2": w2 * box_gain, "b2": b2 * box_gain, "target": target})


def test_concat_and_reshape_of_int8_outputs_stay_int8_up_to_the_float_consumer():
    model = detection_head()
    samples = random_samples({"x": (1, 4, 8, 8)}, 4)
    compiled = compile_tiny(model, samples, format="qoperator")
    assert {"c", "r"} <= q_inputs(compiled) and "y" not in q_inputs(compiled)
    # Shape reads the integers: no DequantizeLinear runs just to report a shape
    producers = {o: n for n in compiled.graph.node for o in n.output}
    shape = next(n for n in compiled.graph.node if n.op_type == "Shape")
    assert producers[shape.input[0]].op_type == "QuantizeLinear"
    ops = ort_optimized_ops(compiled)
    assert ops["QLinearConcat"] == 1 and ops["Concat"] == 0 and ops["QLinearConv"] == 2
    assert ops["Sigmoid"] == 1 and ops["QLinearSigmoid"] == 0  # the float consumer stays float
    assert ops["DequantizeLinear"] == 1
    check_lowered_matches_qdq(compiled, samples, steps=1.0)
    reference = np.concatenate([run(model, s)[0] for s in samples])
    assert sqnr_db(reference, np.concatenate([run(compiled, s, optimize=True)[0] for s in samples])) > 30


def test_concat_of_very_different_ranges_stays_float():
    # one input 100x wider than the other (box pixels next to class scores): a shared scale would
    # leave the narrow one a couple of levels
    model = detection_head(box_gain=100.0)
    compiled = compile_tiny(model, random_samples({"x": (1, 4, 8, 8)}, 4), format="qoperator")
    assert not {"c", "r"} & q_inputs(compiled)
    ops = ort_optimized_ops(compiled)
    assert ops["QLinearConcat"] == 0 and ops["Concat"] == 1 and ops["QLinearConv"] == 2


def test_int8_chain_stops_where_ort_would_fuse_a_slow_qlinear_softmax():
    # YOLOv8's DFL: Concat -> Split -> Reshape -> Softmax -> Conv. ORT moves a DequantizeLinear
    # forward through Reshape and fuses DQ -> Softmax -> Q into QLinearSoftmax, slower than the float
    # Softmax; so Split and Reshape stay float and the int8 chain ends at the Concat.
    w1, b1, w2, b2, w3, b3 = weights((4, 4, 1, 1), (4,), (4, 4, 1, 1), (4,), (2, 4, 1, 1), (2,))
    model = parse_model("""
    g (float[1, 4, 8, 8] x) => (float[1, 2, 4, 16] y, float[1, 4, 8, 8] z) {
        a = Conv (x, w1, b1)
        b = Conv (x, w2, b2)
        c = Concat <axis = 1> (a, b)
        p, q = Split <axis = 1> (c, splits)
        r = Reshape (p, target)
        s = Softmax <axis = 1> (r)
        y = Conv (s, w3, b3)
        z = Sigmoid (q)
    }""", {"w1": w1, "b1": b1, "w2": w2, "b2": b2, "w3": w3, "b3": b3,
           "splits": np.array([4, 4], dtype=np.int64), "target": np.array([1, 4, 4, 16], dtype=np.int64)})
    samples = random_samples({"x": (1, 4, 8, 8)}, 4)
    compiled = compile_tiny(model, samples, format="qoperator")
    assert "c" in q_inputs(compiled) and not {"p", "q", "r"} & q_inputs(compiled)
    ops = ort_optimized_ops(compiled)
    assert ops["QLinearConcat"] == 1 and ops["QLinearSoftmax"] == 0 and ops["Softmax"] == 1
    for sample in samples:
        for qdq_form, lowered in zip(run(compiled, sample), run(compiled, sample, optimize=True)):
            assert np.allclose(qdq_form, lowered, atol=1e-5)  # the Concat copies integers: no rounding


def q_params(model, tensor: str) -> tuple[float, int]:
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    q = next(n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    return float(initializers[q.input[1]]), int(initializers[q.input[2]])


def test_concat_inputs_read_only_by_the_concat_take_its_scale():
    # SPPF-like: `a` reaches only the Concat (directly and through MaxPool), so it is quantized with
    # the Concat's scale and ORT's QLinearConcat copies it; `b` also feeds a Conv and keeps its own.
    # Biases +4 / -4 make the Concat's range wider than either input's.
    w1, b1, w2, b2, w3, b3, w4, b4 = weights((4, 4, 1, 1), (4,), (4, 4, 1, 1), (4,), (4, 12, 1, 1), (4,),
                                             (4, 4, 1, 1), (4,))
    model = parse_model("""
    g (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] y, float[1, 4, 8, 8] z) {
        a = Conv (x, w1, b1)
        p = MaxPool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (a)
        b = Conv (x, w2, b2)
        z = Conv (b, w4, b4)
        c = Concat <axis = 1> (a, p, b)
        y = Conv (c, w3, b3)
    }""", {"w1": w1, "b1": b1 + 4, "w2": w2, "b2": b2 - 4, "w3": w3, "b3": b3, "w4": w4, "b4": b4})
    samples = random_samples({"x": (1, 4, 8, 8)}, 4)
    compiled = compile_tiny(model, samples, format="qoperator")
    assert q_params(compiled, "a") == q_params(compiled, "c")
    assert q_params(compiled, "b") != q_params(compiled, "c")
    ops = ort_optimized_ops(compiled)
    assert ops["QLinearConcat"] == 1 and ops["NhwcMaxPool"] == 1
    check_lowered_matches_qdq(compiled, samples, steps=1.0)
    # the shared scale only drops the Concat's second rounding of `a`: no less accurate than before
    import qcompiler.passes.ort_placement as placement
    original = placement.shared_concat_ranges
    placement.shared_concat_ranges = lambda *args: {}
    try:
        unshared = compile_tiny(model, samples, format="qoperator")
    finally:
        placement.shared_concat_ranges = original
    assert q_params(unshared, "a") != q_params(unshared, "c")
    reference = np.concatenate([run(model, s)[0] for s in samples])
    shared_sqnr = sqnr_db(reference, np.concatenate([run(compiled, s, optimize=True)[0] for s in samples]))
    unshared_sqnr = sqnr_db(reference, np.concatenate([run(unshared, s, optimize=True)[0] for s in samples]))
    assert shared_sqnr > 25 and shared_sqnr >= unshared_sqnr - 0.5
