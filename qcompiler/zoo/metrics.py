"""Fidelity of a quantized model to its fp32 reference: SQNR plus one task metric per zoo model.

Definitions follow shared/MODELS.md. Every function takes the outputs as `run.run_onnx` returns them
(per sample, the list of the model's outputs; a bare array per sample works too) and compares the
quantized outputs with the fp32 ones, never with ground truth: we measure what quantization
changed, not how good the model is.

Task metrics (1.0 = identical behaviour):
- ocr-rec `text_agreement`: fraction of lines whose greedy CTC decodings are exactly equal.
- yolo `box_agreement_f1`: F1 of quantized detections against fp32 detections (same class, IoU >= 0.5).
- ocr-det `text_map_iou`: IoU of the text maps binarised at DBNet's threshold 0.3.
- minilm `embedding_cosine`: mean cosine similarity of mask-weighted mean-pooled embeddings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .models import model_info

# NudeNet's own post-processing and Ultralytics' defaults: keep class scores > 0.25, NMS at IoU 0.45.
YOLO_CONFIDENCE = 0.25
YOLO_NMS_IOU = 0.45
MATCH_IOU = 0.5
DBNET_THRESHOLD = 0.3  # rapidocr's Det.thresh


def _first_outputs(outputs: Sequence) -> list[np.ndarray]:
    """Output 0 of every sample; accepts run_onnx's [[out0, ...], ...] or a plain list of arrays."""
    return [np.asarray(o[0] if isinstance(o, (list, tuple)) else o) for o in outputs]


def _flatten(outputs) -> list[np.ndarray]:
    if isinstance(outputs, (list, tuple)):
        return [array for item in outputs for array in _flatten(item)]
    return [np.asarray(outputs)]


def sqnr_db(ref_outputs: Sequence, test_outputs: Sequence) -> float:
    """10*log10(sum(ref^2) / sum((ref - test)^2)) pooled over every output of every sample; inf if equal."""
    refs, tests = _flatten(ref_outputs), _flatten(test_outputs)
    if len(refs) != len(tests) or any(r.shape != t.shape for r, t in zip(refs, tests)):
        raise ValueError("reference and test outputs differ in count or shape")
    signal = sum(float(np.sum(np.square(r, dtype=np.float64))) for r in refs)
    noise = sum(float(np.sum(np.square(r.astype(np.float64) - t))) for r, t in zip(refs, tests))
    if noise == 0.0:
        return float("inf")
    if signal == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def ctc_greedy_decode(probabilities: np.ndarray, blank: int = 0) -> tuple[int, ...]:
    """Class indices of one line [T, C]: argmax per timestep, repeats collapsed, blanks dropped."""
    best = np.asarray(probabilities).reshape(-1, np.shape(probabilities)[-1]).argmax(axis=-1)
    keep = np.ones(best.shape, bool)
    keep[1:] = best[1:] != best[:-1]
    return tuple(int(i) for i in best[keep & (best != blank)])


def text_agreement(ref_outputs: Sequence, test_outputs: Sequence) -> float:
    """Fraction of text lines (every batch row of every sample) decoded to the same CTC sequence."""
    lines = [(r_line, t_line)
             for r, t in zip(_first_outputs(ref_outputs), _first_outputs(test_outputs))
             for r_line, t_line in zip(r.reshape(-1, *r.shape[-2:]), t.reshape(-1, *t.shape[-2:]))]
    if not lines:
        raise ValueError("no text lines to compare")
    return float(np.mean([ctc_greedy_decode(r) == ctc_greedy_decode(t) for r, t in lines]))


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise IoU [len(a), len(b)] of x1,y1,x2,y2 boxes."""
    a = np.asarray(boxes_a, np.float64).reshape(-1, 4)[:, None, :]
    b = np.asarray(boxes_b, np.float64).reshape(-1, 4)[None, :, :]
    width = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    height = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    intersection = width * height
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def decode_yolo(output: np.ndarray, confidence: float = YOLO_CONFIDENCE,
                nms_iou: float = YOLO_NMS_IOU) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detections of one YOLOv8 image [4+K, N] (or [1, 4+K, N]): boxes xyxy, scores, classes.

    Each anchor keeps its best class (Ultralytics' single-label NMS), anchors scoring above
    `confidence` go through class-wise greedy NMS at `nms_iou`.
    """
    predictions = np.asarray(output, np.float32).reshape(-1, np.shape(output)[-1]).T  # [N, 4+K]
    class_scores = predictions[:, 4:]
    classes = class_scores.argmax(axis=1)
    scores = class_scores[np.arange(len(classes)), classes]
    keep = scores > confidence
    centre_x, centre_y, width, height = predictions[keep, :4].T
    boxes = np.stack([centre_x - width / 2, centre_y - height / 2,
                      centre_x + width / 2, centre_y + height / 2], axis=1)
    scores, classes = scores[keep], classes[keep]
    order = np.argsort(-scores, kind="stable")
    boxes, scores, classes = boxes[order], scores[order], classes[order]
    overlaps = box_iou(boxes, boxes) > nms_iou
    same_class = classes[:, None] == classes[None, :]
    suppressed = np.zeros(len(boxes), bool)
    for i in range(len(boxes)):  # over the few candidates left, never over tensor elements
        if not suppressed[i]:
            suppressed[i + 1:] |= overlaps[i, i + 1:] & same_class[i, i + 1:]
    kept = ~suppressed
    return boxes[kept], scores[kept], classes[kept]


