"""Deterministic calibration and evaluation inputs for the zoo models, made from real sources.

Each sample is `{input_name: array}` with a batch of one. Calibration draws only on the calibration
split of sources.py and evaluation only on the evaluation split, so the two never share a source
photo or sentence. Sample i depends only on (model, split, seed, i), so asking for more samples
extends a list without changing its head, and the same seed always gives identical arrays.

Preprocessing follows each model's own pipeline: YOLOv8 (NudeNet) takes RGB/255 at 320x320; the
PaddleOCR models take BGR (they were trained on cv2 images) normalised to (x/255-0.5)/0.5, text
lines resized to height 48 and zero-padded on the right to width 320 like PaddleOCR's rec resize.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .minilm import tokenize
from .models import model_info
from .sources import FONT_FILES, faces, font, sentences, source_images

DETECTOR_SIZE = 320  # NudeNet 320n's training size; also used for the text detector
LINE_HEIGHT, LINE_WIDTH = 48, 320  # PP-OCRv4 rec_img_shape [3, 48, 320]

Sample = dict[str, np.ndarray]


def calibration_samples(model_id: str, count: int, seed: int = 0) -> list[Sample]:
    """`count` inputs for calibrating `model_id`, from calibration-split sources only."""
    return _samples(model_id, "calibration", count, seed)


def evaluation_samples(model_id: str, count: int, seed: int = 1) -> list[Sample]:
    """`count` inputs for evaluating `model_id`, from evaluation-split sources only."""
    return _samples(model_id, "evaluation", count, seed)


def iter_calibration_samples(model_id: str, count: int, seed: int = 0) -> Iterator[Sample]:
    """The same samples as `calibration_samples`, made one at a time: for calibrating on many
    samples without holding them all in memory."""
    return _iter_samples(model_id, "calibration", count, seed)


def write_npz_dir(samples: Iterable[Mapping[str, np.ndarray]], directory: str | os.PathLike) -> list[Path]:
    """Writes sample i to `directory/sample_{i:04d}.npz`, arrays keyed by input name."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, sample in enumerate(samples):
        path = directory / f"sample_{index:04d}.npz"
        np.savez(path, **sample)
        paths.append(path)
    return paths


def _samples(model_id: str, split: str, count: int, seed: int) -> list[Sample]:
    return list(_iter_samples(model_id, split, count, seed))


def _iter_samples(model_id: str, split: str, count: int, seed: int) -> Iterator[Sample]:
    model_info(model_id)  # rejects unknown ids with a ZooError
    if count < 0:
        raise ValueError(f"count must be >= 0, not {count}")
    stream = (seed, zlib.crc32(f"{model_id}/{split}".encode()))
    if model_id == "minilm":
        return _sentence_samples(split, count, stream)
    make_sample = _IMAGE_SAMPLERS[model_id]
    photos = source_images(split)
    # Cycle through the photos in a seeded order, so a few samples already cover several photos.
    order = np.random.default_rng(stream).permutation(len(photos))
    return (make_sample(np.random.default_rng(stream + (index,)), photos[order[index % len(photos)]][1], split)
            for index in range(count))


def _sentence_samples(split: str, count: int, stream: tuple[int, int]) -> Iterator[Sample]:
    pool = sentences(split)
    order = np.random.default_rng(stream).permutation(len(pool))
    # One sentence per sample: sequence lengths differ between samples, as they do in real traffic.
    return (tokenize([pool[order[index % len(pool)]]]) for index in range(count))


