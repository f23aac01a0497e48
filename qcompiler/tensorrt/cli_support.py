"""Turning command-line shape options and calibration data into optimization-profile shapes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from ..errors import ConfigError


def parse_shapes(items: tuple[str, ...]) -> dict[str, tuple[tuple[int, ...], ...]]:
    """`name:1x3x640x640` (min = opt = max) or `name:MIN:OPT:MAX` to (min, opt, max) per input."""
    shapes = {}
    for item in items:
        name, *dims = item.rsplit(":", 3) if item.count(":") >= 3 else item.rsplit(":", 1)
        if not name or len(dims) not in (1, 3):
            raise ConfigError(f"expected NAME:DIMS or NAME:MIN:OPT:MAX (dims like 1x3x640x640), got {item!r}")
        try:
            parsed = [tuple(int(d) for d in text.lower().split("x")) for text in dims]
        except ValueError:
            raise ConfigError(f"dims must be integers joined by 'x', got {item!r}") from None
        shapes[name] = tuple(parsed) if len(parsed) == 3 else (parsed[0],) * 3
    return shapes


def sample_shapes(calibration: Path, model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """The first calibration sample's input shapes (a directory of .npz, or one stacked .npz)."""
    path = Path(calibration)
    stacked = path.is_file()
    source = path if stacked else next(iter(sorted(path.glob("*.npz"))), None)
    if source is None:
        raise ConfigError(f"no .npz sample in {path} to take the engine's input shapes from")
    names = {graph_input.name for graph_input in model.graph.input}
    with np.load(source) as arrays:
        return {key: tuple(arrays[key].shape[1:] if stacked else arrays[key].shape) for key in arrays.files if key in names}
