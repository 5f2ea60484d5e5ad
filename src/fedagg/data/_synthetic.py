"""Synthetic(α, β): the FedProx / LEAF multinomial-logistic generator, with lazy virtual clients.

The model (spec ``algorithms.md`` §7, checked against FedProx's ``generate_synthetic.py``),
for user ``k`` of ``num_clients``:

* ``n_k = int(lognormal(4, 2)) + 50`` examples;
* ``u_k ~ N(0, α²)`` and ``B_k ~ N(0, β²)`` (α and β are standard deviations);
* ``W_k ~ N(u_k, 1)`` of shape ``(dim, num_classes)`` and ``b_k ~ N(u_k, 1)``;
* ``v_k ~ N(B_k, 1)`` per coordinate, ``x ~ N(v_k, Σ)`` with ``Σ = diag((j + 1)^-1.2)``
  (a covariance: coordinate ``j`` has standard deviation ``(j + 1)^-0.6``);
* ``y = argmax(x W_k + b_k)``;
* 90 % / 10 % train / test split: ``int(0.9 n_k)`` training examples.

Synthetic-IID: one global ``W, b ~ N(0, 1)`` and ``v_k = 0`` (α and β are then unused).

Note: ``u_k`` adds the same amount to every class's logit (``u_k (Σ_j x_j + 1)``), so α does
not change the distribution of ``(x, y)``; label and feature heterogeneity come from β and from
each user's own ``W_k, b_k``. We keep α for fidelity to the published generator.

Choices that depart from the script (which sets no seed and draws everything from NumPy's
global state, so its exact draw cannot be reproduced anyway):

* **Per-user streams.** Every random quantity comes from a generator keyed by
  ``(seed, stream tag, k)``. User ``k`` is a pure function of ``(seed, k)`` and the options:
  it does not depend on ``num_clients`` or on which users were generated before, so clients
  can be generated lazily, in any order, in any process.
* **Sizes first, from their own stream.** The ``n_k`` are the first ``num_clients`` draws of one
  lognormal stream (a prefix: user ``k``'s size does not depend on ``num_clients``), drawn at
  construction (8 bytes per user), so ``sizes()`` costs nothing.
* **Train and test rows from separate streams.** A user's examples are i.i.d. given its
  parameters, so shuffling them and cutting at ``int(0.9 n_k)`` is, in distribution, the same
  as drawing the training rows and the test rows independently. We do the latter so that the
  global test set can be built without generating anyone's training features.
* Features are drawn and stored in float32 and labels computed from the stored features.

Laziness: ``clients`` and ``client_tests`` generate a user's split on access and keep
recently used ones in a small LRU cache bounded in bytes. Only the global test set is built
eagerly, from the first ``test_users`` users (all of them up to 1,000 users, else the first
1,000), so 100,000 virtual clients cost a few MB until used.
"""

from __future__ import annotations

import operator
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

import numpy as np
import numpy.typing as npt

from fedagg.data._types import (
    ArrayDataset,
    FederatedData,
    check_float,
    check_int,
    check_seed,
    freeze,
    stream,
)
from fedagg.errors import ConfigError

__all__ = ["SyntheticClients", "synthetic"]

# Stream tags: one independent family of generators per purpose.
_SIZES, _USER, _TRAIN, _TEST, _GLOBAL = 0, 1, 2, 3, 4
_DEFAULT_TEST_USERS = 1000
_DEFAULT_CACHE_BYTES = 256 * 2**20
_MAX_USERS = 2**32 - 1

Part = Literal["train", "test"]


