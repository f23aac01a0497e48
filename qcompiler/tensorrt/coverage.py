"""INT8 coverage of an engine: which share of the model's Conv/ConvTranspose/MatMul/Gemm FLOPs runs
in a layer whose inputs and weights are Int8, judged from the builder's layer table.

FLOPs come from the ONNX graph at the build's optimization shapes (2 x multiply-accumulates), so the
same float model quantized by two tools is measured on the same denominator. A compute node counts
as INT8 when the engine's compute layer (correlation / gemm / ...) whose metadata names it reads
only Int8 inputs and an Int8 weight.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import onnx

from .layers import EngineLayer

COMPUTE_OP_TYPES = ("Conv", "ConvTranspose", "MatMul", "Gemm")


@dataclass(frozen=True)
class NodeCoverage:
    node: str
    op_type: str
    flops: int
    layer: str          # the engine layer running it ('' if none was found)
    layer_type: str
    input_dtypes: tuple[str, ...]
    weight_dtype: str
    int8: bool


@dataclass
class CoverageReport:
    nodes: list[NodeCoverage] = field(default_factory=list)
    layers: list[EngineLayer] = field(default_factory=list)

    @property
    def total_flops(self) -> int:
        return sum(node.flops for node in self.nodes)

    @property
    def int8_flops(self) -> int:
        return sum(node.flops for node in self.nodes if node.int8)

    @property
    def int8_share(self) -> float:
        """Share of compute FLOPs in INT8 layers (0..1); 1.0 for a model without compute ops."""
        return self.int8_flops / self.total_flops if self.total_flops else 1.0

    quantize_kernels: int = 0   # layers running only Q/DQ nodes: conversions no other layer absorbed

    def float_nodes(self) -> list[NodeCoverage]:
        return sorted((node for node in self.nodes if not node.int8), key=lambda node: -node.flops)


def node_flops(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[str, int]]:
    """node name -> (op type, FLOPs) for every Conv/ConvTranspose/MatMul/Gemm at `input_shapes`."""
    shapes = _tensor_shapes(model, input_shapes)
    result = {}
    for node in model.graph.node:
        if node.op_type not in COMPUTE_OP_TYPES:
            continue
        first, weight, output = (shapes.get(name) for name in (node.input[0], node.input[1], node.output[0]))
        result[node.name] = (node.op_type, _flops(node, first, weight, output))
    return result


def coverage(model: onnx.ModelProto, layers: Sequence[EngineLayer], input_shapes: Mapping[str, Sequence[int]]) -> CoverageReport:
    """Map each compute node of `model` to its engine layer and weigh INT8 by FLOPs."""
    named: dict[str, list[EngineLayer]] = {}
    for layer in layers:
        for name in layer.onnx_nodes:
            named.setdefault(name, []).append(layer)
    qdq_nodes = {node.name for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")}
    standalone = sum(1 for layer in layers if layer.onnx_nodes and set(layer.onnx_nodes) <= qdq_nodes)
    report = CoverageReport(layers=list(layers), quantize_kernels=standalone)
    for name, (op_type, flops) in node_flops(model, input_shapes).items():
        layer = _running_layer(named.get(name, []))
        if layer is None:
            report.nodes.append(NodeCoverage(name, op_type, flops, "", "", (), "", False))
            continue
        report.nodes.append(NodeCoverage(name, op_type, flops, layer.name, layer.layer_type, layer.input_dtypes,
                                         layer.weight_dtype, layer.is_compute and layer.runs_int8))
    return report


def _running_layer(candidates: list[EngineLayer]) -> EngineLayer | None:
    """The layer that executes a compute node among all layers whose metadata names it (its
    epilogue and weight-preparation kernels name it too): a compute-type layer, the first float one
    if the node was split over several, else the first non-`kgen` layer, else any."""
    compute = [layer for layer in candidates if layer.is_compute]
    if compute:
        return next((layer for layer in compute if not layer.runs_int8), compute[0])
    return next((layer for layer in candidates if layer.layer_type != "kgen"), candidates[0] if candidates else None)


def _flops(node: onnx.NodeProto, first, weight, output) -> int:
    if output is None or first is None:
        return 0
    if node.op_type == "Conv" and weight is not None:
        return 2 * _volume(output) * _volume(weight[1:])
    if node.op_type == "ConvTranspose" and weight is not None:
        return 2 * _volume(first) * _volume(weight[1:])
    if node.op_type == "MatMul":
        return 2 * _volume(output) * int(first[-1])
    if node.op_type == "Gemm":
        trans_a = any(a.name == "transA" and a.i for a in node.attribute)
        return 2 * _volume(output) * int(first[0] if trans_a else first[-1])
    return 0


def _volume(shape) -> int:
    return int(np.prod([int(d) for d in shape], dtype=np.int64)) if len(shape) else 1


def _tensor_shapes(model: onnx.ModelProto, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, tuple[int, ...]]:
    """Concrete shapes of every compute node's tensors: ONNX shape inference, and where it leaves
    holes (Shape->Gather->Reshape chains in exported transformers), one ONNX Runtime run on zeros."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for graph_input in fixed.graph.input:
        if graph_input.name in input_shapes:
            shape = graph_input.type.tensor_type.shape
            shape.ClearField("dim")
            for value in input_shapes[graph_input.name]:
                shape.dim.add().dim_value = int(value)
    shapes = {tensor.name: tuple(np.asarray(onnx.numpy_helper.to_array(tensor)).shape) for tensor in fixed.graph.initializer}
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, strict_mode=False, data_prop=True)
    except Exception:  # noqa: BLE001 - holes are filled by running the model below
        inferred = fixed
    for info in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        dims = info.type.tensor_type.shape.dim
        if info.type.tensor_type.HasField("shape") and all(d.HasField("dim_value") for d in dims):
            shapes.setdefault(info.name, tuple(d.dim_value for d in dims))
    wanted = {name for node in fixed.graph.node if node.op_type in COMPUTE_OP_TYPES
              for name in (node.input[0], node.input[1], node.output[0])}
    missing = sorted(wanted - set(shapes))
    if missing:
        shapes.update(_run_for_shapes(fixed, missing, input_shapes))
    return shapes


