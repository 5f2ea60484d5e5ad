"""Byzantine-robust aggregators in bounded memory.

A robust rule is not a monoid: it needs every update of the round. Each one keeps the
round's updates in a :class:`RowStore` as they arrive (in memory by default; on disk with
:func:`fedagg.spool.disk`, so 200 updates of 25M parameters fit in a few hundred MiB of RAM)
and reads them back in *coordinate blocks* of bounded size:

* coordinate-wise rules (median, trimmed mean, Bulyan's last stage) sort one block at a time;
* distance-based rules (Krum, Multi-Krum, Bulyan's selection, RFA's geometric median,
  centered clipping, the Flag Aggregator) need only the n x n Gram matrix of the updates,
  built block by block in one pass. Their iterations run on n-vectors of coefficients (every
  iterate is a combination of the updates), and one last pass forms the result.

So memory is O(n**2 + n * block) beyond the store whatever the model size, and the store
streams. Every rule reads the same blocks in the same order whatever the store, and the Gram
matrix is summed over fixed chunks of :data:`GRAM_CHUNK` coordinates whatever the block size,
so a spooled or blocked result equals the in-memory one bit for bit. Rankings (Krum,
Multi-Krum, Bulyan) do not hinge on the last bits of those sums, which BLAS kernels, thread
counts and CPUs round differently: scores within :data:`TIE_RTOL` of the best are ties, won by
the earliest folded update, so the same updates give the same picks on every machine.

Updates are unweighted here (each client one vote), except RFA, which uses ``alpha_i = n_i /
sum n`` as its reference code does. A pre-transform's ``Update.scale`` (clipping) is applied
as the rows are read. ``decomposable`` is False; ``merge`` concatenates the stores (exact, but
O(n * model)). RFA and centered clipping also have a decomposable per-iteration form (a
monoid per iteration), for aggregation trees: :func:`weiszfeld_step`, :func:`clip_step`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from fedagg.core import kernels
from fedagg.core.aggregate import Composed, MeanState, check_update, compose, mean
from fedagg.core.spec import ArrayTree, ParamSpec
from fedagg.core.update import Update
from fedagg.errors import ConfigError, EmptyAggregate, NonFiniteUpdate, StateError, TooFewUpdates

__all__ = [
    "GRAM_CHUNK",
    "TIE_RTOL",
    "Bulyan",
    "CenterWeight",
    "CenteredClipping",
    "ClipStep",
    "CoordinateMedian",
    "FlagAggregator",
    "GeometricMedian",
    "Gram",
    "Krum",
    "MemoryStore",
    "RowStore",
    "SpoolState",
    "StoreFactory",
    "TooFewUpdates",
    "TrimmedMean",
    "bulyan",
    "centered_clipping",
    "clip_step",
    "distance_to",
    "flag_aggregator",
    "geometric_median",
    "gram",
    "gram_sum",
    "krum",
    "krum_pick",
    "median",
    "multi_krum",
    "pick_best",
    "trimmed_mean",
    "weiszfeld_step",
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
class _Spooled:
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


#: Coordinates per Gram chunk. Every distance-based rule sums its Gram matrix over chunks of
#: exactly these columns (aligned to absolute coordinates), in chunk order, whatever the I/O
#: block size or store: the grouping of the float64 sums is fixed by the model size alone.
GRAM_CHUNK = 4096

#: Ranking rules (Krum, Multi-Krum, Bulyan's selection, SketchKrum) treat scores within
#: ``TIE_RTOL * (best + scale)`` of the best as tied, and take the earliest folded update
#: among them (job order; the canonical order in a deployment with ``order = "canonical"``).
#: ``scale`` is the rounding scale of a score: ``k`` times the median centred squared norm of
#: the updates (``k`` distances are summed). Rounding differences between BLAS kernels,
#: thread counts and CPUs are ~1e-13 of that scale, far inside the tolerance, so the picks do
#: not hinge on the last bits of a sum.
TIE_RTOL = 1e-9


@dataclass(frozen=True, slots=True)
class Gram:
    """A Gram matrix accumulated over fixed coordinate chunks, each chunk centred on its own
    column means: ``X X^T = centred + u 1^T + 1 u^T + s``.

    Distances depend only on ``centred`` (the cross terms cancel exactly), so
    :meth:`sq_dists` never sees the cancellation of a large common component, and its result
    is exactly symmetric: two updates that are each other's nearest neighbour get bit-equal
    distances (an exact tie stays a tie)."""

    centred: F64
    u: F64
    s: float

    def full(self) -> F64:
        """``X X^T`` (float64)."""
        out: F64 = self.centred + (self.u[:, None] + self.u[None, :]) + self.s
        return out

    def sq_dists(self) -> F64:
        """Squared pairwise distances (exactly symmetric, zero on the diagonal)."""
        g = self.centred
        diag = np.diag(g)
        out: F64 = np.maximum((diag[:, None] + diag[None, :]) - 2.0 * g, 0.0)
        np.fill_diagonal(out, 0.0)
        return out

    def spread(self) -> float:
        """The median centred squared norm: the scale of the distances' rounding errors."""
        return float(np.median(np.diag(self.centred)))


