"""Issue 4's latency benchmark: is the quantized model faster on ONNX Runtime's CPU kernels?

For every real model of ../shared/MODELS.md, in one run and on the same data:
- fp32 (the original model);
- onnxruntime.quantization: quantize_dynamic (QOperator; s8 and u8 weights), quantize_static in
  QDQ and in QOperator format (MinMax, per-channel s8 weights, u8 activations);
- qcompiler: each format it offers (qdq, qoperator, dynamic where it applies).
Latency: ONNX Runtime CPU EP, all graph optimizations, 2 intra-op threads, median of >= 30 runs
after warm-up, at batch 1 and a larger batch. Fidelity (SQNR vs fp32 and the task metric) sits
beside every row. For every qcompiler output the notes list the op types ONNX Runtime's optimized
graph still runs in float, which is what keeps a model from the target.
Prints the table and writes benchmarks/results/latency.md (+ .json).

    python benchmarks/latency.py [--models yolo minilm] [--runs 30] [--batch 8]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qcompiler  # noqa: E402
from harness import RESULTS_DIR, SampleReader, loads_in_ort, scratch_dir  # noqa: E402
from qcompiler.cpu import cpu_model_name  # noqa: E402
from qcompiler.ir import ensure_opset  # noqa: E402
from qcompiler.zoo.data import calibration_samples, evaluation_samples  # noqa: E402
from qcompiler.zoo.metrics import fidelity  # noqa: E402
from qcompiler.zoo.models import MODEL_IDS, fetch_model  # noqa: E402
from qcompiler.zoo.run import run_onnx  # noqa: E402

THREADS = 2
ort.set_default_logger_severity(3)  # ORT's warnings about unused initializers drown the table
# Ops that, left in ONNX Runtime's optimized graph, mean float compute on the hot path.
FLOAT_COMPUTE_OPS = {"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm"}
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
# What the optimized graphs (optimized_ops in the .json) show keeps each model in float, and why.
FINDINGS = [
    "qcompiler qdq (the default format) quantizes op inputs only: ORT then dequantizes the weights at run time and "
    "runs float Convs (see its notes), slower than fp32; qoperator closes the groups and ORT runs QLinearConv etc.",
    "yolo: all 64 Convs run as QLinearConv and SiLU as QLinearSigmoid + QLinearMul. The head stays int8 up to the "
    "float ops that read it: the per-level Concats, their Reshapes and the Concat of the three levels run as "
    "QLinearConcat / uint8, with the Concat's scale given to inputs nothing else reads so QLinearConcat copies bytes "
    "(also the SPPF and the last bottleneck of each C2f). Left in float (ORT's optimized graph): the Split after "
    "it and the DFL Softmax (with a DequantizeLinear in front ORT fuses DQ -> Softmax -> Q into QLinearSoftmax, "
    "measured 2-3.5x slower than the float Softmax; it is the most expensive head op of ORT's static output), the "
    "class Sigmoid, the box decoding (Sub/Add/Div/Mul on [N, 4, 2100]) and the output Concat, which joins box "
    "coordinates in pixels with class scores in [0, 1]: ORT's static output quantizes that Concat with one scale "
    "(1.26), so every class score becomes 0 or 1.26, which is why its box agreement collapses.",
    "yolo at batch 1 is the model nearest the 1.5x bar (1.48-1.75x fp32 over eleven runs on 2026-12-06, 1.56-1.75 "
    "in the four after NearestUpsampleAsExpand) with no float Conv left: SiLU is what costs more in int8 than in float. fp32 ORT fuses each "
    "x * Sigmoid(x) into one QuickGelu kernel (0.5-1.0 ms per run at batch 1, see the profile above); int8 needs "
    "QLinearSigmoid (a lookup table) and QLinearMul, two passes (~1.5 ms), because ONNX Runtime has no int8 kernel "
    "for SiLU or for an arbitrary lookup table. Measured alternatives were slower: DequantizeLinear -> QuickGelu -> "
    "QuantizeLinear (three passes) and a Gather on a 256-entry table. The 64 Convs run 2.5x faster as QLinearConv.",
    "yolo against ORT: both run the same backbone kernels (64 QLinearConv, 57-58 QLinearSigmoid/QLinearMul, 13 "
    "QLinearConcat); qcompiler's head costs less (float Softmax instead of QLinearSoftmax, QLinearConcat copying "
    "instead of re-quantizing, the PAN's two upsamples as Expand), 2-14% ahead at batch 1 and 8 over those runs.",
    "ocr-det: float ConvTranspose x2 and BatchNormalization x3 in the DBNet head (ORT's CPU provider has no integer "
    "ConvTranspose), HardSigmoid x10 on [N, C, 1, 1] squeeze-excite gates (no integer kernel; it runs between DQ and Q "
    "so the Mul/Add after it stay int8). Two rewrites made it pass 1.5x at batch 1 (1.36x before): the hardswish of "
    "10 blocks ends in Div(6) -> Mul -> Add by constants read only by unpadded Convs, folded into those Convs "
    "(FoldAffineIntoNextConv: 10 QLinearMul and 10 QLinearAdd fewer), and the six nearest-neighbour FPN Resizes, "
    "which ORT ran as uint8 Resize in NHWC (its 2x fast path is NCHW only; 0.75 ms per run, 4x the float model's "
    "NCHWc Upsample), are written as Expand on channels-last integers (NearestUpsampleAsExpand: 0.2 ms).",
    "ocr-rec: the attention MatMuls of two activations, Softmax, LayerNormalization and HardSigmoid stay float.",
    "minilm: LayerNormalization, Softmax, Gelu and the attention MatMuls (Q.K^T, P.V) stay float, in "
    "onnxruntime.quantization's quantize_dynamic output as well (its optimized graph runs the same 6 FusedMatMul + "
    "6 MatMul in float, next to the same DynamicQuantizeMatMul x18 and MatMulIntegerToFloat x18 behind 6 shared "
    "DynamicQuantizeLinear). What made ORT's output faster at batch 8 before: qcompiler's per-column weight scales "
    "(+7 dB SQNR) cost 1-3% in those GEMMs against its per-tensor ones. What makes ours faster now: ORT fuses each "
    "block's residual Add + LayerNormalization into SkipLayerNormalization, whose CPU kernel measured ~410 us per "
    "block at batch 8 against ~60 + ~35 us for LayerNormalization + Add (about 12% of the model); qcompiler writes "
    "that Add as Sum, which the fusion does not match. ORT's static outputs quantize the attention too "
    "(QLinearMatMul x48, QLinearAdd x62, QLinearSoftmax) at ~2 dB SQNR, which is not a usable model.",
    "onnxruntime.quantization fails on the OCR models with quantize_dynamic ('Expected ... to be an initializer': "
    "their weights are Constant nodes) and with static QOperator.",
    "round-robin timing: each round runs every variant once, in a shuffled order. Sessions stop ORT's spinning "
    "threads at the end of each run (session.force_spinning_stop): without it the threads of the session that just "
    "ran kept a core busy for 10-30 ms on this AMD EPYC and the next session ran up to 2x slower. Ratios still move "
    "by a few percent between runs; compare ratios, not milliseconds.",
]


@dataclass
class Variant:
    model: str
    tool: str            # "fp32", "onnxruntime", "qcompiler"
    method: str
    path: str | None = None
    loads: bool = True
    latency_ms: dict = field(default_factory=dict)   # batch -> median ms
    sqnr_db: float | None = None
    metric: str = ""
    value: float | None = None
    optimized_ops: dict = field(default_factory=dict)
    kernel_ms_b1: dict = field(default_factory=dict)  # op type -> ms per run at batch 1 (ORT profiler)
    note: str = ""


def session(path: str | Path, optimized_path: Path | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = THREADS
    options.inter_op_num_threads = 1
    # Each session has its own intra-op threads, which keep spinning after a run ends (10-30 ms on
    # an AMD EPYC here): the next session timed round-robin then shares the 2 cores with them and
    # measured up to 2x slower. Stopping the spin at the end of each run removes that cross-talk
    # without changing the run itself (threads still spin while it lasts), which is what a
    # deployment serving one model sees.
    options.add_session_config_entry("session.force_spinning_stop", "1")
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved_medians_ms(sessions: dict[str, ort.InferenceSession], feed: dict, runs: int, warmup: int = 5) -> dict[str, float]:
    """Median latency per session, timed round-robin (one run of each per round) so that load from
    other processes on the machine hits every variant alike and the ratios stay fair. The order is
    shuffled every round so no variant always follows the same one. Runs follow each other without
    pauses: sessions stop spinning at the end of a run (`session`), and a pause long enough to park
    the threads instead left caches cold and doubled batch-1 latencies."""
    for sess in sessions.values():
        for _ in range(warmup):
            sess.run(None, feed)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    order = list(sessions)
    shuffle = np.random.default_rng(0).shuffle
    for _ in range(runs):
        shuffle(order)
        for name in order:
            sess = sessions[name]
            start = time.perf_counter()
            sess.run(None, feed)
            times[name].append(time.perf_counter() - start)
    return {name: 1000.0 * statistics.median(values) for name, values in times.items()}


def batched(sample: dict, batch: int) -> dict:
    return {name: np.repeat(value, batch, axis=0) for name, value in sample.items()}


def optimized_op_counts(path: Path, work: Path) -> dict:
    """Op types of the graph ONNX Runtime actually runs (after its fusions)."""
    target = work / (path.stem + ".ort-optimized.onnx")
    session(path, target)
    model = onnx.load(str(target), load_external_data=False)
    return dict(Counter(node.op_type for node in model.graph.node).most_common())


def float_islands(ops: dict) -> str:
    compute = {op: n for op, n in ops.items() if op in FLOAT_COMPUTE_OPS}
    qdq = {op: n for op, n in ops.items() if op in QDQ_OPS}
    parts = []
    if compute:
        parts.append("float compute left: " + ", ".join(f"{n} {op}" for op, n in compute.items()))
    if qdq:
        parts.append("unfused " + ", ".join(f"{n} {op}" for op, n in qdq.items()))
    return "; ".join(parts) or "no float Conv/MatMul, no Q/DQ left"


def kernel_ms_by_op(path: str | Path, feed: dict, runs: int = 30, warmup: int = 5) -> dict[str, float]:
    """Kernel time per op type, in ms per run, from ONNX Runtime's profiler (median of each node over
    `runs` runs, summed per op type): where a model's time goes, for the notes on what keeps it from the target."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.enable_profiling = True
    with tempfile.TemporaryDirectory(prefix="qcompiler-profile-") as directory:
        options.profile_file_prefix = str(Path(directory) / "profile")
        profiled = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for _ in range(warmup + runs):
            profiled.run(None, feed)
        events = json.loads(Path(profiled.end_profiling()).read_text())
    per_node: dict[tuple[str, str], list[float]] = {}
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_node.setdefault((event["args"]["op_name"], event["name"]), []).append(event["dur"])
    by_op: Counter = Counter()
    for (op, _), durations in per_node.items():
        by_op[op] += statistics.median(durations[warmup:] or durations) / 1000.0
    return {op: round(ms, 3) for op, ms in by_op.most_common()}


