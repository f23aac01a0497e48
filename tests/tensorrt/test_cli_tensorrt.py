"""`qcompiler build-engine` and `compile --target tensorrt --engine/--calib-cache` end to end."""

import struct

import numpy as np
import onnx
from click.testing import CliRunner

from helpers import parse_model
from qcompiler.cli import cli

rng = np.random.default_rng(1)


def tiny_model(path, dynamic=False):
    batch = "N" if dynamic else "1"
    model = parse_model(f"""
    g (float[{batch}, 8, 16, 16] x) => (float[{batch}, 8, 16, 16] y) {{
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (a)
        y = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
    }}""", {"w1": (rng.standard_normal((8, 8, 3, 3)) * 0.3).astype(np.float32), "b1": np.zeros(8, np.float32),
            "w2": (rng.standard_normal((8, 8, 3, 3)) * 0.3).astype(np.float32), "b2": np.zeros(8, np.float32)})
    onnx.save(model, path)
    return path


def calibration_dir(path, count=4):
    path.mkdir()
    for index in range(count):
        np.savez(path / f"s{index}.npz", x=rng.standard_normal((1, 8, 16, 16)).astype(np.float32))
    return path


def test_compile_for_tensorrt_writes_model_engine_and_calibration_cache(tmp_path):
    model = tiny_model(tmp_path / "m.onnx", dynamic=True)
    result = CliRunner().invoke(cli, ["compile", str(model), "-o", str(tmp_path / "q.onnx"), "--calib",
                                      str(calibration_dir(tmp_path / "calib")), "--target", "tensorrt",
                                      "--engine", str(tmp_path / "m.plan"), "--calib-cache", str(tmp_path / "m.cache")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "m.plan").stat().st_size > 1000
    assert "INT8 coverage: 100.0%" in result.output
    lines = (tmp_path / "m.cache").read_text().splitlines()
    assert lines[0].startswith("TRT-") and lines[0].endswith("EntropyCalibration2")
    entries = dict(line.split(": ") for line in lines[1:])
    quantized = onnx.load(tmp_path / "q.onnx")
    scales = {t.name: onnx.numpy_helper.to_array(t) for t in quantized.graph.initializer}
    q_of_x = next(n for n in quantized.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    assert struct.unpack(">f", bytes.fromhex(entries["x"]))[0] == np.float32(scales[q_of_x.input[1]])


def test_build_engine_report_and_errors(tmp_path):
    model = tiny_model(tmp_path / "m.onnx", dynamic=True)
    runner = CliRunner()
    missing = runner.invoke(cli, ["build-engine", str(model), "-o", str(tmp_path / "m.plan")])
    assert missing.exit_code == 8 and "dynamic dims" in missing.output and "--shape x:1x8x16x16" in missing.output
    float_build = runner.invoke(cli, ["build-engine", str(model), "-o", str(tmp_path / "m.plan"), "--shape", "x:1x8x16x16:2x8x16x16:4x8x16x16",
                                      "--report"])
    assert float_build.exit_code == 0, float_build.output
    assert "correlation" in float_build.output and "INT8 coverage: 0.0%" in float_build.output
    broken = tmp_path / "broken.onnx"
    proto = onnx.load(model)
    proto.graph.node[0].op_type = "NoSuchOp"
    onnx.save(proto, broken)
    failed = runner.invoke(cli, ["build-engine", str(broken), "-o", str(tmp_path / "b.plan"), "--shape", "x:1x8x16x16"])
    assert failed.exit_code == 8 and "could not build an engine" in failed.output
    assert not (tmp_path / "b.plan").exists()


def test_engine_options_need_the_tensorrt_target(tmp_path):
    model = tiny_model(tmp_path / "m.onnx")
    result = CliRunner().invoke(cli, ["compile", str(model), "-o", str(tmp_path / "q.onnx"), "--calib",
                                      str(calibration_dir(tmp_path / "calib")), "--engine", str(tmp_path / "m.plan")])
    assert result.exit_code != 0 and "--target tensorrt" in result.output


def test_missing_tensorrt_is_one_actionable_error():
    import pytest

    from qcompiler.tensorrt import TensorRTError, load_backend

    with pytest.raises(TensorRTError, match="pip install"):
        load_backend(preferred="no_such_tensorrt_module")
    assert load_backend().name in ("tensorrt", "tensorrt_rtx")