class _GramAcc:
    """Accumulates ``Gram`` over :data:`GRAM_CHUNK`-column chunks from blocks of any width."""

    def __init__(self, centre: bool) -> None:
        self.centre = centre
        self.g: F64 | None = None
        self.u: F64 | None = None
        self.s = 0.0
        self.pend: F64 | None = None
        self.fill = 0

    def add(self, x: F64) -> None:
        """The next columns (in coordinate order) of every row."""
        k = x.shape[1]
        pos = 0
        while pos < k:
            if self.fill == 0 and k - pos >= GRAM_CHUNK:
                self._chunk(x[:, pos : pos + GRAM_CHUNK])
                pos += GRAM_CHUNK
                continue
            if self.pend is None:
                self.pend = np.empty((len(x), GRAM_CHUNK))
            take = min(GRAM_CHUNK - self.fill, k - pos)
            self.pend[:, self.fill : self.fill + take] = x[:, pos : pos + take]
            self.fill += take
            pos += take
            if self.fill == GRAM_CHUNK:
                self._chunk(self.pend)
                self.fill = 0

    def _chunk(self, x: F64) -> None:
        if self.g is None:
            self.g = np.zeros((len(x), len(x)))
            self.u = np.zeros(len(x))
        assert self.u is not None
        if self.centre:
            mu = x.mean(axis=0)
            xc = x - mu  # a fresh C-contiguous array: BLAS sees the same input whatever x was
            self.g += xc @ xc.T
            self.u += xc @ mu
            self.s += float(mu @ mu)
        else:
            xc = np.ascontiguousarray(x)
            self.g += xc @ xc.T

    def result(self) -> Gram:
        if self.fill:
            assert self.pend is not None
            self._chunk(self.pend[:, : self.fill])
            self.fill = 0
        if self.g is None:
            raise EmptyAggregate("no coordinates")
        assert self.u is not None
        return Gram(self.g, self.u, self.s)


def gram_sum(
    blocks: Iterable[tuple[int, int, F64]], extra: Arr | None = None, *, centre: bool = True
) -> Gram:
    """The :class:`Gram` of the rows delivered block by block (blocks of any width, in
    coordinate order), plus ``extra`` as a last row. ``centre=False`` sums the plain products
    (then ``centred`` is ``X X^T`` itself: an all-zero row has an exactly zero norm)."""
    acc = _GramAcc(centre)
    for c0, c1, blk in blocks:
        acc.add(blk if extra is None else np.vstack([blk, extra[c0:c1].astype(np.float64)]))
    return acc.result()


def gram(blocks: Iterable[tuple[int, int, F64]], extra: Arr | None = None) -> F64:
    """``X X^T`` (float64) of the rows delivered block by block, plus ``extra`` as a last row.

    Each fixed chunk of :data:`GRAM_CHUNK` coordinates is centred on its own column means
    before its product, and the cross terms added back: inner products are sums of the same
    float64 products, but the centred part (what distances depend on) does not lose its digits
    to a large common component. The grouping depends on the model size only, not on the
    blocks."""
    return gram_sum(blocks, extra).full()


