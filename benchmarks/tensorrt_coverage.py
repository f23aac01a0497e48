"""Issue 6's check: INT8 coverage of TensorRT engines built from each real model of
../shared/MODELS.md, for qcompiler's `--target tensorrt` output and for onnxruntime.quantization's
QDQ output, every one built the same way (TensorRT if installed, else TensorRT-RTX, verbose log,
one profile at the calibration samples' shape).

Coverage = share of the float model's Conv/ConvTranspose/MatMul/Gemm FLOPs that run in an engine
layer reading Int8 inputs and Int8 weights (qcompiler/tensorrt/coverage.py). Reference outputs:
- ORT default: quantize_static(QDQ, MinMax, per-channel) as its docs show it (u8 activations, int32 bias);
- ORT symmetric: the same with QInt8 activations, ActivationSymmetric and QuantizeBias=False,
  the closest onnxruntime.quantization gets to TensorRT's rules.
Prints the table and writes benchmarks/results/tensorrt_coverage.md (+ .json).

    python benchmarks/tensorrt_coverage.py [--models ocr-det yolo] [--calib 16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

import qcompiler  # noqa: E402
from harness import ort_quantize_static, scratch_dir, timed, write_markdown_table  # noqa: E402
from qcompiler.tensorrt import build_engine, engine_coverage, load_backend  # noqa: E402
from qcompiler.zoo.data import calibration_samples  # noqa: E402
from qcompiler.zoo.models import MODEL_IDS, fetch_model  # noqa: E402

ORT_SYMMETRIC = {"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False}


def measure(model_id: str, method: str, model: onnx.ModelProto, shapes: dict, seconds: float) -> dict:
    build = build_engine(model, shapes)
    record = {"model": model_id, "method": method, "quantize_seconds": round(seconds, 1), "build_seconds": round(build.seconds, 1),
              "parser_errors": len(build.parser_errors), "builds": build.ok, "int8_share": 0.0, "layers": None,
              "standalone_quantize": None, "note": ""}
    if not build.ok:
        record["note"] = (build.errors() or ["build failed"])[0].splitlines()[0][:150]
        return record
    report = engine_coverage(model, build)
    record.update(int8_share=report.int8_share, layers=sum(1 for l in report.layers if l.layer_type not in ("signal", "wait")),
                  standalone_quantize=report.quantize_kernels,
                  note="; ".join(f"float: {n.node} ({n.op_type}, {n.flops / report.total_flops:.1%})" for n in report.float_nodes()[:2]))
    return record


def benchmark_model(model_id: str, calib_count: int, work: Path) -> list[dict]:
    model_path = fetch_model(model_id)
    calibration = calibration_samples(model_id, calib_count)
    shapes = {name: value.shape for name, value in calibration[0].items()}
    records = []
    compiled, seconds = timed(qcompiler.compile, model_path, calibration, qcompiler.QuantConfig(target="tensorrt"))
    records.append(measure(model_id, "qcompiler --target tensorrt", compiled.model, shapes, seconds))
    for method, options in (("ORT quantize_static default QDQ", {}),
                            ("ORT quantize_static symmetric int8, float bias",
                             {"activation_type": "QInt8", "extra_options": ORT_SYMMETRIC})):
        output = work / f"{model_id}.{len(records)}.onnx"
        _, seconds = timed(ort_quantize_static, model_path, calibration, output, **options)
        records.append(measure(model_id, method, onnx.load(output), shapes, seconds))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description="INT8 coverage of TensorRT engines: qcompiler vs onnxruntime.quantization")
    parser.add_argument("--models", nargs="+", default=list(MODEL_IDS), choices=MODEL_IDS)
    parser.add_argument("--calib", type=int, default=16, help="calibration samples per model")
    arguments = parser.parse_args()
    backend = load_backend()
    work = scratch_dir()
    records = []
    for model_id in arguments.models:
        records += benchmark_model(model_id, arguments.calib, work)
    rows = [(r["model"], r["method"], "yes" if r["builds"] else "NO", r["parser_errors"], f"{r['int8_share']:.1%}",
             r["layers"] if r["layers"] is not None else "", r["standalone_quantize"] if r["standalone_quantize"] is not None else "",
             r["build_seconds"], r["note"]) for r in records]
    write_markdown_table("tensorrt_coverage", f"INT8 coverage of TensorRT engines ({backend.name} {backend.version})",
                         ("model", "method", "builds", "parser errors", "INT8 coverage", "engine layers",
                          "standalone quantize layers", "build s", "note"), rows, records, notes=[
        f"{arguments.calib} calibration samples per model (qcompiler.zoo.data); engine profile at the first sample's shape.",
        "INT8 coverage: share of the model's Conv/ConvTranspose/MatMul/Gemm FLOPs in engine layers with Int8 inputs and Int8 weights, "
        "read from the builder's verbose layer table (qcompiler/tensorrt/coverage.py).",
        "standalone quantize layers: engine layers that run only Q/DQ nodes (conversions no compute layer absorbed).",
        "ocr-det: TensorRT-RTX 1.7 runs ConvTranspose in float whatever the weight's quantization axis (3% of its FLOPs).",
    ])


if __name__ == "__main__":
    main()
