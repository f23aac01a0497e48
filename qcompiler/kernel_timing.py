"""Measured choice between ONNX Runtime's int8 kernel and float, per op, for `format="auto"`.

ONNX Runtime's integer kernels are not faster for every op: a small layer can spend more on
quantizing its input and dequantizing its output than it saves. So for each Conv, MatMul and Gemm
with a constant weight, `ops_faster_in_float` times ONNX Runtime on a one-op model at the op's
real input shape (from one run of the model on the first calibration sample), in the two forms
it can take inside an int8 chain: the int8 form `compile` emits (format qoperator: int8 in, int8
out) and float with the conversions that keeping it float adds (DequantizeLinear in, float op,
QuantizeLinear out; see `_time_forms`). It returns the ops whose int8 form is slower by more than
MARGIN; compile keeps those in float.

Timings are stored per machine (CPU model, ONNX Runtime version, threads) in the qcompiler cache
(`$QCOMPILER_CACHE/kernel_timings.json`), keyed by everything that decides an op's speed (op
type, attributes, shapes, quantization settings) but not by its weight values, so compiling again
reuses them: the same inputs on the same machine give byte-identical output.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort

from .calibration import expose_tensors, runtime_session, worker_count
from .calibrators.base import Range
from .config import OutputFormat, QuantConfig
from .cpu import cpu_model_name
from .ir import Graph, Node, matches_any
from .zoo.cache import cache_root, write_atomically

TIMED_OP_TYPES = ("Conv", "MatMul", "Gemm")
# int8 must lose by more than this fraction and this many milliseconds to be dropped. One-op
# timings of tens of microseconds moved by +-50% between runs on a loaded machine, and every
# Conv kept float moves the quantization points around it (ocr-rec's text agreement swung with
# which ones); a difference under 20 us is below what the timing resolves and what matters.
MARGIN = 0.10
MIN_SAVING_MS = 0.02
ROUNDS = 15
CACHE_FILE = "kernel_timings.json"


@dataclass(frozen=True)
class OpTiming:
    node: str
    float_ms: float
    int8_ms: float

    @property
    def int8_is_slower(self) -> bool:
        return self.int8_ms > self.float_ms * (1.0 + MARGIN) and self.int8_ms - self.float_ms > MIN_SAVING_MS


def ops_faster_in_float(graph: Graph, config: QuantConfig, sample: Mapping[str, np.ndarray],
                        cache_dir: str | Path | None = None) -> list[OpTiming]:
    """Timings of the candidate ops whose int8 form measured slower than float (graph order)."""
    candidates = [node for node in graph.nodes if _is_candidate(graph, node, config)]
    if not candidates:
        return []
    shapes = _input_shapes(graph, [node.inputs[0].name for node in candidates], sample, config)
    cache = _TimingCache(cache_dir, config)
    slower = []
    for node in candidates:
        shape = shapes[node.inputs[0].name]
        key = _signature(graph, node, shape, config)
        timing = cache.get(key)
        if timing is None:
            float_model = _one_op_model(graph, node, shape)
            timing = _time_forms(float_model, _int8_form(float_model, config), shape, config)
            cache.put(key, timing)
        result = OpTiming(node.name, *timing)
        if result.int8_is_slower:
            slower.append(result)
    cache.save()
    return slower


def _is_candidate(graph: Graph, node: Node, config: QuantConfig) -> bool:
    if node.op not in TIMED_OP_TYPES or len(node.inputs) < 2:
        return False
    if node.op in config.exclude_op_types or matches_any(node.name, config.exclude_nodes):
        return False
    return graph.constant_value(node.inputs[0]) is None and graph.constant_value(node.inputs[1]) is not None


def _input_shapes(graph: Graph, names: list[str], sample: Mapping[str, np.ndarray],
                  config: QuantConfig) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of `names` on `sample`: one float run with those tensors exposed."""
    model, weights = graph.to_runtime_model()
    with tempfile.TemporaryDirectory(prefix="qcompiler-timing-") as scratch:
        session = runtime_session(expose_tensors(model, names, copy=False), weights, config.calibration_threads, scratch)
        values = session.run(names, dict(sample))
    return {name: tuple(int(d) for d in value.shape) for name, value in zip(names, values)}


