"""Krum on Johnson-Lindenstrauss sketches (:class:`SketchKrum`), then a masked mean
(:class:`MaskedMean`): an approximation in two monoid passes. See :mod:`fedagg.core.tree`."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.core._krum import krum_pick
from fedagg.core._reduce import reduce_tree, update_segments
from fedagg.core.aggregate import Mean, MeanState, check_update
from fedagg.core.spec import ArrayTree, ParamSpec
from fedagg.core.update import Update
from fedagg.errors import ConfigError, EmptyAggregate, NonFiniteUpdate, StateError, TooFewUpdates

__all__ = ["MaskedMean", "SketchKrum", "SketchState", "jl_dim", "sketch_krum"]

Arr = npt.NDArray[Any]
F64 = npt.NDArray[np.float64]


def jl_dim(n: int, eps: float, delta: float = 1e-3) -> int:
    """A sketch size ``k`` at which a Gaussian sketch keeps every pairwise squared distance of
    ``n`` points within a factor ``1 +- eps``, with probability at least ``1 - delta``.

    Per pair, ``P(| ||Sx||^2 / ||x||^2 - 1 | > eps) <= 2 exp(-(k/2)(eps^2/2 - eps^3/3))``
    (Dasgupta & Gupta 2003); a union bound over the ``n(n-1)/2`` pairs gives
    ``k >= 2 (2 ln n + ln(1/delta)) / (eps^2/2 - eps^3/3)``: about ``8 ln(n) / eps**2`` for a
    small ``eps`` (plus the confidence term), independent of the model size.
    """
    if not 0 < eps < 1 or not 0 < delta < 1 or n < 1:
        raise ConfigError("jl_dim needs n >= 1, 0 < eps < 1 and 0 < delta < 1")
    c = eps**2 / 2 - eps**3 / 3
    return max(1, math.ceil(2 * (2 * math.log(max(n, 2)) + math.log(1 / delta)) / c))


@dataclass(slots=True, eq=False)
class SketchState:
    """SketchKrum's first pass: the multiset of the clients' sketches (an ``n x k`` table;
    merge concatenates). ``rows[i]`` is ``S x_i / sqrt(k)`` in float64."""

    spec: ParamSpec
    version: int | None
    k: int
    seed: int
    rows: list[Arr] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    clients: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.rows)

    def check(self) -> None:
        n = len(self.rows)
        if not (len(self.weights) == len(self.clients) == n) or not all(
            isinstance(r, np.ndarray) and r.shape == (self.k,) and r.dtype == np.float64
            for r in self.rows
        ):
            raise StateError("inconsistent SketchState (rows, weights, clients)")


@dataclass(frozen=True, slots=True)
class MaskedMean:
    """SketchKrum's second pass: the mean of the ``selected`` clients' updates only (a monoid,
    over :class:`MeanState`). Updates of other clients are skipped without being read or
    checked; selected ones are checked and folded with weight 1 (each client one vote, as in
    Krum), or their own weight when ``weighted``."""

    selected: frozenset[str]
    inner: Mean = field(default_factory=lambda: Mean("float64"))
    weighted: bool = False

    @property
    def decomposable(self) -> bool:
        return True

    def init(self, spec: ParamSpec, *, version: int | None = None) -> MeanState:
        return self.inner.init(spec, version=version)

    def fold(self, state: MeanState, update: Update) -> MeanState:
        return self.fold_many(state, (update,))

    def fold_many(self, state: MeanState, updates: Iterable[Update]) -> MeanState:
        ups = []
        for u in updates:
            if u.client_id in self.selected:
                check_update(state.spec, state.version, u)
                ups.append(u if self.weighted else replace(u, weight=1.0))
        return self.inner.fold_many(state, ups)

    def merge(self, state: MeanState, other: MeanState) -> MeanState:
        return self.inner.merge(state, other)

    def finalize_flat(self, state: MeanState) -> Arr:
        return self.inner.finalize_flat(state)

    def finalize(self, state: MeanState) -> ArrayTree:
        return self.inner.finalize(state)

    def count(self, state: MeanState) -> int:
        return state.count


@dataclass(frozen=True, slots=True)
class SketchKrum:
    """Krum / Multi-Krum on Johnson-Lindenstrauss sketches: an approximation in two passes.

    Pass 1 (a monoid, :class:`SketchState`): each update ``x_i`` (times its scale) becomes the
    ``k``-vector ``S x_i / sqrt(k)``, ``S`` a ``k x d`` standard Gaussian matrix that is never
    held: its columns are drawn ``block`` at a time from ``(seed, block index)``, so memory is
    ``O(k * block)`` and every process draws the same ``S``. Sketches concatenate (``n x k``
    floats, tiny). At the root, :meth:`select` scores the clients as Krum does (sum of the
    ``n - f - 2`` smallest squared distances) on *sketch* distances and keeps the ``m`` best.
    Pass 2 (:meth:`second_pass`, a :class:`MaskedMean`): the plain mean of the selected
    clients' updates, as Multi-Krum's result.

    Approximation: with ``k >= jl_dim(n, eps, delta)`` (about ``8 ln(n) / eps**2``) every
    pairwise squared distance is within ``(1 +- eps)`` of the exact one with probability
    ``>= 1 - delta``, so every Krum score is too. The selection therefore equals exact Krum's
    whenever the scores that decide it (the ``m``-th and ``m+1``-th best) differ by more than
    a factor ``(1 + eps) / (1 - eps)``, e.g. when honest and Byzantine updates are well
    separated; otherwise it picks a client whose exact score is within that factor of the
    ``m``-th best.

    The seed must be fresh each round and unknown to the clients: ``S`` has a huge null space
    (``k << d``), and a client that knows ``S`` can add to its update any vector in it, which
    the sketch (hence the selection) does not see. A client's sketch is the same whatever the
    update's layout, batch or leaf, up to float64 rounding of the block products.
    """

    f: int
    m: int = 1
    k: int = 256
    seed: int = 0
    block: int = 4096

    def __post_init__(self) -> None:
        for name in ("f", "m", "k", "seed", "block"):
            v = getattr(self, name)
            low = 0 if name in ("f", "seed") else 1
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ConfigError(f"{name} must be an int >= {low}, got {v!r}")

    @property
    def decomposable(self) -> bool:
        return True  # pass 1

    def init(self, spec: ParamSpec, *, version: int | None = None) -> SketchState:
        return SketchState(spec, version, self.k, self.seed)

    def sketch(self, spec: ParamSpec, updates: Sequence[Update]) -> F64:
        """The ``len(updates) x k`` sketches ``S (s_i x_i) / sqrt(k)`` (values unchecked
        beyond finiteness; raises NonFiniteUpdate naming the client)."""
        segs = [update_segments(spec, u) for u in updates]
        offs = [[0, spec.size] if len(s) == 1 else list(spec.offsets) for s in segs]
        scales = np.array([float(u.scale) for u in updates], np.float64)[:, None]
        n, d = len(updates), spec.size
        out = np.zeros((n, self.k))
        buf = np.empty((n, min(self.block, max(d, 1))))
        for b, c0 in enumerate(range(0, d, self.block)):
            c1 = min(d, c0 + self.block)
            x = buf[:, : c1 - c0]
            for r in range(n):
                _gather(segs[r], offs[r], c0, c1, x[r])
            bad = ~np.isfinite(x).all(axis=1)
            if bad.any():
                raise NonFiniteUpdate(
                    updates[int(np.argmax(bad))].client_id, "delta holds NaN or Inf values"
                )
            g = _block_rng(self.seed, b).standard_normal((self.k, c1 - c0))
            out += (x * scales) @ g.T
        out /= math.sqrt(self.k)
        return out

    def fold(self, state: SketchState, update: Update) -> SketchState:
        return self.fold_many(state, (update,))

    def fold_many(self, state: SketchState, updates: Iterable[Update]) -> SketchState:
        ups = list(updates)
        for u in ups:
            check_update(state.spec, state.version, u)
        if not ups:
            return state
        self._fits(state)
        rows = self.sketch(state.spec, ups)
        if not np.isfinite(rows).all():
            bad = int(np.argmax(~np.isfinite(rows).all(axis=1)))
            raise NonFiniteUpdate(ups[bad].client_id, "sketch overflows float64")
        state.rows.extend(rows[i].copy() for i in range(len(ups)))
        state.weights.extend(float(u.weight) for u in ups)
        state.clients.extend(u.client_id for u in ups)
        return state

    def _fits(self, state: SketchState) -> None:
        if state.k != self.k or state.seed != self.seed:
            raise StateError("the state was sketched with another k or seed")

    def merge(self, state: SketchState, other: SketchState) -> SketchState:
        if other.spec != state.spec or other.version != state.version:
            raise StateError("cannot merge sketches of different specs or versions")
        if other.k != state.k or other.seed != state.seed:
            raise StateError("cannot merge sketches of different k or seed")
        state.rows.extend(r.copy() for r in other.rows)
        state.weights.extend(other.weights)
        state.clients.extend(other.clients)
        return state

    def count(self, state: SketchState) -> int:
        return state.count

    def sketch_sq_dists(self, state: SketchState) -> F64:
        """Squared distances between the sketches (approximate squared update distances)."""
        y = np.array(state.rows).reshape(state.count, self.k)
        diff = y[:, None, :] - y[None, :, :]
        out: F64 = np.einsum("ijk,ijk->ij", diff, diff)
        return out

    def select(self, state: SketchState) -> list[str]:
        """The client ids of the ``m`` best Krum scores on sketch distances (fold order)."""
        n = state.count
        if n == 0:
            raise EmptyAggregate("no update was folded: nothing to select")
        if n < 2 * self.f + 3:
            raise TooFewUpdates(f"Krum needs at least {2 * self.f + 3} updates, got {n}")
        if len(set(state.clients)) != n:
            raise StateError("SketchKrum needs unique client ids to select by id")
        y = np.array(state.rows).reshape(n, self.k)
        yc = y - y.mean(axis=0)
        spread = float(np.median(np.einsum("ij,ij->i", yc, yc)))  # the sketches' rounding scale
        chosen = krum_pick(self.sketch_sq_dists(state), range(n), self.f, self.m, spread)
        return [state.clients[i] for i in sorted(chosen)]

    def second_pass(self, selected: Iterable[str]) -> MaskedMean:
        """The monoid of pass 2: the mean of the selected clients' updates."""
        return MaskedMean(frozenset(selected))


