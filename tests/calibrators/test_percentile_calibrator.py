"""PercentileCalibrator against numpy's percentile of the raw samples."""

import numpy as np
import pytest
from calib_distributions import sample, uneven_batches

from qcompiler.calibrators import PercentileCalibrator

CONTINUOUS = ["uniform", "gaussian", "laplace_outliers", "relu_half_normal"]


def fed(calibrator, values):
    for batch in uneven_batches(values):
        calibrator.update(batch)
    return calibrator


@pytest.mark.parametrize("percentile", [99.0, 99.9, 99.999])
@pytest.mark.parametrize("name", CONTINUOUS)
def test_symmetric_within_one_bin_of_numpy(name, percentile):
    values = sample(name, 200_000)
    calibrator = fed(PercentileCalibrator(percentile, symmetric=True), values)
    width = calibrator.histogram.bin_width
    threshold = np.percentile(np.abs(values.astype(np.float64)), percentile)
    low, high = max(-threshold, values.min()), min(threshold, values.max())  # ORT's clipping
    result = calibrator.compute_range()
    assert abs(result.low - low) <= width
    assert abs(result.high - high) <= width
    assert width <= np.abs(values).max() / 2048  # the tolerance is tight, not a free pass


@pytest.mark.parametrize("percentile", [99.0, 99.99])
@pytest.mark.parametrize("name", CONTINUOUS)
def test_two_sided_within_one_bin_of_numpy(name, percentile):
    values = sample(name, 200_000, seed=3)
    calibrator = fed(PercentileCalibrator(percentile, symmetric=False), values)
    width = calibrator.histogram.bin_width
    result = calibrator.compute_range()
    assert abs(result.low - np.percentile(values, 100.0 - percentile)) <= width
    assert abs(result.high - np.percentile(values, percentile)) <= width


def test_outliers_are_clipped_and_100_is_min_max():
    values = sample("laplace_outliers", 100_000)
    clipped = fed(PercentileCalibrator(99.99), values).compute_range()
    assert clipped.high < 15.0  # the 90.0 outlier is gone
    full = fed(PercentileCalibrator(100.0, symmetric=False), values).compute_range()
    assert (full.low, full.high) == (float(values.min()), float(values.max()))


def test_invalid_percentile():
    with pytest.raises(ValueError):
        PercentileCalibrator(0.0)
    with pytest.raises(ValueError):
        PercentileCalibrator(100.5)
    with pytest.raises(ValueError):
        PercentileCalibrator(40.0, symmetric=False)
