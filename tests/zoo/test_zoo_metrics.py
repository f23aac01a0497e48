"""The fidelity metrics on hand-made outputs whose answers are known."""

import math

import numpy as np
import pytest

from qcompiler.zoo import metrics


def test_sqnr_of_known_noise_pooled_over_samples():
    rng = np.random.default_rng(0)
    refs = [rng.normal(0, 1, (1, 1000)).astype(np.float32) for _ in range(4)]
    noise = [np.full_like(r, 0.01) for r in refs]
    expected = 10 * math.log10(sum(float((r.astype(np.float64) ** 2).sum()) for r in refs) / (4 * 1000 * 0.01 ** 2))
    assert metrics.sqnr_db(refs, [r + n for r, n in zip(refs, noise)]) == pytest.approx(expected, abs=1e-3)


def test_sqnr_pools_energy_instead_of_averaging_per_sample_db():
    ref = [np.array([10.0]), np.array([1.0])]
    test = [np.array([10.0]), np.array([0.0])]  # all the error sits in the quiet sample
    assert metrics.sqnr_db(ref, test) == pytest.approx(10 * math.log10(101.0))


def test_sqnr_accepts_run_onnx_nesting_and_is_inf_when_identical():
    outputs = [[np.ones((2, 3)), np.zeros(4)], [np.full((2, 3), 2.0), np.ones(4)]]
    assert metrics.sqnr_db(outputs, outputs) == math.inf
    with pytest.raises(ValueError):
        metrics.sqnr_db(outputs, outputs[:1])


def _one_hot_line(indices, classes=5):
    line = np.full((len(indices), classes), 0.01, np.float32)
    line[np.arange(len(indices)), indices] = 0.9
    return line


def test_ctc_greedy_decode_collapses_repeats_and_drops_blanks():
    # "a a _ a b b _ _ c" -> a a b c: a blank between two a's keeps both.
    assert metrics.ctc_greedy_decode(_one_hot_line([1, 1, 0, 1, 2, 2, 0, 0, 3])) == (1, 1, 2, 3)
    assert metrics.ctc_greedy_decode(_one_hot_line([0, 0, 0])) == ()
    assert metrics.ctc_greedy_decode(_one_hot_line([4, 4, 4])[None]) == (4,)


def test_text_agreement_counts_lines_with_equal_decodings():
    ref = [_one_hot_line([1, 1, 0, 2])[None], _one_hot_line([3, 0, 3])[None]]
    # Same decoding with different alignment counts as agreement; a changed character does not.
    test = [_one_hot_line([1, 0, 2, 2])[None], _one_hot_line([3, 3, 3])[None]]
    assert metrics.text_agreement(ref, test) == 0.5
    assert metrics.text_agreement(ref, ref) == 1.0


def test_box_iou_on_hand_boxes():
    a = np.array([[0, 0, 10, 10], [0, 0, 2, 2]])
    b = np.array([[5, 0, 15, 10], [20, 20, 30, 30]])
    np.testing.assert_allclose(metrics.box_iou(a, b), [[50 / 150, 0.0], [0.0, 0.0]])


def _yolo_output(boxes_cxcywh, class_scores):
    """[1, 4+K, N] like YOLOv8: rows cx, cy, w, h then one score row per class."""
    return np.concatenate([np.asarray(boxes_cxcywh, np.float32).T, np.asarray(class_scores, np.float32).T])[None]


def test_decode_yolo_thresholds_and_applies_classwise_nms():
    output = _yolo_output(
        [[50, 50, 20, 20], [52, 50, 20, 20], [51, 50, 20, 20], [200, 200, 10, 10]],
        [[0.9, 0.0], [0.8, 0.0], [0.0, 0.7], [0.2, 0.1]])  # box 1 overlaps box 0, same class
    boxes, scores, classes = metrics.decode_yolo(output)
    np.testing.assert_allclose(scores, [0.9, 0.7])
    np.testing.assert_array_equal(classes, [0, 1])  # the other class survives at the same place
    np.testing.assert_allclose(boxes[0], [40, 40, 60, 60])
    assert len(metrics.decode_yolo(output, confidence=0.15)[0]) == 3  # box 3 passes a lower threshold


def test_box_agreement_f1_on_hand_detections():
    ref = [_yolo_output([[50, 50, 20, 20], [150, 150, 20, 20]], [[0.9, 0.0], [0.0, 0.9]])]
    shifted = [_yolo_output([[52, 50, 20, 20], [150, 150, 20, 20]], [[0.9, 0.0], [0.9, 0.0]])]
    # box 0 matches (IoU 0.82), box 1 changed class: TP 1, FP 1, FN 1 -> F1 = 2/4.
    assert metrics.box_agreement(ref, shifted) == 0.5
    moved = [_yolo_output([[60, 50, 20, 20], [150, 150, 20, 20]], [[0.9, 0.0], [0.0, 0.9]])]
    assert metrics.box_agreement(ref, moved) == 0.5  # IoU 1/3 < 0.5: one box unmatched each side
    extra = [_yolo_output([[50, 50, 20, 20], [150, 150, 20, 20], [250, 250, 20, 20]],
                          [[0.9, 0.0], [0.0, 0.9], [0.5, 0.0]])]
    assert metrics.box_agreement(ref, extra) == pytest.approx(2 * 2 / (2 * 2 + 1))


def test_box_agreement_counts_images_without_boxes_as_perfect():
    empty = [_yolo_output([[50, 50, 20, 20]], [[0.1, 0.0]])]
    assert metrics.box_agreement(empty * 3, empty * 3) == 1.0
    one = [_yolo_output([[50, 50, 20, 20]], [[0.9, 0.0]])]
    assert metrics.box_agreement(one + empty, one + empty) == 1.0
    assert metrics.box_agreement(one + empty, empty + empty) == 0.0


def test_text_map_iou_binarises_at_dbnet_threshold():
    ref = np.zeros((1, 1, 4, 4), np.float32)
    ref[..., :2, :] = 0.9  # 8 text pixels
    test = ref.copy()
    test[..., 0, :] = 0.31  # still text at 0.3
    test[..., 1, :2] = 0.29  # 2 pixels lost
    test[..., 3, :1] = 0.5  # 1 pixel gained
    assert metrics.text_map_iou([ref], [test]) == pytest.approx(6 / 9)
    assert metrics.text_map_iou([np.zeros_like(ref)], [np.zeros_like(ref)]) == 1.0


def test_embedding_cosine_ignores_padding_tokens():
    hidden = np.array([[[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    sample = {"attention_mask": np.array([[1, 1, 0]])}
    only_padding_changed = hidden.copy()
    only_padding_changed[0, 2] = [-9.0, 3.0]
    assert metrics.embedding_cosine([sample], [hidden], [only_padding_changed]) == pytest.approx(1.0)
    rotated = hidden.copy()
    rotated[0, 1] = [1.0, 0.0]  # pooled (0.5, 0.5) -> (1, 0): 45 degrees apart
    assert metrics.embedding_cosine([sample], [hidden], [rotated]) == pytest.approx(1 / math.sqrt(2))


def test_fidelity_dispatches_by_model():
    ref = [[_one_hot_line([1, 2])[None]]]
    result = metrics.fidelity("ocr-rec", [{}], ref, ref)
    assert result == {"sqnr_db": math.inf, "metric": "text_agreement", "value": 1.0}
    assert metrics.task_metric("ocr-det", [{}], [[np.ones((1, 1, 2, 2))]], [[np.zeros((1, 1, 2, 2))]]) == (
        "text_map_iou", 0.0)
