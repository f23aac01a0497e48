"""run_onnx on a tiny hand-written graph, from a path and from a ModelProto."""

import numpy as np
import onnx
import onnx.parser
import pytest

from qcompiler.errors import ConfigError
from qcompiler.zoo import run_onnx


def _model() -> onnx.ModelProto:
    return onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17]>
    g (float[N, 3] x) => (float[N, 3] doubled, float[N] total) {
        two = Constant <value = float {2.0}> ()
        doubled = Mul (x, two)
        axes = Constant <value = int64[1] {1}> ()
        total = ReduceSum <keepdims = 0> (x, axes)
    }""")


@pytest.mark.parametrize("optimization", ["disable", "all"])
def test_run_onnx_returns_every_output_per_sample(tmp_path, optimization):
    samples = [{"x": np.array([[1.0, 2.0, 3.0]], np.float32)}, {"x": np.ones((2, 3), np.float32)}]
    path = tmp_path / "model.onnx"
    onnx.save(_model(), str(path))
    for model in (path, _model()):
        outputs = run_onnx(model, samples, threads=1, optimization=optimization)
        assert len(outputs) == 2 and all(len(o) == 2 for o in outputs)
        np.testing.assert_array_equal(outputs[0][0], [[2.0, 4.0, 6.0]])
        np.testing.assert_array_equal(outputs[0][1], [6.0])
        np.testing.assert_array_equal(outputs[1][1], [3.0, 3.0])


def test_unknown_optimization_level_is_a_config_error():
    with pytest.raises(ConfigError, match="optimization must be one of"):
        run_onnx(_model(), [], optimization="max")
