"""The calibration stage runs samples side by side: results in sample order, bounded read-ahead,
errors naming the right sample, and statistics identical to one sample at a time."""

import time

import numpy as np
import pytest

import qcompiler
from helpers import parse_model, random_samples, run
from qcompiler.calibration import collect_statistics, compute_ranges, expose_tensors, keep_only_outputs
from qcompiler.calibrators import ChannelAbsMaxCalibrator, RowSampleCalibrator, make_calibrator
from qcompiler.errors import CalibrationError


def observers(names, calibrator="mse"):
    options = {"values_per_update": 64} if calibrator != "minmax" else {}
    return [(name, make_calibrator(calibrator, **options)) for name in names]


def all_kinds(names):
    """Every kind of observer on each tensor: commuting ones (fed by the worker threads) and
    order-dependent ones (fed in sample order)."""
    return [(name, calibrator) for name in names for calibrator in (
        make_calibrator("mse", values_per_update=64), make_calibrator("kl", values_per_update=64),
        make_calibrator("minmax"), make_calibrator("minmax", moving_average=True),
        ChannelAbsMaxCalibrator(axis=1), RowSampleCalibrator(axis=1, capacity=16))]


def state(calibrator):
    if isinstance(calibrator, RowSampleCalibrator):
        sample = calibrator.sample()
        return sample.rows.tobytes(), sample.channel_min.tobytes(), sample.channel_max.tobytes()
    if hasattr(calibrator, "histogram"):
        return calibrator.histogram.counts.tobytes(), calibrator.compute_range()
    found = calibrator.compute_range()
    return np.asarray(found.low).tobytes(), np.asarray(found.high).tobytes()


@pytest.mark.parametrize("threads", [2, 3])
def test_side_by_side_statistics_equal_one_at_a_time(conv_model, threads):
    samples = random_samples({"x": (1, 4, 8, 8)}, 9, seed=3)
    serial, parallel = all_kinds(["a", "r", "y"]), all_kinds(["a", "r", "y"])
    assert collect_statistics(conv_model, serial, samples, threads=1) == 9
    assert collect_statistics(conv_model, parallel, samples, threads=threads) == 9
    for (_, one), (_, side) in zip(serial, parallel):
        assert state(one) == state(side), type(one).__name__


def test_which_calibrators_may_be_fed_in_any_order():
    commuting = [make_calibrator(name) for name in ("minmax", "percentile", "mse", "kl")] + [ChannelAbsMaxCalibrator()]
    assert all(calibrator.updates_commute for calibrator in commuting)
    assert not make_calibrator("minmax", moving_average=True).updates_commute
    assert not getattr(RowSampleCalibrator(), "updates_commute", False)


def test_only_compiled_searches_run_side_by_side(monkeypatch):
    from qcompiler.calibrators import kernels
    searches = [make_calibrator(name) for name in ("mse", "kl")]
    assert all(calibrator.search_releases_gil == kernels.COMPILED for calibrator in searches)
    monkeypatch.setattr(kernels, "COMPILED", False)
    assert not any(calibrator.search_releases_gil for calibrator in searches)
    assert not any(getattr(make_calibrator(name), "search_releases_gil", False) for name in ("minmax", "percentile"))


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
    """The summary reports where calibration time went: the five phases, each measured once
    (>= 0), together no longer than the whole compile."""
    samples = random_samples({"x": (1, 4, 8, 8)}, 8)
    start = time.perf_counter()
    compiled = qcompiler.compile(conv_model, samples, qcompiler.QuantConfig(calibrator="mse"))
    elapsed = time.perf_counter() - start
    seconds = compiled.summary.calibration_seconds
    assert list(seconds) == ["prepare", "session", "samples", "release", "ranges"]
    assert all(value >= 0.0 for value in seconds.values())
    assert 0.0 < sum(seconds.values()) <= elapsed


def test_range_searches_split_over_threads_give_the_ranges_of_one_thread():
    rng = np.random.default_rng(5)
    calibrators = {}
    for index in range(7):
        for kind in ("mse", "kl", "percentile", "minmax"):
            calibrator = make_calibrator(kind)
            calibrator.update(rng.laplace(0.1 * index, 1.0 + index, 5000).astype(np.float32))
            calibrators[f"{kind}{index}"] = calibrator
    serial = compute_ranges(calibrators, threads=1)
    assert list(serial) == list(calibrators)
    for threads in (2, 3):
        assert compute_ranges(calibrators, threads=threads) == serial


def test_range_search_error_names_the_first_failing_tensor_in_order():
    calibrators = {name: make_calibrator("kl") for name in ("a", "b", "c", "d")}
    calibrators["a"].update(np.ones(10, np.float32))
    calibrators["d"].update(np.ones(10, np.float32))  # b and c saw no data
    with pytest.raises(CalibrationError, match="activation 'b': no data"):
        compute_ranges(calibrators, threads=2)