def _run_for_shapes(model: onnx.ModelProto, names: list[str], input_shapes) -> dict[str, tuple[int, ...]]:
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    existing = {output.name for output in probe.graph.output}
    for name in names:
        if name not in existing:
            probe.graph.output.add().name = name
    feeds = {}
    for graph_input in probe.graph.input:
        if graph_input.name in input_shapes:
            dtype = onnx.helper.tensor_dtype_to_np_dtype(graph_input.type.tensor_type.elem_type)
            feeds[graph_input.name] = np.zeros(tuple(input_shapes[graph_input.name]), dtype=dtype)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outputs = session.run(names, feeds)
    except Exception:  # noqa: BLE001 - FLOPs of those nodes stay unknown (0) rather than failing the report
        return {}
    return {name: tuple(value.shape) for name, value in zip(names, outputs)}


def engine_coverage(model: onnx.ModelProto, build) -> CoverageReport:
    """Coverage of an `EngineBuild` of `model`, at its optimization profile's opt shapes."""
    from .backend import TensorRTError
    from .layers import parse_layers

    layers = parse_layers(build.layer_log())
    if not layers:
        # The `Layers:` table is TensorRT-RTX's verbose format; full TensorRT reports layers
        # through IEngineInspector instead, which this report does not read yet.
        raise TensorRTError(f"the {build.backend} {build.backend_version} build log has no layer table; "
                            "INT8 coverage is read from TensorRT-RTX's verbose log")
    shapes = {name: opt for name, (_, opt, _) in build.shapes.items()}
    return coverage(model, layers, shapes)


def report_rows(report: CoverageReport) -> list[tuple[str, str, str, str, str]]:
    """(TensorRT layer, type, input dtypes, weight dtype, fused ONNX nodes) per engine layer."""
    return [(layer.name, layer.layer_type, ",".join(layer.input_dtypes), layer.weight_dtype, " ".join(layer.onnx_nodes))
            for layer in report.layers if layer.layer_type not in ("signal", "wait")]


def summary_line(report: CoverageReport) -> str:
    compute = len(report.nodes)
    int8_nodes = sum(1 for node in report.nodes if node.int8)
    return (f"INT8 coverage: {report.int8_share:.1%} of Conv/ConvTranspose/MatMul/Gemm FLOPs "
            f"({int8_nodes}/{compute} nodes, {report.int8_flops / 1e9:.3f} of {report.total_flops / 1e9:.3f} GFLOP); "
            f"{len(report.layers)} engine layers, {report.quantize_kernels} standalone quantize kernels")
