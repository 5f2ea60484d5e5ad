"""Row stores and the spool state shared by every robust rule: the round's updates kept as
they arrive and read back in coordinate blocks. See :mod:`fedagg.core.robust`."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from fedagg.core import kernels
from fedagg.core._gram import Gram, gram_sum
from fedagg.core.aggregate import check_update
from fedagg.core.spec import ArrayTree, ParamSpec
from fedagg.core.update import Update
from fedagg.errors import ConfigError, EmptyAggregate, NonFiniteUpdate, StateError, TooFewUpdates

__all__ = [
    "BLOCK_BYTES",
    "MemoryStore",
    "RowStore",
    "SpoolState",
    "Spooled",
    "StoreFactory",
    "check_f",
    "memory_store",
    "need_updates",
    "to_memory",
]

Arr = npt.NDArray[Any]
F64 = npt.NDArray[np.float64]

#: Bytes of float64 work space per coordinate block (n rows x block columns).
BLOCK_BYTES = 1 << 26


# --------------------------------------------------------------------------------------------
# Row stores
# --------------------------------------------------------------------------------------------


class RowStore(Protocol):
    """The round's updates as rows of a ``(n, d)`` matrix, appended one at a time."""

    @property
    def rows(self) -> int: ...

    def append(self, segments: Sequence[Arr]) -> None:
        """Append one row given as consecutive flat segments (they sum to ``d`` values)."""
        ...

    def read(self, c0: int, c1: int, out: Arr, rows: Sequence[int] | None = None) -> Arr:
        """Columns ``[c0, c1)`` of ``rows`` (default: all) into ``out`` (rows x (c1 - c0));
        returns ``out``."""
        ...

    def close(self) -> None: ...


#: Makes an empty store for rows of ``d`` values of ``dtype``.
StoreFactory = Callable[[int, np.dtype[Any]], RowStore]


@dataclass(eq=False)
class MemoryStore:
    """Rows kept in RAM (one copy of each update): the default store. It is also what any
    spooled state is saved as (``fedagg.save``) and restored into."""

    d: int
    dtype: str
    data: list[Arr] = field(default_factory=list)

    def check(self) -> None:
        dt = np.dtype(self.dtype)
        if not all(isinstance(r, np.ndarray) and r.shape == (self.d,) and r.dtype == dt
                   for r in self.data):  # fmt: skip
            raise StateError("inconsistent MemoryStore rows")

    @property
    def rows(self) -> int:
        return len(self.data)

    def append(self, segments: Sequence[Arr]) -> None:
        row = np.empty(self.d, np.dtype(self.dtype))
        at = 0
        for s in segments:
            row[at : at + s.size] = s
            at += s.size
        if at != self.d:
            raise ValueError(f"a row of {at} values for a store of width {self.d}")
        self.data.append(row)

    def read(self, c0: int, c1: int, out: Arr, rows: Sequence[int] | None = None) -> Arr:
        idx = range(len(self.data)) if rows is None else rows
        for r, i in enumerate(idx):
            out[r] = self.data[i][c0:c1]
        return out

    def close(self) -> None:
        self.data = []


def to_memory(store: RowStore, d: int, dtype: np.dtype[Any]) -> MemoryStore:
    """A copy of any store's rows in memory (how a spooled state is saved)."""
    if isinstance(store, MemoryStore):
        return store
    out = MemoryStore(d, np.dtype(dtype).str)
    buf = np.empty((1, d), dtype)
    for i in range(store.rows):
        store.read(0, d, buf, [i])
        out.data.append(buf[0].copy())
    return out


def memory_store(d: int, dtype: np.dtype[Any]) -> MemoryStore:
    return MemoryStore(d, np.dtype(dtype).str)


