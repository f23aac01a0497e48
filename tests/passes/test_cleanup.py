"""Clean-up passes: exact (bit-identical outputs), idempotent, and leave what they must not touch."""

import numpy as np

from helpers import op_types, parse_model, run
from ort_helpers import apply_pass
from qcompiler.config import QuantConfig
from qcompiler.context import CompileContext
from qcompiler.passes.cleanup import RemoveIdentities, RemoveRedundantQDQ, ShapeBeforeDequantize

rng = np.random.default_rng(9)
CONTEXT = CompileContext(QuantConfig())


def requantize_model(second_scale: float):
    return parse_model("""
    g (float[2, 8] x) => (float[2, 8] y) {
        q = QuantizeLinear (x, s, z)
        d = DequantizeLinear (q, s, z)
        q2 = QuantizeLinear (d, s2, z)
        d2 = DequantizeLinear (q2, s2, z)
        y = Relu (d2)
    }""", {"s": np.float32(0.02), "s2": np.float32(second_scale), "z": np.uint8(128)})


def test_dq_q_round_trip_with_equal_parameters_is_removed_exactly():
    model = requantize_model(0.02)
    cleaned, result, graph = apply_pass(RemoveRedundantQDQ(), model)
    assert result.modified
    assert op_types(cleaned).count("QuantizeLinear") == 1
    x = (rng.standard_normal((2, 8)) * 2).astype(np.float32)
    assert np.array_equal(run(model, {"x": x})[0], run(cleaned, {"x": x})[0])
    assert not RemoveRedundantQDQ().run(graph, CONTEXT).modified


def test_requantization_to_other_parameters_is_kept():
    model = requantize_model(0.05)
    cleaned, result, _ = apply_pass(RemoveRedundantQDQ(), model)
    assert not result.modified and op_types(cleaned) == op_types(model)


def test_identity_and_same_type_cast_removed_graph_output_kept():
    model = parse_model("""
    g (float[2, 3] x) => (float[2, 3] y, float[2, 3] w) {
        a = Identity (x)
        b = Cast <to = 1> (a)
        c = Cast <to = 10> (b)
        d = Cast <to = 1> (c)
        y = Relu (d)
        w = Identity (y)
    }""")
    cleaned, result, graph = apply_pass(RemoveIdentities(), model)
    assert result.modified
    assert op_types(cleaned) == ["Cast", "Cast", "Relu", "Identity"]  # float16 round trip is not an identity
    x = rng.standard_normal((2, 3)).astype(np.float32)
    for expected, actual in zip(run(model, {"x": x}), run(cleaned, {"x": x})):
        assert np.array_equal(expected, actual)
    assert not RemoveIdentities().run(graph, CONTEXT).modified


def test_shape_reads_the_integers_and_the_dequantize_only_shape_read_disappears():
    model = parse_model("""
    g (float[2, 8] x) => (float[2, 8] y, int64[2] n, int64 k, int64[2] m) {
        q = QuantizeLinear (x, s, z)
        d = DequantizeLinear (q, s, z)
        n = Shape (d)
        k = Size (d)
        e = DequantizeLinear (q, s, z)
        y = Relu (e)
        m = Shape (y)
    }""", {"s": np.float32(0.02), "z": np.uint8(128)})
    cleaned, result, graph = apply_pass(ShapeBeforeDequantize(), model)
    assert result.modified
    assert op_types(cleaned).count("DequantizeLinear") == 1  # the one Relu reads stays
    producers = {o: n.op_type for n in cleaned.graph.node for o in n.output}
    shapes = [n for n in cleaned.graph.node if n.op_type in ("Shape", "Size")]
    assert [producers[n.input[0]] for n in shapes] == ["QuantizeLinear", "QuantizeLinear", "Relu"]
    x = (rng.standard_normal((2, 8)) * 2).astype(np.float32)
    for expected, actual in zip(run(model, {"x": x}), run(cleaned, {"x": x})):
        assert np.array_equal(expected, actual)
    assert not ShapeBeforeDequantize().run(graph, CONTEXT).modified
