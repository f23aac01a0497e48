"""The ort lowering on the real models of shared/MODELS.md: ONNX Runtime must run the integer
kernels (counted in its optimized graph) and fidelity must stay within bounds set below what
benchmarks/latency.py measures (see benchmarks/results/latency.md)."""

import onnx
import pytest

import qcompiler
from ort_helpers import ort_optimized_ops
from qcompiler.zoo.data import calibration_samples, evaluation_samples
from qcompiler.zoo.metrics import fidelity
from qcompiler.zoo.models import MODEL_IDS, fetch_model
from qcompiler.zoo.run import run_onnx

# ops ORT must not run: QLinearSoftmax and SkipLayerNormalization are slower than the float Softmax
# and the Add + LayerNormalization they would replace (benchmarks/results/latency.md)
# ocr-det: FoldAffineIntoNextConv folds the hardswish's Div -> Mul -> Add into 10 unpadded Convs (58 QLinearMul without it)
# Resize 0: NearestUpsampleAsExpand turns the FPN/PAN upsamples into Expands on the integers
AT_MOST = {"yolo": {"QLinearSoftmax": 0, "DequantizeLinear": 3, "Resize": 0},
           "ocr-det": {"QLinearMul": 48, "QLinearAdd": 49, "Resize": 0},
           "minilm-dynamic": {"SkipLayerNormalization": 0}}
# model id -> (config options, min SQNR dB, min task metric, integer ops ORT must run, at least)
CASES = {
    # the head's Concats run as QLinearConcat (13 in the backbone + 4 in the head), its DFL Softmax in float
    "yolo": ({"format": "qoperator"}, 25.0, 0.7, {"QLinearConv": 64, "QLinearSigmoid": 55, "QLinearMul": 55,
                                                   "QLinearConcat": 17}),
    "ocr-det": ({"format": "qoperator"}, 8.0, 0.8, {"QLinearConv": 62, "QLinearAdd": 40, "QLinearMul": 40}),
    "ocr-rec": ({"format": "qoperator"}, 10.0, 0.6, {"QLinearConv": 34, "MatMulIntegerToFloat": 6}),
    "minilm-dynamic": ({"mode": "dynamic"}, 14.0, 0.98, {"DynamicQuantizeMatMul": 18, "MatMulIntegerToFloat": 18}),
    # 7-bit weights (CPUs without VNNI): a little below the full-range fidelity
    "minilm-dynamic-reduce-range": ({"mode": "dynamic", "reduce_range": True}, 14.0, 0.98, {"DynamicQuantizeMatMul": 18}),
}


@pytest.mark.realmodel
@pytest.mark.parametrize("case", sorted(CASES))
def test_real_model_runs_integer_kernels_with_fidelity(case):
    model_id = next(m for m in MODEL_IDS if case.startswith(m))
    options, min_sqnr, min_metric, kernels = CASES[case]
    model_path = fetch_model(model_id)
    calibration = None if options.get("mode") == "dynamic" else calibration_samples(model_id, 16)
    compiled = qcompiler.compile(model_path, calibration, qcompiler.QuantConfig(**options)).model
    onnx.checker.check_model(compiled)
    if options.get("reduce_range"):
        weights = [onnx.numpy_helper.to_array(t) for t in compiled.graph.initializer if t.data_type == onnx.TensorProto.INT8]
        assert weights and all(w.min() >= -64 and w.max() <= 63 for w in weights)
    ops = ort_optimized_ops(compiled)
    for op, count in kernels.items():
        assert ops[op] >= count, (op, ops)
    for op, count in AT_MOST.get(case, {}).items():
        assert ops[op] <= count, (op, ops)
    evaluation = evaluation_samples(model_id, 8)
    result = fidelity(model_id, evaluation, run_onnx(model_path, evaluation), run_onnx(compiled, evaluation))
    assert result["sqnr_db"] >= min_sqnr, result
    assert result["value"] >= min_metric, result
