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
from .config import KNOWN_CALIBRATORS, QUANTIZABLE_OP_TYPES, BiasMode, OutputFormat, QType, QuantConfig, QuantMode, Target
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
@click.option("--calibrator", type=click.Choice(KNOWN_CALIBRATORS), default=QuantConfig.calibrator, show_default=True)
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
@click.option("--quantize-input-op-types", "input_op_types", default="", metavar="OPS",
              help="Comma-separated weightless op types whose activation inputs also get Q/DQ, e.g. Softmax,LayerNormalization,Add.")
@click.option("--smoothquant", is_flag=True, help="Migrate activation outliers into MatMul/Gemm weights first (SmoothQuant).")
@click.option("--smoothquant-alpha", default="0.5", show_default=True,
              help="SmoothQuant migration strength in [0, 1], or 'search' to pick it per layer on calibration data.")
@click.option("--smoothquant-guard/--no-smoothquant-guard", default=True, show_default=True,
              help="With a fixed alpha, leave a layer group unsmoothed where smoothing does not lower its quantized error on held-out calibration rows.")
@click.option("--smoothquant-unfoldable", type=click.Choice(["mul", "skip"]), default="mul", show_default=True,
              help="Where no op can absorb SmoothQuant's 1/s: insert a Mul, or leave the layer unsmoothed.")
@click.option("--per-token", "per_token_activations", is_flag=True,
              help="Quantize linear-layer activations per token at run time (int8, MatMulInteger) instead of statically.")
@click.option("--threads", type=int, default=0, show_default=True, help="Threads for calibration (samples run side by side in ONNX Runtime) and for format auto's kernel timing (0 = one per core).")
@click.option("--format", "output_format", type=click.Choice([f.value for f in OutputFormat]), default="qdq", show_default=True,
              help="ort target: qdq (Q/DQ on op inputs), qoperator (integer kernels: QLinearConv, ...), auto (fastest per op).")
@click.option("--mode", type=click.Choice([m.value for m in QuantMode]), default="static", show_default=True,
              help="static (calibrated activations) or dynamic (activations quantized at run time; no --calib needed).")
@click.option("--reduce-range/--no-reduce-range", default=None,
              help="7-bit weights for x86 CPUs without VNNI (AVX2 vpmaddubsw saturates int16); default: on when this "
                   "machine's CPU has AVX2 but no VNNI.")
@click.option("--debug-checks", is_flag=True, help="Check the graph after every pass and name the pass that broke it.")
@click.option("--engine", "engine_path", type=click.Path(path_type=Path),
              help="tensorrt target: also build a TensorRT engine (plan) from the output, at the calibration samples' shape.")
@click.option("--calib-cache", "calib_cache", type=click.Path(path_type=Path),
              help="tensorrt target: also write the quantized tensors' scales as a TensorRT calibration cache.")
