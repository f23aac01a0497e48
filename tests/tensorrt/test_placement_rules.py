"""Each TensorRT placement rule on a tiny graph, judged by the real TensorRT-RTX build log (which
layers exist, what data types they read and write, which ONNX nodes each fused), plus checker,
ONNX Runtime and fidelity checks of the compiled graph."""

import numpy as np
import onnx
import pytest

from helpers import parse_model, random_samples
from qcompiler.context import CompileContext
from qcompiler.config import QuantConfig
from qcompiler.ir import Graph
from qcompiler.passes.tensorrt_placement import tensorrt_passes
from trt_helpers import assert_close_to_float, assert_symmetric_int8, compile_and_build

rng = np.random.default_rng(6)


def conv_weights(*names, channels=16, kernel=3):
    values = {}
    for name in names:
        values[f"w{name}"] = (rng.standard_normal((channels, channels, kernel, kernel)) * 0.2).astype(np.float32)
        values[f"b{name}"] = (rng.standard_normal(channels) * 0.1).astype(np.float32)
    return values


def samples(shape=(1, 16, 16, 16), count=4):
    return random_samples({"x": shape}, count, seed=3)


def test_conv_chain_all_int8_float_bias_and_no_qdq_on_graph_output():
    model = parse_model("""
    g (float[1, 16, 16, 16] x) => (float[1, 16, 16, 16] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (a)
        y = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
    }""", conv_weights(1, 2))
    built = compile_and_build(model, samples())
    assert_symmetric_int8(built.model)
    assert built.report.int8_share == 1.0
    for conv in built.nodes("Conv"):
        (layer,) = [l for l in built.layers_with(conv.name) if l.is_compute]
        assert layer.layer_type == "correlation" and layer.input_dtypes == ("Int8",) and layer.weight_dtype == "Int8"
        assert not built.producer(conv.input[2]), "bias stays a float initializer"
        weight_dq = built.producer(conv.input[1])
        assert weight_dq.op_type == "DequantizeLinear" and weight_dq.attribute[0].i == 0  # Conv weight axis 0
    assert built.producer("y").op_type == "Conv"  # nothing quantizes the graph output
    last_conv = built.producer("y").name
    epilogue = [l for l in built.layers_with(last_conv) if not l.is_compute]
    assert epilogue and all(o.dtype == "Float" for o in epilogue[-1].outputs)
    assert not any("QuantizeLinear" in n for n in epilogue[-1].onnx_nodes)
    assert_close_to_float(model, built.model, samples()[0], min_sqnr_db=25)


# conv -> relu (r) -> conv (c) -> add(c, r): the skip r is read by the Add and by the second conv
RESIDUAL_BLOCK = """
    g (float[1, 16, 16, 16] x) => (float[1, 16, 16, 16] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (a)
        c = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
        s = Add (c, r)
        y = Relu (s)
    }"""


def test_residual_add_gets_qdq_on_skip_only_and_fuses_into_the_conv():
    model = parse_model(RESIDUAL_BLOCK, conv_weights(1, 2))
    built = compile_and_build(model, samples())
    (add,) = built.nodes("Add")
    conv_side, skip_side = (built.producer(name) for name in add.input)
    # build log: the Add runs in the conv's epilogue layer and reads the skip as Int8 ...
    (epilogue,) = [l for l in built.layers_with(add.name)]
    assert conv_side.name in epilogue.onnx_nodes
    assert "Int8" in epilogue.input_dtypes
    # ... and the layer producing the skip writes only Int8 (no extra Float copy for the Add)
    (relu_layer,) = built.layers_with(built.producer("r").name)
    assert [o.dtype for o in relu_layer.outputs] == ["Int8"]
    # the graph: no Q/DQ between the conv and the Add; the skip reuses the pair conv 2 reads
    assert conv_side.op_type == "Conv"
    assert skip_side.op_type == "DequantizeLinear" and built.producer(skip_side.input[0]).input[0] == "r"
    assert sum(1 for q in built.nodes("QuantizeLinear") if q.input[0] == "r") == 1
    assert built.report.int8_share == 1.0
    assert_close_to_float(model, built.model, samples()[0], min_sqnr_db=25)


def test_without_the_skip_pair_tensorrt_writes_a_float_copy():
    """The reference point of the rule above, built by hand: float skip -> two outputs."""
    from qcompiler.tensorrt import build_engine, parse_layers

    model = parse_model(RESIDUAL_BLOCK, conv_weights(1, 2))
    import qcompiler

    compiled = qcompiler.compile(model, samples(), QuantConfig(target="tensorrt"))
    graph = Graph(compiled.model)
    add = next(n for n in graph.nodes if n.op == "Add")
    graph.replace_input(add, add.inputs[1], next(t for t in graph.tensors().values() if t.name == "r"))
    graph.cleanup()
    relu = graph.producer(next(t for t in graph.tensors().values() if t.name == "r")).name
    layers = parse_layers(build_engine(graph.to_model()).layer_log())
    (relu_layer,) = [l for l in layers if relu in l.onnx_nodes]
    assert sorted(o.dtype for o in relu_layer.outputs) == ["Float", "Int8"]


