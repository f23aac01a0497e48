"""reduce_range: 7-bit weights for x86 CPUs without VNNI. Every stored weight lies in [-64, 63]
(vpmaddubsw's two u8 x s8 products then fit its saturating int16), the per-channel scales are
abs-max / 63, the result still matches fp32 within the bound the coarser weight step implies, and
the automatic choice follows the CPU flags."""

import numpy as np
import onnx
import pytest

import qcompiler
from helpers import parse_model, random_samples, run, sqnr_db
from ort_helpers import compile_tiny, ort_optimized_ops
from qcompiler.config import QuantConfig
from qcompiler.cpu import cpu_model_name, cpu_needs_reduced_range
from qcompiler.errors import ConfigError

rng = np.random.default_rng(21)


def stored_weights(model: onnx.ModelProto) -> list[np.ndarray]:
    """The int8 initializers behind weight DequantizeLinears and in DynamicQuantizeMatMul/MatMulIntegerToFloat."""
    initializers = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    slots = {"DequantizeLinear": 0, "DynamicQuantizeMatMul": 1, "MatMulIntegerToFloat": 1}
    return [initializers[node.input[slots[node.op_type]]] for node in model.graph.node
            if node.op_type in slots and initializers.get(node.input[slots[node.op_type]], np.zeros(0, np.uint8)).dtype == np.int8]


def conv_model():
    w1, b1, w2, b2 = [(rng.standard_normal(s) * 0.3).astype(np.float32) for s in ((8, 4, 3, 3), (8,), (4, 8, 1, 1), (4,))]
    w1[3] *= 20  # per-channel scales: one wide channel must not coarsen the others
    return parse_model("""
    g (float[1, 4, 8, 8] x) => (float[1, 4, 8, 8] y) {
        a = Conv <pads = [1, 1, 1, 1]> (x, w1, b1)
        r = Relu (a)
        y = Conv (r, w2, b2)
    }""", {"w1": w1, "b1": b1, "w2": w2, "b2": b2})


@pytest.mark.parametrize("output_format", ["qdq", "qoperator"])
def test_static_weights_are_seven_bit_and_still_match_fp32(output_format):
    model = conv_model()
    samples = random_samples({"x": (1, 4, 8, 8)}, 4)
    reduced = compile_tiny(model, samples, format=output_format, reduce_range=True)
    full = compile_tiny(model, samples, format=output_format, reduce_range=False)
    weights = stored_weights(reduced)
    assert len(weights) == 2
    for value in weights:
        assert value.min() >= -64 and value.max() <= 63
        # every output channel uses the 7-bit range (abs-max / 63), not a fraction of it
        channel_max = np.abs(value.reshape(value.shape[0], -1)).max(axis=1)
        assert np.all(channel_max == 63)
    assert max(int(np.abs(w).max()) for w in stored_weights(full)) == 127
    reference = np.concatenate([run(model, s)[0] for s in samples])
    reduced_out = np.concatenate([run(reduced, s, optimize=True)[0] for s in samples])
    full_out = np.concatenate([run(full, s, optimize=True)[0] for s in samples])
    # half the weight resolution costs at most ~6 dB of weight noise; activations dominate here
    assert sqnr_db(reference, reduced_out) > 25
    assert sqnr_db(reference, reduced_out) > sqnr_db(reference, full_out) - 6.5
    if output_format == "qoperator":
        assert ort_optimized_ops(reduced)["QLinearConv"] == 1  # the graph-output Conv stays float


