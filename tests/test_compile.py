import numpy as np
import onnx
import pytest

import qcompiler
from helpers import op_types, parse_model, random_samples, run, sqnr_db
from qcompiler.calibrators.base import Range
from qcompiler.errors import CalibrationDataError, CalibrationError


def test_compile_end_to_end_on_a_conv_chain(conv_model, tmp_path):
    samples = random_samples({"x": (1, 4, 8, 8)}, 8)
    compiled = qcompiler.compile(conv_model, samples)
    onnx.checker.check_model(compiled.model, full_check=True)
    assert len(compiled.summary.quantized) == 2 and compiled.summary.calibration_samples == 8
    assert compiled.summary.calibrated_tensors == 2
    for sample in samples[:3]:
        assert sqnr_db(run(conv_model, sample)[0], run(compiled.model, sample)[0]) > 30
    path = compiled.save(tmp_path / "out.onnx")
    assert onnx.load(path).SerializeToString() == compiled.model.SerializeToString()


def test_same_inputs_give_byte_identical_output(conv_model, tmp_path):
    samples = random_samples({"x": (1, 4, 8, 8)}, 4)
    first = qcompiler.compile(conv_model, samples).save(tmp_path / "a.onnx")
    second = qcompiler.compile(conv_model, samples).save(tmp_path / "b.onnx")
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("calibrator", ["minmax", "mse"])
def test_calibration_threads_do_not_change_the_output(conv_model, calibrator):
    samples = random_samples({"x": (1, 4, 8, 8)}, 6)
    outputs = {qcompiler.compile(conv_model, samples, qcompiler.QuantConfig(calibrator=calibrator, calibration_threads=threads))
               .model.SerializeToString() for threads in (1, 2, 3)}
    assert len(outputs) == 1


def test_input_model_is_never_modified(conv_model, tmp_path):
    path = tmp_path / "in.onnx"
    onnx.save(conv_model, path)
    before_file, before_proto = path.read_bytes(), conv_model.SerializeToString()
    samples = random_samples({"x": (1, 4, 8, 8)}, 2)
    qcompiler.compile(path, samples)
    qcompiler.compile(conv_model, samples)
    assert path.read_bytes() == before_file and conv_model.SerializeToString() == before_proto


def test_opset_12_model_is_upgraded_so_per_channel_output_loads():
    weights = np.random.default_rng(1).standard_normal((4, 3, 3, 3)).astype(np.float32)
    model = parse_model("g (float[1, 3, 8, 8] x) => (float[1, 4, 6, 6] y) { y = Conv (x, w) }", {"w": weights}, opset=12)
    compiled = qcompiler.compile(model, random_samples({"x": (1, 3, 8, 8)}, 2))
    assert any("opset 13" in note for note in compiled.summary.notes)
    assert {o.domain: o.version for o in compiled.model.opset_import}[""] == 13
    sample = random_samples({"x": (1, 3, 8, 8)}, 1, seed=5)[0]
    assert sqnr_db(run(model, sample)[0], run(compiled.model, sample)[0]) > 30


def test_nan_activation_names_the_tensor():
    model = parse_model("""
    g (float[2, 4] x) => (float[2, 3] y) {
        l = Log (x)
        y = MatMul (l, w)
    }""", {"w": np.ones((4, 3), np.float32)})
    samples = [{"x": -np.ones((2, 4), np.float32)}]
    with pytest.raises(CalibrationError, match="activation 'l' has NaN values on calibration sample 0"):
        qcompiler.compile(model, samples)


def test_infinite_activations_are_left_out_of_the_range():
    model = parse_model("""
    g (float[2, 4] x) => (float[2, 3] y) {
        l = Log (x)
        y = MatMul (l, w)
    }""", {"w": np.ones((4, 3), np.float32)})
    x = np.array([[0.0, 1.0, 2.0, 3.0], [0.5, 1.5, 2.5, 3.5]], np.float32)  # log(0) = -inf
    compiled = qcompiler.compile(model, [{"x": x}])
    scale = next(onnx.numpy_helper.to_array(t) for t in compiled.model.graph.initializer if t.name == "l_scale")
    assert np.isfinite(scale) and 0 < scale < 0.01  # range from the finite values only: [0, log 3.5]


def test_static_compile_without_calibration_data_is_a_clear_error(conv_model):
    with pytest.raises(CalibrationDataError, match="needs calibration data for 2 activation"):
        qcompiler.compile(conv_model)


def test_given_ranges_skip_calibration(conv_model):
    ranges = {"x": Range(-3.0, 3.0), "r": Range(0.0, 6.0)}
    compiled = qcompiler.compile(conv_model, None, ranges=ranges)
    assert compiled.summary.calibrated_tensors == 0
    assert op_types(compiled.model).count("QuantizeLinear") == 2
