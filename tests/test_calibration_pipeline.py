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


GATHER_TABLES = """
g (int64[3] ids, float[2, 16, 5, 5] image) => (float[3, 8] rows, float[3, 8] shared_sum, float[3, 8] fixed,
                                                 float[2, 16, 5, 5] conv) {
    rows = Gather (table, ids)
    picked = Constant <value = int64[3] {0, 2, 4}> ()
    fixed = Gather (folded, picked)
    shared_gathered = Gather (shared, ids)
    shared_total = ReduceSum <keepdims = 1> (shared)
    shared_sum = Add (shared_gathered, shared_total)
    conv = Conv <pads = [1, 1, 1, 1]> (image, kernel)
}"""


def gather_tables_model():
    rng = np.random.default_rng(8)
    # 2 KiB and more: Graph.to_runtime_model hands tables of at least 1 KiB over as arrays
    tables = {name: rng.standard_normal((64, 8)).astype(np.float32) for name in ("table", "folded", "shared")}
    tables["kernel"] = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    return parse_model(GATHER_TABLES, tables)


def runtime_model(model):
    """`model` with its tables declared external, as `Graph.to_runtime_model` hands them over."""
    from qcompiler.ir import Graph
    return Graph(model).to_runtime_model()


def gather_feed():
    return {"ids": np.array([1, 7, 3], np.int64),
            "image": np.random.default_rng(9).standard_normal((2, 16, 5, 5)).astype(np.float32)}


def test_only_tables_gathered_at_run_time_are_used_in_place():
    from qcompiler.calibration import _runtime_only_weights
    model = gather_tables_model()
    runtime, weights = runtime_model(model)
    # folded: constant indices (constant folding reads it); shared: a ReduceSum reads it too; kernel: a Conv's
    assert _runtime_only_weights(runtime, weights) == {"table"}


def test_a_table_used_in_place_is_not_copied_and_gives_the_same_outputs(tmp_path):
    """The session reads the caller's array itself (a later change to it shows in the output), and
    its outputs equal those of the original model."""
    from qcompiler.calibration import runtime_session
    model = gather_tables_model()
    reference = run(model, gather_feed())
    runtime, weights = runtime_model(model)
    weights = {name: np.array(values) for name, values in weights.items()}  # writeable, to probe
    session = runtime_session(runtime, weights, 1, str(tmp_path))
    outputs = session.run(None, gather_feed())
    for got, expected in zip(outputs, reference):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    weights["table"][:] += 1.0
    weights["shared"][:] += 1.0
    changed = dict(zip([output.name for output in session.get_outputs()], session.run(None, gather_feed())))
    np.testing.assert_allclose(changed["rows"], reference[0] + 1.0, rtol=1e-6)  # in place
    np.testing.assert_allclose(changed["shared_sum"], reference[1], rtol=1e-5, atol=1e-4)  # copied


def test_a_session_that_cannot_use_a_weight_in_place_is_built_with_copies(tmp_path, monkeypatch):
    """Were ONNX Runtime to read an in-place weight during optimization (it does for a Conv kernel,
    which the layout pass reorders), the session is built again with every weight copied."""
    import qcompiler.calibration as calibration
    model = gather_tables_model()
    reference = run(model, gather_feed())
    runtime, weights = runtime_model(model)
    attempts = []
    original = calibration._session

    def recorded(source, values, in_place, threads, scratch):
        attempts.append(set(in_place))
        return original(source, values, in_place, threads, scratch)

    monkeypatch.setattr(calibration, "_runtime_only_weights", lambda model, names: {"kernel"})
    monkeypatch.setattr(calibration, "_session", recorded)
    session = calibration.runtime_session(runtime, weights, 1, str(tmp_path))
    assert attempts == [{"kernel"}, set()]
    outputs = dict(zip([output.name for output in session.get_outputs()], session.run(None, gather_feed())))
    np.testing.assert_allclose(outputs["conv"], reference[-1], rtol=1e-4, atol=1e-4)
