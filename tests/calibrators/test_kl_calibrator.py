"""KLCalibrator against a plain loop implementation of TensorRT's entropy calibration."""

import numpy as np
import pytest
from calib_distributions import sample, uneven_batches

from qcompiler.calibrators import KLCalibrator, MinMaxCalibrator
from qcompiler.calibrators.kl import entropy_divergences


def reference_entropy_threshold(hist: np.ndarray, width: float, levels: int = 128,
                                start: int = 128) -> tuple[float, np.ndarray]:
    """TensorRT's published algorithm, one candidate at a time, as pytorch-quantization writes it.

    Returns (threshold, divergences). bins[0] = bins[1], level of bin j = digitize over
    linspace(0, i, levels + 1), last argmin, threshold (i + 0.5) * width.
    """
    bins = np.array(hist, dtype=np.float64)
    bins[0] = bins[1]
    divergences = []
    for i in range(start, len(bins) + 1):
        reference = bins[:i].copy()
        reference[i - 1] += bins[i:].sum()
        level_of_bin = np.digitize(np.arange(i), np.linspace(0, i, levels + 1)) - 1
        nonempty = bins[:i] != 0
        level_mass = np.bincount(level_of_bin, weights=bins[:i], minlength=levels)
        level_nonempty = np.bincount(level_of_bin, weights=nonempty, minlength=levels)
        candidate = np.zeros(i)
        candidate[nonempty] = level_mass[level_of_bin[nonempty]] / level_nonempty[level_of_bin[nonempty]]
        p = reference / reference.sum()
        q = candidate / candidate.sum()
        support = p > 0
        if np.any(q[support] == 0):
            divergences.append(np.inf)
        else:
            divergences.append(float(np.sum(p[support] * np.log(p[support] / q[support]))))
    divergences = np.array(divergences)
    last_argmin = len(divergences) - 1 - int(np.argmin(divergences[::-1]))
    return (last_argmin + start + 0.5) * width, divergences


@pytest.mark.parametrize("name", ["uniform", "gaussian", "laplace_outliers", "relu_half_normal"])
def test_threshold_matches_loop_reference(name):
    values = sample(name, 100_000)
    calibrator = KLCalibrator()
    for batch in uneven_batches(values):
        calibrator.update(batch)
    hist, width = calibrator.histogram.resampled_abs(2048)
    expected, expected_divergences = reference_entropy_threshold(hist, width)
    # The brief allows one bin; the vectorised search picks the very same candidate.
    assert calibrator.threshold() == pytest.approx(expected, rel=1e-12)
    _, divergences = entropy_divergences(hist)
    finite = np.isfinite(expected_divergences)
    np.testing.assert_array_equal(np.isfinite(divergences), finite)
    np.testing.assert_allclose(divergences[finite], expected_divergences[finite], rtol=1e-9, atol=1e-12)
    result = calibrator.compute_range()
    assert result.high == pytest.approx(min(expected, values.max()), abs=width)
    assert result.low == pytest.approx(max(-expected, values.min()), abs=width)


def test_sparse_histogram_with_empty_bins_and_infinite_candidates():
    rng = np.random.default_rng(5)
    hist = np.zeros(2048)
    hist[rng.choice(2048, 300, replace=False)] = rng.integers(1, 50, 300)
    hist[2047] = 3
    expected, expected_divergences = reference_entropy_threshold(hist, 1.0)
    _, divergences = entropy_divergences(hist)
    assert np.isinf(expected_divergences).sum() > 100  # the case is exercised
    np.testing.assert_array_equal(np.isinf(divergences), np.isinf(expected_divergences))
    finite = np.isfinite(expected_divergences)
    np.testing.assert_allclose(divergences[finite], expected_divergences[finite], rtol=1e-9, atol=1e-12)


def test_outliers_are_clipped_far_below_max():
    values = sample("laplace_outliers", 100_000)
    calibrator = KLCalibrator()
    calibrator.update(values)
    result = calibrator.compute_range()
    assert 3.0 < result.high < 0.25 * values.max()
    minmax = MinMaxCalibrator()
    minmax.update(values)
    assert result.high < minmax.compute_range().high


def test_compute_range_time_is_small():
    import time
    calibrator = KLCalibrator()
    calibrator.update(sample("gaussian", 100_000))
    start = time.perf_counter()
    calibrator.compute_range()
    assert time.perf_counter() - start < 0.05
