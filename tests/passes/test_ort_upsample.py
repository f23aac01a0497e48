"""NearestUpsampleAsExpand: a nearest Resize by integer factors between int8 ops becomes an Expand on
channels-last integers, bit-exact, and ONNX Runtime cancels its transposes against its own NHWC ones."""

import numpy as np
import pytest

from helpers import op_types, parse_model, run
from ort_helpers import apply_pass, ort_optimized_ops
from qcompiler.config import QuantConfig
from qcompiler.context import CompileContext
from qcompiler.passes.ort_lowering import NearestUpsampleAsExpand

rng = np.random.default_rng(11)
SCALE = {"s": np.float32(0.05), "z": np.uint8(128)}


def resize_group(scales, attributes, output_scale=np.float32(0.05), opset=13):
    return parse_model(f"""
    g (float[2, 3, 4, 5] x) => (float[N, C, H, W] y) {{
        q = QuantizeLinear (x, s, z)
        d = DequantizeLinear (q, s, z)
        r = Resize <{attributes}> (d, roi, scales)
        p = QuantizeLinear (r, t, z)
        y = DequantizeLinear (p, t, z)
    }}""", {**SCALE, "t": output_scale, "roi": np.float32([]), "scales": np.float32(scales)}, opset=opset)


def rewrite(model):
    return apply_pass(NearestUpsampleAsExpand(), model)


@pytest.mark.parametrize("scales, attributes, opset", [
    ([1, 1, 2, 2], 'mode = "nearest", coordinate_transformation_mode = "asymmetric", nearest_mode = "floor"', 13),
    ([1, 1, 4, 3], 'mode = "nearest", coordinate_transformation_mode = "half_pixel", nearest_mode = "round_prefer_ceil"', 13),
    ([1, 1, 8, 8], 'mode = "nearest"', 11),  # opset 11/12: Unsqueeze takes its axes as an attribute
])
def test_expand_gives_the_integers_the_resize_gives(scales, attributes, opset):
    model = resize_group(scales, attributes, opset=opset)
    rewritten, result, graph = rewrite(model)
    assert result.modified and "Resize" not in op_types(rewritten) and "Expand" in op_types(rewritten)
    x = (rng.standard_normal((2, 3, 4, 5)) * 3).astype(np.float32)
    for optimize in (False, True):
        expected, actual = run(model, {"x": x}, optimize)[0], run(rewritten, {"x": x}, optimize)[0]
        assert actual.shape == (2, 3, 4 * scales[2], 5 * scales[3]) and np.array_equal(actual, expected)
    assert not NearestUpsampleAsExpand().run(graph, CompileContext(QuantConfig())).modified


@pytest.mark.parametrize("scales, attributes, output_scale", [
    ([1, 1, 2, 2], 'mode = "nearest", coordinate_transformation_mode = "asymmetric"', 0.05),  # rounds: not a repeat
    ([1, 1, 1.5, 2], 'mode = "nearest"', 0.05),
    ([1, 2, 2, 2], 'mode = "nearest"', 0.05),
    ([1, 1, 2, 2], 'mode = "linear"', 0.05),
    ([1, 1, 2, 2], 'mode = "nearest"', 0.1),  # requantizes: not pure data movement
])
def test_leaves_resizes_that_are_not_a_pixel_repeat_of_the_same_integers(scales, attributes, output_scale):
    model = resize_group(scales, attributes, np.float32(output_scale))
    rewritten, result, _ = rewrite(model)
    assert not result.modified and op_types(rewritten) == op_types(model)


def test_ort_runs_it_between_nhwc_convs_without_extra_transposes():
    w1 = np.clip(np.round(rng.standard_normal((8, 3, 3, 3)) * 40), -127, 127).astype(np.int8)
    w2 = np.clip(np.round(rng.standard_normal((4, 8, 1, 1)) * 40), -127, 127).astype(np.int8)
    model = parse_model("""
    g (float[1, 3, 16, 16] x) => (float[1, 4, 64, 64] y) {
        q = QuantizeLinear (x, s, z)
        c1 = QLinearConv <pads = [1, 1, 1, 1]> (q, s, z, w1, ws, wz, s, z)
        d = DequantizeLinear (c1, s, z)
        r = Resize <mode = "nearest", coordinate_transformation_mode = "asymmetric", nearest_mode = "floor"> (d, roi, scales)
        p = QuantizeLinear (r, s, z)
        c2 = QLinearConv (p, s, z, w2, ws, wz, s, z)
        y = DequantizeLinear (c2, s, z)
    }""", {**SCALE, "w1": w1, "w2": w2, "ws": np.float32(0.01), "wz": np.int8(0), "roi": np.float32([]),
           "scales": np.float32([1, 1, 4, 4])})
    rewritten, result, _ = rewrite(model)
    assert result.modified
    before, after = ort_optimized_ops(model), ort_optimized_ops(rewritten)
    assert before["Resize"] == 1 and after["Resize"] == 0
    assert after["Transpose"] <= before["Transpose"], (before, after)  # ours cancelled against ORT's NHWC ones
    x = rng.standard_normal((1, 3, 16, 16)).astype(np.float32)
    assert np.array_equal(run(model, {"x": x}, True)[0], run(rewritten, {"x": x}, True)[0])
