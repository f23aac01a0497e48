"""The calibration stage: run the float model on calibration samples and stream the values of the
requested tensors into calibrators.

This is the only stage that runs ONNX Runtime. The requested tensors are exposed as extra graph
outputs, a few samples run at a time, and each output array is handed to its calibrators and then
dropped, so memory holds a few samples' activations (threads + 1), never the whole data set's.

Speed (the target is calibration within 1.3x of plain inference over the same samples): weights
go to ONNX Runtime as arrays rather than serialized bytes; decomposed hard swish runs as two ops
instead of four, a constant scale and shift after a Conv are folded into it, and a Softmax off the
last axis runs as five plain ops (`runtime_rewrites`, on the calibration session's copy only); with
several threads, samples run side by side, one ONNX Runtime thread each, instead of one sample over
all threads (on 2 cores, two one-thread runs took 0.81-0.96 of the time of one two-thread run on
the real models, and the calibrator updates fill the gaps). Calibrators whose updates commute
(`updates_commute`: min-max, the histograms, channel abs-max) are fed by the thread that ran the
sample, as soon as its run ends, instead of waiting for the calling thread to reach that sample:
1-3% off the stage on ocr-det (A/B in one process), and those outputs are dropped sooner. The
others (moving-average min-max, row samples) are fed on the calling thread, in sample order.
Either way, ranges never depend on timing.
A pool for the updates next to one many-thread run was measured slower: it lost more to ONNX
Runtime's spinning threads than it gained, and turning spinning off slowed every run more.
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

from .calibrators.base import Calibrator, NonFiniteValuesError, Range
from .errors import CalibrationError
from .ir import serialize_for_runtime
from .ir.graph import IN_MEMORY_LOCATION
from .runtime_rewrites import RUNTIME_REWRITES, delete_in_place

ProgressCallback = Callable[[int], None]


def expose_tensors(model: onnx.ModelProto, tensor_names: Iterable[str], copy: bool = True) -> onnx.ModelProto:
    """`model` (a copy of it unless `copy=False`) whose graph outputs also include `tensor_names`.

    An output whose type the model does not state (`Graph.to_runtime_model` writes no value_info)
    is left untyped: ONNX Runtime infers it."""
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
    nodes = model.graph.node
    dropped = []
    for index in range(len(nodes) - 1, -1, -1):
        node = nodes[index]
        if any(name in needed for name in node.output):
            needed.update(_names_read(node))
        else:
            dropped.append(index)
    delete_in_place(nodes, dropped)
    initializers = model.graph.initializer
    delete_in_place(initializers, [index for index in range(len(initializers) - 1, -1, -1)
                                    if initializers[index].name not in needed])
    return {tensor.name for tensor in initializers}


def _names_read(node: onnx.NodeProto) -> set[str]:
    """Tensor names `node` reads, including those its subgraphs (If/Loop/Scan bodies) read."""
    return {name for name in node.input if name} | _subgraph_reads(node)


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    names: set[str] = set()
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
    (`Graph.to_runtime_model`). `seconds`, if given, gains the wall time of the "prepare", "session",
    "samples" and "release" (session teardown) phases. Returns the number of samples seen. NaN in
    an activation is an error naming the tensor; +-Inf values count as the tensor's finite extremes
    (saturating int8 clips them to the range edge anyway; attention masks built from float min are
    the usual source).
    """
    names = list(dict.fromkeys(name for name, _ in observers))
    if not names:
        return 0
    feeds = {name: TensorFeed(name) for name in names}
    for name, calibrator in observers:
        feeds[name].add(calibrator)
    side_by_side = worker_count(threads)
    clock = PhaseClock(seconds)
    with tempfile.TemporaryDirectory(prefix="qcompiler-calib-") as scratch:
        exposed = expose_tensors(model, names, copy=not owns_model)
        kept = keep_only_outputs(exposed, names)
        observed = set(names)
        for rewrite in RUNTIME_REWRITES:
            rewrite(exposed, observed)
        weights = {name: value for name, value in (weights or {}).items() if name in kept}
        clock.lap("prepare")
        session = runtime_session(exposed, weights, 1 if side_by_side > 1 else threads, scratch)
        clock.lap("session")
        in_order = [feed for feed in feeds.values() if feed.in_order]
        count = 0
        for index, values in _run_samples(session, list(feeds.values()), samples, side_by_side):
            for feed, array in zip(in_order, values):
                feed.update_in_order(array, index)
            del values
            count += 1
            if progress is not None:
                progress(count)
        clock.lap("samples")
        del session  # its memory (arena, pre-packed weights) goes now, timed as part of the stage
        clock.lap("release")
        return count