def pick_best(scores: F64, m: int, scale: float = 0.0) -> list[int]:
    """The indices of the ``m`` lowest ``scores``, in the order picked: each pick is the
    earliest index whose score is within ``TIE_RTOL * (best + scale)`` of the lowest score
    left (see :data:`TIE_RTOL`)."""
    left = np.arange(len(scores))
    out: list[int] = []
    clean = np.where(np.isnan(scores), np.inf, scores)  # an overflowed score ranks last
    for _ in range(min(m, len(scores))):
        s = clean[left]
        lo = float(s.min())
        tol = TIE_RTOL * (lo + scale)
        tied = np.flatnonzero(s <= lo + (tol if math.isfinite(tol) else 0.0))
        i = int(left[tied[0]]) if len(tied) else int(left[0])
        out.append(i)
        left = left[left != i]
    return out


def _need(state: SpoolState, n_min: int, rule: str) -> int:
    n = state.count
    if n == 0:
        raise EmptyAggregate("no update was folded: nothing to finalize")
    if n < n_min:
        raise TooFewUpdates(f"{rule} needs at least {n_min} updates, got {n}")
    return n


def _check_f(f: int) -> None:
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ConfigError(f"f (the number of Byzantine clients) must be an int >= 0, got {f!r}")


# --------------------------------------------------------------------------------------------
# Coordinate-wise rules
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CoordinateMedian(_Spooled):
    """The coordinate-wise median. For an even number of updates it is the mean of the two
    middle values (numpy's rule; ``torch.median`` would return the lower one)."""

    def finalize_flat(self, state: SpoolState) -> Arr:
        _need(state, 1, "the median")
        out = np.empty(state.spec.size, state.spec.dtype)
        n = state.count
        for c0, c1, blk in self._blocks(state):
            srt = np.sort(blk, axis=0)  # faster than np.median along a short axis
            mid = srt[n // 2] if n % 2 else (srt[n // 2 - 1] + srt[n // 2]) / 2.0
            out[c0:c1] = mid
        return out


@dataclass(frozen=True, slots=True)
class TrimmedMean(_Spooled):
    """Per coordinate, drop the ``b`` largest and ``b`` smallest values and average the rest.

    ``b`` is given (``b = f`` in the Byzantine-robust literature) or ``int(beta * n)``
    (Flower's FedTrimmedAvg); with too few updates it is lowered to ``(n - 1) // 2``.
    """

    b: int | None = None
    beta: float | None = None

    def __post_init__(self) -> None:
        if (self.b is None) == (self.beta is None):
            raise ConfigError("give exactly one of b (values cut per side) and beta (fraction)")
        if self.b is not None:
            _check_f(self.b)
        if self.beta is not None and not 0 <= self.beta < 0.5:
            raise ConfigError(f"beta must be in [0, 0.5), got {self.beta!r}")

    def cut(self, n: int) -> int:
        b = self.b if self.b is not None else int((self.beta or 0.0) * n)
        return min(b, (n - 1) // 2)

    def finalize_flat(self, state: SpoolState) -> Arr:
        n = _need(state, 1, "the trimmed mean")
        b = self.cut(n)
        out = np.empty(state.spec.size, state.spec.dtype)
        for c0, c1, blk in self._blocks(state):
            srt = np.sort(blk, axis=0)
            out[c0:c1] = srt[b : n - b].mean(axis=0)
        return out


# --------------------------------------------------------------------------------------------
# Krum, Multi-Krum, Bulyan
# --------------------------------------------------------------------------------------------


def _krum_scores(d2: F64, alive: Sequence[int], f: int) -> F64:
    """Krum's score of each alive update: the sum of its ``n - f - 2`` smallest squared
    distances to the other alive updates (summed smallest first: equal multisets of
    distances give bit-equal scores)."""
    sub = d2[np.ix_(alive, alive)]
    n = len(alive)
    k = n - f - 2
    np.fill_diagonal(sub, np.inf)
    part: F64 = np.sort(sub, axis=1)[:, :k]
    out: F64 = part.sum(axis=1)
    return out


def krum_pick(d2: F64, alive: Sequence[int], f: int, m: int, spread: float = 0.0) -> list[int]:
    """The ``m`` alive updates with the best Krum scores, ties (:data:`TIE_RTOL`) going to the
    earliest; ``spread`` is the distances' rounding scale (:meth:`Gram.spread`)."""
    k = max(0, len(alive) - f - 2)
    best = pick_best(_krum_scores(d2, alive, f), m, k * spread)
    return [alive[i] for i in best]


@dataclass(frozen=True, slots=True)
class Krum(_Spooled):
    """Krum (Blanchard et al. 2017) and Multi-Krum: score each update by the sum of its
    ``n - f - 2`` smallest squared distances to the others; return the best one (``m = 1``)
    or the plain mean of the ``m`` best (Multi-Krum, scored once). Needs ``n >= 2f + 3``.
    Distances come from the Gram matrix (one pass over the updates); ties within
    :data:`TIE_RTOL` go to the earliest folded update."""

    f: int = 0
    m: int = 1

    def __post_init__(self) -> None:
        _check_f(self.f)
        if isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1:
            raise ConfigError(f"m must be an int >= 1, got {self.m!r}")

    def select(self, state: SpoolState) -> list[int]:
        """The indices (in fold order) of the selected updates."""
        n = _need(state, 2 * self.f + 3, "Krum")
        g = self._gram(state)
        return sorted(krum_pick(g.sq_dists(), range(n), self.f, self.m, g.spread()))

    def finalize_flat(self, state: SpoolState) -> Arr:
        chosen = self.select(state)
        return self._combine(state, np.full(len(chosen), 1.0 / len(chosen)), chosen)


@dataclass(frozen=True, slots=True)
class Bulyan(_Spooled):
    """Bulyan (El Mhamdi et al. 2018): ``theta = n - 2f`` updates chosen by repeated Krum
    (each pick removed, scores recomputed on the rest); then per coordinate, the mean of the
    ``beta = theta - 2f`` selected values closest to their median. Needs ``n >= 4f + 3``."""

    f: int = 0

    def __post_init__(self) -> None:
        _check_f(self.f)

    def select(self, state: SpoolState) -> list[int]:
        n = _need(state, 4 * self.f + 3, "Bulyan")
        g = self._gram(state)
        d2, spread = g.sq_dists(), g.spread()
        alive = list(range(n))
        chosen: list[int] = []
        for _ in range(n - 2 * self.f):
            f = min(self.f, max(0, len(alive) - 3))  # Krum over the remaining candidates
            (pick,) = krum_pick(d2, alive, f, 1, spread)
            chosen.append(pick)
            alive.remove(pick)
        return sorted(chosen)

    def finalize_flat(self, state: SpoolState) -> Arr:
        chosen = self.select(state)
        theta = len(chosen)
        beta = theta - 2 * self.f
        out = np.empty(state.spec.size, state.spec.dtype)
        for c0, c1, blk in self._blocks(state, chosen):
            med = np.median(blk, axis=0)
            idx = np.argsort(np.abs(blk - med), axis=0, kind="stable")[:beta]
            out[c0:c1] = np.take_along_axis(blk, idx, axis=0).mean(axis=0)
        return out


# --------------------------------------------------------------------------------------------
# Geometric median (RFA) and centered clipping: iterations on coefficient vectors
# --------------------------------------------------------------------------------------------


def _dist_to_combo(g: F64, coef: F64) -> F64:
    """``||x_i - sum_j coef_j x_j||`` for every row i, from the Gram matrix."""
    gc = g @ coef
    d2 = np.diag(g) - 2.0 * gc + float(coef @ gc)
    return np.sqrt(np.maximum(d2, 0.0))


@dataclass(frozen=True, slots=True)
class GeometricMedian(_Spooled):
    """RFA's smoothed Weiszfeld (Pillutla et al.): ``z0`` = the weighted mean;
    ``beta_i = alpha_i / max(nu, ||z - x_i||)``, ``z <- sum beta_i x_i / sum beta_i``, at most
    ``maxiter`` times or until the objective ``sum alpha_i ||z - x_i||`` changes by at most
    ``ftol`` relative. ``alpha_i = n_i / sum n`` (``weighted``) or ``1/n``."""

    maxiter: int = 4
    nu: float = 1e-5
    ftol: float = 1e-6
    weighted: bool = True

    def __post_init__(self) -> None:
        if self.maxiter < 1 or not self.nu > 0 or not self.ftol >= 0:
            raise ConfigError("geometric median needs maxiter >= 1, nu > 0 and ftol >= 0")

    def coefficients(self, g: F64, weights: Sequence[float]) -> F64:
        """The median as a combination of the updates (coefficients sum to 1)."""
        n = len(weights)
        alpha = np.asarray(weights, np.float64) if self.weighted else np.ones(n)
        alpha = alpha / alpha.sum()
        coef = alpha.copy()
        obj = float(alpha @ _dist_to_combo(g, coef))
        for _ in range(self.maxiter):
            dist = _dist_to_combo(g, coef)
            beta = alpha / np.maximum(self.nu, dist)
            coef = beta / beta.sum()
            new = float(alpha @ _dist_to_combo(g, coef))
            done = abs(obj - new) <= self.ftol * max(new, 1e-300)
            obj = new
            if done:
                break
        out: F64 = coef
        return out

    def finalize_flat(self, state: SpoolState) -> Arr:
        _need(state, 1, "the geometric median")
        coef = self.coefficients(self._gram(state).full(), state.weights)
        return self._combine(state, coef)


@dataclass(frozen=True, slots=True)
class CenteredClipping(_Spooled):
    """Centered clipping (Karimireddy, He, Jaggi 2021): ``L`` times,
    ``v <- v + (1/n) sum_i (x_i - v) min(1, tau / ||x_i - v||)``, from ``v0`` = the previous
    round's aggregate (carried by the strategy in ``ServerState.carry``; zero at first)."""

    tau: float = 100.0
    iters: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tau) and self.tau > 0) or self.iters < 1:
            raise ConfigError("centered clipping needs tau > 0 and iters >= 1")

    @property
    def carries(self) -> bool:
        return True

    def coefficients(self, g: F64) -> F64:
        """The result over [x_1..x_n, v0] (the Gram matrix's last row is v0)."""
        n = len(g) - 1
        coef = np.zeros(n + 1)
        coef[n] = 1.0
        for _ in range(self.iters):
            dist = _dist_to_combo(g, coef)[:n]
            s = np.minimum(1.0, self.tau / np.maximum(dist, 1e-300)) / n
            coef = coef * (1.0 - s.sum())
            coef[:n] += s
        return coef

    def finalize_flat(self, state: SpoolState) -> Arr:
        n = _need(state, 1, "centered clipping")
        v0 = state.center
        if v0 is None:
            v0 = np.zeros(state.spec.size, state.spec.dtype)
        coef = self.coefficients(self._gram(state, v0).full())
        out = self._combine(state, coef[:n])
        if coef[n] != 0.0:
            out += (coef[n] * v0.astype(np.float64)).astype(state.spec.dtype)
        return out