def test_maxpool_and_concat_share_one_scale_and_run_int8():
    """YOLO's SPPF: x, MaxPool(x), MaxPool(MaxPool(x)) concatenated, then a 1x1 conv."""
    weights = conv_weights(1)
    weights["w2"] = (rng.standard_normal((16, 48, 1, 1)) * 0.2).astype(np.float32)
    weights["b2"] = np.zeros(16, np.float32)
    model = parse_model("""
    g (float[1, 16, 16, 16] x) => (float[1, 16, 16, 16] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (a)
        p1 = MaxPool <kernel_shape = [5, 5], pads = [2, 2, 2, 2]> (r)
        p2 = MaxPool <kernel_shape = [5, 5], pads = [2, 2, 2, 2]> (p1)
        k = Concat <axis = 1> (r, p1, p2)
        y = Conv (k, w2, b2)
    }""", weights)
    built = compile_and_build(model, samples())
    # build log: both pools run once each, Int8 in and out; no requantize kernel between the
    # conv, the pools and the concat (only the graph input's quantize stands alone)
    pools = [l for l in built.layers if l.layer_type == "maxpool"]
    assert len(pools) == 2 and all(l.input_dtypes == ("Int8",) and [o.dtype for o in l.outputs] == ["Int8"] for l in pools)
    assert built.report.quantize_kernels == 1
    assert_symmetric_int8(built.model)
    (concat,) = built.nodes("Concat")
    scales = {float(built.initializer(built.producer(name).input[1])) for name in concat.input}
    scales |= {float(built.initializer(q.input[1])) for q in built.nodes("QuantizeLinear") if q.input[0] == concat.output[0]}
    assert len(scales) == 1, "all Concat inputs and its output share one scale"
    assert built.report.int8_share == 1.0
    assert_close_to_float(model, built.model, samples()[0], min_sqnr_db=25)


def test_standalone_add_gets_qdq_on_all_inputs_and_the_maxpool_runs_int8():
    weights = conv_weights(1, 2, 3)
    model = parse_model("""
    g (float[1, 16, 16, 16] x) => (float[1, 16, 16, 16] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (a)
        c = Conv <pads = [1, 1, 1, 1]> (x, w2, b2)
        s = Sigmoid (c)
        p = MaxPool <kernel_shape = [3, 3], pads = [1, 1, 1, 1]> (r)
        t = Add (p, s)
        y = Conv <pads = [1, 1, 1, 1]> (t, w3, b3)
    }""", weights)
    built = compile_and_build(model, samples())
    (pool,) = [l for l in built.layers if l.layer_type == "maxpool"]
    assert pool.input_dtypes == ("Int8",)  # build log: the producers write Int8
    (add,) = built.nodes("Add")
    assert all(built.producer(name).op_type == "DequantizeLinear" for name in add.input)
    assert built.report.int8_share == 1.0
    assert_close_to_float(model, built.model, samples()[0], min_sqnr_db=20)


def test_dead_channel_gets_a_positive_scale_and_the_engine_builds():
    weights = conv_weights(1)
    weights["w1"][3] = 0.0  # a pruned output channel: amax 0 must not give scale 0
    model = parse_model("""
    g (float[1, 16, 16, 16] x) => (float[1, 16, 16, 16] y) {
        y = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
    }""", weights)
    built = compile_and_build(model, samples())
    assert_symmetric_int8(built.model)
    assert built.report.int8_share == 1.0


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_and_matmul_weights_per_channel_on_the_output_axis(trans_b):
    weight = (rng.standard_normal((32, 64) if trans_b else (64, 32)) * 0.2).astype(np.float32)
    model = parse_model(f"""
    g (float[8, 64] x) => (float[8, 32] y) {{
        h = Gemm <transB = {trans_b}> (x, w, b)
        r = Relu (h)
        y = MatMul (r, w2)
    }}""", {"w": weight, "b": np.zeros(32, np.float32), "w2": (rng.standard_normal((32, 32)) * 0.2).astype(np.float32)})
    built = compile_and_build(model, random_samples({"x": (8, 64)}, 4, seed=1))
    gemm, matmul = built.nodes("Gemm")[0], built.nodes("MatMul")[0]
    assert built.producer(gemm.input[1]).attribute[0].i == (0 if trans_b else 1)
    assert built.producer(matmul.input[1]).attribute[0].i == 1
    assert built.report.int8_share == 1.0
    assert all(n.layer_type == "gemm" for n in built.report.nodes)


def test_weight_behind_a_transpose_is_pre_transposed_so_its_dq_feeds_the_matmul():
    weight = (rng.standard_normal((32, 64)) * 0.2).astype(np.float32)  # stored [N, K] like torch Linear
    model = parse_model("""
    g (float[8, 64] x) => (float[8, 32] y) {
        t = Transpose <perm = [1, 0]> (w)
        y = MatMul (x, t)
    }""", {"w": weight})
    built = compile_and_build(model, random_samples({"x": (8, 64)}, 4, seed=1))
    (matmul,) = built.nodes("MatMul")
    weight_dq = built.producer(matmul.input[1])
    assert weight_dq.op_type == "DequantizeLinear" and not built.nodes("Transpose")
    assert built.report.int8_share == 1.0
    assert_close_to_float(model, built.model, random_samples({"x": (8, 64)}, 1, seed=2)[0], min_sqnr_db=25)


