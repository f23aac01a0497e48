"""Compile a tiny graph for the tensorrt target, build it with the real TensorRT(-RTX) builder and
look at the verbose layer table: the judge of every placement rule."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

import qcompiler
from helpers import run
from qcompiler.tensorrt import CoverageReport, EngineBuild, EngineLayer, build_engine, engine_coverage


@dataclass
class Built:
    model: onnx.ModelProto
    build: EngineBuild
    report: CoverageReport
    summary: object

    @property
    def layers(self) -> list[EngineLayer]:
        return [layer for layer in self.report.layers if layer.layer_type not in ("signal", "wait")]

    def layers_with(self, onnx_node: str) -> list[EngineLayer]:
        return [layer for layer in self.layers if onnx_node in layer.onnx_nodes]

    def nodes(self, op_type: str) -> list[onnx.NodeProto]:
        return [node for node in self.model.graph.node if node.op_type == op_type]

    def producer(self, tensor: str) -> onnx.NodeProto | None:
        return next((node for node in self.model.graph.node if tensor in node.output), None)

    def initializer(self, name: str) -> np.ndarray:
        return next(onnx.numpy_helper.to_array(t) for t in self.model.graph.initializer if t.name == name)

    def changes(self, pass_name: str) -> list[str]:
        return [change for name, changes in self.summary.pass_changes if name == pass_name for change in changes]


def compile_and_build(model: onnx.ModelProto, samples: list[dict], **options) -> Built:
    compiled = qcompiler.compile(model, samples, qcompiler.QuantConfig(target="tensorrt", **options))
    onnx.checker.check_model(compiled.model, full_check=True)
    build = build_engine(compiled.model, {name: value.shape for name, value in samples[0].items()})
    assert build.ok, build.errors()[:3]
    return Built(compiled.model, build, engine_coverage(compiled.model, build), compiled.summary)


def assert_close_to_float(original: onnx.ModelProto, quantized: onnx.ModelProto, sample: dict, min_sqnr_db: float) -> None:
    """ONNX Runtime (its fusions off) runs the quantized graph and stays near the float one."""
    from helpers import sqnr_db

    reference, result = run(original, sample)[0], run(quantized, sample)[0]
    assert sqnr_db(reference, result) >= min_sqnr_db


def assert_symmetric_int8(model: onnx.ModelProto) -> None:
    """Every Q/DQ pair: int8 zero point 0, scales finite and > 0, activations per tensor."""
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale, zero_point = values[node.input[1]], values[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any(), node.name
        assert np.all(np.isfinite(scale)) and np.all(scale > 0), node.name
        if node.op_type == "QuantizeLinear":
            assert scale.size == 1, f"{node.name}: activations are quantized per tensor"
