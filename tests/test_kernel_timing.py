"""format auto: per-op timing of ONNX Runtime's int8 kernel against float, cached per machine."""

import json

import numpy as np
import onnx
import onnxruntime as ort

import qcompiler
from helpers import random_samples
from qcompiler import kernel_timing
from qcompiler.config import QuantConfig
from qcompiler.ir import Graph, infer_shapes


def _optimized_op_types(model: onnx.ModelProto, tmp_path) -> list[str]:
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node]


def test_the_timed_int8_form_is_the_int8_kernel_and_the_conversions_are_not_fused(conv_model, tmp_path):
    graph = Graph(infer_shapes(conv_model))
    float_model = kernel_timing._one_op_model(graph, graph.nodes[0], (1, 4, 8, 8))
    int8_model = kernel_timing._int8_form(float_model, QuantConfig())

    assert "QLinearConv" in _optimized_op_types(int8_model, tmp_path)
    assert "QLinearConv" not in _optimized_op_types(float_model, tmp_path)
    chain_input = {"x": np.random.default_rng(0).integers(0, 128, (1, 4, 8, 8)).astype(np.uint8)}
    (output,) = ort.InferenceSession(int8_model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, chain_input)
    assert output.dtype == np.uint8 and output.shape == (1, 8, 8, 8)
    for op in ("DequantizeLinear", "QuantizeLinear"):
        assert _optimized_op_types(kernel_timing._conversion_model(op, (1, 4, 8, 8), onnx.TensorProto.UINT8), tmp_path) == [op]
    float_ms, int8_ms = kernel_timing._time_forms(float_model, int8_model, (1, 4, 8, 8), QuantConfig())
    assert float_ms > 0 and int8_ms > 0


def test_timings_are_measured_once_then_read_from_the_cache(conv_model, tmp_path, monkeypatch):
    graph = Graph(infer_shapes(conv_model))
    sample = random_samples({"x": (1, 4, 8, 8)}, 1)[0]
    kernel_timing.ops_faster_in_float(graph, QuantConfig(), sample, cache_dir=tmp_path)
    stored = json.loads((tmp_path / kernel_timing.CACHE_FILE).read_text())
    (machine,) = stored
    assert len(stored[machine]) == 2  # both Convs (different shapes)
    assert all(float_ms > 0 and int8_ms > 0 for float_ms, int8_ms in stored[machine].values())

    def no_timing(*_):
        raise AssertionError("timed again although cached")

    monkeypatch.setattr(kernel_timing, "_time_forms", no_timing)
    kernel_timing.ops_faster_in_float(graph, QuantConfig(), sample, cache_dir=tmp_path)


def test_compile_auto_keeps_ops_measured_slower_in_int8_in_float(conv_model, tmp_path, monkeypatch):
    monkeypatch.setenv("QCOMPILER_CACHE", str(tmp_path))
    samples = random_samples({"x": (1, 4, 8, 8)}, 4)
    config = QuantConfig(format="auto")
    qcompiler.compile(conv_model, samples, config)  # measures and caches both Convs
    path = tmp_path / kernel_timing.CACHE_FILE
    stored = json.loads(path.read_text())
    (machine,) = stored
    graph = Graph(infer_shapes(conv_model))
    second_conv = graph.nodes[2]
    key = kernel_timing._signature(graph, second_conv, (1, 8, 8, 8), config)
    first_key = next(k for k in stored[machine] if k != key)
    stored[machine][key] = [1.0, 2.0]  # int8 twice as slow as float: must stay float
    stored[machine][first_key] = [2.0, 1.0]
    path.write_text(json.dumps(stored))

    first = qcompiler.compile(conv_model, samples, config)
    second = qcompiler.compile(conv_model, samples, config)

    assert first.model.SerializeToString() == second.model.SerializeToString()
    assert any(second_conv.name in note and "stays float" in note for note in first.summary.notes)
    quantized = {entry.node for entry in first.summary.quantized} if hasattr(first.summary.quantized[0], "node") else set(first.summary.quantized)
    assert second_conv.name not in quantized and graph.nodes[0].name in quantized


def test_int8_stays_only_when_it_loses_by_a_fraction_and_by_enough_microseconds():
    slower = kernel_timing.OpTiming
    assert slower("big", float_ms=0.10, int8_ms=0.20).int8_is_slower  # 2x and 100 us
    assert not slower("near", float_ms=0.10, int8_ms=0.105).int8_is_slower  # within MARGIN
    assert not slower("tiny", float_ms=0.009, int8_ms=0.016).int8_is_slower  # 78% slower, but 7 us
    assert not slower("faster", float_ms=0.20, int8_ms=0.10).int8_is_slower
