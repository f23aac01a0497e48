"""Shared by the ort_* pass tests: compile tiny graphs, look at what ONNX Runtime makes of them."""

from __future__ import annotations

import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

import qcompiler
from qcompiler.config import QuantConfig
from qcompiler.context import CompileContext
from qcompiler.ir import Graph


def apply_pass(pass_, model: onnx.ModelProto):
    """(rewritten model, PassResult, Graph) of one pass run on `model`; the result passes the checker."""
    graph = Graph(model)
    result = pass_.run(graph, CompileContext(QuantConfig()))
    rewritten = graph.to_model()
    onnx.checker.check_model(rewritten, full_check=True)
    return rewritten, result, graph


def compile_tiny(model: onnx.ModelProto, samples, **options) -> onnx.ModelProto:
    compiled = qcompiler.compile(model, samples, qcompiler.QuantConfig(**options)).model
    onnx.checker.check_model(compiled, full_check=True)
    return compiled


def ort_optimized_ops(model: onnx.ModelProto) -> Counter:
    """Op types of the graph ONNX Runtime runs after its own fusions (ORT_ENABLE_ALL)."""
    with tempfile.TemporaryDirectory() as directory:
        target = Path(directory) / "optimized.onnx"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(target)
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        return Counter(node.op_type for node in onnx.load(str(target)).graph.node)


def output_step(model: onnx.ModelProto, output_name: str) -> float:
    """The scale of the DequantizeLinear that produces (or feeds the op producing) a graph output."""
    producers = {o: n for n in model.graph.node for o in n.output}
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    node = producers[output_name]
    while node.op_type != "DequantizeLinear":
        node = producers[node.input[0]]
    return float(np.max(initializers[node.input[1]]))


def q_inputs(model: onnx.ModelProto) -> set[str]:
    """Names of the tensors that a QuantizeLinear reads."""
    return {n.input[0] for n in model.graph.node if n.op_type == "QuantizeLinear"}