@dataclass(frozen=True, eq=False)
class _Generator:
    """Everything needed to generate any user's data; small (O(num_clients) integers)."""

    alpha: float
    beta: float
    dim: int
    num_classes: int
    seed: int
    iid: bool
    totals: npt.NDArray[np.int64]  # n_k per user
    n_train: npt.NDArray[np.int64] = field(init=False)
    std: npt.NDArray[np.float32] = field(init=False)
    global_wb: tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]] | None = field(init=False)

    def __post_init__(self) -> None:
        n_train = (0.9 * self.totals).astype(np.int64)
        std = np.power(np.arange(1, self.dim + 1, dtype=np.float64), -0.6).astype(np.float32)
        global_wb = None
        if self.iid:
            rng = stream(self.seed, _GLOBAL)
            w = rng.normal(0.0, 1.0, (self.dim, self.num_classes)).astype(np.float32)
            b = rng.normal(0.0, 1.0, self.num_classes).astype(np.float32)
            global_wb = (w, b)
        for a in (n_train, std, *(global_wb or ())):
            freeze(a)
        object.__setattr__(self, "n_train", n_train)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "global_wb", global_wb)

    def count(self, k: int, part: Part) -> int:
        n_train = int(self.n_train[k])
        return n_train if part == "train" else int(self.totals[k]) - n_train

    def params(
        self, k: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """User ``k``'s feature mean ``v_k`` and model ``W_k``, ``b_k``."""
        if self.global_wb is not None:
            w, b = self.global_wb
            return np.zeros(self.dim, dtype=np.float32), w, b
        rng = stream(self.seed, _USER, k)
        u = rng.normal(0.0, self.alpha)
        big_b = rng.normal(0.0, self.beta)
        v = rng.normal(big_b, 1.0, self.dim).astype(np.float32)
        w = rng.normal(u, 1.0, (self.dim, self.num_classes)).astype(np.float32)
        b = rng.normal(u, 1.0, self.num_classes).astype(np.float32)
        return v, w, b

    def generate(self, k: int, part: Part) -> ArrayDataset:
        """User ``k``'s training or test split (fresh, read-only arrays)."""
        v, w, b = self.params(k)
        rng = stream(self.seed, _TRAIN if part == "train" else _TEST, k)
        x = rng.standard_normal((self.count(k, part), self.dim), dtype=np.float32)
        x *= self.std
        x += v
        y = np.argmax(x @ w + b, axis=1).astype(np.int64)
        freeze(x)
        freeze(y)
        return ArrayDataset(x, y, self.num_classes)


class SyntheticClients(Sequence[ArrayDataset]):
    """The users' training (or test) splits of a Synthetic(α, β) federation, made on access.

    Indexing generates user ``k``'s split deterministically; recently used splits are kept in
    an LRU cache of at most ``cache_bytes`` (set 0 to disable). Arrays are read-only.
    ``sizes()`` is free; ``histogram()`` generates every user once. Pickling keeps only the
    generator's parameters, so a worker process regenerates what it needs. Thread-safe.
    """

    def __init__(self, gen: _Generator, part: Part, cache_bytes: int = _DEFAULT_CACHE_BYTES):
        self._gen = gen
        self._part: Part = part
        self._cache_bytes = cache_bytes
        self._cache: OrderedDict[int, ArrayDataset] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self._gen, self._part, self._cache_bytes))

    def __len__(self) -> int:
        return int(self._gen.totals.shape[0])

    def __repr__(self) -> str:
        return f"<SyntheticClients: {len(self)} lazy {self._part} splits>"

    @overload
    def __getitem__(self, index: int) -> ArrayDataset: ...

    @overload
    def __getitem__(self, index: slice) -> list[ArrayDataset]: ...

    def __getitem__(self, index: int | slice) -> ArrayDataset | list[ArrayDataset]:
        if isinstance(index, slice):
            return [self[k] for k in range(*index.indices(len(self)))]
        k = operator.index(index)
        n = len(self)
        if k < 0:
            k += n
        if not 0 <= k < n:
            raise IndexError(f"client index {index} out of range for {n} clients")
        with self._lock:
            hit = self._cache.get(k)
            if hit is not None:
                self._cache.move_to_end(k)
                return hit
        ds = self._gen.generate(k, self._part)
        self._remember(k, ds)
        return ds

    def _remember(self, k: int, ds: ArrayDataset) -> None:
        nbytes = ds.x.nbytes + ds.y.nbytes
        if nbytes > self._cache_bytes:
            return
        with self._lock:
            if k in self._cache:
                return
            self._cache[k] = ds
            self._cached_bytes += nbytes
            while self._cached_bytes > self._cache_bytes:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.x.nbytes + old.y.nbytes

    def sizes(self) -> npt.NDArray[np.int64]:
        """Examples per user in this split, without generating any features."""
        n_train = self._gen.n_train
        out = n_train if self._part == "train" else self._gen.totals - n_train
        return np.array(out, dtype=np.int64)

    def histogram(self) -> npt.NDArray[np.int64]:
        """Label counts per user, ``(num_clients, num_classes)``: generates every user once."""
        out = np.zeros((len(self), self._gen.num_classes), dtype=np.int64)
        for k in range(len(self)):
            with self._lock:
                hit = self._cache.get(k)
            ds = hit if hit is not None else self._gen.generate(k, self._part)
            out[k] = ds.label_counts()
        return out


