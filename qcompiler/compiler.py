"""The compile API: load -> analyse -> calibrate -> rewrite -> check, in one call."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping

import numpy as np
import onnx

from .calibration import PhaseClock, collect_statistics, compute_ranges
from .calibration_data import CalibrationSource, model_inputs
from .calibrators import ChannelAbsMaxCalibrator, RowSampleCalibrator, make_calibrator
from .calibrators.base import Calibrator, Range
from .config import OutputFormat, QuantConfig, QuantMode, Target
from .context import CompileContext, CompileSummary
from .errors import CalibrationDataError, ConfigError, GraphCheckError
from .ir import FP8_OPSET, PER_CHANNEL_OPSET, Graph, ensure_opset, infer_shapes, load_model, save_model
from .pass_manager import PassManager
from .passes import InsertQDQ, Pass, StatisticRequest
from .passes.smoothquant import SmoothQuant
from .passes.transformer_per_token import PerTokenDynamicQuant
from .passes.ort_pipeline import ort_passes, ort_prepare_passes
from .passes.tensorrt_placement import tensorrt_passes
from .passes.tensorrt_weights import FoldWeightTranspose

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
    {input_name: array}. `ranges`: precomputed activation ranges (e.g. from `qcompiler calibrate`);
    tensors they cover are not calibrated again. `progress(done, total)` is called after each
    calibration sample.
    """
    config = config or QuantConfig()
    summary = CompileSummary()
    working = load_model(model)
    minimum_opset = PER_CHANNEL_OPSET if config.per_channel else QDQ_OPSET
    if config.fp8:
        minimum_opset = FP8_OPSET  # QuantizeLinear/DequantizeLinear take float8 from opset 19
    working, converted = ensure_opset(working, minimum_opset)
    if converted:
        summary.notes.append(f"converted the model to opset {minimum_opset}")
    graph = Graph(infer_shapes(working))
    del working  # the graph holds the shape-inferred copy: one copy of the weights less at the peak
    if config.target is Target.ORT and config.mode is QuantMode.STATIC and config.format is OutputFormat.AUTO \
            and calibration_data is not None:
        config = _keep_slow_int8_ops_in_float(graph, config, calibration_data, summary)

    context = CompileContext(config, dict(ranges or {}), summary=summary)
    stage = CalibrationStage(calibration_data, config, progress)
    PassManager(build_pipeline(config), debug_checks=config.debug_checks, statistics=stage).run(graph, context)
    compiled = graph.to_model()
    if config.fp8:
        from .tensorrt.fp8 import convert_int8_qdq_to_fp8

        compiled = convert_int8_qdq_to_fp8(compiled)
    try:
        onnx.checker.check_model(compiled)
    except onnx.checker.ValidationError as error:
        raise GraphCheckError(f"compiled model fails onnx.checker: {str(error).strip().splitlines()[0]}") from None
    return CompiledModel(compiled, summary, config)


def _keep_slow_int8_ops_in_float(graph: Graph, config: QuantConfig, calibration_data: CalibrationData,
                                  summary: CompileSummary) -> QuantConfig:
    """format auto: the config with the ops whose int8 kernel measured slower than float excluded."""
    from .kernel_timing import ops_faster_in_float

    first_sample = next(iter(CalibrationSource(calibration_data, model_inputs(graph.to_runtime_model()[0]))))
    slower = ops_faster_in_float(graph, config, first_sample)
    for timing in slower:
        summary.notes.append(f"format auto: {timing.node} stays float (int8 {timing.int8_ms:.3f} ms vs float "
                             f"{timing.float_ms:.3f} ms on this machine)")
    if not slower:
        return config
    return config.with_options(exclude_nodes=config.exclude_nodes + tuple(timing.node for timing in slower))


@dataclass
class CalibrationResult:
    """Ranges of a model's float activations, reusable by `compile(ranges=...)` and TensorRT."""

    ranges: dict[str, Range]
    samples: int
    calibrator: str
    seconds: dict[str, float] = field(default_factory=dict)  # per phase, as CompileSummary.calibration_seconds


