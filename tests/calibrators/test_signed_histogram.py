"""SignedHistogram: bin assignment, exact growth and merge, folding and resampling."""

import math

import numpy as np
import pytest
from calib_distributions import sample, uneven_batches

from qcompiler.calibrators import SignedHistogram


def reference_counts(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Counts on the documented grid, computed independently: float64 division, explicit signs.

    E = smallest power of two strictly above max|x| (at least 2**-100), w = E / 4096; magnitude bin
    k = floor(|x| / w); x >= +0 goes to 4096 + k, x < 0 or -0.0 to 4095 - k.
    """
    x = values.astype(np.float64)
    abs_max = float(np.max(np.abs(x)))
    exponent = -100
    while abs_max >= 2.0 ** exponent:
        exponent += 1
    width = 2.0 ** exponent / 4096
    magnitude = np.floor(np.abs(x) / width).astype(np.int64)
    negative = np.signbit(x)
    index = np.where(negative, 4095 - magnitude, 4096 + magnitude)
    return np.bincount(index, minlength=8192), width


@pytest.mark.parametrize("name", ["uniform", "gaussian", "laplace_outliers", "relu_half_normal"])
def test_counts_match_independent_binning(name):
    values = sample(name, 50_000)
    histogram = SignedHistogram()
    for batch in uneven_batches(values):
        histogram.update(batch)
    expected, width = reference_counts(values)
    assert histogram.bin_width == width
    np.testing.assert_array_equal(histogram.counts, expected)
    assert histogram.count == values.size
    assert (histogram.min, histogram.max) == (float(values.min()), float(values.max()))


def test_values_on_bin_edges_and_signed_zero():
    # 1.0 = 2**0 forces E = 2 (strictly above), w = 2**-11; edges are exact multiples of w.
    width = 2.0 ** -11
    values = np.array([0.0, -0.0, width, -width, 3 * width, -3 * width, 1.0, -1.0], np.float32)
    histogram = SignedHistogram()
    histogram.update(values)
    expected, expected_width = reference_counts(values)
    assert expected_width == width
    np.testing.assert_array_equal(histogram.counts, expected)
    folded, _ = histogram.folded_abs()
    assert folded[0] == 2 and folded[1] == 2 and folded[3] == 2 and folded[2048] == 2


@pytest.mark.parametrize("extremes", [(-3.0, 5.0), (-0.0, 2.0 ** -11), (-2.0 ** -11, 0.0)])
def test_limited_update_bins_a_strided_subset_plus_both_extremes(extremes):
    """values_per_update=L bins every p-th value (p the smallest prime >= 7 that leaves <= L-2 of
    them) and the exact min and max, even when those sit on bin edges or are signed zeros (a zero
    extreme counts as +0.0, whichever zero the data had, so both kernels agree)."""
    rng = np.random.default_rng(4)
    low, high = extremes
    values = rng.uniform(low, high, 10_000).astype(np.float32)
    values[[1234, 8765]] = [low, high]
    limited = SignedHistogram(values_per_update=1_000)
    limited.update(values)
    stride = 11  # 10_000 / 998 needs >= 11; 11 is prime
    expected = np.concatenate([values[::stride], np.float32([low + 0.0, high + 0.0])])
    np.testing.assert_array_equal(limited.counts, reference_counts(expected)[0])
    assert limited.count == expected.size
    assert (limited.min, limited.max) == (low, high)


def test_growth_is_exact_in_any_order():
    small = np.linspace(-0.01, 0.013, 1001, dtype=np.float32)
    large = np.array([-300.0, 5.5, 1e-3], np.float32)
    forward, backward, single = SignedHistogram(), SignedHistogram(), SignedHistogram()
    forward.update(small)
    forward.update(large)
    backward.update(large)
    backward.update(small)
    single.update(np.concatenate([small, large]))
    for histogram in (forward, backward):
        np.testing.assert_array_equal(histogram.counts, single.counts)
        assert histogram.exponent == single.exponent == 9  # 256 <= 300 < 512
    np.testing.assert_array_equal(single.counts, reference_counts(np.concatenate([small, large]))[0])


def test_zeros_first_then_data():
    histogram = SignedHistogram()
    histogram.update(np.zeros(10, np.float32))
    assert histogram.abs_max == 0.0
    histogram.update(np.array([0.75, -0.25], np.float32))
    expected, _ = reference_counts(np.concatenate([np.zeros(10), [0.75, -0.25]]))
    np.testing.assert_array_equal(histogram.counts, expected)


def test_tiny_and_huge_values():
    values = np.array([1e-38, -3e-39, 1e-45, 3e38, -2e38], np.float32)  # subnormals, near float32 max
    histogram = SignedHistogram()
    histogram.update(values[:3])
    histogram.update(values[3:])
    expected, _ = reference_counts(values)
    np.testing.assert_array_equal(histogram.counts, expected)
    float64 = SignedHistogram()
    float64.update(np.array([1e300, -1e-300]))
    np.testing.assert_array_equal(float64.counts, reference_counts(np.array([1e300, -1e-300]))[0])


def test_merge_equals_single_pass():
    values = sample("laplace_outliers", 40_000)
    first, second, single = SignedHistogram(), SignedHistogram(), SignedHistogram()
    first.update(values[:1000] * 1e-3)  # much smaller E than the other half
    second.update(values[1000:])
    single.update(values[:1000] * 1e-3)
    single.update(values[1000:])
    first.merge(second)
    np.testing.assert_array_equal(first.counts, single.counts)
    assert (first.exponent, first.count, first.min, first.max) == (
        single.exponent, single.count, single.min, single.max)


def test_folded_abs_matches_abs_histogram():
    values = sample("gaussian", 30_000)
    histogram = SignedHistogram()
    histogram.update(values)
    folded, width = histogram.folded_abs()
    # Independent: np.histogram of |x| on the same edges; no |x| sits exactly on an edge here.
    expected, _ = np.histogram(np.abs(values.astype(np.float64)), bins=np.arange(4097) * width)
    np.testing.assert_array_equal(folded, expected)


def test_resampled_abs_places_each_value_within_one_bin():
    values = sample("laplace_outliers", 200_000)
    histogram = SignedHistogram()
    histogram.update(values)
    counts, width = histogram.resampled_abs(2048)
    abs_values = np.abs(values.astype(np.float64))
    direct, edges = np.histogram(abs_values, bins=2048, range=(0.0, abs_values.max()))
    assert width == pytest.approx(edges[1])
    assert counts.sum() == pytest.approx(values.size, rel=1e-12)
    ours = np.concatenate([[0.0], np.cumsum(counts)])
    reference = np.concatenate([[0, 0], np.cumsum(direct), [values.size]])
    # Each value moved by at most one bin => the cumulative count at edge k lies between the
    # direct cumulative counts at edges k-1 and k+1.
    assert np.all(ours >= reference[:-2] - 1e-6)
    assert np.all(ours <= reference[2:] + 1e-6)


def test_non_finite_values_rejected_without_changing_state():
    histogram = SignedHistogram()
    histogram.update(np.array([1.0, -2.0], np.float32))
    before = histogram.counts.copy()
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="non-finite values"):
            histogram.update(np.array([0.5, bad, 3.0], np.float32))
    np.testing.assert_array_equal(histogram.counts, before)
    assert histogram.count == 2 and histogram.max == 1.0 and math.isfinite(histogram.min)
