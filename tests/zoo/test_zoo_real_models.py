"""Each real model runs on its evaluation data, finds something there, and its metrics respond.

Perfect against itself; close to perfect when its weights get a little noise (a stand-in for good
quantization); clearly worse with much more noise, so the metric cannot be stuck at 1.0.
"""

import math

import numpy as np
import onnx
import pytest
from zoo_helpers import perturb_weights

from qcompiler.zoo import MODEL_IDS, evaluation_samples, fetch_model, fidelity, metrics, model_info, run_onnx

pytestmark = pytest.mark.realmodel

SAMPLES = 16


@pytest.fixture(scope="module", params=MODEL_IDS)
def reference(request):
    """(model id, fp32 model, evaluation samples, fp32 outputs)."""
    model_id = request.param
    model = onnx.load(str(fetch_model(model_id)))
    samples = evaluation_samples(model_id, SAMPLES)
    return model_id, model, samples, run_onnx(model, samples)


def test_outputs_have_content_worth_comparing(reference):
    model_id, _, samples, outputs = reference
    first = [o[0] for o in outputs]
    if model_id == "yolo":
        found = [len(metrics.decode_yolo(o)[0]) for o in first]
        assert sum(n > 0 for n in found) >= SAMPLES // 4, found
    elif model_id == "ocr-rec":
        assert all(o.shape[-1] == 6625 for o in first)  # blank + 6623 characters + space
        assert all(len(metrics.ctc_greedy_decode(o)) >= 4 for o in first)  # every line reads as text
    elif model_id == "ocr-det":
        text_fraction = [(o > metrics.DBNET_THRESHOLD).mean() for o in first]
        assert all(0.002 < f < 0.5 for f in text_fraction), text_fraction
    else:
        assert all(o.shape == (1, s["input_ids"].shape[1], 384) for o, s in zip(first, samples))


def test_model_against_itself_is_perfect(reference):
    model_id, _, samples, outputs = reference
    result = fidelity(model_id, samples, outputs, outputs)
    assert result == {"sqnr_db": math.inf, "metric": model_info(model_id).task_metric, "value": 1.0}


def test_metrics_degrade_with_weight_noise(reference):
    model_id, model, samples, outputs = reference
    slight = fidelity(model_id, samples, outputs, run_onnx(perturb_weights(model, 0.003), samples))
    heavy = fidelity(model_id, samples, outputs, run_onnx(perturb_weights(model, 0.1), samples))
    assert 15.0 < slight["sqnr_db"] < 80.0 and slight["value"] >= 0.95, slight
    assert heavy["sqnr_db"] < slight["sqnr_db"] - 10.0 and heavy["value"] < slight["value"], heavy
    assert np.isfinite(heavy["sqnr_db"])
