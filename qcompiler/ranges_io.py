"""Saving and loading calibrated ranges: qcompiler's JSON file and TensorRT's calibration cache.

JSON (`qcompiler calibrate -o ranges.json`, read back by `qcompiler compile --ranges`):
    {"format": "qcompiler-ranges", "version": 1, "calibrator": "kl", "samples": 64,
     "ranges": {"tensor name": [low, high], ...}}
Floats are written with Python's shortest round-trip repr, so loading gives the exact same values.

TensorRT calibration cache (implicit quantization; `trtexec --calib`): a header line such as
`TRT-8601-EntropyCalibration2`, then `tensor: XXXXXXXX` per tensor, the hex digits being the
big-endian IEEE-754 float32 bits of scale = amax / 127 (TensorRT INT8 is symmetric). TensorRT
ignores a cache whose header does not match its version and algorithm, hence `header`.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Mapping

import numpy as np

from .calibrators.base import Range
from .errors import CalibrationDataError
from .ir.model_io import check_output_path

JSON_FORMAT = "qcompiler-ranges"
DEFAULT_TENSORRT_HEADER = "TRT-8601-EntropyCalibration2"


def write_ranges_json(ranges: Mapping[str, Range], path: str | os.PathLike, calibrator: str = "", samples: int = 0) -> Path:
    document = {"format": JSON_FORMAT, "version": 1, "calibrator": calibrator, "samples": samples,
                "ranges": {name: [float(r.low), float(r.high)] for name, r in sorted(ranges.items())}}
    return _write_text_atomically(path, json.dumps(document, indent=1) + "\n")


def write_tensorrt_cache(ranges: Mapping[str, Range], path: str | os.PathLike, header: str = DEFAULT_TENSORRT_HEADER) -> Path:
    lines = [header]
    for name, value_range in sorted(ranges.items()):
        amax = float(np.max(value_range.abs_max))
        scale = np.float32(amax / 127.0) if amax > 0 else np.float32(1.0)  # TensorRT rejects scale 0
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    return _write_text_atomically(path, "\n".join(lines) + "\n")


def read_ranges(path: str | os.PathLike) -> dict[str, Range]:
    """Ranges from a qcompiler JSON file or a TensorRT calibration cache (detected by content)."""
    path = Path(path)
    if not path.is_file():
        raise CalibrationDataError(f"ranges file not found: {path}")
    text = path.read_text(errors="replace")
    if text.lstrip().startswith("{"):
        return _parse_json(text, path)
    if text.startswith("TRT-"):
        return _parse_tensorrt_cache(text, path)
    raise CalibrationDataError(f"{path} is neither a qcompiler ranges JSON nor a TensorRT calibration cache")


def _parse_json(text: str, path: Path) -> dict[str, Range]:
    try:
        document = json.loads(text)
        if document.get("format") != JSON_FORMAT:
            raise ValueError(f"format is {document.get('format')!r}, expected {JSON_FORMAT!r}")
        ranges = {}
        for name, (low, high) in document["ranges"].items():
            if not (np.isfinite(low) and np.isfinite(high) and low <= high):
                raise ValueError(f"tensor {name!r} has an invalid range [{low}, {high}]")
            ranges[name] = Range(float(low), float(high))
        return ranges
    except (ValueError, KeyError, TypeError) as error:
        raise CalibrationDataError(f"cannot read ranges from {path}: {error}") from None


def _parse_tensorrt_cache(text: str, path: Path) -> dict[str, Range]:
    ranges = {}
    for number, line in enumerate(text.splitlines()[1:], start=2):
        if not line.strip():
            continue
        name, separator, hex_bits = line.rpartition(":")
        try:
            if not separator:
                raise ValueError("expected 'tensor: hexbits'")
            scale = struct.unpack(">f", bytes.fromhex(hex_bits.strip()))[0]
            if not np.isfinite(scale) or scale < 0:
                raise ValueError(f"scale {scale} is not a finite non-negative number")
        except ValueError as error:
            raise CalibrationDataError(f"{path} line {number}: {error}") from None
        amax = float(np.float32(scale) * np.float32(127.0))
        ranges[name.strip()] = Range(-amax, amax)
    return ranges


def _write_text_atomically(path: str | os.PathLike, text: str) -> Path:
    path = check_output_path(path)
    staging = path.with_name(f".{path.name}.partial")
    staging.write_text(text)
    os.replace(staging, path)
    return path