# ---- producers -------------------------------------------------------------------------------------------------
def ort_dynamic(model_path: Path, calib, output: Path, weight_type: str) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(str(model_path), str(output), weight_type=getattr(QuantType, weight_type), per_channel=False)
    return output


def ort_static(model_path: Path, calib, output: Path, quant_format: str) -> Path:
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(SampleReader, CalibrationDataReader):
        pass

    quantize_static(str(model_path), str(output), Reader(calib), quant_format=getattr(QuantFormat, quant_format),
                    per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    return output


def ours(model_path: Path, calib, output: Path, **options) -> Path:
    compiled = qcompiler.compile(model_path, calib if options.get("mode") != "dynamic" else None,
                                 qcompiler.QuantConfig(**options))
    compiled.save(output)
    return output


def producers() -> list[tuple[str, str, Callable]]:
    """(tool, method, function(model_path, calib, output) -> path)."""
    result = [
        ("onnxruntime", "quantize_dynamic s8 weights", lambda m, c, o: ort_dynamic(m, c, o, "QInt8")),
        ("onnxruntime", "quantize_dynamic u8 weights", lambda m, c, o: ort_dynamic(m, c, o, "QUInt8")),
        ("onnxruntime", "quantize_static QDQ", lambda m, c, o: ort_static(m, c, o, "QDQ")),
        ("onnxruntime", "quantize_static QOperator", lambda m, c, o: ort_static(m, c, o, "QOperator")),
    ]
    # auto = qoperator minus the ops whose int8 kernel measured slower here (qcompiler/kernel_timing.py).
    for fmt in ("qdq", "qoperator", "auto"):
        result.append(("qcompiler", f"static {fmt}", lambda m, c, o, fmt=fmt: ours(m, c, o, format=fmt)))
    result.append(("qcompiler", "dynamic", lambda m, c, o: ours(m, c, o, mode="dynamic")))
    return result


# ---- one model -------------------------------------------------------------------------------------------------
def benchmark_model(model_id: str, args, work: Path) -> list[Variant]:
    model_path = fetch_model(model_id)
    # ORT's per-channel QDQ needs opset 13; give it the upgraded model so every row loads.
    upgraded = work / f"{model_id}.opset13.onnx"
    onnx.save(ensure_opset(onnx.load(str(model_path)), 13)[0], str(upgraded))
    calib = calibration_samples(model_id, args.calib)
    evaluation = evaluation_samples(model_id, args.eval)
    reference = run_onnx(model_path, evaluation, threads=THREADS)
    feeds = {batch: batched(evaluation[0], batch) for batch in (1, args.batch)}

    variants = [Variant(model_id, "fp32", "fp32", str(model_path))]
    for tool, method, produce in producers():
        output = work / f"{model_id}.{tool}.{method.replace(' ', '_')}.onnx"
        source = upgraded if tool == "onnxruntime" else model_path
        try:
            produce(source, calib, output)
        except Exception as error:  # noqa: BLE001 - a tool failing on a model is a result, not a crash
            variants.append(Variant(model_id, tool, method, None, False, note=f"failed: {str(error).splitlines()[0][:140]}"))
            continue
        ok, why = loads_in_ort(output)
        variants.append(Variant(model_id, tool, method, str(output), ok, note="" if ok else f"ONNX Runtime refuses it: {why}"))

    sessions = {}
    for variant in variants:
        if not variant.loads:
            continue
        try:
            sessions[variant.method] = session(variant.path)
            for feed in feeds.values():
                sessions[variant.method].run(None, feed)
        except Exception as error:  # noqa: BLE001
            sessions.pop(variant.method, None)
            variant.loads, variant.note = False, f"fails to run: {str(error).splitlines()[0][:140]}"
    for batch, feed in feeds.items():
        for method, ms in interleaved_medians_ms(sessions, feed, args.runs).items():
            next(v for v in variants if v.method == method).latency_ms[batch] = ms
    sessions.clear()
    fastest_ours = best(variants, "qcompiler", 1)
    for variant in (variants[0], fastest_ours):
        if variant is not None:
            variant.kernel_ms_b1 = kernel_ms_by_op(variant.path, feeds[1])

    for variant in variants:
        if not variant.loads:
            continue
        path = Path(variant.path)
        result = fidelity(model_id, evaluation, reference, run_onnx(path, evaluation, threads=THREADS))
        variant.sqnr_db, variant.metric, variant.value = result["sqnr_db"], result["metric"], result["value"]
        if variant.tool != "fp32":
            variant.optimized_ops = optimized_op_counts(path, work)
            if variant.tool == "qcompiler" or args.verbose:
                variant.note = (variant.note + " " + float_islands(variant.optimized_ops)).strip()
        print(f"{model_id:8s} {variant.tool:12s} {variant.method:28s} "
              + " ".join(f"b{b}={ms:7.2f}ms" for b, ms in variant.latency_ms.items())
              + f" sqnr={variant.sqnr_db:.2f} {variant.metric}={variant.value:.4f}", flush=True)
    return variants


# ---- report ----------------------------------------------------------------------------------------------------
def speedups(variants: list[Variant], batch: int) -> dict[str, float]:
    fp32 = next(v for v in variants if v.tool == "fp32").latency_ms[batch]
    return {v.method: fp32 / v.latency_ms[batch] for v in variants if v.loads and batch in v.latency_ms}


def best(variants: list[Variant], tool: str, batch: int) -> Variant | None:
    candidates = [v for v in variants if v.tool == tool and v.loads and batch in v.latency_ms]
    return min(candidates, key=lambda v: v.latency_ms[batch], default=None)


def verdict(model_id: str, batch: int, ours: float, theirs: float, mine: Variant, other: Variant) -> str:
    """Issue 4's bar: at least ORT's speed-up at equal or better fidelity; CNNs >= 1.5x fp32 at every
    batch, the transformer >= 1.5x at batch 1."""
    problems = []
    if ours < theirs:
        problems.append("slower than ORT")
    if mine.sqnr_db < other.sqnr_db or mine.value < other.value:
        problems.append("lower fidelity than ORT")
    if ours < 1.5 and (model_id != "minilm" or batch == 1):
        problems.append("< 1.5x fp32")
    return "met" if not problems else "; ".join(problems)


def run_facts(args) -> dict:
    """What the header states about a measuring run; kept in the .json so a re-render states the same."""
    return {"machine": cpu_model_name() or platform.machine(), "onnxruntime": ort.__version__, "runs": args.runs,
            "batch": args.batch, "load_average": [round(load, 1) for load in os.getloadavg()], "date": time.strftime("%Y-%m-%d")}


def report(all_variants: dict[str, list[Variant]], args, facts: dict) -> str:
    batches = (1, facts["batch"])
    lines = ["# Latency on ONNX Runtime CPU: fp32 vs onnxruntime.quantization vs qcompiler", "",
             f"machine: {facts['machine']}, onnxruntime {facts['onnxruntime']}, {THREADS} threads, "
             f"median of {facts['runs']} runs after 5 warm-up runs, variants timed round-robin in a shuffled order, "
             f"sessions stop spinning at the end of each run, batch 1 and {facts['batch']}, "
             f"load average {'/'.join(f'{load:.1f}' for load in facts['load_average'])} (1/5/15 min) at the end, {facts['date']}", "",
             "| model | tool | method | " + " | ".join(f"ms b{b} | x fp32 b{b}" for b in batches)
             + " | SQNR dB | task metric | value | note |",
             "|" + "---|" * (3 + 2 * len(batches) + 4)]
    summary = ["", "## Fastest of each tool", "",
               "| model | batch | ORT fastest | x fp32 | qcompiler fastest | x fp32 | ours / ORT | SQNR ours / ORT | metric ours / ORT | verdict |",
               "|" + "---|" * 10]
    for model_id, variants in all_variants.items():
        ratio = {b: speedups(variants, b) for b in batches}
        for v in variants:
            cells = []
            for b in batches:
                if b in v.latency_ms:
                    cells += [f"{v.latency_ms[b]:.2f}", f"{ratio[b][v.method]:.2f}"]
                else:
                    cells += ["", ""]
            sqnr = "" if v.sqnr_db is None else f"{v.sqnr_db:.2f}"
            value = "" if v.value is None else f"{v.value:.4f}"
            lines.append(f"| {model_id} | {v.tool} | {v.method} | " + " | ".join(cells) + f" | {sqnr} | {v.metric} | {value} | {v.note} |")
        for b in batches:
            theirs, mine = best(variants, "onnxruntime", b), best(variants, "qcompiler", b)
            if theirs is None or mine is None:
                continue
            summary.append(f"| {model_id} | {b} | {theirs.method} | {ratio[b][theirs.method]:.2f} | {mine.method} | "
                           f"{ratio[b][mine.method]:.2f} | {ratio[b][mine.method] / ratio[b][theirs.method]:.2f} | "
                           f"{mine.sqnr_db:.2f} / {theirs.sqnr_db:.2f} | {mine.value:.4f} / {theirs.value:.4f} | "
                           f"{verdict(model_id, b, ratio[b][mine.method], ratio[b][theirs.method], mine, theirs)} |")
    profiles = ["", "## Where the time goes at batch 1 (ONNX Runtime's profiler, ms per run by op type)", ""]
    for model_id, variants in all_variants.items():
        for v in variants:
            if v.kernel_ms_b1:
                total = sum(v.kernel_ms_b1.values())
                top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(v.kernel_ms_b1.items())[:8])
                profiles.append(f"- {model_id}, {v.tool} {v.method}: {total:.2f} ms of kernels; {top}")
    notes = ["", "## Notes", "",
             f"- {args.calib} calibration samples, {args.eval} disjoint evaluation samples per model; latency feeds are the "
             f"first evaluation sample repeated to the batch size.",
             "- x fp32 = fp32 median / this median (higher is faster); ours / ORT = our fastest speed-up over ORT's fastest.",
             "- onnxruntime.quantization gets each model upgraded to opset 13 (its per-channel QDQ needs it).",
             "- notes on qcompiler rows: op types ONNX Runtime's optimized graph (ORT_ENABLE_ALL) still runs in float.",
             *[f"- {note}" for note in args.notes]]
    return "\n".join(lines + summary + profiles + notes) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description="fp32 vs onnxruntime.quantization vs qcompiler latency on real models")
    parser.add_argument("--models", nargs="+", default=list(MODEL_IDS), choices=MODEL_IDS)
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model and batch (median reported)")
    parser.add_argument("--batch", type=int, default=8, help="the larger batch size")
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval", type=int, default=16)
    parser.add_argument("--verbose", action="store_true", help="also list float ops left in ORT's outputs")
    parser.add_argument("--name", default="latency", help="results file stem")
    parser.add_argument("--from-json", type=Path, help="re-render the table from a results .json instead of measuring")
    args = parser.parse_args()
    args.notes = list(FINDINGS)
    if args.from_json:
        loaded = json.loads(args.from_json.read_text())
        facts = loaded.pop("_run", None) or run_facts(args)
        results = {m: [Variant(**{**v, "latency_ms": {int(b): ms for b, ms in v["latency_ms"].items()}}) for v in vs]
                   for m, vs in loaded.items()}
    else:
        work = scratch_dir()
        results = {model_id: benchmark_model(model_id, args, work) for model_id in args.models}
        facts = run_facts(args)
    if facts["runs"] < 30:
        args.notes.append(f"only {facts['runs']} runs per median (exploratory run)")
    text = report(results, args, facts)
    print(text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{args.name}.md").write_text(text)
    (RESULTS_DIR / f"{args.name}.json").write_text(json.dumps(
        {"_run": facts, **{m: [asdict(v) for v in vs] for m, vs in results.items()}}, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
