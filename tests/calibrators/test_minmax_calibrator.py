"""MinMaxCalibrator and ChannelAbsMaxCalibrator against explicit per-channel loops."""

import numpy as np
import pytest
from calib_distributions import sample, uneven_batches

from qcompiler.calibrators import ChannelAbsMaxCalibrator, MinMaxCalibrator


@pytest.mark.parametrize("name", ["uniform", "gaussian", "laplace_outliers", "relu_half_normal", "constant"])
def test_per_tensor_is_exact(name):
    values = sample(name, 20_000)
    calibrator = MinMaxCalibrator()
    for batch in uneven_batches(values):
        calibrator.update(batch)
    result = calibrator.compute_range()
    assert (result.low, result.high) == (float(values.min()), float(values.max()))
    assert isinstance(result.low, float)


@pytest.mark.parametrize("axis, shapes", [
    (1, [(2, 3, 5, 4), (5, 3, 5, 4), (1, 3, 5, 4)]),    # NCHW channels, varying batch
    (-1, [(2, 3, 5, 4), (5, 3, 5, 4), (1, 3, 5, 4)]),   # last axis
    (0, [(6, 3, 4), (6, 3, 1), (6, 3, 9)]),             # first axis, varying trailing size
])
def test_per_channel_matches_loop_over_channels(axis, shapes):
    rng = np.random.default_rng(4)
    batches = [(rng.normal(0, 1, shape) * rng.uniform(0.1, 10, shape[axis]).reshape(
        [-1 if i == axis % len(shape) else 1 for i in range(len(shape))])).astype(np.float32)
        for shape in shapes]
    calibrator = MinMaxCalibrator(axis=axis)
    for batch in batches:
        calibrator.update(batch)
    result = calibrator.compute_range()
    channels = batches[0].shape[axis]
    for c in range(channels):
        seen = np.concatenate([np.take(b, c, axis=axis).ravel() for b in batches])
        assert result.low[c] == seen.min() and result.high[c] == seen.max()
    assert result.low.shape == (channels,)


def test_channel_abs_max_matches_loop():
    rng = np.random.default_rng(5)
    batches = [rng.laplace(0, 1, (n, 7, 16)).astype(np.float32) * np.arange(1, 17) for n in (3, 1, 4)]
    batches[1][0, 2, 5] = -1000.0  # a negative extreme must count
    calibrator = ChannelAbsMaxCalibrator()  # axis -1: hidden dimension
    for batch in batches:
        calibrator.update(batch)
    expected = np.array([max(np.abs(b[..., c]).max() for b in batches) for c in range(16)])
    np.testing.assert_array_equal(calibrator.abs_max(), expected)
    result = calibrator.compute_range()
    np.testing.assert_array_equal(result.high, expected)
    np.testing.assert_array_equal(result.low, -expected)
    assert calibrator.abs_max()[5] == 1000.0


def test_moving_average_follows_the_recurrence():
    rng = np.random.default_rng(6)
    batches = [rng.normal(0, 1 + i, 500).astype(np.float32) for i in range(6)]
    calibrator = MinMaxCalibrator(moving_average=True, averaging_constant=0.3)
    for batch in batches:
        calibrator.update(batch)
    low, high = float(batches[0].min()), float(batches[0].max())
    for batch in batches[1:]:
        low += 0.3 * (float(batch.min()) - low)
        high += 0.3 * (float(batch.max()) - high)
    result = calibrator.compute_range()
    assert result.low == pytest.approx(low, rel=1e-12) and result.high == pytest.approx(high, rel=1e-12)
    assert result.low > min(float(b.min()) for b in batches)  # genuinely averaged, not the minimum


def test_moving_average_merge_means_concatenation():
    rng = np.random.default_rng(7)
    batches = [rng.normal(0, 1, (50, 4)).astype(np.float32) * (i + 1) for i in range(9)]
    first, second, sequential = (MinMaxCalibrator(axis=1, moving_average=True, averaging_constant=0.2)
                                 for _ in range(3))
    for batch in batches[:4]:
        first.update(batch)
    for batch in batches[4:]:
        second.update(batch)
    for batch in batches:
        sequential.update(batch)
    first.merge(second)
    np.testing.assert_allclose(first.compute_range().low, sequential.compute_range().low, rtol=1e-12)
    np.testing.assert_allclose(first.compute_range().high, sequential.compute_range().high, rtol=1e-12)


def test_channel_errors():
    calibrator = MinMaxCalibrator(axis=1)
    calibrator.update(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="channel count"):
        calibrator.update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match="axis"):
        MinMaxCalibrator(axis=3).update(np.zeros((2, 3)))
    other = MinMaxCalibrator(axis=1)
    other.update(np.zeros((1, 5)))
    with pytest.raises(ValueError, match="channel count"):
        calibrator.merge(other)
    with pytest.raises(ValueError):
        MinMaxCalibrator(averaging_constant=0.0)