#: Domain tag of the sketch streams: ``SeedSequence(seed, spawn_key=(tag, block))`` never
#: coincides with ``default_rng(seed)`` (``default_rng([seed, 0])`` does: trailing zero words are
#: dropped), so a sketch is independent of data drawn from the same seed.
_SKETCH_TAG = 0x534B


def _block_rng(seed: int, block: int) -> np.random.Generator:
    return np.random.Generator(
        np.random.PCG64(np.random.SeedSequence(seed, spawn_key=(_SKETCH_TAG, block)))
    )


def _gather(segs: Sequence[Arr], offs: Sequence[int], c0: int, c1: int, out: Arr) -> None:
    """Flat coordinates ``[c0, c1)`` of an update given as consecutive segments, into ``out``."""
    j = bisect.bisect_right(offs, c0) - 1
    while j < len(segs) and offs[j] < c1:
        a, b = max(offs[j], c0), min(offs[j + 1], c1)
        if a < b:
            out[a - c0 : b - c0] = segs[j][a - offs[j] : b - offs[j]]
        j += 1


def sketch_krum(
    leaves: Sequence[Sequence[Update]],
    spec: ParamSpec,
    f: int,
    m: int = 1,
    *,
    k: int = 256,
    seed: int = 0,
    fanout: int = 2,
    version: int | None = None,
) -> Arr:
    """:class:`SketchKrum` across a tree, in one process: pass 1 sketches every leaf's
    updates and merges the sketch tables by :func:`reduce_tree`; the root selects; pass 2
    folds the selected updates at their leaves and merges the means."""
    rule = SketchKrum(f, m, k, seed)
    firsts = [rule.fold_many(rule.init(spec, version=version), ups) for ups in leaves]
    if not firsts:
        raise EmptyAggregate("no leaf")
    chosen = rule.select(reduce_tree(rule, firsts, fanout))
    masked = rule.second_pass(chosen)
    seconds = [masked.fold_many(masked.init(spec, version=version), ups) for ups in leaves]
    return masked.finalize_flat(reduce_tree(masked, seconds, fanout))