def synthetic(
    alpha: float,
    beta: float,
    num_clients: int = 30,
    dim: int = 60,
    num_classes: int = 10,
    seed: int = 0,
    iid: bool = False,
    *,
    test_users: int | None = None,
    cache_bytes: int = _DEFAULT_CACHE_BYTES,
) -> FederatedData:
    """The Synthetic(α, β) federation of FedProx (Li et al. 2020), one client per user.

    ``alpha`` and ``beta`` are the standard deviations of the per-user model and feature
    means (heterogeneity grows with both); ``iid=True`` gives Synthetic-IID (one global
    model, zero feature means; ``alpha`` and ``beta`` are then unused). ``clients[k]`` and
    ``client_tests[k]`` are user ``k``'s train and test splits, generated lazily from
    ``(seed, k)``. ``test`` concatenates the test splits of the first ``test_users`` users;
    ``None`` means all users when ``num_clients <= 1000``, else the first 1,000.
    ``cache_bytes`` bounds each lazy sequence's LRU cache.
    """
    alpha = check_float("alpha", alpha, low=0.0)
    beta = check_float("beta", beta, low=0.0)
    num_clients = check_int("num_clients", num_clients, low=1, high=_MAX_USERS)
    dim = check_int("dim", dim, low=1)
    num_classes = check_int("num_classes", num_classes, low=2)
    seed = check_seed(seed)
    if not isinstance(iid, bool):
        raise ConfigError(f"iid must be a bool, got {iid!r}")
    if test_users is None:
        test_users = min(num_clients, _DEFAULT_TEST_USERS)
    test_users = check_int("test_users", test_users, low=1, high=num_clients)
    cache_bytes = check_int("cache_bytes", cache_bytes, low=0)

    totals = stream(seed, _SIZES).lognormal(4.0, 2.0, num_clients).astype(np.int64) + 50
    freeze(totals)
    gen = _Generator(alpha, beta, dim, num_classes, seed, iid, totals)
    clients = SyntheticClients(gen, "train", cache_bytes)
    client_tests = SyntheticClients(gen, "test", cache_bytes)

    parts = [gen.generate(k, "test") for k in range(test_users)]
    test = ArrayDataset(
        np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]), num_classes
    )
    name = "synthetic_iid" if iid else f"synthetic({alpha:g},{beta:g})"
    meta: dict[str, Any] = {
        "dataset": "synthetic",
        "num_clients": num_clients,
        "partition": "natural",
        "seed": seed,
        "params": {
            "alpha": alpha,
            "beta": beta,
            "dim": dim,
            "num_classes": num_classes,
            "iid": iid,
            "test_users": test_users,
        },
        "generator": "fedprox-synthetic/v1: per-user streams keyed (seed, tag, user)",
    }
    return FederatedData(
        name=name,
        clients=clients,
        test=test,
        num_features=dim,
        num_classes=num_classes,
        meta=meta,
        client_tests=client_tests,
    )