def _one_op_model(graph: Graph, node: Node, shape: tuple[int, ...]) -> onnx.ModelProto:
    """`node` alone, its constant inputs as initializers, input "x" of `shape`, output "y"."""
    inputs, initializers = ["x"], []
    for index, tensor in enumerate(node.inputs[1:], start=1):
        if tensor.name == "":
            inputs.append("")
            continue
        name = f"input{index}"
        initializers.append(onnx.numpy_helper.from_array(np.asarray(graph.constant_value(tensor)), name))
        inputs.append(name)
    attributes = {key: value for key, value in node.attrs.items()}
    op = onnx.helper.make_node(node.op, inputs, ["y"], name="op", **attributes)
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, list(shape))
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    model = onnx.helper.make_model(onnx.helper.make_graph([op], "one_op", [x], [y], initializers),
                                   opset_imports=[onnx.helper.make_opsetid("", graph.opset)])
    return onnx.shape_inference.infer_shapes(model)


def _int8_form(float_model: onnx.ModelProto, config: QuantConfig) -> onnx.ModelProto:
    """The op as compile emits it inside an int8 chain: quantized input in, quantized output out.

    Inside a chain the op's neighbours hand it int8 and take int8 (QLinearConv to QLinearConv), so
    the QuantizeLinear of "x" and the DequantizeLinear of "y" compile adds around a lone op are
    removed: they are paid once per chain, not per op.
    """
    from .compiler import compile  # compile uses this module for format auto

    one_op = config.with_options(format=OutputFormat.QOPERATOR, exclude_nodes=(), exclude_op_types=(),
                                 smoothquant=False, debug_checks=False)
    ranges = {"x": Range(-4.0, 4.0), "y": Range(-4.0, 4.0)}  # values do not change the kernel's speed
    model = compile(float_model, None, one_op, ranges=ranges).model
    graph = model.graph
    quantize_x = next(n for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    x_zero_point = next(init for init in graph.initializer if init.name == quantize_x.input[2])
    for node in graph.node:
        node.input[:] = ["x" if name == quantize_x.output[0] else name for name in node.input]
    kept = [node for node in graph.node if node is not quantize_x]
    dequantize_y = [n for n in kept if n.op_type == "DequantizeLinear" and n.output[0] == "y"]
    if dequantize_y:
        kept.remove(dequantize_y[0])
        for node in kept:
            node.output[:] = ["y" if name == dequantize_y[0].input[0] else name for name in node.output]
    else:  # a graph output stays float: quantize it as the next op of a chain would read it
        for node in kept:
            node.output[:] = ["y_float" if name == "y" else name for name in node.output]
        graph.initializer.append(onnx.numpy_helper.from_array(np.array(8.0 / 255, np.float32), "y_scale"))
        kept.append(onnx.helper.make_node("QuantizeLinear", ["y_float", "y_scale", x_zero_point.name], ["y"]))
    del graph.node[:]
    graph.node.extend(kept)
    del graph.value_info[:]
    graph.input[0].type.tensor_type.elem_type = x_zero_point.data_type
    graph.output[0].type.tensor_type.elem_type = x_zero_point.data_type
    onnx.checker.check_model(model)
    return model


def _conversion_model(op: str, shape: tuple[int, ...], int8_type: int) -> onnx.ModelProto:
    """DequantizeLinear (int8 -> float) or QuantizeLinear (float -> int8) of one tensor of `shape`."""
    float_type = onnx.TensorProto.FLOAT
    source, target = (int8_type, float_type) if op == "DequantizeLinear" else (float_type, int8_type)
    zero_point = onnx.helper.make_tensor("zero_point", int8_type, [], [0])
    scale = onnx.numpy_helper.from_array(np.array(8.0 / 255, np.float32), "scale")
    node = onnx.helper.make_node(op, ["x", "scale", "zero_point"], ["y"])
    graph = onnx.helper.make_graph([node], op, [onnx.helper.make_tensor_value_info("x", source, list(shape))],
                                   [onnx.helper.make_tensor_value_info("y", target, list(shape))], [scale, zero_point])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])


