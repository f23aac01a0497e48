"""What `qcompiler inspect` reports about a model, computed without running it."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

import numpy as np

from .calibration_data import InputSpec, model_inputs
from .config import QuantConfig
from .context import NodeDecision
from .ir import Graph, default_opset, load_model
from .passes.quantizable import plan


@dataclass(frozen=True)
class ModelReport:
    opset: int
    node_count: int
    parameter_count: int
    inputs: list[InputSpec]
    op_histogram: list[tuple[str, int]]
    decisions: list[NodeDecision]


def inspect_model(source: str | os.PathLike, config: QuantConfig | None = None) -> ModelReport:
    model = load_model(source)
    graph = Graph(model)
    histogram = Counter(node.op_type for node in model.graph.node)
    parameters = sum(int(np.prod(init.dims)) for init in model.graph.initializer)
    _, decisions = plan(graph, config or QuantConfig())
    return ModelReport(default_opset(model), len(model.graph.node), parameters, model_inputs(model),
                       sorted(histogram.items(), key=lambda item: (-item[1], item[0])), decisions)
