"""The calibration stage: run the float model on calibration samples and stream the values of the
requested tensors into calibrators.

This is the only stage that runs ONNX Runtime. The requested tensors are exposed as extra graph
outputs, a few samples run at a time, and each output array is handed to its calibrator and then
dropped, so memory holds a few samples' activations (threads + 1), never the whole data set's.

Speed (the target is calibration within 1.3x of plain inference over the same samples): weights
go to ONNX Runtime as arrays rather than serialized bytes; with several threads, samples run side
by side, one ONNX Runtime thread each, instead of one sample over all threads (on 2 cores, two
one-thread runs took 0.81-0.96 of the time of one two-thread run on the real models, and the
calibrator updates fill the gaps). The per-sample updates stay on the calling thread, in sample
order, so ranges never depend on timing.
A pool for the updates next to one many-thread run was measured slower: it lost more to ONNX
Runtime's spinning threads than it gained, and turning spinning off slowed every run more.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .calibrators.base import Calibrator, NonFiniteValuesError, Range
from .errors import CalibrationError
from .ir import serialize_for_runtime

ProgressCallback = Callable[[int], None]


def expose_tensors(model: onnx.ModelProto, tensor_names: Iterable[str], copy: bool = True) -> onnx.ModelProto:
    """`model` (a copy of it unless `copy=False`) whose graph outputs also include `tensor_names`."""
    exposed = model
    if copy:
        exposed = onnx.ModelProto()
        exposed.CopyFrom(model)
    existing = {output.name for output in exposed.graph.output}
    known_types = {info.name: info.type for info in list(exposed.graph.value_info) + list(exposed.graph.input)}
    for name in tensor_names:
        if name in existing:
            continue
        output = exposed.graph.output.add()
        output.name = name
        if name in known_types:
            output.type.CopyFrom(known_types[name])
        else:
            output.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
    return exposed


def keep_only_outputs(model: onnx.ModelProto, tensor_names: Iterable[str]) -> set[str]:
    """Make `tensor_names` (already graph outputs) the only outputs of `model`, in place, and drop
    the nodes and initializers none of them depends on; returns the kept initializers' names.

    ONNX Runtime runs every node of a graph whatever outputs are fetched, so the work after the
    last calibrated tensor (a transformer's last projection and LayerNorm, a detector's box
    decoding) would be paid on every calibration sample: 2-3% of a run on ocr-det and yolo.
    Graph inputs stay, so every sample still feeds. A node with subgraphs keeps what they read.
    """
    wanted = list(dict.fromkeys(tensor_names))
    outputs = {output.name: output for output in model.graph.output}
    kept_outputs = [outputs[name] for name in wanted]
    del model.graph.output[:]
    model.graph.output.extend(kept_outputs)
    needed = set(wanted)
    kept_nodes = []
    for node in reversed(model.graph.node):
        if any(name in needed for name in node.output):
            kept_nodes.append(node)
            needed.update(_names_read(node))
    del model.graph.node[:]
    model.graph.node.extend(reversed(kept_nodes))
    kept_initializers = [tensor for tensor in model.graph.initializer if tensor.name in needed]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept_initializers)
    return {tensor.name for tensor in kept_initializers}


def _names_read(node: onnx.NodeProto) -> set[str]:
    """Tensor names `node` reads, including those its subgraphs (If/Loop/Scan bodies) read."""
    names = {name for name in node.input if name}
    for attribute in node.attribute:
        for subgraph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else list(attribute.graphs):
            for inner in subgraph.node:
                names.update(_names_read(inner))
    return names


def session_options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


def worker_count(threads: int) -> int:
    """Python-side workers for `threads` (0: one per core, as ONNX Runtime uses)."""
    return threads if threads > 0 else (os.cpu_count() or 1)


def collect_statistics(model: onnx.ModelProto, observers: Sequence[tuple[str, Calibrator]],
                       samples: Iterable[Mapping[str, np.ndarray]], threads: int = 0,
                       progress: ProgressCallback | None = None, owns_model: bool = False,
                       weights: Mapping[str, np.ndarray] | None = None,
                       seconds: dict[str, float] | None = None) -> int:
    """Feed every sample through the model, updating each (tensor name, calibrator) observer; a
    tensor may have several observers (e.g. a range and per-channel abs-max statistics).

    `owns_model=True` lets the stage add the outputs to `model` itself instead of a copy (it must
    not be used afterwards). `weights`: values of the initializers `model` declares as external
    (`Graph.to_runtime_model`). `seconds`, if given, gains the wall time of the "prepare", "session"
    and "samples" phases. Returns the number of samples seen. NaN in an activation is an
    error naming the tensor; +-Inf values count as the tensor's finite extremes (saturating int8
    clips them to the range edge anyway; attention masks built from float min are the usual source).
    """
    names = list(dict.fromkeys(name for name, _ in observers))
    if not names:
        return 0
    by_tensor: dict[str, list[Calibrator]] = {name: [] for name in names}
    for name, calibrator in observers:
        by_tensor[name].append(calibrator)
    side_by_side = worker_count(threads)
    clock = PhaseClock(seconds)
    with tempfile.TemporaryDirectory(prefix="qcompiler-calib-") as scratch:
        exposed = expose_tensors(model, names, copy=not owns_model)
        kept = keep_only_outputs(exposed, names)
        weights = {name: value for name, value in (weights or {}).items() if name in kept}
        clock.lap("prepare")
        session = runtime_session(exposed, weights, 1 if side_by_side > 1 else threads, scratch)
        clock.lap("session")
        count = 0
        for index, values in _outputs_in_sample_order(session, names, samples, side_by_side):
            for name, array in zip(names, values):
                _update(name, by_tensor[name], array, index)
            del values
            count += 1
            if progress is not None:
                progress(count)
        clock.lap("samples")
        return count


class PhaseClock:
    """Adds the wall time since the previous lap (or creation) to `seconds[phase]`; no-op on None."""

    def __init__(self, seconds: dict[str, float] | None) -> None:
        self.seconds = seconds
        self._last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        if self.seconds is not None:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + now - self._last
        self._last = now

    def skip(self) -> None:
        """Start the next lap now, without counting the time since the last one."""
        self._last = time.perf_counter()


def _outputs_in_sample_order(session: ort.InferenceSession, names: list[str], samples: Iterable[Mapping[str, np.ndarray]],
                             side_by_side: int) -> Iterator[tuple[int, list[np.ndarray]]]:
    """(sample index, outputs) for every sample, in order, with up to `side_by_side` samples running
    at once; at most `side_by_side + 1` samples' outputs are alive, whatever the number of samples."""
    def run(index: int, sample: Mapping[str, np.ndarray]) -> tuple[int, list[np.ndarray]]:
        try:
            return index, session.run(names, dict(sample))
        except Exception as error:  # noqa: BLE001 - ORT raises its own exception types
            raise CalibrationError(f"calibration sample {index} failed to run: {_first_line(error)}") from None

    if side_by_side <= 1:
        for index, sample in enumerate(samples):
            yield run(index, sample)
        return
    pool = ThreadPoolExecutor(side_by_side, thread_name_prefix="qcompiler-calib")
    try:
        running: deque = deque()
        for index, sample in enumerate(samples):
            running.append(pool.submit(run, index, sample))
            if len(running) > side_by_side:
                yield running.popleft().result()
        while running:
            yield running.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def runtime_session(model: onnx.ModelProto, weights: Mapping[str, np.ndarray], threads: int,
                    scratch: str) -> ort.InferenceSession:
    """An ONNX Runtime session of the float `model`, whose external initializers are `weights`
    (`Graph.to_runtime_model`); `scratch` holds the file of a model too large for one protobuf."""
    options = session_options(threads)
    names = list(weights)
    values = [ort.OrtValue.ortvalue_from_numpy(weights[name]) for name in names]
    if values:
        options.add_external_initializers(names, values)
    try:
        session = ort.InferenceSession(serialize_for_runtime(model, scratch), options, providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - ORT raises its own exception types
        raise CalibrationError(f"ONNX Runtime cannot load the model for calibration: {_first_line(error)}") from None
    # ONNX Runtime may read the arrays in place: they and their OrtValues live as long as the session.
    session.qcompiler_weights = (weights, values)
    return session


def _update(name: str, calibrators: list[Calibrator], array: np.ndarray, sample_index: int) -> None:
    for calibrator in calibrators:
        try:
            calibrator.update(array)
        except NonFiniteValuesError:
            # Rare, so checked only when a calibrator trips over it: no extra pass per tensor.
            array = _clip_infinities(name, sample_index, array)
            calibrator.update(array)


def _clip_infinities(name: str, sample_index: int, array: np.ndarray) -> np.ndarray:
    """NaN is an error naming the tensor; +-inf become the finite extremes of the same array, which
    leaves min-max ranges as if they were dropped and keeps the shape per-channel statistics need."""
    if np.isnan(array).any():
        raise CalibrationError(f"activation '{name}' has NaN values on calibration sample {sample_index}")
    finite = array[np.isfinite(array)]
    if finite.size == 0:
        raise CalibrationError(f"activation '{name}' is infinite everywhere on calibration sample {sample_index}")
    return np.clip(array, finite.min(), finite.max())


def compute_ranges(calibrators: Mapping[str, Calibrator]) -> dict[str, Range]:
    """Each calibrator's range, one tensor after another.

    Not in a thread pool: the searches are many numpy calls on cache-sized blocks, and two threads
    took 1.2-2x the time of one (MiniLM and yolo, MSE and KL), losing to the GIL and to page faults.
    """
    ranges = {}
    for name, calibrator in calibrators.items():
        try:
            ranges[name] = calibrator.compute_range()
        except ValueError as error:
            raise CalibrationError(f"activation '{name}': {error}") from None
    return ranges


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
