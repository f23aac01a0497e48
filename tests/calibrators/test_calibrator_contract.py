"""Guarantees every calibrator gives: batch/order invariance, exact merge, bounded state, pickling,
edge cases and errors, and the registry."""

import pickle

import numpy as np
import pytest
from calib_distributions import DISTRIBUTIONS, sample, state_nbytes, uneven_batches
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from qcompiler.calibrators import (CALIBRATORS, Calibrator, ChannelAbsMaxCalibrator, KLCalibrator,
                                   MinMaxCalibrator, MSECalibrator, PercentileCalibrator, Range,
                                   make_calibrator)
from qcompiler.calibrators.histogram import _PENDING_VALUES

# Every calibrator whose result must not depend on batching (moving average is excluded by design).
FACTORIES = {
    "minmax": MinMaxCalibrator,
    "minmax_per_channel": lambda: MinMaxCalibrator(axis=1),
    "channel_absmax": lambda: ChannelAbsMaxCalibrator(axis=1),
    "percentile": PercentileCalibrator,
    "percentile_two_sided": lambda: PercentileCalibrator(99.9, symmetric=False),
    "mse": MSECalibrator,
    "mse_asymmetric": lambda: MSECalibrator(symmetric=False),
    "kl": KLCalibrator,
}
PER_CHANNEL = {"minmax_per_channel", "channel_absmax"}