def _matches(ref: tuple, test: tuple, iou_threshold: float) -> int:
    """One-to-one matches between two detection sets: same class, IoU >= threshold, best IoU first."""
    (ref_boxes, _, ref_classes), (test_boxes, _, test_classes) = ref, test
    iou = box_iou(ref_boxes, test_boxes)
    iou[ref_classes[:, None] != test_classes[None, :]] = 0.0
    matched = 0
    while iou.size and iou.max() >= iou_threshold:
        i, j = np.unravel_index(np.argmax(iou), iou.shape)
        iou[i, :] = 0.0
        iou[:, j] = 0.0
        matched += 1
    return matched


def box_agreement(ref_outputs: Sequence, test_outputs: Sequence, confidence: float = YOLO_CONFIDENCE,
                  iou_threshold: float = MATCH_IOU) -> float:
    """F1 of the quantized detections against the fp32 ones, counted over all images together.

    An image where neither model finds anything adds nothing, so it counts as perfect; if no image
    has a detection at all the result is 1.0.
    """
    true_positives = false_positives = false_negatives = 0
    for ref, test in zip(_first_outputs(ref_outputs), _first_outputs(test_outputs)):
        for ref_image, test_image in zip(ref.reshape(-1, *ref.shape[-2:]), test.reshape(-1, *test.shape[-2:])):
            ref_dets, test_dets = decode_yolo(ref_image, confidence), decode_yolo(test_image, confidence)
            matched = _matches(ref_dets, test_dets, iou_threshold)
            true_positives += matched
            false_positives += len(test_dets[0]) - matched
            false_negatives += len(ref_dets[0]) - matched
    total = 2 * true_positives + false_positives + false_negatives
    return 1.0 if total == 0 else 2 * true_positives / total


def text_map_iou(ref_outputs: Sequence, test_outputs: Sequence, threshold: float = DBNET_THRESHOLD) -> float:
    """IoU of the text maps binarised at `threshold`, pixels of all samples pooled; 1.0 if both empty."""
    intersection = union = 0
    for ref, test in zip(_first_outputs(ref_outputs), _first_outputs(test_outputs)):
        ref_text, test_text = ref > threshold, test > threshold
        intersection += int(np.count_nonzero(ref_text & test_text))
        union += int(np.count_nonzero(ref_text | test_text))
    return 1.0 if union == 0 else intersection / union


def mean_pooled(hidden_state: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings [B, H]: hidden states [B, S, H] averaged over the unmasked tokens."""
    weights = np.asarray(attention_mask, np.float64)[..., None]
    return (hidden_state * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)


def embedding_cosine(samples: Sequence[Mapping[str, np.ndarray]], ref_outputs: Sequence,
                     test_outputs: Sequence) -> float:
    """Mean cosine similarity between fp32 and quantized sentence embeddings (sentence-transformers pooling)."""
    cosines = []
    for sample, ref, test in zip(samples, _first_outputs(ref_outputs), _first_outputs(test_outputs)):
        a, b = mean_pooled(ref, sample["attention_mask"]), mean_pooled(test, sample["attention_mask"])
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        cosines.extend((a * b).sum(axis=1) / np.clip(norms, 1e-12, None))
    if not cosines:
        raise ValueError("no sentences to compare")
    return float(np.mean(cosines))


_TASK_METRICS: dict[str, Callable[[Sequence, Sequence, Sequence], float]] = {
    "ocr-det": lambda samples, ref, test: text_map_iou(ref, test),
    "ocr-rec": lambda samples, ref, test: text_agreement(ref, test),
    "yolo": lambda samples, ref, test: box_agreement(ref, test),
    "minilm": embedding_cosine,
}


def task_metric(model_id: str, samples: Sequence[Mapping[str, np.ndarray]], ref_outputs: Sequence,
                test_outputs: Sequence) -> tuple[str, float]:
    """(metric name, value) of `model_id`'s task metric; 1.0 means the same behaviour as fp32."""
    name = model_info(model_id).task_metric
    if len(ref_outputs) != len(test_outputs):
        raise ValueError(f"{len(ref_outputs)} reference outputs but {len(test_outputs)} test outputs")
    return name, float(_TASK_METRICS[model_id](samples, ref_outputs, test_outputs))


def fidelity(model_id: str, samples: Sequence[Mapping[str, np.ndarray]], ref_outputs: Sequence,
             test_outputs: Sequence) -> dict:
    """{"sqnr_db": ..., "metric": name, "value": ...}: the two numbers we report per model."""
    name, value = task_metric(model_id, samples, ref_outputs, test_outputs)
    return {"sqnr_db": sqnr_db(ref_outputs, test_outputs), "metric": name, "value": value}
