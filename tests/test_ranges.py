"""Calibrating every activation, saving ranges (JSON and TensorRT cache) and compiling from them."""

import struct
import subprocess
import sys

import numpy as np
import onnx
import pytest

import qcompiler
from helpers import random_samples
from qcompiler.calibrators.base import Range
from qcompiler.config import QuantConfig
from qcompiler.errors import CalibrationDataError
from qcompiler.ranges_io import read_ranges, write_ranges_json, write_tensorrt_cache


def test_json_round_trip_is_exact(tmp_path):
    ranges = {"a": Range(-0.1, 2.0 / 3.0), "b/c:0": Range(0.0, 1e-30)}
    path = write_ranges_json(ranges, tmp_path / "r.json", "kl", 7)
    assert read_ranges(path) == ranges


def test_tensorrt_cache_format_and_round_trip(tmp_path):
    path = write_tensorrt_cache({"x": Range(-127.0, 12.0), "zero": Range(0.0, 0.0)}, tmp_path / "calib.cache")
    lines = path.read_text().splitlines()
    assert lines[0] == "TRT-8601-EntropyCalibration2"
    assert lines[1] == "x: 3f800000"  # amax 127 -> scale 1.0, big-endian float32 bits
    assert struct.unpack(">f", bytes.fromhex(lines[2].split(": ")[1]))[0] > 0  # never a zero scale
    assert read_ranges(path)["x"] == Range(-127.0, 127.0)


@pytest.mark.parametrize("content, message", [
    ("not ranges", "neither"),
    ('{"format": "other"}', "expected 'qcompiler-ranges'"),
    ('{"format": "qcompiler-ranges", "ranges": {"t": [2.0, 1.0]}}', "invalid range"),
    ("TRT-8601-EntropyCalibration2\nx: zz\n", "line 2"),
])
def test_bad_ranges_files(tmp_path, content, message):
    path = tmp_path / "bad"
    path.write_text(content)
    with pytest.raises(CalibrationDataError, match=message):
        read_ranges(path)


def test_calibrate_measures_every_float_activation(conv_model):
    samples = random_samples({"x": (1, 4, 8, 8)}, 3)
    result = qcompiler.calibrate(conv_model, samples, QuantConfig(calibrator="minmax"))
    assert sorted(result.ranges) == ["a", "r", "x", "y"] and result.samples == 3
    assert list(result.seconds) == ["prepare", "session", "samples", "release", "ranges"]
    stacked = np.stack([s["x"] for s in samples])
    assert result.ranges["x"] == Range(float(stacked.min()), float(stacked.max()))


def test_compile_from_saved_ranges_equals_compile_with_calibration(conv_model, tmp_path):
    samples = random_samples({"x": (1, 4, 8, 8)}, 3)
    direct = qcompiler.compile(conv_model, samples)
    path = write_ranges_json(qcompiler.calibrate(conv_model, samples).ranges, tmp_path / "r.json")
    from_file = qcompiler.compile(conv_model, None, ranges=read_ranges(path))
    assert from_file.summary.calibrated_tensors == 0
    assert from_file.model.SerializeToString() == direct.model.SerializeToString()


def test_per_tensor_calibrator_override():
    config = QuantConfig(calibrator="kl", tensor_calibrators={"head/*": "minmax", "r": "percentile"})
    assert config.calibrator_for("head/conv_out")[0] == "minmax"
    assert config.calibrator_for("r") == ("percentile", {"values_per_update": config.histogram_values_per_sample})
    assert config.calibrator_for("other")[0] == "kl"


def test_override_changes_only_the_named_tensor(conv_model):
    samples = random_samples({"x": (1, 4, 8, 8)}, 4)
    plain = qcompiler.calibrate(conv_model, samples, QuantConfig(calibrator="minmax")).ranges
    mixed = qcompiler.calibrate(conv_model, samples, QuantConfig(calibrator="minmax", tensor_calibrators={"x": "percentile"})).ranges
    assert mixed["r"] == plain["r"]
    assert mixed["x"] != plain["x"] and mixed["x"].low > plain["x"].low  # 99.999th percentile of |x| clips the extreme


def test_cli_calibrate_then_compile_with_ranges(tmp_path, conv_model):
    onnx.save(conv_model, tmp_path / "m.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    for index, sample in enumerate(random_samples({"x": (1, 4, 8, 8)}, 3)):
        np.savez(calib / f"{index}.npz", **sample)
    cli = [sys.executable, "-m", "qcompiler"]
    result = subprocess.run([*cli, "calibrate", tmp_path / "m.onnx", "--calib", calib, "--calibrator", "mse",
                             "-o", tmp_path / "r.json", "--trt-cache", tmp_path / "r.cache"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert set(read_ranges(tmp_path / "r.json")) == set(read_ranges(tmp_path / "r.cache")) == {"x", "a", "r", "y"}
    result = subprocess.run([*cli, "compile", tmp_path / "m.onnx", "-o", tmp_path / "q.onnx", "--ranges", tmp_path / "r.json"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "calibrated 0 activations" in result.stderr
    result = subprocess.run([*cli, "calibrate", tmp_path / "m.onnx", "--calib", calib], capture_output=True, text=True)
    assert result.returncode == 6 and "nothing to write" in result.stderr
