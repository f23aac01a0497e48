"""Build a TensorRT engine from an ONNX model and keep the builder's verbose log.

The log is the ground truth of our Q/DQ placement: with DETAILED profiling verbosity it lists every
fused layer with its input/constant data types and the ONNX nodes fused into it (see layers.py).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import onnx

from ..ir import load_model
from .backend import Backend, TensorRTError, load_backend

# name -> (min, opt, max) dims for one input
ShapeProfile = Mapping[str, tuple[Sequence[int], Sequence[int], Sequence[int]]]


@dataclass
class EngineBuild:
    """What one build produced: the serialized engine (None if the build failed) and the log."""

    backend: str
    backend_version: str
    plan: bytes | None
    parser_errors: list[str]
    log: list[tuple[str, str]] = field(default_factory=list)   # (severity name, message)
    seconds: float = 0.0
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.plan is not None and not self.parser_errors

    def errors(self) -> list[str]:
        return self.parser_errors + [message for severity, message in self.log if severity in ("ERROR", "INTERNAL_ERROR")]

    def layer_log(self) -> str:
        """The builder's `Layers:` message (one line per fused engine layer), or '' if absent."""
        for _, message in self.log:
            if message.startswith("Layers:"):
                return message
        return ""

    def save(self, path: str | os.PathLike) -> Path:
        if self.plan is None:
            raise TensorRTError("the engine build failed; nothing to save: " + "; ".join(self.errors()[:3]))
        path = Path(path)
        temporary = path.with_name(path.name + ".partial")
        temporary.write_bytes(self.plan)
        os.replace(temporary, path)
        return path


def input_shapes(model: onnx.ModelProto, shapes: Mapping[str, Sequence[int] | tuple] | None) -> dict:
    """(min, opt, max) per graph input: given shapes first, static shapes otherwise.

    A given value is either one shape (used as min = opt = max) or a (min, opt, max) triple.
    A dynamic input without a given shape is a user error naming the input and its dims.
    """
    initializers = {tensor.name for tensor in model.graph.initializer}
    given = dict(shapes or {})
    profile = {}
    for graph_input in model.graph.input:
        if graph_input.name in initializers:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in graph_input.type.tensor_type.shape.dim]
        if graph_input.name in given:
            value = given.pop(graph_input.name)
            triple = value if len(value) == 3 and all(isinstance(v, (list, tuple)) for v in value) else (value, value, value)
            triple = tuple(tuple(int(d) for d in shape) for shape in triple)
            for shape in triple:
                if len(shape) != len(dims) or any(isinstance(d, int) and d != s for d, s in zip(dims, shape)):
                    raise TensorRTError(f"shape {list(shape)} does not fit input {graph_input.name} {dims}")
            profile[graph_input.name] = triple
        elif all(isinstance(d, int) and d > 0 for d in dims):
            profile[graph_input.name] = (tuple(dims),) * 3
        else:
            raise TensorRTError(f"input {graph_input.name} has dynamic dims {dims}; give its shape, "
                                f"e.g. --shape {graph_input.name}:{'x'.join(str(d) if isinstance(d, int) and d > 0 else '1' for d in dims)}")
    if given:
        raise TensorRTError(f"shapes given for unknown inputs: {', '.join(sorted(given))}")
    return profile


def build_engine(model: str | os.PathLike | onnx.ModelProto, shapes: Mapping | None = None, fp16: bool = False,
                 workspace_mb: int | None = None, backend: Backend | None = None) -> EngineBuild:
    """Parse `model` and build a serialized engine, keeping the verbose log.

    `shapes`: per-input shape or (min, opt, max) for dynamic inputs (one optimization profile).
    `fp16`: full TensorRT only (weakly typed build with FP16 and INT8 flags); TensorRT-RTX builds
    strongly typed networks and takes every layer's type from the graph.
    Parser errors do not raise: they are returned in `parser_errors`, so reports can count them.
    """
    backend = backend or load_backend()
    trt = backend.module
    proto = load_model(model)
    profile_shapes = input_shapes(proto, shapes)
    if fp16 and backend.is_rtx:
        raise TensorRTError("TensorRT-RTX builds strongly typed networks and has no FP16 flag; "
                            "install full TensorRT for --fp16 or give it an FP16 graph")
    logger = _CapturingLogger(trt)
    start = time.perf_counter()
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    parsed = parser.parse(proto.SerializeToString())
    parser_errors = [_describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
    result = EngineBuild(backend.name, backend.version, None, parser_errors, logger.messages, 0.0, profile_shapes)
    if not parsed or parser_errors:
        result.parser_errors = parser_errors or ["the ONNX parser failed without an error message"]
        result.seconds = time.perf_counter() - start
        return result
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_mb) << 20)
    if not backend.is_rtx:
        if fp16:
            config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.INT8)   # weakly typed TensorRT 10 honours Q/DQ only with INT8 enabled
    if any(low != high for low, _, high in profile_shapes.values()) or _has_dynamic_inputs(network):
        profile = builder.create_optimization_profile()
        for name, (low, opt, high) in profile_shapes.items():
            profile.set_shape(name, low, opt, high)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    result.plan = bytes(serialized) if serialized is not None else None
    result.seconds = time.perf_counter() - start
    return result


def _has_dynamic_inputs(network) -> bool:
    return any(-1 in tuple(network.get_input(i).shape) for i in range(network.num_inputs))


def _describe_parser_error(error) -> str:
    node = error.node_name() if hasattr(error, "node_name") else ""
    where = f" (node {node})" if node else ""
    return f"{error.desc()}{where}"


class _CapturingLogger:
    """A TensorRT logger that keeps every message, VERBOSE included (the layer table is VERBOSE)."""

    def __new__(cls, trt):
        class Logger(trt.ILogger):
            def __init__(self):
                trt.ILogger.__init__(self)
                self.messages: list[tuple[str, str]] = []

            def log(self, severity, message):
                self.messages.append((str(severity).rsplit(".", 1)[-1], message))

        return Logger()
