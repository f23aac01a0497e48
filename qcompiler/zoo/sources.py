"""Real source material that ships inside installed packages: photos, faces, sentences, fonts.

Nothing here touches the network. Photos come from scikit-image's bundled samples (only those in
its wheel, not the ones it would download), scikit-learn's two sample photos and matplotlib's
sample_data; faces from the LFW subset in scikit-image's wheel; sentences from the Python
documentation bundled as `pydoc_data.topics`; fonts are the DejaVu TTFs matplotlib ships. Every
source belongs to either the calibration or the evaluation split, so evaluation never sees a
photo, face or sentence that calibration saw. (The sentences differ between Python versions, so
MiniLM and OCR data are deterministic per Python version.)
"""

from __future__ import annotations

import functools
import re
import zlib
from pathlib import Path

import numpy as np

SPLITS = ("calibration", "evaluation")

# Photos with people (astronaut, camera, grace_hopper) and a few others that the NudeNet detector
# fires on (colorwheel, coffee, moon) sit on both sides, so both splits give detections.
IMAGE_SPLITS = {
    "calibration": ("astronaut", "camera", "chelsea", "rocket", "china", "coins",
                    "immunohistochemistry", "colorwheel", "brick", "text"),
    "evaluation": ("grace_hopper", "coffee", "moon", "flower", "hubble_deep_field", "retina",
                   "gravel", "grass", "page", "clock"),
}

FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
              "DejaVuSans-Oblique.ttf", "DejaVuSerif-Bold.ttf")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, not {split!r}")


@functools.lru_cache(maxsize=None)
def _load_image(name: str) -> np.ndarray:
    """Photo `name` as an HxWx3 uint8 RGB array (grey ones replicated to three channels)."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image

        image = load_sample_image(f"{name}.jpg")
    elif name == "grace_hopper":
        import matplotlib
        from PIL import Image

        path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        image = np.asarray(Image.open(path).convert("RGB"))
    else:
        import skimage.data

        image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    image = np.ascontiguousarray(image[:, :, :3], dtype=np.uint8)
    image.setflags(write=False)
    return image


def source_images(split: str) -> list[tuple[str, np.ndarray]]:
    """(name, HxWx3 uint8 RGB) for every photo of `split`, loaded once per process."""
    _check_split(split)
    return [(name, _load_image(name)) for name in IMAGE_SPLITS[split]]


@functools.lru_cache(maxsize=None)
def faces(split: str) -> np.ndarray:
    """Grey 25x25 uint8 face crops of `split`: halves of the 100 faces in skimage's LFW subset.

    The photos above hold only three people, too few for the person detector's evaluation, so
    data.py pastes these faces onto photo crops.
    """
    import skimage.data

    _check_split(split)
    crops = (skimage.data.lfw_subset()[:100] * 255).round().astype(np.uint8)  # the first 100 are faces
    crops = crops[:50] if split == "calibration" else crops[50:]
    crops.setflags(write=False)
    return crops


@functools.lru_cache(maxsize=None)
def _all_sentences() -> tuple[str, ...]:
    """Prose sentences of 5..40 words from pydoc_data.topics, in a fixed order, without duplicates."""
    from pydoc_data.topics import topics

    sentences: dict[str, None] = {}
    for key in sorted(topics):
        for paragraph in re.split(r"\n\s*\n", topics[key]):
            if paragraph.startswith(" "):  # indented paragraphs are grammar rules and code
                continue
            for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z])", " ".join(paragraph.split())):
                if _is_prose(sentence):
                    sentences.setdefault(sentence)
    return tuple(sentences)


def _is_prose(sentence: str) -> bool:
    words = len(sentence.split())
    letters = sum(character.isalpha() or character == " " for character in sentence)
    return (5 <= words <= 40 and sentence.isascii() and sentence[0].isupper()
            and sentence[-1] in ".!?" and letters >= 0.9 * len(sentence))


@functools.lru_cache(maxsize=None)
def sentences(split: str) -> tuple[str, ...]:
    """The sentences of `split`; a sentence's split is fixed by a hash of its text."""
    _check_split(split)
    # crc32, not hash(): str hashes are salted per process and would reshuffle the split.
    side = SPLITS.index(split)
    return tuple(s for s in _all_sentences() if zlib.crc32(s.encode()) % 2 == side)


@functools.lru_cache(maxsize=None)
def font(file_name: str, size: int):
    """A PIL FreeType font from matplotlib's bundled DejaVu TTFs."""
    import matplotlib
    from PIL import ImageFont

    return ImageFont.truetype(str(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / file_name), size)
