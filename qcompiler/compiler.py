"""The compile API: load -> analyse -> calibrate -> rewrite -> check, in one call."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import onnx

from .calibration import collect_statistics, compute_ranges
from .calibration_data import CalibrationSource, model_inputs
from .calibrators import make_calibrator
from .calibrators.base import Range
from .config import QuantConfig
from .context import CompileContext, CompileSummary
from .errors import CalibrationDataError, GraphCheckError
from .ir import PER_CHANNEL_OPSET, Graph, ensure_opset, infer_shapes, load_model, save_model
from .pass_manager import PassManager
from .passes import InsertQDQ
from .passes.quantizable import activation_tensors

# QuantizeLinear/DequantizeLinear exist from opset 10; per-tensor QDQ needs nothing newer.
QDQ_OPSET = 10

ModelSource = str | os.PathLike | onnx.ModelProto
CalibrationData = str | os.PathLike | Iterable[Mapping[str, np.ndarray]]


@dataclass
class CompiledModel:
    """The result of `compile`: the quantized model, what was done, and how to save it."""

    model: onnx.ModelProto
    summary: CompileSummary
    config: QuantConfig

    def save(self, path: str | os.PathLike, external_data: bool | None = None) -> Path:
        """Write atomically; weights go to `<path>.data` when the model exceeds 2 GB (or if asked)."""
        return save_model(self.model, path, external_data=external_data)


def compile(model: ModelSource, calibration_data: CalibrationData | None = None, config: QuantConfig | None = None, *,
            ranges: Mapping[str, Range] | None = None,
            progress: Callable[[int, int | None], None] | None = None) -> CompiledModel:
    """Quantize `model` statically and return the compiled result; the input is never modified.

    `calibration_data`: a directory of .npz samples, one stacked .npz, or an iterable of
    {input_name: array}. `ranges`: precomputed activation ranges (skips calibration for those
    tensors). `progress(done, total)` is called after each calibration sample.
    """
    config = config or QuantConfig()
    summary = CompileSummary()
    working = load_model(model)
    working, converted = ensure_opset(working, PER_CHANNEL_OPSET if config.per_channel else QDQ_OPSET)
    if converted:
        summary.notes.append(f"converted the model to opset {PER_CHANNEL_OPSET if config.per_channel else QDQ_OPSET}")
    working = infer_shapes(working)
    graph = Graph(working)

    needed = activation_tensors(graph, config)
    activation_ranges = {name: value for name, value in (ranges or {}).items() if name in needed}
    to_calibrate = [name for name in needed if name not in activation_ranges]
    if to_calibrate:
        activation_ranges.update(_calibrate(working, to_calibrate, calibration_data, config, summary, progress))
    summary.calibrated_tensors = len(to_calibrate)

    context = CompileContext(config, activation_ranges, summary)
    PassManager([InsertQDQ()], debug_checks=config.debug_checks).run(graph, context)
    compiled = graph.to_model()
    try:
        onnx.checker.check_model(compiled)
    except onnx.checker.ValidationError as error:
        raise GraphCheckError(f"compiled model fails onnx.checker: {str(error).strip().splitlines()[0]}") from None
    return CompiledModel(compiled, summary, config)


def _calibrate(model: onnx.ModelProto, tensor_names: list[str], calibration_data, config: QuantConfig,
               summary: CompileSummary, progress) -> dict[str, Range]:
    if calibration_data is None:
        raise CalibrationDataError(f"static quantization needs calibration data for {len(tensor_names)} activation(s); pass calibration_data (CLI: --calib)")
    source = CalibrationSource(calibration_data, model_inputs(model))
    calibrators = {name: make_calibrator(config.calibrator, **config.calibrator_options) for name in tensor_names}
    total = source.count
    report = (lambda done: progress(done, total)) if progress else None
    summary.calibration_samples = collect_statistics(model, calibrators, source, config.calibration_threads, report)
    return compute_ranges(calibrators)