def calibrate(model: ModelSource, calibration_data: CalibrationData, config: QuantConfig | None = None, *,
              tensors: Iterable[str] | None = None,
              progress: Callable[[int, int | None], None] | None = None) -> CalibrationResult:
    """Measure the range of every float activation (or of `tensors`) in one streaming pass.

    All activations rather than only those one config quantizes, so the saved ranges serve any
    later compile and TensorRT's implicit quantization, which wants every tensor.
    """
    config = config or QuantConfig()
    graph = Graph(infer_shapes(load_model(model)))
    names = list(tensors) if tensors is not None else float_activations(graph)
    context = CompileContext(config)
    CalibrationStage(calibration_data, config, progress)(graph, [StatisticRequest(name) for name in names], context)
    return CalibrationResult(context.activation_ranges, context.summary.calibration_samples, config.calibrator,
                             dict(context.summary.calibration_seconds))


def float_activations(graph: Graph) -> list[str]:
    """Float32 graph inputs and node outputs, in graph order (initializers and constants excluded)."""
    names: list[str] = [t.name for t in graph.gs.inputs if t.dtype is not None and np.dtype(t.dtype) == np.float32]
    for node in graph.nodes:
        if node.op == "Constant":
            continue
        for output in node.outputs:
            try:
                is_float = output.dtype is not None and np.dtype(output.dtype) == np.float32
            except TypeError:
                is_float = False
            if is_float and output.name not in names:
                names.append(output.name)
    return names


def build_pipeline(config: QuantConfig) -> list[Pass]:
    """The ordered passes for a config: the one place where targets and options pick rewrites."""
    passes: list[Pass] = []
    # 1. float-exact rewrites that prepare the graph for quantization
    if config.target is Target.ORT:
        passes += ort_prepare_passes(config)
    if config.target is Target.TENSORRT:
        passes.append(FoldWeightTranspose())  # TensorRT wants weight DQ -> op with nothing between
    if config.smoothquant:
        passes.append(SmoothQuant())
    # 2. QDQ insertion (dynamic mode quantizes activations at run time instead: section 3)
    if config.per_token_activations:
        passes.append(PerTokenDynamicQuant())
    if config.mode is QuantMode.STATIC:
        passes.append(InsertQDQ())
    # 3. target-specific placement and lowering
    if config.target is Target.ORT:
        passes += ort_passes(config)
    if config.target is Target.TENSORRT:
        passes += tensorrt_passes()
    return passes


class CalibrationStage:
    """Measures what passes ask for, on the graph as it is when they ask, by running it in ONNX
    Runtime over the calibration samples (one streaming pass per request batch)."""

    def __init__(self, calibration_data: CalibrationData | None, config: QuantConfig,
                 progress: Callable[[int, int | None], None] | None = None):
        self.calibration_data = calibration_data
        self.config = config
        self.progress = progress

    def __call__(self, graph: Graph, requests: list[StatisticRequest], context: CompileContext) -> None:
        if self.calibration_data is None:
            raise CalibrationDataError(f"static quantization needs calibration data for {len(requests)} activation(s); "
                                       "pass calibration_data (CLI: --calib), or quantize activations at run time with "
                                       "mode='dynamic' (CLI: --mode dynamic)")
        seconds = context.summary.calibration_seconds
        clock = PhaseClock(seconds)
        model, weights = graph.to_runtime_model()
        source = CalibrationSource(self.calibration_data, model_inputs(model))
        observers = [(request.tensor, self._calibrator_for(request)) for request in requests]
        report = (lambda done: self.progress(done, source.count)) if self.progress else None
        threads = self.config.calibration_threads
        clock.lap("prepare")
        samples = collect_statistics(model, observers, source, threads, report, owns_model=True, weights=weights,
                                     seconds=seconds)
        clock.skip()  # collect_statistics timed its own phases
        del model, weights  # the runtime copy and its weight arrays
        clock.lap("release")
        context.summary.calibration_samples = max(context.summary.calibration_samples, samples)
        range_observers = {}
        for request, (_, calibrator) in zip(requests, observers):
            if request.kind == "range":
                range_observers[request.tensor] = calibrator
            elif request.kind == "row_sample":
                context.row_samples[(request.tensor, request.axis)] = calibrator.sample()
            else:
                context.channel_absmax[(request.tensor, request.axis)] = calibrator.compute_range().high
        context.activation_ranges.update(compute_ranges(range_observers, threads))
        context.summary.calibrated_tensors += len(range_observers)
        clock.lap("ranges")

    def _calibrator_for(self, request: StatisticRequest) -> Calibrator:
        if request.kind == "channel_absmax":
            return ChannelAbsMaxCalibrator(axis=request.axis)
        if request.kind == "row_sample":
            return RowSampleCalibrator(axis=request.axis)
        name, options = self.config.calibrator_for(request.tensor)
        try:
            return make_calibrator(name, **options)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"calibrator {name!r} with options {options}: {error}") from None
