"""The compiled calibrator kernels against their numpy references (calibrators/kernels.py)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from qcompiler.calibrators import KLCalibrator, MinMaxCalibrator, MSECalibrator, PercentileCalibrator, kernels
from qcompiler.calibrators.kl import _level_spans, entropy_divergences
from qcompiler.calibrators.mse import SquaredErrorModel

compiled_only = pytest.mark.skipif(not kernels.COMPILED, reason="installed without the compiled kernels")


@pytest.fixture
def numpy_only(monkeypatch):
    """Run the numpy fallbacks, as an install without a C compiler does."""
    monkeypatch.setattr(kernels, "COMPILED", False)


def numpy_extremes(values: np.ndarray) -> tuple[float, float]:
    if np.isnan(values).any():
        return np.nan, np.nan
    return float(values.min()) + 0.0, float(values.max()) + 0.0


def reference_bins(values: np.ndarray, scale: float) -> np.ndarray:
    """The sign-magnitude grid, written out value by value in float64."""
    counts = np.zeros(8192, np.int64)
    for x in values.astype(np.float64):
        counts[4096 + int(x * scale) - int(np.signbit(x))] += 1
    return counts


def awkward_arrays(dtype) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    tiny = np.finfo(dtype).smallest_subnormal
    return [
        rng.standard_normal(100_003).astype(dtype),
        np.maximum(rng.standard_normal(4097), 0).astype(dtype),  # ReLU: half exact zeros
        np.array([-0.0, 0.0, -0.0], dtype),
        np.array([-0.0], dtype),
        np.array([tiny, -tiny, 0.0], dtype),
        np.array([np.finfo(dtype).max, -np.finfo(dtype).max], dtype),
        np.full(9, 3.5, dtype),
        np.array([7.0], dtype),
    ]


def test_kernels_are_compiled_where_a_c_compiler_exists():
    """An install on a machine with a C compiler builds them; silently losing them would only show
    as slower calibration."""
    if shutil.which("cc") or shutil.which("gcc"):
        assert kernels.COMPILED


@compiled_only
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extremes_match_numpy(dtype):
    for values in awkward_arrays(dtype):
        assert kernels.extremes(values) == numpy_extremes(values)
        assert str(kernels.extremes(values)) == str(numpy_extremes(values))  # +0.0, never -0.0


@compiled_only
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("position", [0, 500, 999])
@pytest.mark.parametrize("special", [np.inf, -np.inf, np.nan, np.copysign(np.nan, -1.0)])
def test_extremes_report_infinities_and_any_nan(dtype, position, special):
    """Including a NaN with the sign bit set, which orders below -inf by its bits."""
    values = np.random.default_rng(1).standard_normal(1000).astype(dtype)
    values[position] = special
    assert np.signbit(values[position]) == np.signbit(special)
    low, high = kernels.extremes(values)
    if np.isnan(special):
        assert np.isnan(low) and np.isnan(high)
    else:
        assert (low, high) == numpy_extremes(values)


@compiled_only
def test_extremes_of_a_strided_view_fall_back_to_numpy():
    values = np.arange(20, dtype=np.float32)[::3]
    assert kernels.extremes(values) == (0.0, 18.0)


@compiled_only
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stride", [1, 7, 13])
def test_bin_strided_matches_the_numpy_path_and_a_reference(dtype, stride, monkeypatch):
    rng = np.random.default_rng(2)
    values = np.concatenate([rng.laplace(0, 1, 30_011), [0.0, -0.0, 2.0 ** -11, -(2.0 ** -11), 15.999]]).astype(dtype)
    scale = 2.0 ** 8  # grid [-16, 16), bins of width 2**-8
    compiled = np.zeros(8192, np.int64)
    kernels.bin_strided(values, stride, scale, compiled)
    monkeypatch.setattr(kernels, "COMPILED", False)
    fallback = np.zeros(8192, np.int64)
    kernels.bin_strided(values, stride, scale, fallback)
    np.testing.assert_array_equal(compiled, fallback)
    np.testing.assert_array_equal(compiled, reference_bins(values[::stride], scale))


@compiled_only
@pytest.mark.parametrize("bad", [16.0, np.inf, np.nan])
def test_bin_strided_leaves_the_counts_alone_when_a_value_is_off_the_grid(bad):
    values = np.random.default_rng(3).uniform(-1, 1, 5000).astype(np.float32)
    values[4000] = bad
    counts = np.arange(8192, dtype=np.int64)
    with pytest.raises(ValueError, match="outside the histogram grid"):
        kernels.bin_strided(values, 1, 2.0 ** 8, counts)
    np.testing.assert_array_equal(counts, np.arange(8192))


@compiled_only
@pytest.mark.parametrize("with_extremes", [False, True])
def test_observe_is_extremes_plus_bin_strided_in_one_pass(with_extremes):
    values = np.random.default_rng(4).standard_normal(50_000).astype(np.float32)
    scale, stride = 2.0 ** 9, 11
    counts = np.zeros(8192, np.int64)
    low, high, binned = kernels.observe(values, stride, scale, with_extremes, counts)
    assert binned and (low, high) == numpy_extremes(values)
    expected = values[::stride]
    if with_extremes:
        expected = np.concatenate([expected, np.float32([low, high])])
    np.testing.assert_array_equal(counts, reference_bins(expected, scale))


@compiled_only
@pytest.mark.parametrize("bad", [5.0, np.inf, np.nan])
def test_observe_bins_nothing_unless_every_value_is_on_the_grid(bad):
    """Even a value outside the strided subset (index 1 with stride 7) keeps the counts unchanged."""
    values = np.random.default_rng(5).uniform(-1, 1, 10_000).astype(np.float32)
    values[1] = bad
    counts = np.zeros(8192, np.int64)
    low, high, binned = kernels.observe(values, 7, 2.0 ** 10, True, counts)
    assert not binned and not counts.any()
    assert np.isnan(high) if np.isnan(bad) else high == bad


def calibrator_factories():
    return {
        "minmax": lambda: MinMaxCalibrator(),
        "percentile": lambda: PercentileCalibrator(99.99, values_per_update=1000),
        "percentile_two_sided": lambda: PercentileCalibrator(99.9, symmetric=False, values_per_update=1000),
        "mse": lambda: MSECalibrator(values_per_update=1000),
        "mse_asymmetric": lambda: MSECalibrator(symmetric=False, values_per_update=1000),
        "kl": lambda: KLCalibrator(values_per_update=1000),
    }


@compiled_only
@pytest.mark.parametrize("kind", list(calibrator_factories()))
def test_calibrators_give_the_same_range_with_and_without_the_kernels(kind, monkeypatch):
    rng = np.random.default_rng(6)
    batches = [rng.laplace(0.2, 1 + step, 3001 + 500 * step).astype(np.float32) for step in range(6)]
    batches.append(np.maximum(batches[0], 0))
    ranges = []
    for compiled in (True, False):
        monkeypatch.setattr(kernels, "COMPILED", compiled)
        calibrator = calibrator_factories()[kind]()
        for batch in batches:
            calibrator.update(batch)
        ranges.append(calibrator.compute_range())
        if hasattr(calibrator, "histogram"):
            ranges.append(calibrator.histogram.counts.copy())
    if len(ranges) == 2:
        assert ranges[0] == ranges[1]
    else:
        np.testing.assert_array_equal(ranges[1], ranges[3])  # same counts, bin for bin
        assert ranges[0] == ranges[2]


@compiled_only
@pytest.mark.parametrize("symmetric", [True, False])
def test_squared_errors_match_the_numpy_reference(symmetric, numpy_only):
    rng = np.random.default_rng(7)
    for trial in range(20):
        edges = np.sort(rng.uniform(0 if symmetric else -4, 4, rng.integers(2, 2500)))
        if len(edges) > 6:
            edges[3] = edges[2]  # zero-width bins: point masses
            edges[-2] = edges[-3]
        counts = rng.poisson(50, len(edges) - 1).astype(np.float64)
        counts[rng.integers(0, len(counts), len(counts) // 4)] = 0.0
        highs = rng.uniform(0.05, 5, 64)
        lows = np.zeros(64) if symmetric else -rng.uniform(0.05, 5, 64)
        steps = 127 if symmetric else 255
        model = SquaredErrorModel(counts, edges)
        reference = model(lows, highs, steps)  # numpy_only: the fallback path
        kernels.COMPILED = True
        compiled = model(lows, highs, steps)
        kernels.COMPILED = False
        np.testing.assert_allclose(compiled, reference, rtol=1e-9, atol=1e-12 * reference.max())


@compiled_only
def test_entropy_divergences_match_the_numpy_path(monkeypatch):
    counts = np.random.default_rng(9).poisson(np.exp(-np.linspace(0, 8, 2048)) * 1000).astype(np.float64)
    candidates, compiled = entropy_divergences(counts)
    monkeypatch.setattr(kernels, "COMPILED", False)
    _, reference = entropy_divergences(counts)
    finite = np.isfinite(reference)
    np.testing.assert_array_equal(np.isfinite(compiled), finite)
    np.testing.assert_allclose(compiled[finite], reference[finite], rtol=1e-9, atol=1e-12)


@compiled_only
def test_entropy_divergences_kernel_checks_its_spans():
    counts = np.arange(1.0, 257.0)
    first_bins, end_bins, span_of_level = _level_spans(16, 256, 16)
    assert span_of_level.dtype == np.uint16
    bad = span_of_level.copy()
    bad[3, 5] = len(first_bins)
    with pytest.raises(IndexError, match="span index out of range"):
        kernels.entropy_divergences(counts, first_bins, end_bins, bad, 16)
    with pytest.raises(IndexError, match="span bins out of range"):
        kernels.entropy_divergences(counts, first_bins, end_bins + 1000, span_of_level, 16)
    with pytest.raises(ValueError, match="do not fit the candidates"):
        kernels.entropy_divergences(counts[:100], first_bins, end_bins, span_of_level, 16)
    with pytest.raises(TypeError, match="uint16"):
        kernels._kernels.entropy_divergences(counts, first_bins, end_bins, span_of_level.astype(np.int64), 16)


@compiled_only
def test_the_compiled_module_rejects_bad_buffers_with_a_clear_error():
    from qcompiler.calibrators import _kernels
    values, counts = np.zeros(10, np.float32), np.zeros(8192, np.int64)
    with pytest.raises(TypeError, match="float32 or float64"):
        _kernels.extremes(np.zeros(10, np.int32))
    with pytest.raises(ValueError, match="empty"):
        _kernels.extremes(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="8192 int64"):
        _kernels.bin_strided(values, 1, 1.0, np.zeros(100, np.int64))
    with pytest.raises(ValueError, match="stride"):
        _kernels.observe(values, 0, 1.0, False, counts)
    with pytest.raises(ValueError, match="empty"):
        _kernels.observe(np.zeros(0, np.float32), 1, 1.0, False, counts)
    with pytest.raises(ValueError, match="not C-contiguous"):
        _kernels.bin_strided(values, 1, 1.0, np.zeros(16384, np.int64)[::2])  # not contiguous
    assert not counts.any()


@compiled_only
@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc to build the plain variant")
def test_vector_clones_give_the_same_bits_as_the_plain_build(tmp_path):
    """The installed module picks an AVX-512, AVX2 or baseline clone of each loop by CPU; a build
    without clones must give the same bits, so ranges do not depend on the machine."""
    import importlib.util
    import subprocess
    import sysconfig
    from pathlib import Path

    from qcompiler.calibrators import _kernels
    source = Path(__file__).resolve().parents[2] / "calibrators" / "_kernels.c"
    target = tmp_path / ("_kernels" + sysconfig.get_config_var("EXT_SUFFIX"))
    subprocess.run(["gcc", "-O3", "-ffp-contract=off", "-fno-trapping-math", "-DQCOMPILER_NO_CLONES", "-fPIC",
                    "-shared", f"-I{sysconfig.get_paths()['include']}", str(source), "-o", str(target)], check=True)
    spec = importlib.util.spec_from_file_location("_kernels", target)
    plain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plain)
    rng = np.random.default_rng(10)
    for trial in range(30):
        edges = np.sort(rng.uniform(-5, 5, rng.integers(3, 3000)))
        density = rng.exponential(size=len(edges) - 1)
        lows, highs = rng.uniform(-6, 0, 100), rng.uniform(0.01, 6, 100)
        assert plain.squared_errors(edges, density, lows, highs, 255.0) == _kernels.squared_errors(
            edges, density, lows, highs, 255.0)
        counts = rng.poisson(np.exp(-np.linspace(0, 8, 512)) * 1000).astype(np.float64)
        spans = _level_spans(64, 512, 64)
        assert plain.entropy_divergences(counts, *spans, 64) == _kernels.entropy_divergences(counts, *spans, 64)
        for dtype in (np.float32, np.float64):
            values = rng.standard_normal(rng.integers(1, 50_000)).astype(dtype)
            assert plain.extremes(values) == _kernels.extremes(values)
            counts, plain_counts = np.zeros(8192, np.int64), np.zeros(8192, np.int64)
            assert plain.observe(values, 7, 2.0 ** 9, True, plain_counts) == _kernels.observe(values, 7, 2.0 ** 9, True, counts)
            np.testing.assert_array_equal(plain_counts, counts)
