"""Issue 3's calibrator benchmark, side by side with onnxruntime.quantization, on every real model.

Per model and calibrator it prints:
- calibration wall time as a ratio to plain fp32 ONNX Runtime inference over the same samples
  (both include creating the session; median over interleaved repetitions, 2 threads);
- peak RSS of a fresh process calibrating 64 and 512 samples streamed from the data generator
  (must not grow materially with the sample count);
- fidelity of the compiled model (SQNR vs fp32 and the model's task metric);
and the same for onnxruntime.quantization.quantize_static with its MinMax, Entropy and Percentile
calibrators (wall time of the whole call, peak RSS, fidelity, or the error it fails with).
Writes benchmarks/results/calibration.md (+ .json).

    python benchmarks/calibration.py [--models yolo] [--calib 64] [--repeats 7] [--no-rss]
    python benchmarks/calibration.py --memory     # only the 64/512-sample peak RSS table
    python benchmarks/calibration.py --calib 256 --no-rss --ours-only --name calibration_256
        # how the fixed costs (session, range searches) amortize over a larger calibration set
    python benchmarks/calibration.py --no-rss --ours-only --repeats 1 --values-per-sample 8192 --name calibration_8192
        # what binning fewer values per tensor and sample costs in fidelity
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qcompiler  # noqa: E402
from harness import RESULTS_DIR, evaluate, loads_in_ort, ort_quantize_static, scratch_dir  # noqa: E402
from qcompiler.calibration import PhaseClock  # noqa: E402
from qcompiler.compiler import CalibrationStage  # noqa: E402
from qcompiler.context import CompileContext  # noqa: E402
from qcompiler.ir import Graph, ensure_opset, infer_shapes, load_model  # noqa: E402
from qcompiler.passes import StatisticRequest  # noqa: E402
from qcompiler.passes.quantizable import activation_tensors  # noqa: E402
from qcompiler.zoo.data import calibration_samples, evaluation_samples, iter_calibration_samples  # noqa: E402
from qcompiler.zoo.models import MODEL_IDS, fetch_model  # noqa: E402
from qcompiler.zoo.run import run_onnx  # noqa: E402

OURS = ("minmax", "percentile", "mse", "kl")
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
THREADS = 2
RSS_KILL_MB = 6_000


def fp32_phases(model_path: Path, samples) -> dict[str, float]:
    """Plain fp32 inference over `samples`: seconds to create the session, to run every sample, and
    to release the session (the calibration stage's time includes its own teardown too)."""
    seconds: dict[str, float] = {}
    clock = PhaseClock(seconds)
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    clock.lap("session")
    for sample in samples:
        session.run(None, sample)
    clock.lap("samples")
    del session  # timed like the calibration stage's own teardown
    clock.lap("release")
    return seconds


def fp32_inference_seconds(model_path: Path, samples) -> float:
    return sum(fp32_phases(model_path, samples).values())


DEFAULT_VALUES_PER_SAMPLE = qcompiler.QuantConfig().histogram_values_per_sample


def calibrate_ours(model_path: Path, samples, calibrator: str,
                   values_per_sample: int | None = DEFAULT_VALUES_PER_SAMPLE) -> tuple[float, CompileContext]:
    """Time the calibration stage exactly as compile runs it, on the tensors compile needs."""
    config = qcompiler.QuantConfig(calibrator=calibrator, calibration_threads=THREADS,
                                   histogram_values_per_sample=values_per_sample)
    graph = Graph(infer_shapes(ensure_opset(load_model(model_path), 13)[0]))
    requests = [StatisticRequest(name) for name in activation_tensors(graph, config)]
    context = CompileContext(config)
    start = time.perf_counter()
    CalibrationStage(samples, config)(graph, requests, context)
    return time.perf_counter() - start, context


def peak_rss_mb(arguments: list[str]) -> str:
    """Peak RSS of a child process running `--probe ...`; killed past RSS_KILL_MB."""
    process = subprocess.Popen([sys.executable, __file__, "--probe", *arguments], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    while process.poll() is None:
        try:
            status = Path(f"/proc/{process.pid}/status").read_text()
            peak = max(peak, int(next(line for line in status.splitlines() if line.startswith("VmRSS")).split()[1]) // 1024)
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            pass
        if peak > RSS_KILL_MB:
            process.kill()
            process.wait()
            return f">{RSS_KILL_MB} (killed)"
        time.sleep(0.05)
    out, err = process.communicate()
    if process.returncode != 0:
        return "failed: " + (err.strip().splitlines() or ["?"])[-1][:80]
    return out.strip().splitlines()[-1]


def probe(model_id: str, method: str, count: int) -> None:
    """Child process: calibrate `count` streamed samples, print own peak RSS in MB."""
    model_path = fetch_model(model_id)
    samples = iter_calibration_samples(model_id, count)
    if method in OURS:
        config = qcompiler.QuantConfig(calibrator=method, calibration_threads=THREADS)
        qcompiler.compile(model_path, samples, config)
    else:
        work = scratch_dir()
        ort_quantize_static(model_path, samples, work / "out.onnx", method=method)
    # VmHWM, not ru_maxrss: Linux copies ru_maxrss from the parent at fork, VmHWM starts afresh at exec.
    status = Path("/proc/self/status").read_text()
    print(int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) // 1024)


def benchmark_model(model_id: str, calib_count: int, eval_count: int, repeats: int, rss: bool, work: Path,
                    ours_only: bool = False, values_per_sample: int | None = DEFAULT_VALUES_PER_SAMPLE) -> list[dict]:
    model_path = fetch_model(model_id)
    samples = calibration_samples(model_id, calib_count)
    evaluation = evaluation_samples(model_id, eval_count)
    reference = run_onnx(model_path, evaluation)
    ratios: dict[str, list[float]] = {name: [] for name in OURS}
    ours_seconds: dict[str, list[float]] = {name: [] for name in OURS}
    baselines: list[float] = []
    contexts = {}
    for repeat in range(repeats):  # interleaved, so machine noise hits fp32 and calibration alike
        for name in OURS:
            if repeat % 2:  # alternate which one runs first: neither always gets the warmer caches
                seconds, contexts[name] = calibrate_ours(model_path, samples, name, values_per_sample)
                baseline = fp32_inference_seconds(model_path, samples)
            else:
                baseline = fp32_inference_seconds(model_path, samples)
                seconds, contexts[name] = calibrate_ours(model_path, samples, name, values_per_sample)
            ratios[name].append(seconds / baseline)
            ours_seconds[name].append(seconds)
            baselines.append(baseline)
    rows = []
    for name in OURS:
        compiled = qcompiler.compile(model_path, None, qcompiler.QuantConfig(calibrator=name), ranges=contexts[name].activation_ranges)
        path = work / f"{model_id}.{name}.onnx"
        compiled.save(path)
        row = evaluate(model_id, f"qcompiler {name}", path, evaluation, reference)
        rows.append({"model": model_id, "tool": "qcompiler", "calibrator": name, "time_ratio": median(ratios[name]),
                     "time_ratio_range": [min(ratios[name]), max(ratios[name])],
                     "time_ratio_to_fastest": median(ours_seconds[name]) / min(baselines),
                     "sqnr_db": row.sqnr_db, "metric": row.metric, "value": row.value,
                     "rss_64": peak_rss_mb([model_id, name, "64"]) if rss else "",
                     "rss_512": peak_rss_mb([model_id, name, "512"]) if rss else "", "note": ""})
    for method in () if ours_only else ORT_METHODS:
        output = work / f"{model_id}.ort.{method}.onnx"
        baseline = fp32_inference_seconds(model_path, samples)
        start = time.perf_counter()
        try:
            ort_quantize_static(model_path, samples, output, method=method)
            seconds, note = time.perf_counter() - start, ""
        except Exception as error:  # noqa: BLE001 - record how the reference tool fails
            seconds, note = None, f"fails: {type(error).__name__}: {str(error).strip().splitlines()[0][:90] if str(error).strip() else ''}"
        entry = {"model": model_id, "tool": "onnxruntime.quantization", "calibrator": method,
                 "time_ratio": seconds / baseline if seconds else None, "sqnr_db": None, "metric": "", "value": None,
                 "rss_64": peak_rss_mb([model_id, method, "64"]) if rss and not note else "",
                 "rss_512": peak_rss_mb([model_id, method, "512"]) if rss and not note else "", "note": note}
        if not note:
            loads, why = loads_in_ort(output)
            if loads:
                row = evaluate(model_id, method, output, evaluation, reference)
                entry.update(sqnr_db=row.sqnr_db, metric=row.metric, value=row.value)
            else:
                entry["note"] = f"output does not load: {why[:90]}"
        rows.append(entry)
    return rows


def memory_rows(models: list[str]) -> list[dict]:
    """Peak RSS of fresh processes calibrating 64 and 512 streamed samples, ours and ORT's."""
    rows = []
    for model_id in models:
        for tool, methods in (("qcompiler", OURS), ("onnxruntime.quantization", ORT_METHODS)):
            for method in methods:
                rows.append({"model": model_id, "tool": tool, "calibrator": method,
                             "rss_64": peak_rss_mb([model_id, method, "64"]), "rss_512": peak_rss_mb([model_id, method, "512"])})
                print(rows[-1], flush=True)
    return rows


def write_memory_results(rows: list[dict]) -> None:
    lines = ["# Calibration peak memory: 64 vs 512 samples, qcompiler vs onnxruntime.quantization", "",
             f"Peak RSS (VmHWM, MB) of a fresh process that loads the model and calibrates 64 or 512 samples "
             f"streamed one at a time from the data generator, then quantizes; processes above {RSS_KILL_MB} MB are "
             f"killed. onnxruntime {ort.__version__}; {time.strftime('%Y-%m-%d')}.", "",
             "| model | tool | calibrator | peak RSS MB @64 | @512 |", "|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['tool']} | {r['calibrator']} | {r['rss_64']} | {r['rss_512']} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    (RESULTS_DIR / "calibration_memory.md").write_text(text)
    (RESULTS_DIR / "calibration_memory.json").write_text(json.dumps(rows, indent=1) + "\n")


def write_results(rows: list[dict], arguments) -> None:
    lines = ["# Calibration: time, memory and fidelity, qcompiler vs onnxruntime.quantization", "",
             f"{arguments.calib} calibration samples (time, fidelity), {arguments.eval} evaluation samples, "
             f"{THREADS} threads, median of {arguments.repeats} interleaved repetitions; onnxruntime {ort.__version__}; "
             f"{time.strftime('%Y-%m-%d')}.", "",
             "| model | tool | calibrator | time / fp32 inference (min-max of repetitions) | median time / fastest fp32 | peak RSS MB @64 | @512 | SQNR dB | task metric | value | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ratio = "" if row["time_ratio"] is None else f"{row['time_ratio']:.2f}"
        if row.get("time_ratio_range"):  # the repetitions' spread: this machine is shared and noisy
            ratio += " ({:.2f}-{:.2f})".format(*row["time_ratio_range"])
        to_fastest = f"{row['time_ratio_to_fastest']:.2f}" if row.get("time_ratio_to_fastest") else ""
        sqnr = "" if row["sqnr_db"] is None else f"{row['sqnr_db']:.2f}"
        value = "" if row["value"] is None else f"{row['value']:.4f}"
        lines.append(f"| {row['model']} | {row['tool']} | {row['calibrator']} | {ratio} | {to_fastest} | {row['rss_64'] or '-'} | {row['rss_512'] or '-'} | "
                     f"{sqnr} | {row['metric']} | {value} | {row['note']} |")
    if not any(row["rss_64"] for row in rows):
        lines.append("\nPeak memory (-): see `calibration_memory.md` (`python benchmarks/calibration.py --memory`).")
    lines += ["", "Best fidelity per model (SQNR):", ""]
    for model_id in dict.fromkeys(row["model"] for row in rows):
        for tool in ("qcompiler", "onnxruntime.quantization"):
            scored = [row for row in rows if row["model"] == model_id and row["tool"] == tool and row["sqnr_db"] is not None]
            best = max(scored, key=lambda row: row["sqnr_db"], default=None)
            lines.append(f"- {model_id}, {tool}: " + (f"{best['calibrator']} {best['sqnr_db']:.2f} dB, {best['metric']} {best['value']:.4f}" if best else "no loadable output"))
    lines += ["", "Time ratios pair each calibration with an fp32 run next to it. The two-thread fp32 run is the noisier "
              "side on this shared machine (its threads meet at every operator, so a busy neighbour on either core "
              "slows it, at times to 1.6x), so 'median time / fastest fp32' also divides our median time by the "
              "fastest fp32 run of all repetitions: the conservative figure.",
              "Time for onnxruntime.quantization is the whole quantize_static call (its calibration dominates).",
              f"qcompiler's histogram calibrators bin a strided subset of at most {arguments.values_per_sample} values per "
              "tensor per sample (QuantConfig.histogram_values_per_sample), exact min/max always included."]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{arguments.name}.md").write_text(text)
    (RESULTS_DIR / f"{arguments.name}.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--probe":
        probe(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description="calibrator time/memory/fidelity vs onnxruntime.quantization")
    parser.add_argument("--models", nargs="+", default=list(MODEL_IDS), choices=MODEL_IDS)
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--eval", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--no-rss", dest="rss", action="store_false", help="skip the 64/512-sample peak RSS probes")
    parser.add_argument("--memory", action="store_true", help="only the peak RSS probes, to calibration_memory.md")
    parser.add_argument("--ours-only", action="store_true", help="skip onnxruntime.quantization's calibrators")
    parser.add_argument("--name", default="calibration", help="results file stem under benchmarks/results/")
    parser.add_argument("--values-per-sample", type=int, default=DEFAULT_VALUES_PER_SAMPLE,
                        help="QuantConfig.histogram_values_per_sample for our histogram calibrators")
    arguments = parser.parse_args()
    if arguments.memory:
        write_memory_results(memory_rows(arguments.models))
        return
    work = scratch_dir()
    rows = []
    for model_id in arguments.models:
        rows += benchmark_model(model_id, arguments.calib, arguments.eval, arguments.repeats, arguments.rss, work,
                                arguments.ours_only, arguments.values_per_sample)
    write_results(rows, arguments)


if __name__ == "__main__":
    main()
