"""The `qcompiler` command line: compile and inspect models.

User mistakes (bad paths, corrupt models, mismatched calibration data, bad options) end in one
`error: ...` line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import functools
import sys
from collections import Counter
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .compiler import calibrate as calibrate_model
from .compiler import compile as compile_model
from .config import KNOWN_CALIBRATORS, QUANTIZABLE_OP_TYPES, BiasMode, QType, QuantConfig, Target
from .context import CompileSummary
from .errors import ConfigError, QCompilerError
from .ir import check_output_path
from .ranges_io import DEFAULT_TENSORRT_HEADER, read_ranges, write_ranges_json, write_tensorrt_cache

console = Console(stderr=True)
stdout = Console()


def user_errors(command):
    """Turn qcompiler's own errors into one line and the error's exit code."""
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except QCompilerError as error:
            console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
            sys.exit(error.exit_code)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="qcompiler")
def cli() -> None:
    """qcompiler: quantize ONNX models for ONNX Runtime and TensorRT."""


@cli.command("compile")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the quantized model.")
@click.option("--calib", "calibration", type=click.Path(path_type=Path), help="Directory of .npz samples or one stacked .npz.")
@click.option("--calibrator", type=click.Choice(KNOWN_CALIBRATORS), default="minmax", show_default=True)
@click.option("--tensor-calibrator", "tensor_calibrators", multiple=True, metavar="PATTERN=NAME",
              help="Calibrator for tensors matching PATTERN, e.g. 'conv1_out=minmax' (repeatable; first match wins).")
@click.option("--ranges", "ranges_path", type=click.Path(path_type=Path),
              help="Ranges from `qcompiler calibrate` (JSON) or a TensorRT calibration cache; skips calibrating those tensors.")
@click.option("--target", type=click.Choice([t.value for t in Target]), default="ort", show_default=True)
@click.option("--activation-type", type=click.Choice([q.value for q in QType]), default="uint8", show_default=True,
              help="uint8 (asymmetric) suits ONNX Runtime's x86 kernels; int8 is symmetric.")
@click.option("--per-tensor", is_flag=True, help="Quantize weights per tensor instead of per output channel.")
@click.option("--bias", type=click.Choice([b.value for b in BiasMode]), default="auto", show_default=True)
@click.option("--op-types", default=",".join(QUANTIZABLE_OP_TYPES), show_default=True, help="Comma-separated op types to quantize.")
@click.option("--exclude", multiple=True, help="Node name or shell pattern to keep in float (repeatable).")
@click.option("--exclude-op-type", multiple=True, help="Op type to keep in float (repeatable).")
@click.option("--quantize-activation-matmul/--no-quantize-activation-matmul", default=None,
              help="Also quantize MatMuls of two activations (attention); default: on for tensorrt, off for ort.")
@click.option("--threads", type=int, default=0, show_default=True, help="ONNX Runtime threads for calibration (0 = default).")
@click.option("--debug-checks", is_flag=True, help="Check the graph after every pass and name the pass that broke it.")
@user_errors
def compile_command(model: Path, output: Path, calibration: Path | None, calibrator: str, tensor_calibrators: tuple[str, ...],
                    ranges_path: Path | None, target: str, activation_type: str,
                    per_tensor: bool, bias: str, op_types: str, exclude: tuple[str, ...], exclude_op_type: tuple[str, ...],
                    quantize_activation_matmul: bool | None, threads: int, debug_checks: bool) -> None:
    """Quantize MODEL statically and write it to --output."""
    if output.resolve() == model.resolve():
        raise ConfigError("output path is the input model; qcompiler never overwrites its input")
    check_output_path(output)
    config = QuantConfig(target=target, calibrator=calibrator, tensor_calibrators=parse_assignments(tensor_calibrators),
                         activation_type=activation_type, per_channel=not per_tensor,
                         bias=bias, op_types=tuple(op.strip() for op in op_types.split(",") if op.strip()),
                         exclude_nodes=exclude, exclude_op_types=exclude_op_type,
                         quantize_activation_matmul=quantize_activation_matmul, calibration_threads=threads,
                         debug_checks=debug_checks)
    with Progress(TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("calibrate", total=None)
        compiled = compile_model(model, calibration, config, ranges=read_ranges(ranges_path) if ranges_path else None,
                                 progress=lambda done, total: bar.update(task, completed=done, total=total))
    compiled.save(output)
    print_summary(compiled.summary, model, output)


def parse_assignments(items: tuple[str, ...]) -> dict[str, str]:
    """`PATTERN=NAME` options to an ordered mapping."""
    parsed = {}
    for item in items:
        pattern, separator, name = item.rpartition("=")
        if not separator or not pattern or not name:
            raise ConfigError(f"expected PATTERN=NAME, got {item!r}")
        parsed[pattern] = name
    return parsed


@cli.command("calibrate")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--calib", "calibration", type=click.Path(path_type=Path), required=True,
              help="Directory of .npz samples or one stacked .npz.")
@click.option("--calibrator", type=click.Choice(KNOWN_CALIBRATORS), default="minmax", show_default=True)
@click.option("--tensor-calibrator", "tensor_calibrators", multiple=True, metavar="PATTERN=NAME",
              help="Calibrator for tensors matching PATTERN (repeatable; first match wins).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Ranges JSON to write (reusable with compile --ranges).")
@click.option("--trt-cache", type=click.Path(path_type=Path), help="Also write a TensorRT calibration cache (scale = amax/127).")
@click.option("--trt-cache-header", default=DEFAULT_TENSORRT_HEADER, show_default=True,
              help="First line of the TensorRT cache; TensorRT ignores caches whose header does not match it.")
@click.option("--threads", type=int, default=0, show_default=True, help="ONNX Runtime threads (0 = default).")
@user_errors
def calibrate_command(model: Path, calibration: Path, calibrator: str, tensor_calibrators: tuple[str, ...], output: Path | None,
                      trt_cache: Path | None, trt_cache_header: str, threads: int) -> None:
    """Measure the range of every float activation of MODEL and save them."""
    if output is None and trt_cache is None:
        raise ConfigError("nothing to write: give -o ranges.json and/or --trt-cache FILE")
    for path in (output, trt_cache):
        if path is not None:
            check_output_path(path)
    config = QuantConfig(calibrator=calibrator, tensor_calibrators=parse_assignments(tensor_calibrators), calibration_threads=threads)
    with Progress(TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("calibrate", total=None)
        result = calibrate_model(model, calibration, config, progress=lambda done, total: bar.update(task, completed=done, total=total))
    if output is not None:
        write_ranges_json(result.ranges, output, calibrator, result.samples)
    if trt_cache is not None:
        write_tensorrt_cache(result.ranges, trt_cache, trt_cache_header)
    written = " and ".join(str(p) for p in (output, trt_cache) if p is not None)
    console.print(f"{calibrator}: ranges of {len(result.ranges)} tensors from {result.samples} samples written to {written}", highlight=False)


def print_summary(summary: CompileSummary, source: Path, output: Path) -> None:
    table = Table(title="quantization summary", title_justify="left")
    table.add_column("op type")
    table.add_column("quantized", justify="right")
    table.add_column("kept in float", justify="right")
    for op, (quantized, skipped) in summary.counts_by_op().items():
        table.add_row(op, str(quantized), str(skipped))
    console.print(table)
    reasons = Counter(decision.detail for decision in summary.skipped)
    for reason, count in sorted(reasons.items()):
        console.print(f"  kept in float ({count}): {reason}", highlight=False)
    for note in summary.notes:
        console.print(f"  note: {note}", highlight=False)
    size_in, size_out = _size_mb(source), _size_mb(output)
    console.print(f"calibrated {summary.calibrated_tensors} activations on {summary.calibration_samples} samples; "
                  f"wrote {output} ({size_out:.1f} MB, input {size_in:.1f} MB)", highlight=False)


def _size_mb(path: Path) -> float:
    total = path.stat().st_size if path.exists() else 0
    data = path.with_name(path.name + ".data")
    if data.exists():
        total += data.stat().st_size
    return total / 1e6


@cli.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@user_errors
def inspect_command(model: Path) -> None:
    """Print MODEL's inputs, op histogram and which nodes are quantizable."""
    from .inspection import inspect_model

    report = inspect_model(model)
    stdout.print(f"[bold]{model}[/]  opset {report.opset}, {report.node_count} nodes, {report.parameter_count:,} parameters", highlight=False)
    inputs = Table(title="inputs", title_justify="left")
    inputs.add_column("name")
    inputs.add_column("type")
    for spec in report.inputs:
        inputs.add_row(spec.name, spec.describe().split(": ", 1)[1])
    stdout.print(inputs)
    ops = Table(title="op histogram", title_justify="left")
    ops.add_column("op type")
    ops.add_column("count", justify="right")
    for op, count in report.op_histogram:
        ops.add_row(op, str(count))
    stdout.print(ops)
    quantizable = Table(title="quantizable nodes", title_justify="left")
    quantizable.add_column("node")
    quantizable.add_column("op")
    quantizable.add_column("decision")
    for decision in report.decisions:
        quantizable.add_row(decision.node, decision.op_type, ("quantize " if decision.quantized else "float: ") + decision.detail)
    stdout.print(quantizable)


def main() -> None:
    cli(prog_name="qcompiler")


if __name__ == "__main__":
    main()
