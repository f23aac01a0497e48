"""The row sample SmoothQuant's alpha search scores layers on: bounded, deterministic, uniform,
exact per-channel extremes; and the calibration stage answering a "row_sample" request."""

import numpy as np
import pytest

from helpers import parse_model
from qcompiler.calibrators.rows import RowSampleCalibrator
from qcompiler.compiler import CalibrationStage
from qcompiler.config import QuantConfig
from qcompiler.context import CompileContext
from qcompiler.ir import Graph
from qcompiler.passes import StatisticRequest


def batches(count, rows=50, channels=4, seed=0):
    generator = np.random.default_rng(seed)
    start = 0
    for _ in range(count):
        batch = generator.standard_normal((rows, channels)).astype(np.float32)
        batch[:, 0] = np.arange(start, start + rows)  # channel 0 numbers the rows: which ones were kept
        start += rows
        yield batch


def test_memory_is_bounded_and_extremes_are_exact():
    calibrator = RowSampleCalibrator(capacity=64)
    seen = list(batches(40))
    for batch in seen:
        calibrator.update(batch.reshape(5, 10, 4))  # any leading shape: rows are vectors on the last axis
    sample = calibrator.sample()
    everything = np.concatenate(seen)
    assert sample.rows.shape == (64, 4) and sample.rows_seen == 2000
    np.testing.assert_array_equal(sample.channel_min, everything.min(axis=0))
    np.testing.assert_array_equal(sample.channel_max, everything.max(axis=0))
    np.testing.assert_array_equal(sample.channel_absmax, np.abs(everything).max(axis=0))
    kept = sample.rows[:, 0].astype(int)
    assert len(set(kept)) == 64  # distinct real rows
    np.testing.assert_array_equal(sample.rows, everything[kept])


def test_sample_is_deterministic_and_uniform_over_the_stream():
    def kept_rows(seed):
        calibrator = RowSampleCalibrator(capacity=100, seed=seed)
        for batch in batches(100):
            calibrator.update(batch)
        return calibrator.sample().rows[:, 0]

    np.testing.assert_array_equal(kept_rows(0), kept_rows(0))
    positions = np.concatenate([kept_rows(seed) for seed in range(20)])  # 2000 picks out of 5000 rows
    # Uniform: each fifth of the stream holds ~20% of the picks (a FIFO or first-k sample would not).
    shares = np.histogram(positions, bins=5, range=(0, 5000))[0] / positions.size
    assert np.all(np.abs(shares - 0.2) < 0.04), shares


def test_merge_keeps_exact_extremes_and_capacity():
    a, b = RowSampleCalibrator(capacity=32), RowSampleCalibrator(capacity=32)
    first, second = list(batches(3)), list(batches(3, seed=1))
    for batch in first:
        a.update(batch)
    for batch in second:
        b.update(batch)
    a.merge(b)
    sample = a.sample()
    everything = np.concatenate(first + second)
    assert sample.rows.shape == (32, 4) and sample.rows_seen == 300
    np.testing.assert_array_equal(sample.channel_max, everything.max(axis=0))
    with pytest.raises(TypeError):
        a.merge(RowSampleCalibrator(capacity=8))


def test_channel_count_change_is_an_error():
    calibrator = RowSampleCalibrator()
    calibrator.update(np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="channel count"):
        calibrator.update(np.zeros((3, 5), np.float32))


def test_calibration_stage_answers_row_sample_requests():
    model = parse_model("g (float[3, 4] x) => (float[3, 4] y) { y = Relu (x) }")
    samples = [{"x": np.full((3, 4), float(i), np.float32) - 2} for i in range(5)]
    context = CompileContext(QuantConfig())
    CalibrationStage(samples, context.config)(Graph(model), [StatisticRequest("y", "row_sample", -1)], context)
    sample = context.row_samples[("y", -1)]
    assert sample.rows.shape == (15, 4) and sample.rows_seen == 15
    np.testing.assert_array_equal(sample.channel_max, np.full(4, 2.0))
    assert context.has_statistic("y", "row_sample", -1)
