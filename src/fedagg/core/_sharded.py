"""The weighted mean over coordinate shards (:class:`Sharded`): one mean state per slice of
the flat layout, bit-identical to the unsharded mean. See :mod:`fedagg.core.tree`."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.core import kernels as _kernels
from fedagg.core._reduce import update_segments
from fedagg.core.aggregate import Composed, Mean, MeanState, PreTransform, check_peak, check_update
from fedagg.core.spec import ArrayTree, Delta, ParamSpec
from fedagg.core.update import Update
from fedagg.errors import ConfigError, EmptyAggregate, StateError, UpdateError

__all__ = ["Sharded", "ShardedState", "shard_bounds", "sharded"]

Arr = npt.NDArray[Any]


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
            peak = max(
                (_kernels.max_abs(s, use_numba=use) for s in update_segments(spec, u)), default=0.0
            )
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
        parts = _split_segments(spec, self.bounds(spec), update_segments(spec, up))
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
        pieces = [_split_segments(spec, state.bounds, update_segments(spec, u)) for u in ups]
        done: list[tuple[MeanState, tuple[float, float, int]]] = []
        try:
            for i, st in enumerate(state.shards):
                saved = (st.weight, st.weight_comp, st.count)
                self.mean.fold_many(
                    st,
                    [replace(u, delta=p[i]) for u, p in zip(ups, pieces, strict=True)],
                    undo=True,
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
