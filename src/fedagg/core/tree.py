"""Trees and shards of monoid states: the pure math behind hierarchical aggregation.

Nothing here does I/O. See :mod:`fedagg.hierarchy` for the processes, shared memory and Ray
actors that run it. What is here:

* :class:`Sharded` splits every update into ``S`` coordinate slices (zero-copy views) and
  keeps one weighted-mean state per slice, so ``S`` workers can each own one slice; the
  result equals the unsharded mean bit for bit.
* :func:`reduce_tree` merges partial states along a balanced tree of a given fan-out, and
  :func:`tree_error_bound` states how far a tree's result may be from the flat fold's.
* Hierarchical forms of the rules that are not monoids: :class:`LeafThenMean` (a robust rule
  at each leaf, a mean above: a *different* rule, documented as such), the exact multi-pass
  drivers :func:`tree_rfa` and :func:`tree_centered_clipping` (one monoid per iteration), and
  :class:`SketchKrum` (Krum on Johnson-Lindenstrauss sketches, then a masked mean: an
  approximation with a stated error).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, TypeVar

import numpy as np
import numpy.typing as npt

from fedagg.core import kernels as _kernels
from fedagg.core.aggregate import (
    Accumulator,
    Aggregator,
    Composed,
    Mean,
    MeanState,
    PreTransform,
    check_peak,
    check_update,
)
from fedagg.core.robust import distance_to, krum_pick
from fedagg.core.spec import ArrayTree, Delta, ParamSpec
from fedagg.core.update import Update
from fedagg.errors import (
    ConfigError,
    EmptyAggregate,
    NonFiniteUpdate,
    StateError,
    TooFewUpdates,
    UpdateError,
)

__all__ = [
    "LeafThenMean",
    "MaskedMean",
    "Sharded",
    "ShardedState",
    "SketchKrum",
    "SketchState",
    "compensated_margin",
    "jl_dim",
    "leaf_then_mean",
    "reduce_tree",
    "shard_bounds",
    "sharded",
    "sketch_krum",
    "tree_centered_clipping",
    "tree_error_bound",
    "tree_rfa",
]

Arr = npt.NDArray[Any]
F64 = npt.NDArray[np.float64]
S = TypeVar("S")


def shard_bounds(size: int, shards: int, align: int = 16) -> list[tuple[int, int]]:
    """``shards`` contiguous coordinate ranges ``[lo, hi)`` covering ``range(size)``.

    The ranges are as equal as ``align`` allows: every boundary but the last is a multiple of
    ``align`` elements (16 float32 = one 64-byte cache line, so two workers never write the
    same line). Shards may be empty when ``size`` is small.
    """
    if shards < 1:
        raise ConfigError(f"shards must be >= 1, got {shards}")
    if size < 0 or align < 1:
        raise ConfigError(f"invalid size {size} or alignment {align}")
    units = -(-size // align)  # ceil
    out: list[tuple[int, int]] = []
    for i in range(shards):
        lo = min(size, (units * i // shards) * align)
        hi = min(size, (units * (i + 1) // shards) * align)
        out.append((lo, hi))
    return out


# --------------------------------------------------------------------------------------------
# Trees of partial states
# --------------------------------------------------------------------------------------------


class Mergeable(Protocol[S]):
    """Anything with a monoid ``merge`` (every aggregator, and the first pass of
    :class:`SketchKrum`)."""

    def merge(self, state: S, other: S) -> S: ...


def reduce_tree(agg: Mergeable[S], states: Sequence[S], fanout: int = 2) -> S:
    """Merge ``states`` along a balanced tree of fan-out ``fanout``; returns the root state.

    Level by level, consecutive groups of ``fanout`` states are merged into the *first* state
    of their group (``agg.merge(head, other)`` in order), so the tree has depth
    ``ceil(log_fanout(len(states)))``; a last, incomplete group is merged as it is (a lone
    state is carried up unchanged). What it mutates: ``agg.merge`` works in place, so the
    head of every group of two or more at every level is changed, i.e. ``states[i]`` for each
    ``i`` with ``i % fanout**l == 0`` and ``i + fanout**(l-1) < len(states)`` for some
    ``l >= 1``; the result *is* ``states[0]`` (for the in-place aggregators of fedagg). All
    other states are left exactly as they were (``merge`` never changes its second
    argument). Pass copies (``fedagg.loads(fedagg.dumps(s))``) to keep the inputs. For a
    decomposable aggregator the result equals the flat fold up to :func:`tree_error_bound`.
    """
    if isinstance(fanout, bool) or not isinstance(fanout, int) or fanout < 2:
        raise ConfigError(f"fanout must be an int >= 2, got {fanout!r}")
    level = list(states)
    if not level:
        raise ConfigError("reduce_tree needs at least one state")
    while len(level) > 1:
        nxt: list[S] = []
        for g in range(0, len(level), fanout):
            head = level[g]
            for other in level[g + 1 : g + fanout]:
                head = agg.merge(head, other)
            nxt.append(head)
        level = nxt
    return level[0]


def _gamma(k: int, u: float) -> float:
    if k * u >= 1:
        return math.inf
    return k * u / (1 - k * u)


def _units(dtype: npt.DTypeLike) -> tuple[float, float]:
    """The unit roundoff of a float dtype and its smallest positive (subnormal) value."""
    info = np.finfo(np.dtype(dtype))
    return float(info.eps) / 2, float(info.smallest_subnormal)


def compensated_margin(abs_weighted_sum: npt.ArrayLike, total_weight: float, n: int) -> F64:
    """How far the float64 quotient of the compensated mean may be from the exact mean.

    With the ``"float64"`` accumulator, every tree (and the flat fold) keeps each product
    ``w_i s_i x_i`` exactly (value + error, Dekker's split) and each addition's error, and
    rounds only the running compensation: the quotient is within
    ``3u|q| + 5 (n**2 + 1) u**2 * A / W`` of the exact mean ``q`` (``u = 2**-53``,
    ``A = sum |w_i s_i x_i|``; see ``fedagg.aggregators.mean``). This returns the looser
    ``(4u + 7 n**2 u**2) * A / W`` per coordinate (a generous constant: it is used to
    certify, not to estimate).
    """
    a = np.asarray(abs_weighted_sum, np.float64)
    if not total_weight > 0 or n < 0:
        raise ConfigError("total_weight must be > 0 and n >= 0")
    u = 2.0**-53
    out: F64 = (4 * u + 7 * n * n * u * u) * (a / total_weight) * (1 + 1e-12)
    return out


def tree_error_bound(
    abs_weighted_sum: npt.ArrayLike,
    total_weight: float,
    n: int,
    accumulator: Accumulator = "float32",
    *,
    dtype: npt.DTypeLike = np.float32,
) -> F64:
    """Per-coordinate bound on ``|tree - flat|`` for the weighted mean (:class:`Mean`).

    ``tree`` is the finalized result of *any* merge tree (any shape, any leaf order, any leaf
    batches, e.g. :func:`reduce_tree` of any fan-out) over ``n`` updates, ``flat`` the result
    of folding them all into one state. ``abs_weighted_sum`` is ``A = sum_i |w_i s_i x_i|`` per
    coordinate (weight x scale x value), ``total_weight`` is ``W = sum_i w_i``, ``dtype`` the
    model's dtype.

    * ``"float32"`` (plain sums; for a float32 model): both results add the *same* rounded
      terms ``t_i = fl(fl(w_i s_i) x_i)``, only in another order, and any order of ``n - 1``
      additions is within ``gamma_{n-1} * sum |t_i|`` of the exact sum, with
      ``gamma_k = k u / (1 - k u)``, ``u = 2**-24``. Hence::

          |tree - flat| <= 2 gamma_{n-1} (1+u)^2 A / W          (the sums)
                           + 2u (1 + gamma_{n+1}) (1+u)^2 A / W (each result's final rounding)
                           + 2**-49 A / W + 2**-149             (float64 division, subnormals)

      (with ``u`` the model dtype's unit roundoff when the model is float64, whose plain
      accumulator is float64).
    * ``"float64"`` (Neumaier-compensated): both quotients are within
      ``D = compensated_margin(A, W, n)`` of the exact mean ``q``, so the results are *equal*
      unless a rounding boundary of the model dtype lies within ``D`` of ``q`` (then they
      differ by one unit in the last place). ``D`` is ``~4 * 2**-53 * A / W`` for any
      realistic ``n``, so this is rare, and never happens when the exact mean is itself
      representable. The bound returned is ``2 D + ulp(A / W + D)``.
    """
    a = np.asarray(abs_weighted_sum, np.float64)
    if not (math.isfinite(total_weight) and total_weight > 0):
        raise ConfigError(f"total_weight must be finite and > 0, got {total_weight!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"n must be an int >= 0, got {n!r}")
    u, tiny = _units(dtype)
    scale = a / total_weight
    if accumulator == "float32":
        g = 2 * _gamma(max(0, n - 1), u) + 2 * u * (1 + _gamma(n + 1, u))
        out: F64 = (g * (1 + u) ** 2 + 2.0**-49) * scale + tiny
        return out
    if accumulator == "float64":
        d = compensated_margin(a, total_weight, n)
        out = 2 * d + 2 * u * (scale + d) * (1 + 1e-12) + tiny
        return out
    raise ConfigError(f"accumulator must be 'float32' or 'float64', not {accumulator!r}")


# --------------------------------------------------------------------------------------------
# Coordinate shards
# --------------------------------------------------------------------------------------------


def _sub_spec(spec: ParamSpec, lo: int, hi: int) -> ParamSpec:
    """The slice ``[lo, hi)`` of ``spec``'s flat layout, as a spec of 1-D pieces: one piece per
    array of ``spec`` the slice overlaps (named ``"name[a:b]"``), or one empty piece."""
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    off = spec.offsets
    for j, name in enumerate(spec.names):
        a, b = max(lo, off[j]), min(hi, off[j + 1])
        if a < b:
            names.append(f"{name}[{a - off[j]}:{b - off[j]}]")
            shapes.append((b - a,))
    if not names:
        names, shapes = ["empty"], [(0,)]
    return ParamSpec(tuple(names), tuple(shapes), spec.dtype, False)


def _split_segments(
    spec: ParamSpec, bounds: Sequence[tuple[int, int]], segs: Sequence[Arr]
) -> list[Delta]:
    """One delta per shard: views of the update's segments (never copies)."""
    if len(segs) == 1:
        flat = segs[0]
        return [flat[lo:hi] for lo, hi in bounds]
    off = spec.offsets
    out: list[Delta] = []
    for lo, hi in bounds:
        parts = []
        for j in range(len(segs)):
            a, b = max(lo, off[j]), min(hi, off[j + 1])
            if a < b:
                parts.append(segs[j][a - off[j] : b - off[j]])
        out.append(parts if parts else segs[0][0:0])
    return out


@dataclass(slots=True, eq=False)
class ShardedState:
    """The state of :class:`Sharded`: one :class:`MeanState` per coordinate shard.

    ``bounds[i] = (lo, hi)`` is shard ``i``'s range of the flat layout, and ``shards[i]`` a
    weighted-mean state over that slice (its ``spec`` is the slice, see
    :meth:`Sharded.shard_spec`). Every shard has folded the same updates, so they share count
    and weight.
    """

    spec: ParamSpec
    version: int | None
    bounds: list[tuple[int, int]]
    shards: list[MeanState]

    @property
    def count(self) -> int:
        return self.shards[0].count if self.shards else 0

    def check(self) -> None:
        """Raise StateError unless the shards fit the spec and agree with each other."""
        if not self.shards or len(self.bounds) != len(self.shards):
            raise StateError("a ShardedState needs one bounds entry per shard, and >= 1 shard")
        at = 0
        for (lo, hi), st in zip(self.bounds, self.shards, strict=True):
            if lo != at or hi < lo:
                raise StateError("shard bounds must be contiguous ranges covering the model")
            at = hi
            if not isinstance(st, MeanState) or st.spec != _sub_spec(self.spec, lo, hi):
                raise StateError(f"shard [{lo}, {hi}) does not fit the spec")
            st.check()
        if at != self.spec.size:
            raise StateError("shard bounds must cover the whole model")
        first = self.shards[0]
        for st in self.shards:
            if st.version != self.version or st.accumulator != first.accumulator:
                raise StateError("shards disagree on version or accumulator")
            if st.count != first.count:
                raise StateError("shards hold different numbers of updates")

    def nbytes(self) -> int:
        return sum(st.nbytes() for st in self.shards)


@dataclass(frozen=True, slots=True)
class Sharded:
    """The weighted mean computed as ``shards`` independent coordinate slices.

    Each update's flat delta is cut into the ranges of ``shard_bounds(spec.size, shards,
    align)``; shard ``i`` is a :class:`MeanState` over that slice, fed zero-copy views of the
    update. ``fold``/``fold_many`` validate each update once for the whole model, apply
    ``inner``'s pre-transforms to the *whole* update (so e.g. a norm clip sees the full norm),
    then fold every shard; they are atomic: a refused update or batch leaves all shards
    exactly as they were (the float32 shards roll back from their undo buffers, the float64
    ones are never touched before every check passed). ``merge`` is shard-wise, ``finalize``
    concatenates.

    Guarantee: the result equals the unsharded ``inner``'s **bit for bit**, for any ``shards``
    (including more shards than coordinates), since every coordinate goes through the same
    kernel operations in the same order. The same updates and batches are refused.

    ``inner`` must be coordinate-wise: a :class:`Mean`, or a :class:`Composed` of
    pre-transforms and a :class:`Mean` (the pre-transforms run on the whole update, before it
    is sliced). Anything else raises ConfigError.

    For ``S`` worker processes, each owning a shard: :meth:`shard_spec`, :meth:`init_shard`,
    :meth:`split` (validates the whole update and gives each worker its slice) and
    :attr:`mean` (what a worker folds with), then :meth:`assemble` at the root.
    """

    inner: Mean | Composed
    shards: int
    align: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.shards, bool) or not isinstance(self.shards, int) or self.shards < 1:
            raise ConfigError(f"shards must be an int >= 1, got {self.shards!r}")
        if isinstance(self.align, bool) or not isinstance(self.align, int) or self.align < 1:
            raise ConfigError(f"align must be an int >= 1, got {self.align!r}")
        base = self.inner.inner if isinstance(self.inner, Composed) else self.inner
        if not isinstance(base, Mean):
            raise ConfigError(
                f"only coordinate-wise rules can be sharded (the weighted mean, optionally after "
                f"pre-transforms), not {type(base).__name__}: its result at one coordinate "
                "depends on the others"
            )

    # -- parts --------------------------------------------------------------------------------
    @property
    def mean(self) -> Mean:
        """The weighted mean each shard runs (what a worker folds its slices with)."""
        base = self.inner.inner if isinstance(self.inner, Composed) else self.inner
        assert isinstance(base, Mean)
        return base

    @property
    def pre(self) -> tuple[PreTransform, ...]:
        return self.inner.pre if isinstance(self.inner, Composed) else ()

    @property
    def decomposable(self) -> bool:
        return True

    def bounds(self, spec: ParamSpec) -> list[tuple[int, int]]:
        return shard_bounds(spec.size, self.shards, self.align)

    def shard_spec(self, spec: ParamSpec, i: int) -> ParamSpec:
        """The spec of shard ``i``: its slice of the flat layout, as 1-D pieces of the arrays it
        overlaps (a flat buffer of the slice's size fits it too)."""
        lo, hi = self._bound(spec, i)
        return _sub_spec(spec, lo, hi)

    def _bound(self, spec: ParamSpec, i: int) -> tuple[int, int]:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.shards:
            raise ConfigError(f"shard index must be in [0, {self.shards}), got {i!r}")
        return self.bounds(spec)[i]

    # -- monoid -------------------------------------------------------------------------------
    def init(self, spec: ParamSpec, *, version: int | None = None) -> ShardedState:
        bounds = self.bounds(spec)
        states = [self.mean.init(_sub_spec(spec, lo, hi), version=version) for lo, hi in bounds]
        return ShardedState(spec, version, bounds, states)

    def init_shard(self, spec: ParamSpec, i: int, *, version: int | None = None) -> MeanState:
        """An empty state for shard ``i`` alone (what worker ``i`` holds)."""
        return self.mean.init(self.shard_spec(spec, i), version=version)

    def _prepare(self, spec: ParamSpec, version: int | None, update: Update) -> Update:
        check_update(spec, version, update)
        for t in self.pre:
            update = t(spec, update)
        return update

    def _check_values(self, spec: ParamSpec, ups: Sequence[Update], count: int) -> None:
        """The float64 fold's own value checks, done once on whole updates (a shard sees only
        its slice's peak): no shard can then refuse what another one has folded."""
        use = self.mean.use_numba
        for u in ups:
            peak = max((_kernels.max_abs(s, use_numba=use) for s in _segs(spec, u)), default=0.0)
            weighted = float(u.weight) * float(u.scale)
            check_peak(u.client_id, weighted, peak, count=count + len(ups), float64=True)

    def split(self, spec: ParamSpec, update: Update, *, version: int | None = None) -> list[Update]:
        """Validate ``update`` for the whole model (metadata, pre-transforms, finite values)
        and return its ``S`` slices, as updates worker ``i`` folds with ``self.mean`` into its
        shard state. Views only, no copy. A worker's float32 fold can still refuse a batch
        whose weighted sum overflows float32; use the float64 accumulator when shards live in
        separate processes and every refusal must be decided here."""
        up = self._prepare(spec, version, update)
        self._check_values(spec, [up], 0)
        parts = _split_segments(spec, self.bounds(spec), _segs(spec, up))
        return [replace(up, delta=p) for p in parts]

    def fold(self, state: ShardedState, update: Update) -> ShardedState:
        return self.fold_many(state, (update,))

    def fold_many(self, state: ShardedState, updates: Iterable[Update]) -> ShardedState:
        spec = state.spec
        ups = [self._prepare(spec, state.version, u) for u in updates]
        if not ups:
            return state
        if self.mean.accumulator == "float64":
            self._check_values(spec, ups, state.count)
        pieces = [_split_segments(spec, state.bounds, _segs(spec, u)) for u in ups]
        done: list[tuple[MeanState, tuple[float, float, int]]] = []
        try:
            for i, st in enumerate(state.shards):
                saved = (st.weight, st.weight_comp, st.count)
                self.mean.fold_many(
                    st, [replace(u, delta=p[i]) for u, p in zip(ups, pieces, strict=True)]
                )
                done.append((st, saved))
        except UpdateError:
            for st, saved in done:
                _roll_back_fold(st, saved)
            raise
        return state

    def merge(self, state: ShardedState, other: ShardedState) -> ShardedState:
        if other.spec != state.spec:
            raise StateError("cannot merge states of different specs")
        if other.version != state.version:
            raise StateError(f"cannot merge version {other.version} into {state.version}")
        if other.bounds != state.bounds:
            raise StateError("cannot merge states sharded differently")
        done: list[tuple[MeanState, tuple[float, float, int]]] = []
        try:
            for st, ot in zip(state.shards, other.shards, strict=True):
                saved = (st.weight, st.weight_comp, st.count)
                self.mean.merge(st, ot)
                done.append((st, saved))
        except StateError:
            for st, saved in done:
                _roll_back_merge(st, saved)
            raise
        return state

    def finalize_flat(self, state: ShardedState) -> Arr:
        if state.count == 0:
            raise EmptyAggregate("no update was folded: nothing to finalize")
        out = np.empty(state.spec.size, state.spec.dtype)
        for (lo, hi), st in zip(state.bounds, state.shards, strict=True):
            out[lo:hi] = self.mean.finalize_flat(st)
        return out

    def finalize(self, state: ShardedState) -> ArrayTree:
        return state.spec.unflatten(self.finalize_flat(state))

    def count(self, state: ShardedState) -> int:
        return state.count

    # -- distributed shards -----------------------------------------------------------------
    def shard_state(self, state: ShardedState, i: int) -> MeanState:
        """Shard ``i``'s state (the object itself, not a copy)."""
        self._bound(state.spec, i)
        return state.shards[i]

    def assemble(self, spec: ParamSpec, states: Sequence[MeanState]) -> ShardedState:
        """One state from the ``S`` shard states that ``S`` workers built (no copy).

        Raises StateError unless there is one state per shard, each over its shard's spec,
        all with this rule's accumulator, one version, and the same updates (same count, and
        total weights equal to 1e-12 relative).
        """
        if len(states) != self.shards:
            raise StateError(f"expected {self.shards} shard states, got {len(states)}")
        bounds = self.bounds(spec)
        first = states[0]
        w0 = first.weight + first.weight_comp
        for i, (st, (lo, hi)) in enumerate(zip(states, bounds, strict=True)):
            if not isinstance(st, MeanState) or st.spec != _sub_spec(spec, lo, hi):
                raise StateError(f"state {i} is not over shard {i}'s slice [{lo}, {hi})")
            if st.accumulator != self.mean.accumulator:
                raise StateError(f"state {i} uses the {st.accumulator} accumulator")
            if st.version != first.version:
                raise StateError(f"state {i} aggregates version {st.version}, not {first.version}")
            w = st.weight + st.weight_comp
            if st.count != first.count or abs(w - w0) > 1e-12 * max(abs(w0), abs(w)):
                raise StateError(f"state {i} did not fold the same updates as state 0")
        out = ShardedState(spec, first.version, bounds, list(states))
        out.check()
        return out


def _segs(spec: ParamSpec, update: Update) -> list[Arr]:
    return spec.segments(update.delta)


def _roll_back_fold(st: MeanState, saved: tuple[float, float, int]) -> None:
    """Undo a *successful* fold_many of a plain (float32) Mean: its ``undo`` buffer holds the
    sums as they were before that call."""
    if st.comp is not None or (st.undo is None and st.acc.size):
        raise StateError("cannot roll back a compensated shard")  # pragma: no cover
    if st.acc.size:
        assert st.undo is not None
        st.acc[...] = st.undo
    st.weight, st.weight_comp, st.count = saved


def _roll_back_merge(st: MeanState, saved: tuple[float, float, int]) -> None:
    if saved[2] == 0:  # merged into the identity: a copy of the other state
        st.acc[...] = 0
        if st.comp is not None:
            st.comp[...] = 0
    elif st.count != saved[2]:  # a plain merge: undo holds the sums before it
        if st.comp is not None or st.undo is None:
            raise StateError("cannot roll back a compensated shard")  # pragma: no cover
        st.acc[...] = st.undo
    st.weight, st.weight_comp, st.count = saved


def sharded(inner: Mean | Composed, shards: int, *, align: int = 16) -> Sharded:
    """``inner`` (a mean, possibly after pre-transforms) over ``shards`` coordinate slices.
    See :class:`Sharded`."""
    return Sharded(inner, shards, align)


# --------------------------------------------------------------------------------------------
# Robust at the leaves, mean above
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LeafThenMean:
    """ "Robust at the leaves, then a mean above": a hierarchical rule, *not* the leaf rule.

    Each leaf (an edge aggregator) runs ``leaf`` (e.g. Krum, the median) on its own clients'
    updates only. :meth:`seal` turns the leaf's finalized result ``r_l`` into a weighted-mean
    partial state of weight ``n_l``, the number of updates the leaf aggregated (``by="count"``,
    the default: each client one vote, as in the robust rules) or their total client weight
    (``by="weight"``). Those merge up the tree with the mean monoid of ``above``; the root's
    result is ``sum_l n_l r_l / sum_l n_l``.

    Meaning of robustness: leaf ``l`` tolerates what ``leaf`` tolerates among *its own*
    ``n_l`` clients (e.g. Krum ``n_l >= 2 f_l + 3``, the median ``f_l < n_l / 2``). A leaf
    within its tolerance contributes a robust estimate; a leaf beyond it (e.g. a Byzantine
    majority) can output any vector, and the mean above does not remove it: it is only
    diluted, entering with weight ``n_l / N``, so it moves the result by ``n_l / N`` times its
    own error, which is unbounded. The mean over leaves has breakdown point 0: the rule as a
    whole is robust only while *every* leaf is within its own tolerance. With ``f`` Byzantine
    clients placed adversarially that requires ``f <= min_l f_l`` (they may all sit in the
    smallest leaf); with clients assigned to leaves at random, each leaf sees about ``f / L``.
    """

    leaf: Aggregator[Any]
    above: Mean = field(default_factory=lambda: Mean("float64"))
    by: Literal["count", "weight"] = "count"

    def __post_init__(self) -> None:
        if not isinstance(self.above, Mean):
            raise ConfigError("above must be a Mean")
        if self.by not in ("count", "weight"):
            raise ConfigError(f"by must be 'count' or 'weight', not {self.by!r}")

    @property
    def decomposable(self) -> bool:
        return True  # above the leaves

    def seal(self, leaf_state: Any, *, leaf_id: str = "") -> MeanState:
        """The leaf's result as a mean partial of weight ``n_l`` (or its clients' weight)."""
        spec: ParamSpec = leaf_state.spec
        version: int | None = getattr(leaf_state, "version", None)
        result = self.leaf.finalize_flat(leaf_state)
        by_count = self.by == "count"
        w = float(self.leaf.count(leaf_state)) if by_count else _client_weight(leaf_state)
        state = self.above.init(spec, version=version)
        return self.above.fold(state, Update(result, w, leaf_id, version))

    def init(self, spec: ParamSpec, *, version: int | None = None) -> MeanState:
        return self.above.init(spec, version=version)

    def merge(self, state: MeanState, other: MeanState) -> MeanState:
        return self.above.merge(state, other)

    def finalize_flat(self, state: MeanState) -> Arr:
        return self.above.finalize_flat(state)

    def finalize(self, state: MeanState) -> ArrayTree:
        return self.above.finalize(state)

    def count(self, state: MeanState) -> int:
        """How many leaves were sealed into ``state``."""
        return state.count

    def aggregate(
        self,
        leaves: Sequence[Sequence[Update]],
        spec: ParamSpec,
        *,
        version: int | None = None,
        fanout: int = 2,
    ) -> Arr:
        """The whole rule in one process: every non-empty leaf folds its updates with
        ``leaf`` and is sealed; the sealed states merge by :func:`reduce_tree`."""
        sealed = [
            self.seal(
                self.leaf.fold_many(self.leaf.init(spec, version=version), ups), leaf_id=f"{i}"
            )
            for i, ups in enumerate(leaves)
            if ups
        ]
        if not sealed:
            raise EmptyAggregate("no leaf holds an update")
        return self.above.finalize_flat(reduce_tree(self.above, sealed, fanout))


def _client_weight(state: Any) -> float:
    weights = getattr(state, "weights", None)
    if isinstance(weights, list):
        return math.fsum(weights)
    if isinstance(state, MeanState):
        return state.weight + state.weight_comp
    raise ConfigError(f"cannot read client weights from a {type(state).__name__}")


def leaf_then_mean(
    leaf_rule: Aggregator[Any], *, by: Literal["count", "weight"] = "count"
) -> LeafThenMean:
    """``leaf_rule`` at every leaf, then the float64 weighted mean of the leaf results, each
    weighted by its leaf's update count. See :class:`LeafThenMean` for what it tolerates."""
    return LeafThenMean(leaf_rule, Mean("float64"), by)


# --------------------------------------------------------------------------------------------
# RFA and centered clipping across a tree: one monoid pass per iteration
# --------------------------------------------------------------------------------------------


def _quotient(state: MeanState) -> F64:
    """``(acc + comp) / W`` of a float64 mean state, kept in float64 (no rounding to the
    model dtype between iterations)."""
    out: F64 = (state.acc.astype(np.float64) + (0.0 if state.comp is None else state.comp)) / (
        state.weight + state.weight_comp
    )
    return out


def _center_pass(
    spec: ParamSpec,
    version: int | None,
    leaves: Sequence[Sequence[Update]],
    center: F64 | None,
    weight: Any,
    fanout: int,
) -> tuple[MeanState, float]:
    """One pass over the tree: each leaf folds its updates, reweighted by
    ``weight(update, distance to center)``, into a float64 mean (the monoid of
    :func:`weiszfeld_step` / :func:`clip_step`; the distance is read once and also summed,
    weighted, for RFA's objective); the leaf states merge by :func:`reduce_tree`."""
    agg = Mean("float64")
    states: list[MeanState] = []
    obj = 0.0
    for ups in leaves:
        st = agg.init(spec, version=version)
        batch = []
        for u in ups:
            check_update(spec, version, u)
            dist = 0.0 if center is None else distance_to(spec, u, center)
            if not math.isfinite(dist):
                raise NonFiniteUpdate(u.client_id, "delta holds NaN or Inf values")
            w, o = weight(u, dist)
            obj += o
            batch.append(replace(u, weight=w))
        states.append(agg.fold_many(st, batch))
    root = reduce_tree(agg, states, fanout) if states else agg.init(spec, version=version)
    if root.count == 0:
        raise EmptyAggregate("no update was folded: nothing to finalize")
    return root, obj


def tree_rfa(
    leaves: Sequence[Sequence[Update]],
    spec: ParamSpec,
    *,
    maxiter: int = 4,
    nu: float = 1e-5,
    ftol: float = 1e-6,
    weighted: bool = True,
    fanout: int = 2,
    version: int | None = None,
) -> Arr:
    """RFA's geometric median (:func:`~fedagg.aggregators.geometric_median`, same defaults)
    computed across an aggregation tree, one monoid pass per iteration.

    Pass 0 is the weighted mean ``z0`` (``alpha_i = n_i / sum n``, or ``1/n`` when not
    ``weighted``). Pass ``k`` broadcasts ``z_k``; each leaf folds ``beta_i x_i`` with
    ``beta_i = alpha_i / max(nu, ||x_i - z_k||)`` (the :func:`weiszfeld_step` monoid) and sums
    ``alpha_i ||x_i - z_k||`` (the objective at ``z_k``); :func:`reduce_tree` merges; the root
    forms ``z_{k+1}``. It stops as the flat rule does: after ``maxiter`` steps, or at ``z_k``
    once ``|obj(z_{k-1}) - obj(z_k)| <= ftol * obj(z_k)`` (known one pass later, so an early
    stop costs one extra pass). Iterates stay in float64; only the result is cast to the
    model's dtype. It equals the flat rule up to float64 rounding (distances are computed
    directly here, from the Gram matrix there): the results agree to the last float32 bit or
    so.
    """
    if maxiter < 1 or not nu > 0 or not ftol >= 0:
        raise ConfigError("tree_rfa needs maxiter >= 1, nu > 0 and ftol >= 0")

    def alpha(u: Update) -> float:
        return float(u.weight) if weighted else 1.0

    root, _ = _center_pass(spec, version, leaves, None, lambda u, d: (alpha(u), 0.0), fanout)
    total = root.weight + root.weight_comp  # sum alpha_i
    z = _quotient(root)
    prev: float | None = None
    for _ in range(maxiter):
        root, obj_sum = _center_pass(
            spec,
            version,
            leaves,
            z,
            lambda u, d: (alpha(u) / max(nu, d), alpha(u) * d),
            fanout,
        )
        obj = obj_sum / total
        if prev is not None and abs(prev - obj) <= ftol * max(obj, 1e-300):
            break
        prev = obj
        z = _quotient(root)
    return z.astype(spec.dtype)


def tree_centered_clipping(
    leaves: Sequence[Sequence[Update]],
    spec: ParamSpec,
    tau: float = 100.0,
    iters: int = 1,
    v0: npt.ArrayLike | None = None,
    *,
    fanout: int = 2,
    version: int | None = None,
) -> Arr:
    """Centered clipping (:func:`~fedagg.aggregators.centered_clipping`) across an
    aggregation tree: ``iters`` passes of the :func:`clip_step` monoid.

    Each pass broadcasts ``v``; each leaf folds ``s_i x_i`` with weights
    ``s_i = min(1, tau / ||x_i - v||)``; :func:`reduce_tree` merges; the root forms
    ``v + (sum s_i x_i - (sum s_i) v) / n``. ``v0`` defaults to zero, as in the flat rule
    when no previous aggregate is carried. Iterates stay in float64; the result is cast to the
    model's dtype. Each client has one vote (weights are not used), as in the flat rule.
    """
    if not (math.isfinite(tau) and tau > 0) or iters < 1:
        raise ConfigError("centered clipping needs tau > 0 and iters >= 1")
    v = np.zeros(spec.size) if v0 is None else np.array(v0, np.float64).reshape(-1)
    if v.shape != (spec.size,):
        raise ConfigError(f"v0 must have {spec.size} values, got {v.shape}")

    def clip(u: Update, d: float) -> tuple[float, float]:
        return (min(1.0, tau / d) if d > 0 else 1.0), 0.0

    for _ in range(iters):
        root, _ = _center_pass(spec, version, leaves, v, clip, fanout)
        num = root.acc.astype(np.float64)
        if root.comp is not None:
            num += root.comp
        num -= (root.weight + root.weight_comp) * v
        v = v + num / root.count
    out: Arr = v.astype(spec.dtype)
    return out


# --------------------------------------------------------------------------------------------
# Krum on Johnson-Lindenstrauss sketches
# --------------------------------------------------------------------------------------------


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
        segs = [_segs(spec, u) for u in updates]
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