# --------------------------------------------------------------------------------------------
# The Flag Aggregator
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FlagAggregator(_Spooled):
    """The Flag Aggregator (Almasi et al., ICLR 2024): the m-dimensional subspace Y that
    best reconstructs the unit-normalised updates (IRLS on the "sine median" objective
    ``sum_i sqrt(1 - ||Y^T g_i||^2)`` plus ``lam`` times the pairwise term), then
    ``(1/m) Y Y^T sum_i g_i``.

    Everything runs on the p x p Gram matrix (plain products, not centred: angles need each
    inner product to its own relative precision): the scatter matrix is
    ``G (diag(a^2) + L) G^T`` with L the Laplacian of the pairwise weights, so an IRLS step is
    a p x p eigenproblem, O(n p^2 + p^3) for any ``lam``. The first weights are those the
    reference's random start ``Y0`` gives in high dimension, where ``||Y0^T g||^2 = 0``:
    ``a_i = (1 + eps)^(-1/4)`` and ``b_ij = lam / (p (p - 1)) (1 + eps)^(-1/4)``, so ``lam``
    acts from the first step; the result is always an SVD result, never a start. Updates
    whose scaled values are all zero are left out (they have no direction; their norm is
    exactly 0). ``m`` defaults to ``ceil(p / 2)`` (the reference's scripts: p=7 -> 4,
    p=15 -> 8).
    ``norm="unit"`` returns the reference's aggregate of unit vectors; ``"median"`` rescales
    it by the median update norm, so it is a delta on the updates' scale.
    """

    m: int | None = None
    lam: float = 0.0
    iters: int = 3
    eps: float = 1e-7
    tol: float = 1e-10
    norm: Literal["unit", "median"] = "unit"

    def __post_init__(self) -> None:
        if self.m is not None and (isinstance(self.m, bool) or self.m < 1):
            raise ConfigError(f"m must be None or >= 1, got {self.m!r}")
        if not (math.isfinite(self.lam) and self.lam >= 0) or self.iters < 1:
            raise ConfigError("the Flag Aggregator needs lam >= 0 and iters >= 1")
        if self.norm not in ("unit", "median"):
            raise ConfigError(f"norm must be 'unit' or 'median', not {self.norm!r}")

    def coefficients(self, g: F64) -> tuple[F64, int]:
        """The aggregate as a combination of the raw updates, and the subspace size used."""
        norms = np.sqrt(np.maximum(np.diag(g), 0.0))
        keep = np.flatnonzero(norms > 0)
        coef = np.zeros(len(g))
        if len(keep) == 0:
            return coef, 0
        p = len(keep)
        k = g[np.ix_(keep, keep)] / np.outer(norms[keep], norms[keep])  # unit-vector Gram
        m = min(self.m if self.m is not None else -(-p // 2), p)
        a, b = self._start(p)
        best: tuple[float, F64] | None = None
        for _ in range(self.iters):
            proj = self._projector(k, a, b, m)  # P with ||Y^T G e||^2 = e^T K P K e
            obj, a, b = self._weights(k, proj, p)
            if best is not None and best[0] - obj <= self.tol:
                if obj < best[0]:
                    best = (obj, proj)
                break
            if best is None or obj < best[0]:
                best = (obj, proj)
            if obj <= self.tol:
                break
        assert best is not None
        proj = best[1]
        c = proj @ (k @ np.ones(p)) / m  # (1/m) Y Y^T sum g_i, over the unit vectors
        coef[keep] = c / norms[keep]
        if self.norm == "median":
            coef *= float(np.median(norms[keep]))
        return coef, m

    def _start(self, p: int) -> tuple[F64, F64]:
        """The first IRLS weights: the reference's, at a start orthogonal to every update."""
        w0 = (1.0 + self.eps) ** -0.25
        a = np.full(p, w0)
        b = np.zeros((p, p))
        if self.lam > 0 and p > 1:
            b[...] = self.lam / (p * (p - 1)) * w0
            np.fill_diagonal(b, 0.0)
        return a, b

    def _projector(self, k: F64, a: F64, b: F64, m: int) -> F64:
        """``Q`` (p x p) such that ``Y Y^T = G Q G^T`` for the top-m eigenvectors Y of the
        weighted scatter ``G C G^T``, ``C = diag(a^2) + L(b^2)``."""
        w = b**2  # symmetric; every ordered pair (i, j) adds w_ij (e_i - e_j)(e_i - e_j)^T
        c = np.diag(a**2) + 2.0 * (np.diag(w.sum(axis=1)) - w)
        ev, evec = np.linalg.eigh(c)
        r = evec * np.sqrt(np.maximum(ev, 0.0))  # C = R R^T
        mm = r.T @ k @ r  # M^T M with M = G R
        lam, w_ = np.linalg.eigh(mm)
        order = np.argsort(lam)[::-1][:m]
        lam, w_ = lam[order], w_[:, order]
        good = lam > lam.max(initial=0.0) * 1e-12
        lam, w_ = lam[good], w_[:, good]
        t = r @ w_  # Y = G t diag(lam)^-1/2
        q: F64 = (t / lam) @ t.T
        return q

    def _weights(self, k: F64, proj: F64, p: int) -> tuple[float, F64, F64]:
        """The objective at this subspace and the next IRLS weights."""
        kpk = k @ proj @ k  # e_i^T K P K e_j = <Y^T g_i, Y^T g_j>
        r = np.clip(np.diag(kpk), 0.0, None)
        sin2 = np.abs(1.0 - r)
        obj = float(np.sqrt(sin2).sum())
        a = (sin2 + self.eps) ** -0.25
        b = np.zeros((p, p))
        if self.lam > 0 and p > 1:
            dr = r[:, None] + r[None, :] - 2.0 * kpk  # ||Y^T (g_i - g_j)||^2
            pair = np.abs(1.0 - dr)
            np.fill_diagonal(pair, 0.0)
            scale = self.lam / (p * (p - 1))
            obj += scale * float(np.sqrt(pair).sum())
            b = scale * (pair + self.eps) ** -0.25
            np.fill_diagonal(b, 0.0)
        return obj, a, b

    def finalize_flat(self, state: SpoolState) -> Arr:
        _need(state, 1, "the Flag Aggregator")
        coef, _ = self.coefficients(self._gram(state, centre=False).full())
        return self._combine(state, coef)


# --------------------------------------------------------------------------------------------
# Decomposable per-iteration forms (for aggregation trees)
# --------------------------------------------------------------------------------------------


def distance_to(spec: ParamSpec, update: Update, center: Arr) -> float:
    """``||scale * delta - center||`` in float64, a chunk at a time (no model-sized copy)."""
    total = 0.0
    at = 0
    step = 1 << 16
    for seg in spec.segments(update.delta):
        for lo in range(0, seg.size, step):
            hi = min(seg.size, lo + step)
            x = seg[lo:hi].astype(np.float64) * float(update.scale)
            x -= center[at + lo : at + hi]
            total += float(x @ x)
        at += seg.size
    return math.sqrt(total)


@dataclass(frozen=True, slots=True)
class CenterWeight:
    """A pre-transform weighting each update by its distance to ``center``: RFA's
    ``alpha_i / max(nu, ||x_i - z||)`` (``kind="weiszfeld"``) or centered clipping's
    ``min(1, tau / ||x_i - v||)`` (``kind="clip"``, replacing the weight)."""

    center: Arr
    kind: Literal["weiszfeld", "clip"]
    radius: float

    def __call__(self, spec: ParamSpec, update: Update) -> Update:
        dist = distance_to(spec, update, self.center)
        if not math.isfinite(dist):
            raise NonFiniteUpdate(update.client_id, "delta holds NaN or Inf values")
        if self.kind == "weiszfeld":
            w = float(update.weight) / max(self.radius, dist)
        else:
            w = min(1.0, self.radius / dist) if dist > 0 else 1.0
        return replace(update, weight=w)


@dataclass(frozen=True, slots=True)
class ClipStep:
    """One centered-clipping iteration as a monoid: fold ``min(1, tau/||x_i - v||) x_i``
    (weights ``s_i``), merge along any tree, finalize ``v + (S/n)(mean - v)`` with
    ``S = sum s_i``, which is ``v + (1/n) sum s_i (x_i - v)``."""

    inner: Composed

    @property
    def decomposable(self) -> bool:
        return True

    @property
    def center(self) -> Arr:
        pre = self.inner.pre[0]
        assert isinstance(pre, CenterWeight)
        return pre.center

    def init(self, spec: ParamSpec, *, version: int | None = None) -> MeanState:
        state: MeanState = self.inner.init(spec, version=version)
        return state

    def fold(self, state: MeanState, update: Update) -> MeanState:
        out: MeanState = self.inner.fold(state, update)
        return out

    def fold_many(self, state: MeanState, updates: Iterable[Update]) -> MeanState:
        out: MeanState = self.inner.fold_many(state, updates)
        return out

    def merge(self, state: MeanState, other: MeanState) -> MeanState:
        out: MeanState = self.inner.merge(state, other)
        return out

    def count(self, state: MeanState) -> int:
        return state.count

    def finalize_flat(self, state: MeanState) -> Arr:
        mean_x = self.inner.finalize_flat(state).astype(np.float64)
        frac = (state.weight + state.weight_comp) / state.count
        v = self.center.astype(np.float64)
        out: Arr = (v + frac * (mean_x - v)).astype(state.spec.dtype)
        return out

    def finalize(self, state: MeanState) -> ArrayTree:
        return state.spec.unflatten(self.finalize_flat(state))


def weiszfeld_step(z: Arr, nu: float = 1e-5) -> Composed:
    """One smoothed-Weiszfeld iteration from ``z`` as a monoid (a weighted mean with weights
    ``alpha_i / max(nu, ||x_i - z||)``): its finalize is the next iterate."""
    if not nu > 0:
        raise ConfigError(f"nu must be > 0, got {nu!r}")
    return compose(CenterWeight(np.asarray(z, np.float64), "weiszfeld", float(nu)), mean("float64"))


def clip_step(v: Arr, tau: float = 100.0) -> ClipStep:
    """One centered-clipping iteration from ``v`` as a monoid (see :class:`ClipStep`)."""
    if not (math.isfinite(tau) and tau > 0):
        raise ConfigError(f"tau must be finite and > 0, got {tau!r}")
    return ClipStep(
        compose(CenterWeight(np.asarray(v, np.float64), "clip", float(tau)), mean("float64"))
    )


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------


def median(
    *, spool: StoreFactory | None = None, block_bytes: int = BLOCK_BYTES
) -> CoordinateMedian:
    """The coordinate-wise median."""
    return CoordinateMedian(spool, block_bytes)


def trimmed_mean(
    b: int | None = None,
    *,
    beta: float | None = None,
    spool: StoreFactory | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> TrimmedMean:
    """The coordinate-wise trimmed mean, cutting ``b`` (or ``int(beta n)``) per side."""
    return TrimmedMean(spool, block_bytes, b, beta)


def krum(f: int, *, spool: StoreFactory | None = None, block_bytes: int = BLOCK_BYTES) -> Krum:
    """Krum with ``f`` assumed Byzantine clients."""
    return Krum(spool, block_bytes, f, 1)


def multi_krum(
    f: int, m: int, *, spool: StoreFactory | None = None, block_bytes: int = BLOCK_BYTES
) -> Krum:
    """Multi-Krum: the mean of the ``m`` updates with the best Krum scores."""
    return Krum(spool, block_bytes, f, m)


def bulyan(f: int, *, spool: StoreFactory | None = None, block_bytes: int = BLOCK_BYTES) -> Bulyan:
    """Bulyan over Krum with ``f`` assumed Byzantine clients."""
    return Bulyan(spool, block_bytes, f)


def geometric_median(
    maxiter: int = 4,
    nu: float = 1e-5,
    ftol: float = 1e-6,
    *,
    weighted: bool = True,
    spool: StoreFactory | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> GeometricMedian:
    """RFA's geometric median (smoothed Weiszfeld)."""
    return GeometricMedian(spool, block_bytes, maxiter, nu, ftol, weighted)


def centered_clipping(
    tau: float = 100.0,
    iters: int = 1,
    *,
    spool: StoreFactory | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> CenteredClipping:
    """Centered clipping with radius ``tau`` and ``iters`` iterations."""
    return CenteredClipping(spool, block_bytes, tau, iters)


def flag_aggregator(
    m: int | None = None,
    lam: float = 0.0,
    *,
    iters: int = 3,
    norm: Literal["unit", "median"] = "unit",
    spool: StoreFactory | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> FlagAggregator:
    """The Flag Aggregator with subspace size ``m`` (default ``ceil(p/2)``)."""
    return FlagAggregator(spool, block_bytes, m, lam, iters, 1e-7, 1e-10, norm)
