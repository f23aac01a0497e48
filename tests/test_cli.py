"""The command line as a user runs it: a real subprocess, exit codes, stderr, files on disk."""

import subprocess
import sys

import numpy as np
import onnx
import pytest

from helpers import random_samples


def qcompiler_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "qcompiler", *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=300)


@pytest.fixture
def workspace(tmp_path, conv_model):
    onnx.save(conv_model, tmp_path / "model.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    for index, sample in enumerate(random_samples({"x": (1, 4, 8, 8)}, 4)):
        np.savez(calib / f"sample_{index}.npz", **sample)
    return tmp_path


def test_compile_writes_a_valid_model_and_prints_a_summary(workspace):
    result = qcompiler_cli("compile", workspace / "model.onnx", "-o", workspace / "out.onnx", "--calib", workspace / "calib")
    assert result.returncode == 0, result.stderr
    onnx.checker.check_model(onnx.load(workspace / "out.onnx"), full_check=True)
    assert "quantization summary" in result.stderr and "Conv" in result.stderr
    assert "calibrated 2 activations on 4 samples" in result.stderr


def _assert_one_line_error(result, code, text, workspace):
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and text in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (workspace / "out.onnx").exists()
    assert [p.name for p in workspace.iterdir() if p.name.startswith(".out.onnx")] == []


def test_missing_model(workspace):
    result = qcompiler_cli("compile", workspace / "nope.onnx", "-o", workspace / "out.onnx", "--calib", workspace / "calib")
    _assert_one_line_error(result, 2, "model file not found", workspace)


def test_non_onnx_and_truncated_files(workspace):
    (workspace / "text.onnx").write_text("hello, I am not a model\n" * 20)
    result = qcompiler_cli("compile", workspace / "text.onnx", "-o", workspace / "out.onnx", "--calib", workspace / "calib")
    _assert_one_line_error(result, 2, "text.onnx", workspace)
    data = (workspace / "model.onnx").read_bytes()
    (workspace / "cut.onnx").write_bytes(data[: len(data) // 3])
    result = qcompiler_cli("compile", workspace / "cut.onnx", "-o", workspace / "out.onnx", "--calib", workspace / "calib")
    _assert_one_line_error(result, 2, "cut.onnx", workspace)


def test_wrong_calibration_input_name_and_shape(workspace):
    bad = workspace / "bad_calib"
    bad.mkdir()
    np.savez(bad / "s.npz", images=np.zeros((1, 4, 8, 8), np.float32))
    result = qcompiler_cli("compile", workspace / "model.onnx", "-o", workspace / "out.onnx", "--calib", bad)
    _assert_one_line_error(result, 4, "missing input(s) ['x']", workspace)
    np.savez(bad / "s.npz", x=np.zeros((1, 4, 8, 9), np.float32))
    result = qcompiler_cli("compile", workspace / "model.onnx", "-o", workspace / "out.onnx", "--calib", bad)
    _assert_one_line_error(result, 4, "dim 3 must be 8", workspace)


def test_missing_calibration_and_bad_output_directory(workspace):
    result = qcompiler_cli("compile", workspace / "model.onnx", "-o", workspace / "out.onnx")
    _assert_one_line_error(result, 4, "needs calibration data", workspace)
    result = qcompiler_cli("compile", workspace / "model.onnx", "-o", workspace / "no" / "such" / "out.onnx", "--calib", workspace / "calib")
    _assert_one_line_error(result, 2, "output directory does not exist", workspace)


def test_refuses_to_overwrite_the_input(workspace):
    before = (workspace / "model.onnx").read_bytes()
    result = qcompiler_cli("compile", workspace / "model.onnx", "-o", workspace / "model.onnx", "--calib", workspace / "calib")
    _assert_one_line_error(result, 6, "never overwrites its input", workspace)
    assert (workspace / "model.onnx").read_bytes() == before


def test_inspect(workspace):
    result = qcompiler_cli("inspect", workspace / "model.onnx")
    assert result.returncode == 0, result.stderr
    assert "float32[1, 4, 8, 8]" in result.stdout and "quantize per-channel" in result.stdout
    assert "Relu" in result.stdout


def test_console_script_is_installed():
    result = subprocess.run(["qcompiler", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "compile" in result.stdout and "inspect" in result.stdout


def test_smoothquant_guard_flag_reaches_the_pass(tmp_path):
    from helpers import parse_model

    rng = np.random.default_rng(0)
    model = parse_model("""
    g (float[1, 8, 16] x) => (float[1, 8, 16] y) {
        y = MatMul (x, w)
    }""", {"w": rng.standard_normal((16, 16)).astype(np.float32)})
    onnx.save(model, tmp_path / "model.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    for index, sample in enumerate(random_samples({"x": (1, 8, 16)}, 4)):
        np.savez(calib / f"sample_{index}.npz", **sample)
    result = qcompiler_cli("compile", tmp_path / "model.onnx", "-o", tmp_path / "out.onnx", "--calib", calib,
                           "--smoothquant", "--no-smoothquant-guard")
    assert result.returncode == 0, result.stderr
    assert "smoothquant layer groups: 1 mul" in result.stderr
