"""The calibration stage runs samples side by side: results in sample order, bounded read-ahead,
errors naming the right sample, and statistics identical to one sample at a time."""

import time

import numpy as np
import pytest

import qcompiler
from helpers import parse_model, random_samples, run
from qcompiler.calibration import collect_statistics, expose_tensors, keep_only_outputs
from qcompiler.calibrators import make_calibrator
from qcompiler.errors import CalibrationError


def observers(names, calibrator="mse"):
    options = {"values_per_update": 64} if calibrator != "minmax" else {}
    return [(name, make_calibrator(calibrator, **options)) for name in names]


@pytest.mark.parametrize("threads", [2, 3])
def test_side_by_side_statistics_equal_one_at_a_time(conv_model, threads):
    samples = random_samples({"x": (1, 4, 8, 8)}, 9, seed=3)
    serial, parallel = observers(["a", "r", "y"]), observers(["a", "r", "y"])
    assert collect_statistics(conv_model, serial, samples, threads=1) == 9
    assert collect_statistics(conv_model, parallel, samples, threads=threads) == 9
    for (_, one), (_, side) in zip(serial, parallel):
        assert np.array_equal(one.histogram.counts, side.histogram.counts)
        assert one.compute_range() == side.compute_range()


def test_read_ahead_is_bounded(conv_model):
    """With 2 samples side by side, at most 3 samples' outputs exist at once, however many samples
    there are: the source is never read more than 3 ahead of the calibrators."""
    pulled, updated = [], []

    class Counting:
        name = "counting"

        def update(self, values):
            updated.append(len(pulled))

    def source():
        for index, sample in enumerate(random_samples({"x": (1, 4, 8, 8)}, 40)):
            pulled.append(index)
            yield sample

    collect_statistics(conv_model, [("y", Counting())], source(), threads=2)
    assert len(updated) == 40
    assert max(ahead - done for done, ahead in enumerate(updated, start=1)) <= 3


def test_failing_sample_is_named_when_samples_run_side_by_side(conv_model):
    samples = random_samples({"x": (1, 4, 8, 8)}, 6)
    samples[4] = {"x": np.zeros((1, 4, 9, 8), np.float32)}  # ONNX Runtime rejects the shape
    with pytest.raises(CalibrationError, match="calibration sample 4 failed to run"):
        collect_statistics(conv_model, observers(["y"]), samples, threads=2)


def test_nan_activation_is_named_with_its_sample_when_side_by_side(conv_model):
    samples = random_samples({"x": (1, 4, 8, 8)}, 6)
    samples[2]["x"][0, 0, 0, 0] = np.nan
    with pytest.raises(CalibrationError, match="NaN values on calibration sample 2"):
        collect_statistics(conv_model, observers(["a"], "minmax"), samples, threads=2)


def test_calibration_graph_keeps_only_what_the_calibrated_tensors_need(conv_model):
    """Asking for `a` drops the Relu, the second Conv and its weights; `a` is unchanged."""
    model = expose_tensors(conv_model, ["a"])
    kept = keep_only_outputs(model, ["a"])
    assert [node.op_type for node in model.graph.node] == ["Conv"]
    assert [output.name for output in model.graph.output] == ["a"]
    assert kept == {"w1", "b1"} == {tensor.name for tensor in model.graph.initializer}
    feed = {"x": np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)}
    reference = run(expose_tensors(conv_model, ["a"]), feed)[1]
    assert np.array_equal(run(model, feed)[0], reference)


def test_calibration_graph_keeps_what_a_subgraph_reads():
    """`s` is read only inside the If's branches (an outer-scope name), so its producer stays."""
    model = parse_model("""
    g (float[4] x, bool c) => (float[4] y) {
        s = Neg (x)
        t = Abs (x)
        y = If (c) <then_branch = then_g () => (float[4] o) { o = Identity (s) },
                     else_branch = else_g () => (float[4] o) { o = Identity (x) }>
    }""")
    keep_only_outputs(model, ["y"])
    assert [node.op_type for node in model.graph.node] == ["Neg", "If"]
    feed = {"x": np.arange(4, dtype=np.float32), "c": np.array(True)}
    assert np.array_equal(run(model, feed)[0], -feed["x"])


def test_compile_summary_times_each_calibration_phase(conv_model):
    """The summary reports where calibration time went: the four phases, each measured once
    (>= 0), together no longer than the whole compile."""
    samples = random_samples({"x": (1, 4, 8, 8)}, 8)
    start = time.perf_counter()
    compiled = qcompiler.compile(conv_model, samples, qcompiler.QuantConfig(calibrator="mse"))
    elapsed = time.perf_counter() - start
    seconds = compiled.summary.calibration_seconds
    assert list(seconds) == ["prepare", "session", "samples", "ranges"]
    assert all(value >= 0.0 for value in seconds.values())
    assert 0.0 < sum(seconds.values()) <= elapsed