def _empty_model() -> onnx.ModelProto:
    """One Identity on one float: what a run costs with (almost) nothing to compute."""
    value = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "empty", [value],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])


def _time_forms(float_model: onnx.ModelProto, int8_model: onnx.ModelProto, shape: tuple[int, ...],
                config: QuantConfig) -> tuple[float, float]:
    """(float_ms, int8_ms): the op's cost inside an int8 chain kept in float, and in int8.

    Kept in float it costs DequantizeLinear of its input + the float op + QuantizeLinear of its
    output. These are timed as separate models (ONNX Runtime would fuse DQ -> Conv -> Q into
    QLinearConv even with float weights) and the per-run overhead of the two extra runs, timed on
    an empty model, is taken off. Fastest of ROUNDS runs (load from other processes only ever adds
    time), all models interleaved so load hits them alike.
    """
    int8_type = int8_model.graph.input[0].type.tensor_type.elem_type
    rng = np.random.default_rng(0)
    chain_input = rng.integers(0, 128, shape).astype(onnx.helper.tensor_dtype_to_np_dtype(int8_type))
    float_input = rng.standard_normal(shape).astype(np.float32)
    options = ort.SessionOptions()
    options.intra_op_num_threads = worker_count(config.calibration_threads)
    options.log_severity_level = 3
    # The sessions run round-robin, each with its own intra-op threads, which would otherwise keep
    # spinning after a run and slow the next session's run (up to 2x on an AMD EPYC here).
    options.add_session_config_entry("session.force_spinning_stop", "1")
    float_session = ort.InferenceSession(float_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    output_shape = float_session.run(None, {"x": float_input})[0].shape
    runs = [(float_session, {"x": float_input}),
            (_session(int8_model, options), {"x": chain_input}),
            (_session(_conversion_model("DequantizeLinear", shape, int8_type), options), {"x": chain_input}),
            (_session(_conversion_model("QuantizeLinear", output_shape, int8_type), options),
             {"x": rng.standard_normal(output_shape).astype(np.float32)}),
            (_session(_empty_model(), options), {"x": np.zeros(1, np.float32)})]
    for session, feed in runs:
        session.run(None, feed)
        session.run(None, feed)
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(ROUNDS):
        for index, (session, feed) in enumerate(runs):
            start = time.perf_counter()
            session.run(None, feed)
            times[index].append(time.perf_counter() - start)
    op, int8, dequantize, quantize, empty = (min(t) * 1e3 for t in times)
    return max(op + dequantize + quantize - 2 * empty, op), int8


def _session(model: onnx.ModelProto, options: ort.SessionOptions) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _signature(graph: Graph, node: Node, shape: tuple[int, ...], config: QuantConfig) -> str:
    weights = [np.asarray(graph.constant_value(t)) if t.name else None for t in node.inputs[1:]]
    described = {
        "method": "in an int8 chain: QLinear op vs DQ + float op + Q, timed apart, spinning stopped after each run",
        "op": node.op, "opset": graph.opset, "input": list(shape),
        "attributes": {key: repr(value) for key, value in sorted(node.attrs.items())},
        "constants": [None if w is None else [list(w.shape), str(w.dtype)] for w in weights],
        "quantization": {key: str(value) for key, value in sorted(config.as_dict().items())
                         if key in ("activation_type", "per_channel", "bias", "reduce_range", "weight_bits")},
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:24]


class _TimingCache:
    """kernel_timings.json: {machine: {signature: [float_ms, int8_ms]}}."""

    def __init__(self, cache_dir: str | Path | None, config: QuantConfig):
        self.path = cache_root(cache_dir) / CACHE_FILE
        self.machine = f"{cpu_model_name()}|onnxruntime {ort.__version__}|threads {worker_count(config.calibration_threads)}"
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.data = {}
        self.changed = False

    def get(self, key: str) -> tuple[float, float] | None:
        entry = self.data.get(self.machine, {}).get(key)
        return (float(entry[0]), float(entry[1])) if entry else None

    def put(self, key: str, timing: tuple[float, float]) -> None:
        self.data.setdefault(self.machine, {})[key] = [round(timing[0], 6), round(timing[1], 6)]
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.data, indent=1, sort_keys=True)
        write_atomically(self.path, lambda target: target.write_text(text))