def test_dynamic_weights_are_seven_bit_within_the_seven_bit_bound():
    w = rng.standard_normal((32, 16)).astype(np.float32)
    w[:, 2] *= 10
    b = rng.standard_normal(16).astype(np.float32)
    model = parse_model("g (float[2, 3, 32] x) => (float[2, 3, 16] y) { m = MatMul (x, w)\n y = Add (m, b) }", {"w": w, "b": b})
    compiled = qcompiler.compile(model, None, QuantConfig(mode="dynamic", reduce_range=True)).model
    onnx.checker.check_model(compiled, full_check=True)
    (stored,) = stored_weights(compiled)
    assert stored.min() >= -64 and stored.max() <= 63 and np.all(np.abs(stored).max(axis=0) == 63)
    for _ in range(3):
        x = (rng.standard_normal((2, 3, 32)) * 2).astype(np.float32)
        x_step = (max(float(x.max()), 0.0) - min(float(x.min()), 0.0)) / 255
        w_steps = np.abs(w).max(axis=0) / 63
        flat = np.abs(x.reshape(-1, 32))
        bound = flat @ np.broadcast_to(w_steps / 2, w.shape) + (x_step / 2) * np.abs(w).sum(axis=0) + 32 * x_step * w_steps / 4
        error = np.abs(run(compiled, {"x": x})[0] - run(model, {"x": x})[0]).reshape(-1, 16)
        assert np.all(error <= bound * (1 + 1e-4) + 1e-5)


@pytest.mark.parametrize("flags, expected", [
    ("fpu sse4_2 avx avx2 fma", True),                          # Haswell-class AVX2
    ("avx2 avx512f avx512bw", True),                            # Skylake-SP: AVX-512 but no VNNI
    ("avx2 avx512f avx512bw avx512_vnni", False),               # Cascade Lake and later
    ("avx2 avx_vnni", False),                                   # Alder Lake AVX-VNNI
    ("sse4_2", False),                                          # no vpmaddubsw path to protect
])
def test_automatic_choice_follows_the_cpu_flags(flags, expected):
    assert cpu_needs_reduced_range(f"processor\t: 0\nflags\t\t: {flags}\n") is expected


def test_explicit_setting_overrides_and_tensorrt_never_reduces(monkeypatch):
    import qcompiler.config as config
    monkeypatch.setattr(config, "cpu_needs_reduced_range", lambda: True)  # the name config calls
    assert QuantConfig().resolved_reduce_range and not QuantConfig(reduce_range=False).resolved_reduce_range
    monkeypatch.setattr(config, "cpu_needs_reduced_range", lambda: False)
    assert not QuantConfig().resolved_reduce_range and QuantConfig(reduce_range=True).resolved_reduce_range
    assert not QuantConfig(target="tensorrt").resolved_reduce_range
    with pytest.raises(ConfigError):
        QuantConfig(target="tensorrt", reduce_range=True)
    assert cpu_needs_reduced_range("Features\t: fp asimd asimddp\n") is False  # ARM: no x86 flags line
    assert cpu_model_name("processor\t: 0\nmodel name\t: Example CPU @ 2.0GHz\n") == "Example CPU @ 2.0GHz"


def test_command_line_switches(tmp_path):
    import subprocess
    import sys
    onnx.save(conv_model(), tmp_path / "model.onnx")
    calib = tmp_path / "calib"
    calib.mkdir()
    for index, sample in enumerate(random_samples({"x": (1, 4, 8, 8)}, 2)):
        np.savez(calib / f"sample_{index}.npz", **sample)

    def compile_with(*flags):
        result = subprocess.run([sys.executable, "-m", "qcompiler", "compile", tmp_path / "model.onnx", "-o",
                                 tmp_path / "out.onnx", "--calib", calib, *flags], capture_output=True, text=True, timeout=300)
        return result, (onnx.load(tmp_path / "out.onnx") if result.returncode == 0 else None)

    result, model = compile_with("--reduce-range")
    assert result.returncode == 0, result.stderr
    assert max(int(np.abs(w).max()) for w in stored_weights(model)) == 63 and "7 bits" in result.stderr
    result, model = compile_with("--no-reduce-range")
    assert max(int(np.abs(w).max()) for w in stored_weights(model)) == 127 and "7 bits" not in result.stderr
    result, _ = compile_with("--reduce-range", "--target", "tensorrt")
    assert result.returncode != 0 and "reduce_range" in result.stderr and "Traceback" not in result.stderr