def rows(values: np.ndarray) -> np.ndarray:
    """Per-channel calibrators see [N, 4] data (channel axis 1); batches split along N."""
    return values[: len(values) // 4 * 4].reshape(-1, 4)


def feed(kind: str, batches) -> object:
    calibrator = FACTORIES[kind]()
    for batch in batches:
        calibrator.update(rows(batch) if kind in PER_CHANNEL else batch)
    return calibrator


def same_range(a: Range, b: Range) -> bool:
    return np.array_equal(a.low, b.low) and np.array_equal(a.high, b.high)


@pytest.mark.parametrize("name", DISTRIBUTIONS)
@pytest.mark.parametrize("kind", FACTORIES)
def test_result_independent_of_batching_and_order(kind, name):
    values = sample(name, 40_000)
    if kind in PER_CHANNEL:
        values = rows(values)  # split whole rows so channels stay aligned
    batches = uneven_batches(values)
    shuffled = [batches[i] for i in np.random.default_rng(2).permutation(len(batches))]
    permuted_values = np.random.default_rng(3).permutation(values, axis=0)
    reference = feed(kind, [values]).compute_range()
    for variant in (batches, shuffled, uneven_batches(permuted_values, 11)):
        assert same_range(feed(kind, variant).compute_range(), reference)


@pytest.mark.parametrize("kind", FACTORIES)
def test_merge_of_halves_equals_one_pass(kind):
    values = np.concatenate([sample("laplace_outliers", 30_000), sample("gaussian", 10_000, 1) * 0.01])
    single = feed(kind, [values])
    first, second = feed(kind, uneven_batches(values[:20_000], 3)), feed(kind, [values[20_000:]])
    first.merge(second)
    assert same_range(first.compute_range(), single.compute_range())
    if hasattr(single, "histogram"):
        np.testing.assert_array_equal(first.histogram.counts, single.histogram.counts)
    empty = FACTORIES[kind]()
    empty.merge(first)  # merging into a fresh calibrator, and merging a fresh one, change nothing
    first.merge(FACTORIES[kind]())
    assert same_range(empty.compute_range(), single.compute_range())
    assert same_range(first.compute_range(), single.compute_range())


@pytest.mark.parametrize("kind", FACTORIES)
def test_state_size_does_not_grow(kind):
    """The state handed between workers (pickled) has a fixed size; in memory, histograms also hold
    values waiting to be binned, at most _PENDING_VALUES (+ one batch) float32 values."""
    rng = np.random.default_rng(9)
    calibrator = FACTORIES[kind]()
    sizes, live = {}, []
    for step in range(1, 1001):
        batch = rng.normal(0, step, 64).astype(np.float32)  # growing scale forces histogram growth
        calibrator.update(rows(batch) if kind in PER_CHANNEL else batch)
        live.append(state_nbytes(calibrator))
        if step in (10, 1000):
            sizes[step] = state_nbytes(pickle.loads(pickle.dumps(calibrator)))
    assert sizes[10] == sizes[1000] > 0
    assert max(live) <= live[0] + 4 * (_PENDING_VALUES + 64)


@pytest.mark.parametrize("kind", FACTORIES)
def test_pickle_round_trip(kind):
    values = sample("gaussian", 5_000)
    calibrator = feed(kind, [values])
    restored = pickle.loads(pickle.dumps(calibrator))
    assert same_range(restored.compute_range(), calibrator.compute_range())
    restored.merge(feed(kind, [values * 3]))  # a restored state keeps working
    assert isinstance(restored, Calibrator)


@pytest.mark.parametrize("kind", FACTORIES)
def test_all_zero_and_constant(kind):
    zero = feed(kind, [sample("all_zero", 1000)]).compute_range()
    assert np.all(zero.low == 0.0) and np.all(zero.high == 0.0)
    for constant in (-2.75, 0.3):
        result = feed(kind, [np.full(1000, constant, np.float32)]).compute_range()
        assert np.all(np.isfinite(result.low)) and np.all(np.isfinite(result.high))
        value = float(np.float32(constant))
        if kind == "channel_absmax":
            value = abs(value)
        assert np.all(result.low <= value) and np.all(value <= result.high), result


@pytest.mark.parametrize("kind", FACTORIES)
def test_errors(kind):
    with pytest.raises(ValueError, match="^no data$"):
        FACTORIES[kind]().compute_range()
    calibrator = feed(kind, [sample("uniform", 400)])
    before = calibrator.compute_range()
    for bad in (np.nan, np.inf, -np.inf):
        values = sample("uniform", 400)
        values[17] = bad
        with pytest.raises(ValueError, match="^non-finite values$"):
            calibrator.update(rows(values) if kind in PER_CHANNEL else values)
    assert same_range(calibrator.compute_range(), before)  # a rejected batch leaves no trace


def test_merge_rejects_other_kinds_and_settings():
    pairs = [(MinMaxCalibrator(), KLCalibrator()), (MinMaxCalibrator(), MinMaxCalibrator(axis=0)),
             (PercentileCalibrator(99.9), PercentileCalibrator(99.99)), (MSECalibrator(), KLCalibrator()),
             (MSECalibrator(), MSECalibrator(symmetric=False)), (KLCalibrator(), KLCalibrator(start_bin=256)),
             (ChannelAbsMaxCalibrator(), ChannelAbsMaxCalibrator(axis=1)),
             (MinMaxCalibrator(moving_average=True), MinMaxCalibrator())]
    for mine, other in pairs:
        other.update(np.ones((2, 2), np.float32))
        with pytest.raises(TypeError, match="cannot merge"):
            mine.merge(other)


def test_registry():
    assert set(CALIBRATORS) == {"minmax", "percentile", "mse", "kl", "entropy"}
    assert isinstance(make_calibrator("entropy"), KLCalibrator)
    assert make_calibrator("percentile", percentile=99.9).percentile == 99.9
    for name in CALIBRATORS:
        calibrator = make_calibrator(name)
        assert isinstance(calibrator, Calibrator) and calibrator.name in CALIBRATORS
    with pytest.raises(ValueError, match="unknown calibrator 'histo'; valid names: minmax, percentile, mse, kl, entropy"):
        make_calibrator("histo")


finite_batches = st.lists(
    hnp.arrays(np.float32, st.integers(1, 40),
               elements=st.floats(-1e4, 1e4, width=32, allow_nan=False, allow_infinity=False)),
    min_size=2, max_size=6)


@settings(max_examples=40, deadline=None)
@given(batches=finite_batches, order=st.randoms(use_true_random=False))
def test_merge_is_order_independent(batches, order):
    for kind in ("minmax", "percentile", "percentile_two_sided", "mse", "mse_asymmetric", "kl"):
        parts = [feed(kind, [batch]) for batch in batches]
        left_fold = FACTORIES[kind]()
        for part in parts:
            left_fold.merge(part)
        shuffled = [pickle.loads(pickle.dumps(part)) for part in parts]
        order.shuffle(shuffled)
        while len(shuffled) > 1:  # pairwise tree in a random order
            a, b = shuffled.pop(), shuffled.pop()
            a.merge(b)
            shuffled.insert(order.randrange(len(shuffled) + 1), a)
        assert same_range(shuffled[0].compute_range(), left_fold.compute_range()), kind
        if hasattr(left_fold, "histogram"):
            np.testing.assert_array_equal(shuffled[0].histogram.counts, left_fold.histogram.counts)
