import numpy as np
import pytest

from helpers import parse_model
from qcompiler.calibration_data import CalibrationSource, model_inputs
from qcompiler.errors import CalibrationDataError


@pytest.fixture
def inputs():
    model = parse_model("""
    g (float[batch, 3, 8, 8] image, int64[batch, seq] ids) => (float[batch, 3, 8, 8] y) { y = Relu (image) }""")
    return model_inputs(model)


def _sample(batch=1, seq=5):
    return {"image": np.zeros((batch, 3, 8, 8), np.float32), "ids": np.zeros((batch, seq), np.int64)}


def test_model_inputs_read_symbolic_and_static_dims(inputs):
    assert [(s.name, s.dtype.name, s.shape) for s in inputs] == [
        ("image", "float32", ("batch", 3, 8, 8)), ("ids", "int64", ("batch", "seq"))]


def test_directory_of_npz_files_in_name_order(tmp_path, inputs):
    for index in (2, 0, 1):
        sample = _sample(seq=index + 1)
        np.savez(tmp_path / f"sample_{index}.npz", **sample)
    (tmp_path / "notes.txt").write_text("ignored")
    source = CalibrationSource(tmp_path, inputs)
    assert source.count == 3
    assert [s["ids"].shape[1] for s in source] == [1, 2, 3]
    assert [s["ids"].shape[1] for s in source] == [1, 2, 3]  # re-iterable


def test_stacked_npz_with_leading_sample_axis(tmp_path, inputs):
    np.savez(tmp_path / "all.npz", image=np.ones((4, 1, 3, 8, 8), np.float32), ids=np.ones((4, 1, 6), np.int64))
    samples = list(CalibrationSource(tmp_path / "all.npz", inputs))
    assert len(samples) == 4 and samples[0]["image"].shape == (1, 3, 8, 8)


def test_single_sample_npz(tmp_path, inputs):
    np.savez(tmp_path / "one.npz", **_sample(batch=2))
    samples = list(CalibrationSource(tmp_path / "one.npz", inputs))
    assert len(samples) == 1 and samples[0]["image"].shape == (2, 3, 8, 8)


def test_iterable_and_float64_is_cast(inputs):
    sample = _sample()
    sample["image"] = sample["image"].astype(np.float64)
    (checked,) = list(CalibrationSource([sample], inputs))
    assert checked["image"].dtype == np.float32


@pytest.mark.parametrize("change, message", [
    (lambda s: s.pop("ids"), r"missing input\(s\) \['ids'\]"),
    (lambda s: s.update(extra=np.zeros(1)), r"unknown input\(s\) \['extra'\]"),
    (lambda s: s.update(image=np.zeros((1, 3, 8), np.float32)), r"\(rank 3\), the model expects rank 4"),
    (lambda s: s.update(image=np.zeros((1, 3, 8, 9), np.float32)), "dim 3 must be 8"),
    (lambda s: s.update(ids=np.zeros((1, 5), np.float32)), "dtype float32, the model expects int64"),
    (lambda s: s.update(ids=np.zeros((2, 5), np.int64)), "dim 'batch' is 2 in 'ids' but 1 in 'image'"),
    (lambda s: s["image"].__setitem__((0, 0, 0, 0), np.nan), "contains NaN or Inf"),
])
def test_mismatched_samples_give_one_line_naming_the_problem(inputs, change, message):
    sample = _sample()
    change(sample)
    with pytest.raises(CalibrationDataError, match=message) as caught:
        list(CalibrationSource([sample], inputs))
    assert "\n" not in str(caught.value) and "calibration sample 0" in str(caught.value)


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing", "not found"),
    (lambda p: p, "no .npz files"),
    (lambda p: (p / "data.txt").write_text("x") and p / "data.txt", "must be a directory of .npz files"),
])
def test_bad_sources(tmp_path, inputs, make, message):
    with pytest.raises(CalibrationDataError, match=message):
        CalibrationSource(make(tmp_path), inputs)


def test_corrupt_npz_names_the_file(tmp_path, inputs):
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CalibrationDataError, match="broken.npz"):
        list(CalibrationSource(tmp_path, inputs))


def test_empty_iterable_is_an_error(inputs):
    with pytest.raises(CalibrationDataError, match="no calibration samples"):
        list(CalibrationSource([], inputs))


def test_single_mapping_instead_of_iterable(inputs):
    with pytest.raises(CalibrationDataError, match="single mapping"):
        CalibrationSource(_sample(), inputs)
