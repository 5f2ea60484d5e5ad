"""Containers for federated datasets, and the argument checks and seeding shared by the package.

Choices:

* :class:`ArrayDataset` is a dense ``float32`` feature matrix and ``int64`` labels: the layout
  every fedagg model consumes without conversion. Arrays are checked (and converted if needed)
  once, when the dataset is built. Arrays shared through a cache (bundled datasets, lazily
  generated clients) are read-only, so that no caller can corrupt what another one sees.
* :class:`FederatedData` takes any ``Sequence[ArrayDataset]`` as its clients: a tuple for a
  partitioned dataset, or a lazy sequence that generates a client when it is indexed (see
  :func:`fedagg.data.synthetic`). A lazy sequence may also offer ``sizes()`` and
  ``histogram()`` (the :class:`ClientSummary` protocol) so that those are answered without
  materialising every client.
* Equality is identity (``eq=False``): element-wise comparison of arrays in ``__eq__`` is
  ambiguous and costly.
* Random streams: :func:`stream` keys a generator by a fixed-length tuple of 32-bit words
  ``(seed low, seed high, tag, index)``. ``SeedSequence`` pads short entropy with zeros, so
  ``[s, k]`` and ``[s, k, 0]`` would give the same stream; a fixed length rules that out.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol, TypeAlias, runtime_checkable

import numpy as np
import numpy.typing as npt

from fedagg.errors import ConfigError

__all__ = ["ArrayDataset", "ClientSummary", "FederatedData", "Seed"]

#: A seed: a non-negative integer below 2**64, or a generator that is drawn from (and advanced).
Seed: TypeAlias = int | np.random.Generator

_U32 = 0xFFFFFFFF


@dataclass(frozen=True, slots=True, eq=False)
class ArrayDataset:
    """One client's (or the test) examples: ``x`` is ``(n, d)`` float32 C-contiguous, ``y`` is
    ``(n,)`` int64 with labels in ``[0, num_classes)``.

    Other float or integer arrays are converted on construction; anything else raises
    :class:`~fedagg.errors.ConfigError`.
    """

    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]
    num_classes: int

    def __post_init__(self) -> None:
        x = np.asarray(self.x)
        y = np.asarray(self.y)
        if x.ndim != 2:
            raise ConfigError(f"features must be a 2-D (n, d) array, got shape {x.shape}")
        if x.dtype.kind not in "fiu":
            raise ConfigError(f"features must be numeric, got dtype {x.dtype}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise ConfigError(f"labels must have shape ({x.shape[0]},), got {y.shape}")
        if y.dtype.kind not in "iu":
            raise ConfigError(f"labels must be integers, got dtype {y.dtype}")
        num_classes = check_int("num_classes", self.num_classes, low=1)
        if y.size and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ConfigError(
                f"labels must lie in [0, {num_classes}), got [{int(y.min())}, {int(y.max())}]"
            )
        object.__setattr__(self, "x", np.ascontiguousarray(x, dtype=np.float32))
        object.__setattr__(self, "y", np.ascontiguousarray(y, dtype=np.int64))
        object.__setattr__(self, "num_classes", num_classes)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return f"ArrayDataset(n={len(self)}, d={self.num_features}, num_classes={self.num_classes})"

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])

    def subset(self, indices: npt.ArrayLike) -> ArrayDataset:
        """A new dataset holding the examples at ``indices`` (a copy, in that order)."""
        idx = index_array(indices, len(self))
        return ArrayDataset(self.x[idx], self.y[idx], self.num_classes)

    def label_counts(self) -> npt.NDArray[np.int64]:
        """Examples per label, shape ``(num_classes,)``."""
        return np.bincount(self.y, minlength=self.num_classes).astype(np.int64)


@runtime_checkable
class ClientSummary(Protocol):
    """What a lazy client sequence may implement to summarise itself without materialising."""

    def sizes(self) -> npt.NDArray[np.int64]: ...

    def histogram(self) -> npt.NDArray[np.int64]: ...


@dataclass(frozen=True, eq=False)
class FederatedData:
    """A federation: the clients' training sets, a global test set and how they were made.

    ``clients`` may be lazy (generated on access). ``meta`` records everything needed to
    regenerate the data (dataset, seed, partitioner and its parameters); it is stored as a
    read-only mapping. ``client_tests`` holds per-client test sets where they are natural
    (synthetic data), else ``None``.
    """

    name: str
    clients: Sequence[ArrayDataset]
    test: ArrayDataset
    num_features: int
    num_classes: int
    meta: Mapping[str, Any]
    client_tests: Sequence[ArrayDataset] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.clients, list):
            object.__setattr__(self, "clients", tuple(self.clients))
        if isinstance(self.client_tests, list):
            object.__setattr__(self, "client_tests", tuple(self.client_tests))
        if len(self.clients) == 0:
            raise ConfigError("a federation needs at least one client")
        num_features = check_int("num_features", self.num_features, low=1)
        num_classes = check_int("num_classes", self.num_classes, low=1)
        sets: list[tuple[str, ArrayDataset]] = [("test", self.test)]
        if isinstance(self.clients, tuple):  # materialised: cheap to check them all
            sets += [(f"client {i}", c) for i, c in enumerate(self.clients)]
        if isinstance(self.client_tests, tuple):
            sets += [(f"client test {i}", c) for i, c in enumerate(self.client_tests)]
        for what, ds in sets:
            if not isinstance(ds, ArrayDataset):
                raise ConfigError(f"{what} must be an ArrayDataset, got {type(ds).__name__}")
            if ds.num_features != num_features or ds.num_classes != num_classes:
                raise ConfigError(
                    f"{what} has {ds.num_features} features and {ds.num_classes} classes, "
                    f"expected {num_features} and {num_classes}"
                )
        if self.client_tests is not None and len(self.client_tests) != len(self.clients):
            raise ConfigError(
                f"{len(self.client_tests)} client test sets for {len(self.clients)} clients"
            )
        object.__setattr__(self, "meta", MappingProxyType(dict(self.meta)))

    def __repr__(self) -> str:
        return (
            f"FederatedData(name={self.name!r}, clients={len(self.clients)}, "
            f"test={len(self.test)}, num_features={self.num_features}, "
            f"num_classes={self.num_classes})"
        )

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def sizes(self) -> npt.NDArray[np.int64]:
        """Training examples per client, shape ``(num_clients,)``."""
        if isinstance(self.clients, ClientSummary):
            return self.clients.sizes()
        return np.array([len(c) for c in self.clients], dtype=np.int64)

    def histogram(self) -> npt.NDArray[np.int64]:
        """Label counts per client, shape ``(num_clients, num_classes)``.

        For lazy clients this generates every client's labels once (without caching them):
        its cost is that of generating the whole federation.
        """
        if isinstance(self.clients, ClientSummary):
            return self.clients.histogram()
        out = np.zeros((len(self.clients), self.num_classes), dtype=np.int64)
        for i, c in enumerate(self.clients):
            out[i] = c.label_counts()
        return out


# -- argument checks shared by the package ---------------------------------------------------


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an ``int`` within ``[low, high]``, or a ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    out = int(value)
    if low is not None and out < low:
        raise ConfigError(f"{name} must be >= {low}, got {out}")
    if high is not None and out > high:
        raise ConfigError(f"{name} must be <= {high}, got {out}")
    return out


def check_float(
    name: str, value: object, *, low: float = -math.inf, strict_low: bool = False
) -> float:
    """``value`` as a finite ``float`` at least ``low`` (or above it if ``strict_low``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a real number, got {value!r}")
    out = float(value)
    if not math.isfinite(out):
        raise ConfigError(f"{name} must be finite, got {out}")
    if out < low or (strict_low and out == low):
        raise ConfigError(f"{name} must be {'>' if strict_low else '>='} {low}, got {out}")
    return out


def check_seed(seed: object) -> int:
    """A seed as an ``int`` in ``[0, 2**64)``."""
    return check_int("seed", seed, low=0, high=2**64 - 1)


def as_generator(seed: object) -> np.random.Generator:
    """A generator from a seed; a generator passed in is returned as is (and will advance)."""
    if isinstance(seed, np.random.Generator):
        return seed
    return np.random.default_rng(check_seed(seed))


def stream(seed: int, tag: int, index: int = 0) -> np.random.Generator:
    """The generator keyed by ``(seed, tag, index)``: independent streams for distinct keys."""
    key = np.array([seed & _U32, seed >> 32, tag, index], dtype=np.uint32)
    return np.random.default_rng(key)


def index_array(indices: npt.ArrayLike, n: int) -> npt.NDArray[np.int64]:
    """``indices`` as a 1-D int64 array of positions in ``[0, n)``, or a ConfigError."""
    idx = np.asarray(indices)
    if idx.ndim != 1:
        raise ConfigError(f"indices must be a 1-D array, got shape {idx.shape}")
    if idx.size == 0:
        return np.zeros(0, dtype=np.int64)
    if idx.dtype.kind not in "iu":
        raise ConfigError(f"indices must be integers, got dtype {idx.dtype}")
    lo, hi = int(idx.min()), int(idx.max())
    if lo < 0 or hi >= n:
        raise ConfigError(f"indices must lie in [0, {n}), got [{lo}, {hi}]")
    return idx.astype(np.int64, copy=False)


def label_array(labels: npt.ArrayLike) -> npt.NDArray[np.int64]:
    """``labels`` as a 1-D non-negative int64 array, or a ConfigError."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ConfigError(f"labels must be a 1-D array, got shape {y.shape}")
    if y.size and y.dtype.kind not in "iu":
        raise ConfigError(f"labels must be integers, got dtype {y.dtype}")
    if y.size and int(y.min()) < 0:
        raise ConfigError("labels must be non-negative")
    return y.astype(np.int64, copy=False)


def freeze(a: npt.NDArray[Any]) -> None:
    """Make ``a`` read-only (it is shared through a cache)."""
    a.flags.writeable = False
