"""Which TensorRT is installed: full `tensorrt` when present, else `tensorrt_rtx`.

Both expose the same Builder / OnnxParser / BuilderConfig API. TensorRT-RTX parses and builds
engines on a machine without a GPU (it cannot run them there), which is what CI uses. RTX builds
only strongly typed networks: it has no INT8/FP16 builder flags, the graph's Q/DQ and float types
decide every layer's precision.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

from ..errors import QCompilerError

BACKEND_MODULES = ("tensorrt", "tensorrt_rtx")


class TensorRTError(QCompilerError):
    """TensorRT is missing, cannot parse the model, or cannot build an engine from it."""

    exit_code = 8


@dataclass(frozen=True)
class Backend:
    module: ModuleType
    name: str            # "tensorrt" or "tensorrt_rtx"
    version: str

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt_rtx"


def load_backend(preferred: str | None = None) -> Backend:
    """The first importable TensorRT module (or `preferred`), as a Backend."""
    names = (preferred,) if preferred else BACKEND_MODULES
    for name in names:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if not hasattr(module, "Builder"):  # e.g. a directory named tensorrt/ on sys.path (namespace package)
            continue
        return Backend(module, name, str(getattr(module, "__version__", "unknown")))
    raise TensorRTError("no TensorRT found: install TensorRT (`pip install tensorrt`) or TensorRT-RTX, which builds "
                        "without a GPU (`pip install 'qcompiler[tensorrt]'`, i.e. tensorrt-rtx-cu13==1.7.1.116)")
