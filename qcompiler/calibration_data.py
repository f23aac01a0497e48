"""Calibration samples: where they come from and whether they fit the model.

Accepted sources:
- a directory of `.npz` files, one sample each, arrays keyed by input name (read in name order);
- one `.npz` file whose arrays have a leading sample axis (`[num_samples, *input_shape]`), or whose
  arrays have exactly the inputs' ranks (then it is a single sample);
- any Python iterable of `{input_name: ndarray}` mappings.
Samples are read lazily, one at a time, so a large data set is never held in memory. Each sample is
checked against the model's inputs (names, dtype, rank, static dims, symbolic dims consistent within
the sample) and every mismatch is one `CalibrationDataError` line naming the sample and input.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
import onnx

from .errors import CalibrationDataError

Sample = Mapping[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]  # int static dim, str symbolic name, None unknown

    def describe(self) -> str:
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"{self.name}: {self.dtype.name}[{dims}]"


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real inputs of the model (graph inputs that are not initializers)."""
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        shape = tuple(dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or None)
                      for dim in tensor_type.shape.dim)
        specs.append(InputSpec(value.name, dtype, shape))
    return specs


class CalibrationSource:
    """A validated, re-iterable stream of samples (each pass over it re-reads the source)."""

    def __init__(self, source: str | os.PathLike | Iterable[Sample], inputs: list[InputSpec]):
        self.inputs = inputs
        self._specs = {spec.name: spec for spec in inputs}
        self._factory, self._count, self._origin = _open(source, inputs)

    def __len__(self) -> int:
        return self._count if self._count is not None else 0

    @property
    def count(self) -> int | None:
        return self._count

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        seen = 0
        for index, sample in enumerate(self._factory()):
            yield self._validated(sample, index)
            seen += 1
        if seen == 0:
            raise CalibrationDataError(f"no calibration samples in {self._origin}")

    def _validated(self, sample: Sample, index: int) -> dict[str, np.ndarray]:
        where = f"calibration sample {index} ({self._origin})"
        if not isinstance(sample, Mapping):
            raise CalibrationDataError(f"{where}: expected a mapping of input name to array, got {type(sample).__name__}")
        missing = [name for name in self._specs if name not in sample]
        unknown = [name for name in sample if name not in self._specs]
        if missing or unknown:
            expected = ", ".join(spec.describe() for spec in self.inputs)
            problems = []
            if missing:
                problems.append(f"missing input(s) {missing}")
            if unknown:
                problems.append(f"unknown input(s) {unknown}")
            raise CalibrationDataError(f"{where}: {'; '.join(problems)}; the model expects {expected}")
        checked: dict[str, np.ndarray] = {}
        symbols: dict[str, tuple[str, int]] = {}
        for name, spec in self._specs.items():
            array = np.asarray(sample[name])
            checked[name] = _checked_array(array, spec, where, symbols)
        return checked


def _checked_array(array: np.ndarray, spec: InputSpec, where: str, symbols: dict[str, tuple[str, int]]) -> np.ndarray:
    if array.dtype != spec.dtype:
        same_kind = array.dtype.kind == spec.dtype.kind or (array.dtype.kind in "iu" and spec.dtype.kind in "iu")
        if not same_kind:
            raise CalibrationDataError(f"{where}: input '{spec.name}' has dtype {array.dtype.name}, the model expects {spec.dtype.name}")
        array = array.astype(spec.dtype)
    if spec.shape and array.ndim != len(spec.shape):
        raise CalibrationDataError(f"{where}: input '{spec.name}' has shape {list(array.shape)} (rank {array.ndim}), "
                                   f"the model expects rank {len(spec.shape)}: {spec.describe()}")
    for axis, (expected, actual) in enumerate(zip(spec.shape, array.shape)):
        if isinstance(expected, int) and expected > 0 and expected != actual:
            raise CalibrationDataError(f"{where}: input '{spec.name}' has shape {list(array.shape)}, "
                                       f"the model expects {spec.describe()} (dim {axis} must be {expected})")
        if isinstance(expected, str):
            previous = symbols.setdefault(expected, (spec.name, actual))
            if previous[1] != actual:
                raise CalibrationDataError(f"{where}: dim '{expected}' is {actual} in '{spec.name}' but {previous[1]} in '{previous[0]}'")
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise CalibrationDataError(f"{where}: input '{spec.name}' contains NaN or Inf")
    return np.ascontiguousarray(array)


def _open(source, inputs: list[InputSpec]) -> tuple:
    """(factory returning a fresh iterator of raw samples, sample count or None, description)."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise CalibrationDataError(f"calibration data not found: {path}")
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix == ".npz")
            if not files:
                raise CalibrationDataError(f"no .npz files in calibration directory {path}")
            return (lambda: (_read_npz(f) for f in files)), len(files), str(path)
        if path.suffix != ".npz":
            raise CalibrationDataError(f"calibration data must be a directory of .npz files or one .npz file, got {path}")
        return _open_stacked(path, inputs)
    if isinstance(source, Mapping):
        raise CalibrationDataError("calibration data is a single mapping; pass an iterable of samples (e.g. [sample])")
    if isinstance(source, Iterable):
        if isinstance(source, Iterator):
            # A one-shot iterator can be read only once; that is all calibration needs.
            consumed = []
            def once():
                if consumed:
                    raise CalibrationDataError("calibration data iterator was already consumed; pass a list or a re-iterable")
                consumed.append(True)
                return source
            return once, None, "the given iterator"
        count = len(source) if hasattr(source, "__len__") else None
        return (lambda: iter(source)), count, "the given samples"
    raise CalibrationDataError(f"unsupported calibration data of type {type(source).__name__}")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise CalibrationDataError(f"cannot read calibration file {path}: {str(error).splitlines()[0] if str(error) else type(error).__name__}") from None


def _open_stacked(path: Path, inputs: list[InputSpec]) -> tuple:
    arrays = _read_npz(path)
    if not arrays:
        raise CalibrationDataError(f"calibration file {path} holds no arrays")
    ranks = {spec.name: len(spec.shape) for spec in inputs}
    if all(name in ranks and array.ndim == ranks[name] for name, array in arrays.items()):
        return (lambda: iter([arrays])), 1, str(path)
    lengths = {name: array.shape[0] if array.ndim else 0 for name, array in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise CalibrationDataError(f"calibration file {path}: arrays disagree on the number of samples {lengths}")
    count = next(iter(lengths.values()))
    return (lambda: ({name: array[index] for name, array in arrays.items()} for index in range(count))), count, str(path)
