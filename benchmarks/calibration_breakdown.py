"""Where calibration time goes, phase by phase, next to plain fp32 inference over the same samples.

Issue 3 asks for calibration within 1.3x of plain fp32 inference. This splits both sides:
- fp32: creating a 2-thread ONNX Runtime session, running every sample, releasing the session;
- ours, per calibrator, as compile runs it (`CompileSummary.calibration_seconds`): prepare (graph
  export, calibrated tensors exposed as outputs), session, samples (runs + statistics), release
  (session and runtime copy freed), ranges;
- ours with outputs exposed but no statistics at all ("exposed only"): the floor that the
  statistics add to;
- ours with each tensor's min and max computed inside the graph (ReduceMin/ReduceMax, only the
  scalars are outputs: "min/max in graph"), the alternative to exposing tensors for min-max, and
  the same with a ReduceSum per tensor, which NaN detection would need there.
Medians over interleaved repetitions (ms), and each total as a ratio to the fp32 total of the same
repetition. Writes benchmarks/results/calibration_breakdown.md (+ .json).

    python benchmarks/calibration_breakdown.py [--models ocr-rec yolo] [--calib 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from statistics import median

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qcompiler  # noqa: E402
from calibration import OURS, THREADS, calibrate_ours, fp32_phases  # noqa: E402
from harness import RESULTS_DIR  # noqa: E402
from qcompiler.calibration import PhaseClock, collect_statistics  # noqa: E402
from qcompiler.calibrators import MinMaxCalibrator  # noqa: E402
from qcompiler.cpu import cpu_model_name  # noqa: E402
from qcompiler.ir import Graph, ensure_opset, infer_shapes, load_model  # noqa: E402
from qcompiler.passes.quantizable import activation_tensors  # noqa: E402
from qcompiler.zoo.data import calibration_samples  # noqa: E402
from qcompiler.zoo.models import MODEL_IDS, fetch_model  # noqa: E402

PHASES = ("prepare", "session", "samples", "release", "ranges")
EXPOSED_ONLY = "exposed only"
IN_GRAPH = "min/max in graph"
IN_GRAPH_NAN = "min/max + NaN check in graph"
IN_GRAPH_REDUCTIONS = {IN_GRAPH: ("ReduceMin", "ReduceMax"), IN_GRAPH_NAN: ("ReduceMin", "ReduceMax", "ReduceSum")}


class NoStatistics:
    """A calibrator that looks at nothing: what running the exposed model costs by itself."""

    name = "none"

    def update(self, values: np.ndarray) -> None:
        pass


def stage_phases(model_path: Path, samples, observe) -> dict[str, float]:
    """The calibration stage's steps on the tensors compile calibrates, where `observe(model, names)`
    (timed as part of "prepare") may add nodes to the runtime model and returns the observers."""
    graph = Graph(infer_shapes(ensure_opset(load_model(model_path), 13)[0]))
    names = activation_tensors(graph, qcompiler.QuantConfig(calibration_threads=THREADS))
    seconds: dict[str, float] = {}
    clock = PhaseClock(seconds)
    model, weights = graph.to_runtime_model()
    observers = observe(model, names)
    clock.lap("prepare")
    collect_statistics(model, observers, samples, THREADS, owns_model=True, weights=weights, seconds=seconds)
    clock.skip()
    del model, weights  # as the calibration stage does, timed as part of "release"
    clock.lap("release")
    return seconds


def exposed_only_phases(model_path: Path, samples) -> dict[str, float]:
    """Every calibrated tensor exposed, a calibrator that does nothing with it."""
    return stage_phases(model_path, samples, lambda model, names: [(name, NoStatistics()) for name in names])


def in_graph_phases(model_path: Path, samples, reductions: tuple[str, ...]) -> dict[str, float]:
    """Min-max ranges from reduction nodes added after each tensor, nothing else exposed. With
    ReduceSum, a NaN would reach the sum (ReduceMin/ReduceMax ignore it): the check numpy's
    min/max get for free."""
    def observe(model, names):
        scalars = []
        for index, name in enumerate(names):
            for op in reductions:
                scalars.append(f"qcompiler_{op}_{index}")
                model.graph.node.append(onnx.helper.make_node(op, [name], [scalars[-1]], keepdims=0))
        return [(name, MinMaxCalibrator()) for name in scalars]

    return stage_phases(model_path, samples, observe)


def reductions_drop_nan() -> list[str]:
    """The ONNX Runtime reductions that return a non-NaN result for a tensor holding one NaN (not
    in its first element): why "min/max in graph" needs the ReduceSum to keep NaN an error."""
    dropping = []
    for op in ("ReduceMin", "ReduceMax"):
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node(op, ["x"], ["y"], keepdims=0)], "reduce",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 16, 33, 35])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [])])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        values = np.random.default_rng(0).standard_normal((1, 16, 33, 35)).astype(np.float32)
        values.reshape(-1)[1000] = np.nan
        if not np.isnan(session.run(None, {"x": values})[0]):
            dropping.append(op)
    return dropping


def breakdown(model_id: str, calib_count: int, repeats: int) -> list[dict]:
    model_path = fetch_model(model_id)
    samples = calibration_samples(model_id, calib_count)
    methods = (EXPOSED_ONLY, *IN_GRAPH_REDUCTIONS, *OURS)
    fp32_runs: list[dict[str, float]] = []
    ours_runs: dict[str, list[dict[str, float]]] = {method: [] for method in methods}
    exposed_only_phases(model_path, samples[:2])  # warm-up: first-call imports and caches stay out of the table
    fp32_phases(model_path, samples[:2])
    for repeat in range(repeats):  # interleaved, alternating which side runs first
        for method in methods:
            first_fp32 = repeat % 2 == 0
            if first_fp32:
                fp32_runs.append(fp32_phases(model_path, samples))
            if method == EXPOSED_ONLY:
                ours_runs[method].append(exposed_only_phases(model_path, samples))
            elif method in IN_GRAPH_REDUCTIONS:
                ours_runs[method].append(in_graph_phases(model_path, samples, IN_GRAPH_REDUCTIONS[method]))
            else:
                ours_runs[method].append(dict(calibrate_ours(model_path, samples, method)[1].summary.calibration_seconds))
            if not first_fp32:
                fp32_runs.append(fp32_phases(model_path, samples))
    fp32_totals = [sum(run.values()) for run in fp32_runs]
    rows = [{"model": model_id, "side": "fp32 inference", **_medians(fp32_runs, ("session", "samples", "release")),
             "total_ms": 1e3 * median(fp32_totals), "ratio": 1.0, "ratio_range": [1.0, 1.0],
             "ratio_to_fastest": median(fp32_totals) / min(fp32_totals)}]
    for index, method in enumerate(methods):
        runs = ours_runs[method]
        # each repetition of a method was paired with its own fp32 run: ratios within a pair
        paired = fp32_totals[index::len(methods)]
        ratios = [sum(run.values()) / baseline for run, baseline in zip(runs, paired)]
        rows.append({"model": model_id, "side": method, **_medians(runs, PHASES),
                     "total_ms": 1e3 * median(sum(run.values()) for run in runs),
                     "ratio": median(ratios), "ratio_range": [min(ratios), max(ratios)],
                     "ratio_to_fastest": median(sum(run.values()) for run in runs) / min(fp32_totals)})
    return rows


def _medians(runs: list[dict[str, float]], phases) -> dict[str, float]:
    return {f"{phase}_ms": 1e3 * median(run.get(phase, 0.0) for run in runs) for phase in phases}


def write_results(rows: list[dict], arguments) -> None:
    load = os.getloadavg()[0]
    lines = ["# Calibration time, phase by phase, vs plain fp32 inference", "",
             f"{arguments.calib} calibration samples, {THREADS} threads, median of {arguments.repeats} interleaved "
             f"repetitions (ms); machine: {cpu_model_name()}, {os.cpu_count()} logical CPUs, load average "
             f"{load:.2f} at the end; onnxruntime {ort.__version__}; {time.strftime('%Y-%m-%d')}.", "",
             "| model | run | prepare | session | samples | release | ranges | total | total / fp32 (min-max) | total / fastest fp32 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        cells = [f"{row[f'{phase}_ms']:.0f}" if f"{phase}_ms" in row else "" for phase in PHASES]
        lines.append(f"| {row['model']} | {row['side']} | " + " | ".join(cells)
                     + f" | {row['total_ms']:.0f} | {row['ratio']:.2f} ({row['ratio_range'][0]:.2f}-{row['ratio_range'][1]:.2f})"
                     + f" | {row['ratio_to_fastest']:.2f} |")
    lines += ["", "'total / fp32': the median of each repetition's total over the fp32 total of the same repetition. "
              "'total / fastest fp32': the median total over the fastest fp32 total of all repetitions, the "
              "conservative figure: the two-thread fp32 run is the noisier side on this shared machine (its threads "
              "meet at every operator, so a busy neighbour on either core slows it, at times to 1.6x).",
              "", f"'{EXPOSED_ONLY}': the calibration stage with every calibrated tensor exposed but no statistics "
              "taken; the calibrators' rows add their statistics (samples) and their range searches (ranges) to it. "
              f"'{IN_GRAPH}': min-max ranges from ReduceMin/ReduceMax nodes after each tensor, only their scalars "
              f"exposed (compare with minmax); '{IN_GRAPH_NAN}' adds a ReduceSum per tensor, which a NaN would reach.",
              "", "ONNX Runtime reductions that ignore a NaN (one NaN at element 1000 of a [1,16,33,35] tensor): "
              + (", ".join(reductions_drop_nan()) or "none") + "."]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{arguments.name}.md").write_text(text)
    record = {"_run": {"calib": arguments.calib, "repeats": arguments.repeats, "threads": THREADS, "load_average": load,
                       "machine": cpu_model_name(), "date": time.strftime("%Y-%m-%d")}, "rows": rows}
    (RESULTS_DIR / f"{arguments.name}.json").write_text(json.dumps(record, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description="calibration time by phase vs plain fp32 inference")
    parser.add_argument("--models", nargs="+", default=list(MODEL_IDS), choices=MODEL_IDS)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--name", default="calibration_breakdown", help="results file stem under benchmarks/results/")
    arguments = parser.parse_args()
    rows = []
    for model_id in arguments.models:
        rows += breakdown(model_id, arguments.calib, arguments.repeats)
        print(rows[-len(OURS) - 2 - len(IN_GRAPH_REDUCTIONS):], flush=True)
    write_results(rows, arguments)


if __name__ == "__main__":
    main()