def _random_crop(rng: np.random.Generator, photo: np.ndarray, size: tuple[int, int],
                 min_fraction: float) -> Image.Image:
    """A random crop with the aspect of `size` (w, h), randomly mirrored, resized to `size`."""
    height, width = photo.shape[:2]
    aspect = size[0] / size[1]
    crop_height = min(height, width / aspect) * rng.uniform(min_fraction, 1.0)
    crop_width = crop_height * aspect
    left = rng.uniform(0, width - crop_width)
    top = rng.uniform(0, height - crop_height)
    image = Image.fromarray(photo).resize(size, Image.BILINEAR,
                                          box=(left, top, left + crop_width, top + crop_height))
    return image.transpose(Image.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def _yolo_sample(rng: np.random.Generator, photo: np.ndarray, split: str) -> Sample:
    """A photo crop with 0..3 real faces pasted on it, so the person detector has something to find."""
    image = _random_crop(rng, photo, (DETECTOR_SIZE, DETECTOR_SIZE), min_fraction=0.6)
    face_crops = faces(split)
    for _ in range(rng.integers(0, 4)):
        size = int(rng.integers(48, 97))  # NudeNet finds most LFW faces at this scale, few at 140+
        face = Image.fromarray(face_crops[rng.integers(len(face_crops))]).resize((size, size), Image.BICUBIC)
        image.paste(face.convert("RGB"), tuple(int(v) for v in rng.integers(0, DETECTOR_SIZE - size, size=2)))
    return {"images": _to_nchw(np.asarray(image, np.float32) / 255.0)}


def _ocr_normalise(rgb: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> 1x3xHxW float32 BGR in [-1, 1], as PaddleOCR feeds its models."""
    return _to_nchw((rgb[:, :, ::-1].astype(np.float32) / 255.0 - 0.5) / 0.5)


def _to_nchw(hwc: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(hwc.transpose(2, 0, 1)[None], dtype=np.float32)


def _word_run(rng: np.random.Generator, texts: tuple[str, ...], face, max_width: float) -> str:
    """Consecutive words of a random sentence, as many as fit in `max_width` pixels (at least one)."""
    words = texts[rng.integers(len(texts))].split()
    start = rng.integers(len(words))
    run = words[start]
    for word in words[start + 1:]:
        if face.getlength(f"{run} {word}") > max_width:
            break
        run = f"{run} {word}"
    return run


def _det_sample(rng: np.random.Generator, photo: np.ndarray, split: str) -> Sample:
    """A photo crop with 2..5 snippets of rendered text, for the DBNet text detector."""
    image = _random_crop(rng, photo, (DETECTOR_SIZE, DETECTOR_SIZE), min_fraction=0.4)
    draw = ImageDraw.Draw(image)
    pixels = np.asarray(image)
    snippets = int(rng.integers(2, 6))
    band_height = DETECTOR_SIZE / snippets
    for band in range(snippets):  # one snippet per horizontal band, so snippets rarely overlap
        face = font(FONT_FILES[rng.integers(len(FONT_FILES))], int(rng.integers(14, 41)))
        text = _word_run(rng, sentences(split), face, max_width=DETECTOR_SIZE * rng.uniform(0.3, 0.9))
        left, top, right, bottom = draw.textbbox((0, 0), text, font=face)
        x = rng.uniform(0, max(1.0, DETECTOR_SIZE - right))
        y = min(band * band_height + rng.uniform(0, max(1.0, band_height - bottom)), DETECTOR_SIZE - bottom)
        if rng.random() < 0.3:  # a label with its own backing box, like a sign or caption
            backing = tuple(int(v) for v in rng.integers(200, 256, size=3))
            draw.rectangle((x + left - 4, y + top - 4, x + right + 4, y + bottom + 4), fill=backing)
            brightness = float(np.mean(backing))
        else:
            brightness = float(pixels[int(y):int(y + bottom) + 1, int(x):int(x + right) + 1].mean())
        # Contrast with what is underneath, or the detector is right to find nothing.
        low, high = (0, 70) if brightness > 110 else (190, 256)
        draw.text((x, y), text, font=face, fill=tuple(int(v) for v in rng.integers(low, high, size=3)))
    return {"x": _ocr_normalise(np.asarray(image))}


def _rec_sample(rng: np.random.Generator, photo: np.ndarray, split: str) -> Sample:
    """One rendered text line, resized to height 48 and right-padded to width 320 like PaddleOCR."""
    face = font(FONT_FILES[rng.integers(len(FONT_FILES))], int(rng.integers(22, 41)))
    ascent, descent = face.getmetrics()
    margin = int(rng.integers(2, 8))
    height = ascent + descent + 2 * margin
    text = _word_run(rng, sentences(split), face, max_width=height * LINE_WIDTH / LINE_HEIGHT - 2 * margin)
    width = int(np.ceil(face.getlength(text))) + 2 * margin
    if rng.random() < 0.5:
        background = Image.new("RGB", (width, height), tuple(int(v) for v in rng.integers(190, 256, size=3)))
    else:  # a washed-out photo crop, like text printed over a picture
        crop = np.asarray(_random_crop(rng, photo, (width, height), min_fraction=0.2), np.float32)
        wash = rng.uniform(0.45, 0.75)
        background = Image.fromarray((crop * (1 - wash) + 255 * wash).astype(np.uint8))
    ImageDraw.Draw(background).text((margin, margin), text, font=face,
                                    fill=tuple(int(v) for v in rng.integers(0, 90, size=3)))
    resized_width = min(LINE_WIDTH, int(np.ceil(LINE_HEIGHT * width / height)))
    line = _ocr_normalise(np.asarray(background.resize((resized_width, LINE_HEIGHT), Image.BILINEAR)))
    padded = np.zeros((1, 3, LINE_HEIGHT, LINE_WIDTH), np.float32)
    padded[:, :, :, :resized_width] = line
    return {"x": padded}


_IMAGE_SAMPLERS: dict[str, Callable[[np.random.Generator, np.ndarray, str], Sample]] = {
    "yolo": _yolo_sample,
    "ocr-det": _det_sample,
    "ocr-rec": _rec_sample,
}
