"""Opset requirements of features, and upgrading models that are below them.

Per-channel DequantizeLinear (the `axis` attribute) needs opset 13; block-wise int4 needs 21; FP8
needs 19. A model below what a feature needs is converted with ONNX's version converter and the
result is checked, so we never write a file that ONNX Runtime refuses to load (onnxruntime.quantization
does exactly that with per-channel on opset 11/12 models).
"""

from __future__ import annotations

import onnx
from onnx import version_converter

from ..errors import UnsupportedModelError

PER_CHANNEL_OPSET = 13
FP8_OPSET = 19
BLOCKWISE_OPSET = 21
OLDEST_CONVERTIBLE_OPSET = 7


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise UnsupportedModelError("model imports no default-domain (ai.onnx) opset")


def ensure_opset(model: onnx.ModelProto, minimum: int) -> tuple[onnx.ModelProto, bool]:
    """Return (model at opset >= minimum, whether it was converted)."""
    current = default_opset(model)
    if current >= minimum:
        return model, False
    if current < OLDEST_CONVERTIBLE_OPSET:
        raise UnsupportedModelError(f"model opset {current} is too old to convert (need >= {OLDEST_CONVERTIBLE_OPSET}; quantization needs {minimum})")
    try:
        converted = version_converter.convert_version(model, minimum)
        onnx.checker.check_model(converted)
    except Exception as error:  # noqa: BLE001 - the converter raises many unrelated types
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnsupportedModelError(f"cannot convert model from opset {current} to {minimum}: {message}") from None
    # The converter drops IR-level fields it does not know about; keep the user's metadata.
    _restore_model_fields(source=model, target=converted)
    return converted, True


def _restore_model_fields(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    if not target.metadata_props and source.metadata_props:
        target.metadata_props.extend(source.metadata_props)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        if not getattr(target, field) and getattr(source, field):
            setattr(target, field, getattr(source, field))
