"""Test distributions shared by the calibrator tests (imported by file name, not a package)."""

import numpy as np

DISTRIBUTIONS = ("uniform", "gaussian", "laplace_outliers", "relu_half_normal", "all_zero", "constant")


def sample(name: str, size: int = 100_000, seed: int = 0) -> np.ndarray:
    """float32 samples of one named distribution, reproducible from `seed`."""
    rng = np.random.default_rng(seed)
    if name == "uniform":
        values = rng.uniform(-2.0, 3.0, size)
    elif name == "gaussian":
        values = rng.normal(0.5, 1.5, size)
    elif name == "laplace_outliers":
        values = rng.laplace(0.0, 1.0, size)
        values[rng.choice(size, 6, replace=False)] = [60.0, -45.0, 80.0, 52.5, -70.0, 90.0]
    elif name == "relu_half_normal":
        values = np.maximum(rng.normal(0.0, 1.0, size), 0.0)
    elif name == "all_zero":
        values = np.zeros(size)
    elif name == "constant":
        values = np.full(size, -2.75)
    else:
        raise KeyError(name)
    return values.astype(np.float32)


def uneven_batches(values: np.ndarray, count: int = 7, seed: int = 1) -> list[np.ndarray]:
    """`values` cut into `count` contiguous batches of random, uneven sizes (some tiny)."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, len(values)), count - 1, replace=False))
    return np.split(values, cuts)


def state_nbytes(obj, seen=None) -> int:
    """Bytes held in numpy arrays, numpy scalars and Python floats reachable from `obj`'s attributes
    (recursively)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, (np.ndarray, np.generic)):
        return obj.nbytes
    if isinstance(obj, float):
        return 8
    if isinstance(obj, dict):
        return sum(state_nbytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):
        return state_nbytes(vars(obj), seen)
    return 0
