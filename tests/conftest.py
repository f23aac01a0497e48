import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import parse_model  # noqa: E402


@pytest.fixture
def conv_model() -> onnx.ModelProto:
    """Conv(+bias) -> Relu -> Conv: two quantizable ops sharing nothing, 4 -> 8 -> 4 channels."""
    rng = np.random.default_rng(0)
    weights = {name: (rng.standard_normal(shape) * 0.3).astype(np.float32)
               for name, shape in (("w1", (8, 4, 3, 3)), ("b1", (8,)), ("w2", (4, 8, 3, 3)), ("b2", (4,)))}
    return parse_model("""
    g (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (a)
        y = Conv <pads = [1, 1, 1, 1]> (r, w2, b2)
    }""", weights)
