"""Runs a model on zoo samples with ONNX Runtime on the CPU, one session per call."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import numpy as np
import onnx
import onnxruntime as ort

from ..errors import ConfigError

OPTIMIZATION_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def run_onnx(model: str | os.PathLike | onnx.ModelProto, samples: Iterable[Mapping[str, np.ndarray]],
             threads: int = 2, optimization: str = "all") -> list[list[np.ndarray]]:
    """Every output of `model` for each sample, in graph output order.

    `optimization` is ONNX Runtime's graph optimization level ("disable", "basic", "extended",
    "all"); tests that check what a pass did use "disable" so ORT's own fusions hide nothing.
    """
    if optimization not in OPTIMIZATION_LEVELS:
        raise ConfigError(f"optimization must be one of {', '.join(OPTIMIZATION_LEVELS)}, not {optimization!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else os.fspath(model)
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return [session.run(None, dict(sample)) for sample in samples]
