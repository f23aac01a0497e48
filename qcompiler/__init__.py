"""qcompiler: an ONNX graph quantization compiler for ONNX Runtime and TensorRT.

    import qcompiler
    compiled = qcompiler.compile("model.onnx", "calib_dir/", qcompiler.QuantConfig())
    compiled.save("model.int8.onnx")
"""

from .compiler import CalibrationResult, CompiledModel, calibrate, compile
from .config import BiasMode, QType, QuantConfig, Target
from .errors import (CalibrationDataError, CalibrationError, ConfigError, GraphCheckError, ModelLoadError,
                     QCompilerError, UnsupportedModelError)

__version__ = "0.1.0"

__all__ = [
    "compile", "CompiledModel", "calibrate", "CalibrationResult", "QuantConfig", "QType", "Target", "BiasMode",
    "QCompilerError", "ModelLoadError", "UnsupportedModelError", "CalibrationDataError",
    "CalibrationError", "ConfigError", "GraphCheckError",
]