# --------------------------------------------------------------------------------------------
# The spool state shared by every robust rule
# --------------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class SpoolState:
    """The round's updates (in ``store``), their weights, scales and senders."""

    spec: ParamSpec
    version: int | None
    store: RowStore
    weights: list[float] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    clients: list[str] = field(default_factory=list)
    center: Arr | None = None  # centered clipping's starting point (the last aggregate)

    @property
    def count(self) -> int:
        return len(self.weights)

    def check(self) -> None:
        n = len(self.weights)
        if not (len(self.scales) == len(self.clients) == n == self.store.rows):
            raise StateError("inconsistent SpoolState (rows, weights, scales, clients)")
        if self.center is not None and (
            not isinstance(self.center, np.ndarray) or self.center.shape != (self.spec.size,)
        ):
            raise StateError("centered clipping's center does not match the spec")

    def checkpoint_view(self) -> SpoolState:
        """This state with its rows in memory: what ``fedagg.save`` writes."""
        mem = to_memory(self.store, self.spec.size, self.spec.dtype)
        return SpoolState(
            self.spec, self.version, mem, list(self.weights), list(self.scales),
            list(self.clients), self.center,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Spooled:
    """Fold, merge and block reading common to every robust rule."""

    spool: StoreFactory | None = None
    block_bytes: int = BLOCK_BYTES

    @property
    def decomposable(self) -> bool:
        return False

    def init(self, spec: ParamSpec, *, version: int | None = None) -> SpoolState:
        make = memory_store if self.spool is None else self.spool
        return SpoolState(spec, version, make(spec.size, spec.dtype))

    def fold(self, state: SpoolState, update: Update) -> SpoolState:
        return self.fold_many(state, (update,))

    def fold_many(self, state: SpoolState, updates: Iterable[Update]) -> SpoolState:
        ups = list(updates)
        pieces = []
        for u in ups:  # check all first: all or none
            check_update(state.spec, state.version, u)
            segs = state.spec.segments(u.delta)
            if not all(kernels.all_finite(s, use_numba=kernels.HAVE_NUMBA) for s in segs):
                raise NonFiniteUpdate(u.client_id, "delta holds NaN or Inf values")
            pieces.append(segs)
        for u, segs in zip(ups, pieces, strict=True):
            state.store.append(segs)
            state.weights.append(float(u.weight))
            state.scales.append(float(u.scale))
            state.clients.append(u.client_id)
        return state

    def merge(self, state: SpoolState, other: SpoolState) -> SpoolState:
        if other.spec != state.spec or other.version != state.version:
            raise StateError("cannot merge spools of different specs or versions")
        d = state.spec.size
        width = min(d, self._width(1))
        buf = np.empty((1, width), state.spec.dtype)
        for i in range(other.count):
            row = np.empty(d, state.spec.dtype)
            for c0 in range(0, d, width):
                c1 = min(d, c0 + width)
                other.store.read(c0, c1, buf[:, : c1 - c0], [i])
                row[c0:c1] = buf[0, : c1 - c0]
            state.store.append([row])
        state.weights += other.weights
        state.scales += other.scales
        state.clients += other.clients
        return state

    def count(self, state: SpoolState) -> int:
        return state.count

    def finalize(self, state: SpoolState) -> ArrayTree:
        flat: Arr = self.finalize_flat(state)  # type: ignore[attr-defined]
        return state.spec.unflatten(flat)

    # -- block access -------------------------------------------------------------------------
    def _width(self, n: int) -> int:
        return max(256, self.block_bytes // (8 * max(1, n)))

    def _blocks(
        self, state: SpoolState, rows: Sequence[int] | None = None
    ) -> Iterable[tuple[int, int, F64]]:
        """``(c0, c1, block)``: the (scaled) rows' columns [c0, c1) as float64, in order."""
        idx = list(range(state.count)) if rows is None else list(rows)
        d = state.spec.size
        width = min(d, self._width(len(idx)))
        raw = np.empty((len(idx), width), state.spec.dtype)
        wide = np.empty((len(idx), width), np.float64)
        scales = np.array([state.scales[i] for i in idx], np.float64)[:, None]
        unit = bool(np.all(scales == 1.0))
        for c0 in range(0, d, width):
            c1 = min(d, c0 + width)
            k = c1 - c0
            state.store.read(c0, c1, raw[:, :k], None if rows is None else idx)
            blk = wide[:, :k]
            blk[...] = raw[:, :k]
            if not unit:
                blk *= scales
            yield c0, c1, blk

    def _combine(self, state: SpoolState, coef: F64, rows: Sequence[int] | None = None) -> Arr:
        """``sum_i coef_i * x_i`` over ``rows`` (the scaled updates), in the model dtype."""
        out = np.empty(state.spec.size, state.spec.dtype)
        c = coef[:, None]
        for c0, c1, blk in self._blocks(state, rows):
            out[c0:c1] = (blk * c).sum(axis=0)
        return out

    def _gram(self, state: SpoolState, extra: Arr | None = None, *, centre: bool = True) -> Gram:
        """The Gram matrix of the scaled updates (and of ``extra``, as a last row)."""
        return gram_sum(self._blocks(state), extra, centre=centre)


def need_updates(state: SpoolState, n_min: int, rule: str) -> int:
    """The number of updates in ``state``; raises unless there are at least ``n_min``."""
    n = state.count
    if n == 0:
        raise EmptyAggregate("no update was folded: nothing to finalize")
    if n < n_min:
        raise TooFewUpdates(f"{rule} needs at least {n_min} updates, got {n}")
    return n


def check_f(f: int) -> None:
    """Raise ConfigError unless ``f`` (assumed Byzantine clients) is an int >= 0."""
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ConfigError(f"f (the number of Byzantine clients) must be an int >= 0, got {f!r}")
