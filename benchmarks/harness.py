"""Shared pieces of the benchmarks: the reference tool (onnxruntime.quantization) driven on the
same data as qcompiler, evaluation, and writing result tables."""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import onnx
import onnxruntime as ort

from qcompiler.zoo.metrics import fidelity
from qcompiler.zoo.run import run_onnx

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Row:
    model: str
    method: str
    loads: bool
    sqnr_db: float | None = None
    metric: str = ""
    value: float | None = None
    seconds: float | None = None
    note: str = ""
    extra: dict = field(default_factory=dict)


class SampleReader:
    """onnxruntime.quantization's CalibrationDataReader over a list of samples."""

    def __init__(self, samples: Sequence[dict]):
        self._iterator = iter(samples)

    def get_next(self):
        return next(self._iterator, None)

    def rewind(self):  # some ORT versions call this between calibration passes
        pass


def ort_quantize_static(model_path: Path, samples: Sequence[dict], output: Path, method: str = "MinMax",
                        per_channel: bool = True, extra_options: dict | None = None, activation_type: str = "QUInt8") -> Path:
    """onnxruntime.quantization.quantize_static as its docs show it: QDQ, u8 activations (unless
    `activation_type="QInt8"`), s8 weights."""
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, quantize_static

    class Reader(SampleReader, CalibrationDataReader):
        pass

    quantize_static(str(model_path), str(output), Reader(samples), quant_format=QuantFormat.QDQ, per_channel=per_channel,
                    activation_type=getattr(QuantType, activation_type), weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method), extra_options=extra_options or {})
    return output


def loads_in_ort(path: Path) -> tuple[bool, str]:
    try:
        ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return True, ""
    except Exception as error:  # noqa: BLE001
        return False, str(error).strip().splitlines()[0][:160]


def evaluate(model_id: str, method: str, model: Path | onnx.ModelProto, eval_samples, reference_outputs, seconds=None, note="") -> Row:
    if isinstance(model, Path):
        ok, why = loads_in_ort(model)
        if not ok:
            return Row(model_id, method, False, note=f"ONNX Runtime refuses to load it: {why}", seconds=seconds)
    outputs = run_onnx(model, eval_samples)
    result = fidelity(model_id, eval_samples, reference_outputs, outputs)
    return Row(model_id, method, True, result["sqnr_db"], result["metric"], result["value"], seconds, note)


def timed(function: Callable, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def write_table(name: str, title: str, rows: list[Row], notes: Sequence[str] = ()) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    header = "| model | method | loads | SQNR dB | task metric | value | seconds | note |"
    lines = [f"# {title}", "", f"machine: {platform.processor() or platform.machine()}, onnxruntime {ort.__version__}, "
             f"onnx {onnx.__version__}, {time.strftime('%Y-%m-%d')}", "", header, "|" + "---|" * 8]
    for row in rows:
        sqnr = "" if row.sqnr_db is None else f"{row.sqnr_db:.2f}"
        value = "" if row.value is None else f"{row.value:.4f}"
        seconds = "" if row.seconds is None else f"{row.seconds:.1f}"
        lines.append(f"| {row.model} | {row.method} | {'yes' if row.loads else 'NO'} | {sqnr} | {row.metric} | {value} | {seconds} | {row.note} |")
    lines += [""] + [f"- {note}" for note in notes]
    text = "\n".join(lines) + "\n"
    print(text)
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(text)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps([asdict(row) for row in rows], indent=1, default=float) + "\n")
    return path


def model_arguments(description: str, model_ids: Sequence[str], calib: int = 32, evaluation: int = 16):
    """The command line shared by the per-model fidelity benchmarks: --models, --calib, --eval."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--models", nargs="+", default=list(model_ids), choices=model_ids)
    parser.add_argument("--calib", type=int, default=calib, help="calibration samples per model")
    parser.add_argument("--eval", type=int, default=evaluation, help="evaluation samples per model")
    return parser.parse_args()


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="qcompiler-bench-"))


def write_markdown_table(name: str, title: str, header: Sequence[str], rows: Sequence[Sequence], records: list[dict],
                         notes: Sequence[str] = ()) -> Path:
    """A results table whose columns do not fit Row: prints it, writes RESULTS_DIR/name.md and .json."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", f"machine: {platform.processor() or platform.machine()}, onnxruntime {ort.__version__}, "
             f"onnx {onnx.__version__}, {time.strftime('%Y-%m-%d')}", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    lines += [""] + [f"- {note}" for note in notes]
    text = "\n".join(lines) + "\n"
    print(text)
    path = RESULTS_DIR / f"{name}.md"
    path.write_text(text)
    (RESULTS_DIR / f"{name}.json").write_text(json.dumps(records, indent=1, default=float) + "\n")
    return path
