"""Shape inference that never aborts compilation.

ONNX's inference fails on some real models (custom domains, odd exporters); the rest of qcompiler
only uses shapes as hints, so a failure is recorded and the model goes on without them.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import onnx

from .model_io import needs_external_data, save_model

log = logging.getLogger(__name__)


def infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return the model with value_info filled in where ONNX can infer it; unchanged on failure."""
    try:
        if not needs_external_data(model):
            return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
        # infer_shapes on an in-memory proto is limited to 2 GB; the path variant is not.
        with tempfile.TemporaryDirectory() as scratch:
            source = Path(scratch) / "in.onnx"
            save_model(model, source, external_data=True)
            inferred = Path(scratch) / "out.onnx"
            onnx.shape_inference.infer_shapes_path(str(source), str(inferred), check_type=False, strict_mode=False, data_prop=True)
            result = onnx.load_model(str(inferred), load_external_data=True)
            return result
    except Exception as error:  # noqa: BLE001 - any inference failure just means "no hints"
        log.warning("shape inference failed, continuing without inferred shapes: %s", str(error).splitlines()[0] if str(error) else error)
        return model
