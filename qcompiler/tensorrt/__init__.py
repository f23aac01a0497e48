"""Building TensorRT engines from qcompiler's output and judging Q/DQ placement by the build log."""

from .backend import Backend, TensorRTError, load_backend
from .build import EngineBuild, build_engine, input_shapes
from .coverage import CoverageReport, coverage, engine_coverage, report_rows, summary_line
from .layers import EngineLayer, parse_layers

__all__ = ["Backend", "CoverageReport", "EngineBuild", "EngineLayer", "TensorRTError", "build_engine", "coverage",
           "engine_coverage", "input_shapes", "load_backend", "parse_layers", "report_rows", "summary_line"]
