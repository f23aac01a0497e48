"""Calibration/evaluation data: shapes the models expect, determinism, and disjoint sources."""

import numpy as np
import pytest

from qcompiler.zoo import ZooError, data, model_info, sources

IMAGE_MODELS = ("yolo", "ocr-det", "ocr-rec")


def _same(a, b):
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("model_id", IMAGE_MODELS)
def test_image_samples_match_model_inputs(model_id):
    samples = data.calibration_samples(model_id, 6) + data.evaluation_samples(model_id, 6)
    for sample in samples:
        assert tuple(sample) == model_info(model_id).input_names
        (array,) = sample.values()
        assert array.dtype == np.float32 and array.shape[:2] == (1, 3)
        low, high = (0.0, 1.0) if model_id == "yolo" else (-1.0, 1.0)  # RGB/255 vs (x/255-0.5)/0.5
        assert low <= array.min() < array.max() <= high
        if model_id == "ocr-rec":
            assert array.shape == (1, 3, 48, 320)
        else:  # the detectors downsample by 32
            assert array.shape[2] % 32 == 0 and array.shape[3] % 32 == 0


@pytest.mark.parametrize("model_id", IMAGE_MODELS)
def test_same_seed_gives_identical_samples_and_longer_lists_keep_their_head(model_id):
    first = data.calibration_samples(model_id, 5, seed=3)
    again = data.calibration_samples(model_id, 8, seed=3)
    assert all(_same(a, b) for a, b in zip(first, again))
    other_seed = data.calibration_samples(model_id, 5, seed=4)
    assert not any(_same(a, b) for a, b in zip(first, other_seed))


@pytest.mark.parametrize("model_id", IMAGE_MODELS)
def test_evaluation_samples_differ_from_calibration_samples(model_id):
    calibration = data.calibration_samples(model_id, 12, seed=0)
    # Even with the same seed the two splits share no sample.
    evaluation = data.evaluation_samples(model_id, 12, seed=0)
    assert not any(_same(c, e) for c in calibration for e in evaluation)


def test_sources_are_split_without_overlap():
    names = {split: {name for name, _ in sources.source_images(split)} for split in sources.SPLITS}
    assert names["calibration"].isdisjoint(names["evaluation"]) and len(names["evaluation"]) >= 8
    pixels = {split: {image.tobytes() for _, image in sources.source_images(split)} for split in sources.SPLITS}
    assert pixels["calibration"].isdisjoint(pixels["evaluation"])  # e.g. skimage's cat() is chelsea()
    faces = {split: {face.tobytes() for face in sources.faces(split)} for split in sources.SPLITS}
    assert faces["calibration"].isdisjoint(faces["evaluation"]) and len(faces["evaluation"]) == 50
    calibration, evaluation = (set(sources.sentences(split)) for split in sources.SPLITS)
    assert calibration.isdisjoint(evaluation) and min(len(calibration), len(evaluation)) > 300


def test_sentences_are_prose_of_5_to_40_words():
    for sentence in sources.sentences("evaluation"):
        assert 5 <= len(sentence.split()) <= 40 and sentence[-1] in ".!?" and ">>>" not in sentence


def test_unknown_model_and_bad_split_are_rejected():
    with pytest.raises(ZooError, match="unknown zoo model"):
        data.calibration_samples("resnet", 1)
    with pytest.raises(ValueError):
        sources.sentences("training")


def test_write_npz_dir_round_trips(tmp_path):
    samples = data.evaluation_samples("ocr-rec", 3)
    paths = data.write_npz_dir(samples, tmp_path / "calib")
    assert [p.name for p in paths] == ["sample_0000.npz", "sample_0001.npz", "sample_0002.npz"]
    for path, sample in zip(paths, samples):
        with np.load(path) as loaded:
            assert _same(dict(loaded), sample)
