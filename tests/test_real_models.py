"""End-to-end compile of every real model of shared/MODELS.md: checker, ONNX Runtime, fidelity.

The bounds sit well below what benchmarks/fidelity.py measures (see benchmarks/results/fidelity.md)
and far above what a broken quantizer gives (wrong axis or scale drops SQNR below 0 dB and task
agreement towards 0), so these fail on real regressions, not on noise.
"""

import onnx
import pytest

import qcompiler
from qcompiler.zoo.data import calibration_samples, evaluation_samples
from qcompiler.zoo.metrics import fidelity
from qcompiler.zoo.models import fetch_model
from qcompiler.zoo.run import run_onnx

# model id -> (minimum SQNR dB, minimum task metric, number of Conv/ConvTranspose/MatMul/Gemm quantized)
EXPECTED = {
    "ocr-det": (10.0, 0.85, 64),
    "ocr-rec": (10.0, 0.6, 47),
    "yolo": (25.0, 0.7, 64),
    "minilm": (12.0, 0.98, 36),
}


@pytest.mark.realmodel
@pytest.mark.parametrize("model_id", sorted(EXPECTED))
def test_real_model_compiles_and_keeps_fidelity(model_id, tmp_path):
    min_sqnr, min_metric, quantized_ops = EXPECTED[model_id]
    model_path = fetch_model(model_id)
    compiled = qcompiler.compile(model_path, calibration_samples(model_id, 16))
    output = compiled.save(tmp_path / "model.int8.onnx")
    onnx.checker.check_model(str(output), full_check=True)
    assert len(compiled.summary.quantized) == quantized_ops
    evaluation = evaluation_samples(model_id, 8)
    result = fidelity(model_id, evaluation, run_onnx(model_path, evaluation), run_onnx(output, evaluation))
    assert result["sqnr_db"] >= min_sqnr, result
    assert result["value"] >= min_metric, result
