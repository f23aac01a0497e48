"""Issue 2's side-by-side fidelity check on every real model of ../shared/MODELS.md.

For each model, on the same calibration and the same (disjoint) evaluation samples:
- qcompiler's default static compile (min-max, per-channel weights);
- onnxruntime.quantization.quantize_static(QDQ, MinMax, per_channel=True) on the original file, and,
  where ONNX Runtime refuses to load that output (per-channel on opset < 13), on the model upgraded
  to opset 13 so that a number exists to compare with.
Prints the table and writes benchmarks/results/fidelity.md (+ .json).

    python benchmarks/fidelity.py [--models ocr-det yolo] [--calib 32] [--eval 16]
"""

from __future__ import annotations

import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qcompiler  # noqa: E402
from harness import Row, evaluate, model_arguments, ort_quantize_static, scratch_dir, timed, write_table  # noqa: E402
from qcompiler.ir import default_opset, ensure_opset  # noqa: E402
from qcompiler.zoo.data import calibration_samples, evaluation_samples  # noqa: E402
from qcompiler.zoo.models import MODEL_IDS, fetch_model  # noqa: E402
from qcompiler.zoo.run import run_onnx  # noqa: E402


def benchmark_model(model_id: str, calib_count: int, eval_count: int, work: Path) -> list[Row]:
    model_path = fetch_model(model_id)
    calib = calibration_samples(model_id, calib_count)
    evaluation = evaluation_samples(model_id, eval_count)
    reference = run_onnx(model_path, evaluation)
    rows = []

    compiled, seconds = timed(qcompiler.compile, model_path, calib)
    ours = work / f"{model_id}.qcompiler.onnx"
    compiled.save(ours)
    quantized = len(compiled.summary.quantized)
    rows.append(evaluate(model_id, f"qcompiler {qcompiler.QuantConfig().calibrator} (default)", ours, evaluation, reference, seconds,
                         note=f"{quantized} ops quantized"))

    ort_out = work / f"{model_id}.ort.onnx"
    _, seconds = timed(ort_quantize_static, model_path, calib, ort_out)
    row = evaluate(model_id, "ORT quantize_static MinMax per-channel", ort_out, evaluation, reference, seconds)
    rows.append(row)
    if not row.loads:
        upgraded = work / f"{model_id}.opset13.onnx"
        onnx.save(ensure_opset(onnx.load(model_path), 13)[0], upgraded)
        ort_up = work / f"{model_id}.ort.opset13.onnx"
        _, seconds = timed(ort_quantize_static, upgraded, calib, ort_up)
        rows.append(evaluate(model_id, "ORT quantize_static MinMax per-channel (model upgraded to opset 13 first)",
                             ort_up, evaluation, reference, seconds,
                             note=f"original opset {default_opset(onnx.load(model_path))}"))
    return rows


def main() -> None:
    arguments = model_arguments("qcompiler vs onnxruntime.quantization fidelity on real models", MODEL_IDS)
    work = scratch_dir()
    rows = []
    for model_id in arguments.models:
        rows += benchmark_model(model_id, arguments.calib, arguments.eval, work)
    write_table("fidelity", "Fidelity vs fp32: qcompiler vs onnxruntime.quantization.quantize_static", rows, notes=[
        f"{arguments.calib} calibration samples, {arguments.eval} disjoint evaluation samples per model (qcompiler.zoo.data).",
        "SQNR over all evaluation outputs vs fp32 (shared/MODELS.md); task metrics in qcompiler/zoo/metrics.py.",
        "seconds = wall time of the quantization call, calibration included.",
    ])


if __name__ == "__main__":
    main()