class TensorFeed:
    """The calibrators of one tensor, split by whether their updates commute (see
    `Calibrator.updates_commute`): those are fed by any thread, one update at a time (`lock`); the
    others only in sample order, by the calling thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.any_order: list[Calibrator] = []
        self.in_order: list[Calibrator] = []
        self.lock = threading.Lock()

    def add(self, calibrator: Calibrator) -> None:
        (self.any_order if getattr(calibrator, "updates_commute", False) else self.in_order).append(calibrator)

    def update_any_order(self, array: np.ndarray, sample_index: int) -> None:
        if self.any_order:
            with self.lock:
                _update(self.name, self.any_order, array, sample_index)

    def update_in_order(self, array: np.ndarray, sample_index: int) -> None:
        _update(self.name, self.in_order, array, sample_index)


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


def _run_samples(session: ort.InferenceSession, feeds: list[TensorFeed], samples: Iterable[Mapping[str, np.ndarray]],
                 side_by_side: int) -> Iterator[tuple[int, list[np.ndarray]]]:
    """Runs every sample, with up to `side_by_side` at once, and feeds each output to the
    calibrators that take any order as soon as its run ends; yields (sample index, the outputs of
    the tensors with in-order calibrators) in sample order. At most `side_by_side + 1` samples'
    outputs are alive, whatever the number of samples; an error is raised for the first failing
    sample in sample order."""
    names = [feed.name for feed in feeds]

    def run(index: int, sample: Mapping[str, np.ndarray]) -> tuple[int, list[np.ndarray]]:
        try:
            values = session.run(names, dict(sample))
        except Exception as error:  # noqa: BLE001 - ORT raises its own exception types
            raise CalibrationError(f"calibration sample {index} failed to run: {_first_line(error)}") from None
        for feed, array in zip(feeds, values):
            feed.update_any_order(array, index)
        return index, [array for feed, array in zip(feeds, values) if feed.in_order]

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
    (`Graph.to_runtime_model`); `scratch` holds the file of a model too large for one protobuf.

    ONNX Runtime (1.32) copies every array given by `add_external_initializers` into the session;
    `add_initializer` uses the array in place, but then graph optimizations cannot read its values
    (a Conv weight given so fails the NCHWc and fusion passes). So arrays that no optimization reads
    (`_runtime_only_weights`: tables a Gather indexes with run-time indices, the embeddings of
    transformers) go in place: MiniLM's session took 47 instead of 65 ms without its 47 MB copy.
    Should a future ONNX Runtime read one of them anyway, the session is built again with copies.
    """
    names = list(weights)
    values = {name: ort.OrtValue.ortvalue_from_numpy(weights[name]) for name in names}
    in_place = _runtime_only_weights(model, names)
    source = serialize_for_runtime(model, scratch)
    attempts = [in_place, set()] if in_place else [set()]
    for attempt in attempts:
        try:
            session = _session(source, values, attempt, threads, scratch)
            break
        except Exception as error:  # noqa: BLE001 - ORT raises its own exception types
            if attempt is attempts[-1]:
                raise CalibrationError(f"ONNX Runtime cannot load the model for calibration: {_first_line(error)}") from None
    # ONNX Runtime may read the arrays in place: they and their OrtValues live as long as the session.
    session.qcompiler_weights = (weights, values)
    return session


def _session(source: str | bytes, values: Mapping[str, ort.OrtValue], in_place: set[str], threads: int,
             scratch: str) -> ort.InferenceSession:
    options = session_options(threads)
    copied = [name for name in values if name not in in_place]
    if copied:
        options.add_external_initializers(copied, [values[name] for name in copied])
    if in_place:
        # ONNX Runtime checks that the placeholders' external data file exists, though it never reads
        # an initializer given in place.
        open(os.path.join(scratch, IN_MEMORY_LOCATION), "wb").close()
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", scratch)
        for name in sorted(in_place):
            options.add_initializer(name, values[name])
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _runtime_only_weights(model: onnx.ModelProto, names: Iterable[str]) -> set[str]:
    """The `names` whose every reader is a top-level Gather taking them as its data and indices that
    are not constant, so no graph optimization (constant folding included) reads their values."""
    graph = model.graph
    constants = {tensor.name for tensor in graph.initializer}
    constants.update(output for node in graph.node if node.op_type == "Constant" for output in node.output)
    readers: dict[str, list[bool]] = {}
    for node in graph.node:
        gathers_at_run_time = (node.op_type == "Gather" and node.domain in ("", "ai.onnx")
                               and len(node.input) == 2 and node.input[1] not in constants)
        for position, name in enumerate(node.input):
            readers.setdefault(name, []).append(gathers_at_run_time and position == 0)
        for name in _subgraph_reads(node):
            readers.setdefault(name, []).append(False)
    return {name for name in names if readers.get(name) and all(readers[name])}


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


def compute_ranges(calibrators: Mapping[str, Calibrator], threads: int = 1) -> dict[str, Range]:
    """Each calibrator's range. The searches of calibrators with `search_releases_gil` (MSE and KL
    with the compiled kernels: C without the GIL) are split over `worker_count(threads)` threads,
    which took 0.55-0.7 of one thread's time on ocr-det and yolo; the others (short numpy calls
    that hold the GIL, slower on two threads than on one) run on the calling thread meanwhile.
    """
    names = list(calibrators)
    in_parallel = [name for name in names if getattr(calibrators[name], "search_releases_gil", False)]
    workers = min(worker_count(threads), len(in_parallel))
    if workers <= 1:
        in_parallel = []
    parallel_names = set(in_parallel)
    in_turn = [name for name in names if name not in parallel_names]
    found: dict[str, Range | ValueError] = {}
    with ThreadPoolExecutor(max(workers, 1), thread_name_prefix="qcompiler-ranges") as pool:
        parts = pool.map(partial(_ranges_of, calibrators), [in_parallel[index::workers] for index in range(workers)])
        found.update(_ranges_of(calibrators, in_turn))
        for part in parts:
            found.update(part)
    for name in names:  # the first failing tensor in order is named, however the work was split
        if isinstance(found[name], ValueError):
            raise CalibrationError(f"activation '{name}': {found[name]}")
    return {name: found[name] for name in names}


def _ranges_of(calibrators: Mapping[str, Calibrator], names: list[str]) -> dict[str, Range | ValueError]:
    found: dict[str, Range | ValueError] = {}
    for name in names:
        try:
            found[name] = calibrators[name].compute_range()
        except ValueError as error:
            found[name] = error
    return found


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