def test_attention_matmuls_are_quantized_and_run_int8():
    model = parse_model("""
    g (float[1, 4, 64, 32] q, float[1, 4, 32, 64] k, float[1, 4, 64, 32] v) => (float[1, 4, 64, 32] y) {
        s = MatMul (q, k)
        p = Softmax <axis = -1> (s)
        y = MatMul (p, v)
    }""")
    shapes = {"q": (1, 4, 64, 32), "k": (1, 4, 32, 64), "v": (1, 4, 64, 32)}
    built = compile_and_build(model, random_samples(shapes, 4, seed=5))
    assert len(built.nodes("QuantizeLinear")) == 4
    assert built.report.int8_share == 1.0, [(n.node, n.layer, n.input_dtypes) for n in built.report.nodes]


def test_fused_projection_split_keeps_its_gemm_int8():
    """One QKV projection, then Reshape/Transpose and three Slices (PP-OCR's SVTR attention)."""
    model = parse_model("""
    g (float[1, 40, 120] x) => (float[1, 2, 40, 60] y) {
        h = MatMul (x, w)
        hb = Add (h, b)
        r = Reshape (hb, shape)
        t = Transpose <perm = [2, 0, 3, 1, 4]> (r)
        q = Slice (t, s0, e0, ax)
        k = Slice (t, s1, e1, ax)
        v = Slice (t, s2, e2, ax)
        q3 = Squeeze (q, ax)
        k3 = Squeeze (k, ax)
        v3 = Squeeze (v, ax)
        kt = Transpose <perm = [0, 1, 3, 2]> (k3)
        a = MatMul (q3, kt)
        p = Softmax <axis = -1> (a)
        y = MatMul (p, v3)
    }""", {"w": (rng.standard_normal((120, 360)) * 0.1).astype(np.float32), "b": np.zeros(360, np.float32),
           "shape": np.array([0, -1, 3, 2, 60], np.int64), "ax": np.array([0], np.int64),
           "s0": np.array([0], np.int64), "e0": np.array([1], np.int64), "s1": np.array([1], np.int64),
           "e1": np.array([2], np.int64), "s2": np.array([2], np.int64), "e2": np.array([3], np.int64)})
    built = compile_and_build(model, random_samples({"x": (1, 40, 120)}, 4, seed=2))
    assert built.changes("tensorrt-projection-split")
    projection = next(n for n in built.report.nodes if n.node == built.nodes("MatMul")[0].name)
    assert projection.int8 and projection.layer_type == "gemm", projection


def test_placement_is_idempotent_and_leaves_float_regions_alone():
    """A second run changes nothing; an Add feeding a LayerNorm-like float region gets no pair."""
    model = parse_model("""
    g (float[1, 16, 16, 16] x) => (float[1, 16, 16, 16] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (a)
        c = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
        s = Add (c, r)
        e = Sigmoid (x)
        f = Add (s, e)
        y = Mul (f, e)
    }""", conv_weights(1, 2))
    import qcompiler

    compiled = qcompiler.compile(model, samples(), QuantConfig(target="tensorrt"))
    standalone = [change for name, changes in compiled.summary.pass_changes if name == "tensorrt-standalone-add" for change in changes]
    assert not standalone, "f's output is not quantized: no pairs on its inputs"
    graph = Graph(compiled.model)
    context = CompileContext(QuantConfig(target="tensorrt"))
    for placement in tensorrt_passes():
        assert not placement.run(graph, context).modified, placement.name


def test_fp8_option_gives_fp8_convs_at_the_same_places():
    model = parse_model("""
    g (float[1, 16, 16, 16] x) => (float[1, 16, 16, 16] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (a)
        c = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
        y = Add (c, r)
    }""", conv_weights(1, 2))
    import qcompiler
    from qcompiler.tensorrt import build_engine, engine_coverage

    compiled = qcompiler.compile(model, samples(), QuantConfig(target="tensorrt", fp8=True))
    onnx.checker.check_model(compiled.model, full_check=True)
    int8 = qcompiler.compile(model, samples(), QuantConfig(target="tensorrt"))
    assert [n.op_type for n in compiled.model.graph.node] == [n.op_type for n in int8.model.graph.node]
    zero_points = {n.input[2] for n in compiled.model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert {t.data_type for t in compiled.model.graph.initializer if t.name in zero_points} == {onnx.TensorProto.FLOAT8E4M3FN}
    build = build_engine(compiled.model)
    assert build.ok, build.errors()[:3]
    convs = [l for l in engine_coverage(compiled.model, build).layers if l.layer_type == "correlation"]
    assert len(convs) == 2 and all(l.input_dtypes == ("FP8",) and l.weight_dtype == "FP8" for l in convs)
    assert_close_to_float(model, compiled.model, samples()[0], min_sqnr_db=20)
