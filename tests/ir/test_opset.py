import numpy as np
import onnx
import pytest

from helpers import parse_model, run
from qcompiler.errors import UnsupportedModelError
from qcompiler.ir import default_opset, ensure_opset


def test_old_opset_is_converted_and_still_computes_the_same():
    model = parse_model("""
    g (float[1, 2, 4, 4] x) => (float[1, 3, 4, 4] y) {
        c = Conv <pads = [1, 1, 1, 1]> (x, w)
        y = Softmax <axis = 1> (c)
    }""", {"w": np.linspace(-1, 1, 54, dtype=np.float32).reshape(3, 2, 3, 3)}, opset=11)
    model.metadata_props.add(key="source", value="exporter")
    converted, changed = ensure_opset(model, 13)
    assert changed and default_opset(converted) == 13
    onnx.checker.check_model(converted, full_check=True)
    assert {p.key: p.value for p in converted.metadata_props} == {"source": "exporter"}
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 2, 4, 4)).astype(np.float32)}
    np.testing.assert_allclose(run(model, feeds)[0], run(converted, feeds)[0], rtol=1e-6, atol=1e-6)


def test_model_at_or_above_the_minimum_is_untouched():
    model = parse_model("g (float[2] x) => (float[2] y) { y = Relu (x) }", opset=17)
    converted, changed = ensure_opset(model, 13)
    assert not changed and converted is model


def test_too_old_opset_is_a_clear_error():
    model = parse_model("g (float[2] x) => (float[2] y) { y = Relu (x) }", opset=6)
    with pytest.raises(UnsupportedModelError, match="opset 6 is too old"):
        ensure_opset(model, 13)
