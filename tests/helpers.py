"""Small shared helpers for tests: build tiny models, run them in ONNX Runtime, measure error."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort


def parse_model(text: str, initializers: dict[str, np.ndarray] | None = None, opset: int = 13) -> onnx.ModelProto:
    """A model from ONNX text syntax plus named initializers; the opset header is added here so
    tests stay short."""
    header = f'<ir_version: 8, opset_import: ["" : {opset}]>\n'
    model = onnx.parser.parse_model(header + text)
    for name, value in (initializers or {}).items():
        model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(value), name))
    onnx.checker.check_model(model, full_check=True)
    return model


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], optimize: bool = False) -> list[np.ndarray]:
    """Run with ONNX Runtime's own graph optimizations off by default, so its fusions cannot hide
    what a pass did."""
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def sqnr_db(reference: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.sum((reference.astype(np.float64) - test) ** 2))
    signal = float(np.sum(reference.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(signal / noise)


def op_types(model: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in model.graph.node]


def initializer(model: onnx.ModelProto, name: str) -> np.ndarray:
    for tensor in model.graph.initializer:
        if tensor.name == name:
            return onnx.numpy_helper.to_array(tensor)
    raise KeyError(name)


def random_samples(shapes: dict[str, tuple[int, ...]], count: int, seed: int = 0, scale: float = 1.0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{name: (rng.standard_normal(shape) * scale).astype(np.float32) for name, shape in shapes.items()} for _ in range(count)]