@click.option("--fp8", is_flag=True, help="tensorrt target: FP8 (E4M3) Q/DQ instead of INT8 (opset 19; runs on SM 8.9+).")
@user_errors
def compile_command(model: Path, output: Path, calibration: Path | None, calibrator: str, tensor_calibrators: tuple[str, ...],
                    ranges_path: Path | None, target: str, activation_type: str,
                    per_tensor: bool, bias: str, op_types: str, exclude: tuple[str, ...], exclude_op_type: tuple[str, ...],
                    quantize_activation_matmul: bool | None, input_op_types: str, smoothquant: bool, smoothquant_alpha: str,
                    smoothquant_guard: bool, smoothquant_unfoldable: str, per_token_activations: bool, threads: int, debug_checks: bool,
                    engine_path: Path | None, calib_cache: Path | None, fp8: bool, output_format: str = "qdq",
                    mode: str = "static", reduce_range: bool | None = None) -> None:
    """Quantize MODEL statically and write it to --output."""
    if output.resolve() == model.resolve():
        raise ConfigError("output path is the input model; qcompiler never overwrites its input")
    check_output_path(output)
    if (engine_path or calib_cache) and target != Target.TENSORRT.value:
        raise ConfigError("--engine and --calib-cache need --target tensorrt")
    for path in (engine_path, calib_cache):
        if path is not None:
            check_output_path(path)
    config = QuantConfig(target=target, calibrator=calibrator, tensor_calibrators=parse_assignments(tensor_calibrators),
                         activation_type=activation_type, per_channel=not per_tensor,
                         bias=bias, op_types=tuple(op.strip() for op in op_types.split(",") if op.strip()),
                         exclude_nodes=exclude, exclude_op_types=exclude_op_type,
                         quantize_activation_matmul=quantize_activation_matmul, calibration_threads=threads,
                         quantize_input_op_types=tuple(op.strip() for op in input_op_types.split(",") if op.strip()),
                         smoothquant=smoothquant, smoothquant_alpha=smoothquant_alpha, smoothquant_guard=smoothquant_guard,
                         smoothquant_unfoldable=smoothquant_unfoldable, per_token_activations=per_token_activations,
                         debug_checks=debug_checks, format=output_format, mode=mode, fp8=fp8,
                         reduce_range=reduce_range)
    with Progress(TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as bar:
        task = bar.add_task("calibrate", total=None)
        compiled = compile_model(model, calibration, config, ranges=read_ranges(ranges_path) if ranges_path else None,
                                 progress=lambda done, total: bar.update(task, completed=done, total=total))
    compiled.save(output)
    print_summary(compiled.summary, model, output)
    if calib_cache is not None:
        from .tensorrt.calibration_cache import write_calibration_cache

        count = write_calibration_cache(compiled.model, calib_cache)
        console.print(f"wrote TensorRT calibration cache {calib_cache} ({count} tensors)", highlight=False)
    if engine_path is not None:
        from .tensorrt import build_engine
        from .tensorrt.cli_support import sample_shapes

        build = build_engine(compiled.model, sample_shapes(calibration, compiled.model) if calibration else None)
        finish_engine_build(build, compiled.model, engine_path, report=False)


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
@click.option("--calibrator", type=click.Choice(KNOWN_CALIBRATORS), default=QuantConfig.calibrator, show_default=True)
@click.option("--tensor-calibrator", "tensor_calibrators", multiple=True, metavar="PATTERN=NAME",
              help="Calibrator for tensors matching PATTERN (repeatable; first match wins).")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Ranges JSON to write (reusable with compile --ranges).")
@click.option("--trt-cache", type=click.Path(path_type=Path), help="Also write a TensorRT calibration cache (scale = amax/127).")
@click.option("--trt-cache-header", default=DEFAULT_TENSORRT_HEADER, show_default=True,
              help="First line of the TensorRT cache; TensorRT ignores caches whose header does not match it.")
@click.option("--threads", type=int, default=0, show_default=True, help="Threads for calibration: samples run side by side in ONNX Runtime (0 = one per core).")
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
    console.print(f"{calibrator}: ranges of {len(result.ranges)} tensors from {result.samples} samples"
                  f"{_phases(result.seconds)} written to {written}", highlight=False)


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
    smoothing = Counter(decision.action for decision in summary.smoothing)
    if smoothing:
        console.print("  smoothquant layer groups: " + ", ".join(f"{count} {action}" for action, count in sorted(smoothing.items()))
                      + (" (mul = a Mul by 1/s inserted: no producer could absorb it)" if smoothing.get("mul") else ""),
                      highlight=False)
    size_in, size_out = _size_mb(source), _size_mb(output)
    console.print(f"calibrated {summary.calibrated_tensors} activations on {summary.calibration_samples} samples"
                  f"{_phases(summary.calibration_seconds)}; wrote {output} ({size_out:.1f} MB, input {size_in:.1f} MB)",
                  highlight=False)


def _phases(seconds: dict[str, float]) -> str:
    """' in 0.62 s (prepare 0.03, session 0.04, samples 0.52, release 0.01, ranges 0.03)', or '' without calibration."""
    if not seconds:
        return ""
    return f" in {sum(seconds.values()):.2f} s (" + ", ".join(f"{phase} {value:.2f}" for phase, value in seconds.items()) + ")"


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


@cli.command("build-engine")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Where to write the engine (plan).")
@click.option("--shape", "shapes", multiple=True, metavar="NAME:DIMS[:OPT:MAX]",
              help="Shape of a dynamic input, e.g. x:1x3x640x640, or min:opt:max (repeatable).")
@click.option("--fp16", is_flag=True, help="Full TensorRT only: allow FP16 for layers without Q/DQ.")
@click.option("--workspace", type=int, help="Builder workspace limit in MiB.")
@click.option("--report", is_flag=True, help="Print every engine layer's types and fused ONNX nodes, and INT8 coverage.")
@user_errors
def build_engine_command(model: Path, output: Path, shapes: tuple[str, ...], fp16: bool, workspace: int | None, report: bool) -> None:
    """Build a TensorRT engine from MODEL (TensorRT if installed, else TensorRT-RTX)."""
    from .ir import load_model
    from .tensorrt import build_engine
    from .tensorrt.cli_support import parse_shapes

    check_output_path(output)
    proto = load_model(model)
    build = build_engine(proto, parse_shapes(shapes), fp16=fp16, workspace_mb=workspace)
    finish_engine_build(build, proto, output, report=report)


def finish_engine_build(build, model, output: Path, report: bool) -> None:
    """Save a successful build (printing the coverage line, and the layer table if asked) or fail in one line."""
    from .tensorrt import TensorRTError, engine_coverage, report_rows, summary_line

    if not build.ok:
        errors = build.errors() or ["no error message"]
        raise TensorRTError(f"{build.backend} {build.backend_version} could not build an engine: {errors[0].splitlines()[0]}"
                            + (f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""))
    build.save(output)
    try:
        coverage_report = engine_coverage(model, build)
    except TensorRTError as error:
        console.print(f"built with {build.backend} {build.backend_version} in {build.seconds:.1f}s; wrote {output}; "
                      f"no layer report: {error}", highlight=False)
        return
    if report:
        table = Table(title="engine layers", title_justify="left")
        for column in ("TensorRT layer", "type", "input dtype", "weight dtype", "fused ONNX nodes"):
            table.add_column(column, overflow="fold")
        for row in report_rows(coverage_report):
            table.add_row(*row)
        stdout.print(table)
        for node in coverage_report.float_nodes()[:20]:
            stdout.print(f"  not INT8: {node.node} ({node.op_type}, {node.flops / max(coverage_report.total_flops, 1):.2%} of FLOPs) "
                         f"in {node.layer or 'no layer'} [{','.join(node.input_dtypes)} / {node.weight_dtype or '-'}]", highlight=False)
        stdout.print(summary_line(coverage_report), highlight=False)
    else:
        console.print(summary_line(coverage_report), highlight=False)
    console.print(f"built with {build.backend} {build.backend_version} in {build.seconds:.1f}s; wrote {output}", highlight=False)


def main() -> None:
    cli(prog_name="qcompiler")


if __name__ == "__main__":
    main()
