"""The exceptions qcompiler raises for problems a user can fix.

Each carries one line that names the problem; the CLI prints it and exits non-zero instead of
showing a traceback.
"""


class QCompilerError(Exception):
    """Base of every error caused by the user's input or environment, not by a bug."""

    exit_code = 1


class ModelLoadError(QCompilerError):
    """The model path is missing, unreadable, truncated or not an ONNX model."""

    exit_code = 2


class UnsupportedModelError(QCompilerError):
    """The model is valid ONNX but uses something qcompiler cannot handle (e.g. an opset too old to convert)."""

    exit_code = 3


class CalibrationDataError(QCompilerError):
    """Calibration samples are missing, unreadable, or do not match the model's inputs."""

    exit_code = 4


class CalibrationError(QCompilerError):
    """Calibration ran but produced unusable statistics (e.g. NaN activations), naming the tensor."""

    exit_code = 5


class ConfigError(QCompilerError):
    """An option value is invalid or options contradict each other."""

    exit_code = 6


class GraphCheckError(QCompilerError):
    """A pass produced a graph that fails onnx.checker or shape inference (debug mode names the pass)."""

    exit_code = 7
