"""Loading and saving ONNX models without losing anything and without leaving partial files.

Loading accepts a path or a ModelProto (which is copied: the caller's model is never modified),
pulls in external data, and turns every way a file can be wrong into one `ModelLoadError` line.
Saving is atomic: everything is written under temporary names in the target directory and renamed
into place only when complete, with weights moved to an external-data file when the model would
exceed protobuf's 2 GB limit.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError, EncodeError

from ..errors import ModelLoadError

# Protobuf refuses to serialize messages of 2 GiB or more; stay clear of it with some headroom.
PROTOBUF_LIMIT_BYTES = 2**31 - 2**24


def load_model(source: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Return a private copy of the model, external data loaded, or raise ModelLoadError."""
    if isinstance(source, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(source)
        _check_is_model(model, "the given ModelProto")
        return model
    if not isinstance(source, (str, os.PathLike)):
        raise ModelLoadError(f"expected a model path or onnx.ModelProto, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise ModelLoadError(f"model file not found: {path}")
    if not path.is_file():
        raise ModelLoadError(f"model path is not a file: {path}")
    try:
        model = onnx.load_model(str(path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path} is not a readable ONNX model (truncated or corrupt?): {_first_line(error)}") from None
    _check_is_model(model, str(path))
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as error:
        raise ModelLoadError(f"{path}: cannot read its external data: {_first_line(error)}") from None
    return model


def _check_is_model(model: onnx.ModelProto, origin: str) -> None:
    # Arbitrary bytes often parse as an (almost) empty protobuf message, so parsing is not proof.
    if not model.opset_import or len(model.graph.node) == 0:
        raise ModelLoadError(f"{origin} is not an ONNX model (no graph nodes or no opset imports)")


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def needs_external_data(model: onnx.ModelProto) -> bool:
    return model.ByteSize() >= PROTOBUF_LIMIT_BYTES


def serialize_if_small(model: onnx.ModelProto) -> bytes | None:
    """The model's deterministic bytes, or None when it is too large for one protobuf.

    Serializing and looking at the length costs one encoding; asking ByteSize() first and then
    serializing would cost two, which is noticeable on a model of a few hundred MB.
    """
    try:
        data = model.SerializeToString(deterministic=True)
    except (ValueError, EncodeError):  # protobuf refuses messages over 2 GB
        return None
    return data if len(data) < PROTOBUF_LIMIT_BYTES else None


def check_output_path(path: str | os.PathLike) -> Path:
    """Fail early (before any expensive work) when `path` cannot receive a model."""
    path = Path(path)
    if path.is_dir():
        raise ModelLoadError(f"output path is a directory: {path}")
    if not path.parent.is_dir():
        raise ModelLoadError(f"output directory does not exist: {path.parent}")
    return path


def save_model(model: onnx.ModelProto, path: str | os.PathLike, external_data: bool | None = None) -> Path:
    """Write `model` to `path` atomically; weights go to `<name>.data` beside it when needed.

    `external_data=None` decides by size. The serialization is deterministic, so the same model
    always gives the same bytes.
    """
    path = check_output_path(path)
    directory = path.parent
    small = serialize_if_small(model) if external_data is not True else None
    use_external = small is None if external_data is None else external_data
    data_name = path.name + ".data"
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=directory))
    try:
        staged_model = staging / path.name
        if use_external:
            to_write = onnx.ModelProto()
            to_write.CopyFrom(model)  # conversion to external data mutates the proto in place
            onnx.save_model(to_write, str(staged_model), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name, size_threshold=1024)
            if (staging / data_name).exists():  # absent when every tensor is below the size threshold
                os.replace(staging / data_name, directory / data_name)
        else:
            with open(staged_model, "wb") as handle:
                handle.write(small if small is not None else model.SerializeToString(deterministic=True))
        os.replace(staged_model, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def serialize_for_runtime(model: onnx.ModelProto, scratch_dir: str | os.PathLike) -> str | bytes:
    """Bytes ONNX Runtime can load, or a file path when the model is too large for one protobuf."""
    data = serialize_if_small(model)
    if data is not None:
        return data
    target = Path(scratch_dir) / "model.onnx"
    save_model(model, target, external_data=True)
    return str(target)
