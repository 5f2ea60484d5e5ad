"""``[deploy] receivers = P``: the server folds its uploads in P processes, through the one-host
shared-memory plane (:class:`fedagg.plane.ShmAggregator`, LIFL's design).

The engine, the authentication and the event log stay in the server's process; only the
aggregate moves. :class:`PlaneMean` wraps the strategy's plain :class:`~fedagg.core.aggregate.Mean`
(the policy code is unchanged, it folds through the wrapper as through any aggregator): each
accepted update, once logged and read back from its spool, is checked (Mean's rules: shape,
weight, version, finiteness, overflow) in one pass that copies it into a shared-memory slot,
and handed to the P receiver processes, each owning a coordinate shard of the accumulator,
which fold it in place while the engine goes on with the next event. The weighted mean is
element-wise, and every shard folds the updates in log order with Mean's own kernels, so the
aggregate is bit for bit that of the in-process fold, and a replay after a crash (the log and
the spool files, as without receivers) reproduces it. A round's close finalizes in the
receivers; a checkpoint saves the aggregate exported from them (:meth:`PlaneState.checkpoint_view`),
and a restart loads it back into them.

A receiver that dies (killed, out of memory) makes the next fold, finalize or checkpoint raise
:class:`~fedagg.plane.AggregatorFailed`: the engine stops (the server exits with that error),
nothing acknowledged is lost (every accepted upload is logged before it is folded), and the next
start replays the log into fresh receivers: exactly once, the same bits.

Only a plain mean runs in receivers (also inside the server's bounds and canonical order, which
keep updates and fold them through it): a pre-transform, a robust rule, secure aggregation or
DP is a :class:`~fedagg.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg._checkpoint import register
from fedagg.core.aggregate import Mean, MeanState
from fedagg.core.spec import ArrayTree, ParamSpec
from fedagg.core.strategy import Strategy
from fedagg.core.update import Update
from fedagg.deploy._canonical import Canonical
from fedagg.errors import ConfigError, StateError
from fedagg.plane import Lease, ShmAggregator

__all__ = [
    "PlaneMean", "PlaneState", "plane_strategy", "read_buffer", "start_receivers",
    "stop_receivers",
]  # fmt: skip

Arr = npt.NDArray[Any]
log = logging.getLogger("fedagg.server")
_TRANSIENT = {"transient": True}


@register
@dataclass(eq=False)
class PlaneState:
    """A round's aggregate held by the receivers (a handle: the sums live in shared memory).

    ``saved``: the aggregate as a whole :class:`MeanState` while no receiver holds it (a
    checkpoint's, or one set aside for another state, or a state of another shape than the
    model's, folded in process); None while the receivers hold it (or it is empty)."""

    spec: ParamSpec
    version: int | None
    accumulator: str
    saved: MeanState | None = None
    #: the wrapper whose receivers hold this state (None: they do not)
    live: PlaneMean | None = field(default=None, repr=False, metadata=_TRANSIENT)

    def checkpoint_view(self) -> PlaneState:
        """What a checkpoint saves: the aggregate exported from the receivers."""
        return PlaneState(self.spec, self.version, self.accumulator, self.inner)

    @property
    def inner(self) -> MeanState:
        """The aggregate as one :class:`MeanState` (exported from the receivers: a copy)."""
        if self.live is not None and self.live.holds(self):
            return self.live.export()
        if self.saved is not None:
            return self.saved
        return Mean(self.accumulator).init(self.spec, version=self.version)  # type: ignore[arg-type]


@dataclass(eq=False)
class PlaneMean:
    """A :class:`Mean` whose aggregate lives in ``receivers`` processes (see the module).

    The processes start with the engine's warm-up (:meth:`start_receivers`, before the server
    listens) or else at the first fold, never when the strategy is built (a federation that is
    only inspected starts none), and stop with the federation (:meth:`close_receivers`). They
    hold one aggregate at a time, the live one; folding into another state sets the live one
    aside (exported), which a policy that keeps one round open at a time never does."""

    inner: Mean
    receivers: int
    spec: ParamSpec
    #: slots of the shared-memory ring (updates handed over and not yet folded)
    slots: int = 2
    #: whether partial aggregates (an edge's) are merged here: bigger slots
    partials: bool = False
    timeout: float = 60.0
    _plane: ShmAggregator | None = field(default=None, init=False, repr=False)
    #: the state the receivers hold (weakly: a state the policy dropped needs no setting aside)
    _owner: weakref.ref[PlaneState] | None = field(default=None, init=False, repr=False)
    #: the slot :meth:`receiver_slot` handed out, until an update read into it is folded
    _lease: Lease | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if type(self.inner) is not Mean:
            raise ConfigError(
                "deploy.receivers > 0 folds a plain mean in the receiver processes: not "
                f"{type(self.inner).__name__} (no pre-transform, robust rule, secure aggregation "
                "or DP); set deploy.receivers = 0"
            )
        if not 1 <= self.receivers <= 64:
            raise ConfigError(f"deploy.receivers must be in 0..64, got {self.receivers!r}")

    # -- the Aggregator protocol ---------------------------------------------------------------
    @property
    def decomposable(self) -> bool:
        return True

    @property
    def accumulator(self) -> str:
        return self.inner.accumulator

    def init(self, spec: ParamSpec, *, version: int | None = None) -> PlaneState:
        return PlaneState(spec, version, self.inner.accumulator)

    def fold(self, state: PlaneState, update: Update) -> PlaneState:
        plane = self._bind(state)
        if plane is None:
            state.saved = self.inner.fold(self._local(state), update)
        elif self._lease is not None and _views(update.delta, self._lease.array):
            lease, self._lease = self._lease, None  # read into a slot: handed over in place
            u = update
            plane.commit(lease, u.weight, scale=u.scale, client_id=u.client_id,
                         base_version=u.base_version)  # fmt: skip
        else:
            plane.submit(update)
        return state

    def fold_many(self, state: PlaneState, updates: Iterable[Update]) -> PlaneState:
        """All or none (as :meth:`Mean.fold_many`): on a refusal the aggregate is restored."""
        ups = list(updates)
        if len(ups) == 1:  # one update: all or nothing already (the server's bounds fold so)
            return self.fold(state, ups[0])
        plane = self._bind(state)
        if plane is None:
            state.saved = self.inner.fold_many(self._local(state), ups)
            return state
        before = plane.state() if plane.count else None
        try:
            for u in ups:
                plane.submit(u)
            plane.flush()
        except BaseException:
            plane.reset(state.version)
            if before is not None:
                plane.load(before)
            raise
        return state

    def merge(self, state: PlaneState, other: Any) -> PlaneState:
        part = other.inner if isinstance(other, PlaneState) else other
        plane = self._bind(state)
        if plane is None or not self.partials:
            merged = self.inner.merge(self._local(state, export=True), part)
            if plane is not None:  # back into the receivers
                plane.reset(state.version)
                if merged.count:
                    plane.load(merged)
            else:
                state.saved = merged
        else:
            plane.merge(part)
        return state

    def finalize_flat(self, state: PlaneState) -> Arr:
        plane = self._bind(state)
        if plane is None:
            return self.inner.finalize_flat(self._local(state))
        return plane.finalize_flat()

    def finalize(self, state: PlaneState) -> ArrayTree:
        return state.spec.unflatten(self.finalize_flat(state))

    def count(self, state: PlaneState) -> int:
        if self.holds(state):
            assert self._plane is not None
            return self._plane.count
        return 0 if state.saved is None else int(state.saved.count)

    # -- the receivers ---------------------------------------------------------------------------
    def start_receivers(self) -> None:
        """Start the receivers now (the engine's warm-up does, before the server listens; else
        the first fold), so that their start and kernel warm-up do not delay a round."""
        if self._plane is None:
            self._plane = ShmAggregator(
                self.spec, shards=self.receivers, accumulator=self.inner.accumulator,
                slots=self.slots, partials=self.partials, timeout=self.timeout,
                backend=self.inner.backend,
            )  # fmt: skip
            log.info("%d receiver processes fold the uploads (pids %s)", self.receivers,
                     ", ".join(str(p) for p in self._plane.worker_info))  # fmt: skip

    def receiver_slot(self) -> Arr | None:
        """A shared-memory slot to read the next update into (the engine's read-back buffer:
        the update is then written once, where the receivers fold it), or None before the
        receivers start. The same slot until an update read into it is folded."""
        if self._plane is None:
            return None
        if self._lease is None:
            self._lease = self._plane.lease()  # waits while every slot is being folded
        return self._lease.array

    def holds(self, state: PlaneState) -> bool:
        """Whether the receivers hold ``state``'s aggregate now."""
        return self._owner is not None and self._owner() is state and self._plane is not None

    def export(self) -> MeanState:
        """The live aggregate as a :class:`MeanState` (a copy, after every pending fold)."""
        if self._plane is None:
            raise StateError("the receivers hold no aggregate")
        return self._plane.state()

    def close_receivers(self) -> None:
        """Stop the receivers (their shared memory is unlinked). Safe to call twice."""
        plane, self._plane, self._owner, self._lease = self._plane, None, None, None
        if plane is not None:
            plane.close()

    def _local(self, state: PlaneState, *, export: bool = False) -> MeanState:
        """``state``'s aggregate as an in-process MeanState (exported if live and asked)."""
        if export and self.holds(state):
            return self.export()
        if state.saved is None:
            state.saved = self.inner.init(state.spec, version=state.version)
        return state.saved

    def _bind(self, state: PlaneState) -> ShmAggregator | None:
        """The receivers, holding ``state``'s aggregate (None: a state of another shape,
        folded in process). Starts them on first use; sets aside the state they held."""
        if not isinstance(state, PlaneState):
            raise StateError(f"expected a PlaneState, not {type(state).__name__}")
        if state.spec != self.spec:
            return None
        if self.holds(state):
            assert self._plane is not None
            return self._plane
        if self._plane is None:
            self.start_receivers()
        else:
            old = self._owner() if self._owner is not None else None
            if old is not None:  # another state is live: set it aside, exported
                if self._plane.count:
                    old.saved = self._plane.state()
                old.live = None
        plane = self._plane
        assert plane is not None
        self._owner = None
        plane.reset(state.version)
        if state.saved is not None:
            if state.saved.count:
                plane.load(state.saved)
            state.saved = None
        self._owner, state.live = weakref.ref(state), self
        return plane


def read_buffer(agg: Any) -> Arr | None:
    """The buffer the engine reads the next spooled update into when ``agg`` (the strategy's
    aggregator, or the bounds or canonical order around it) folds in receivers, else None."""
    hook = _hook(agg, "receiver_slot")
    return None if hook is None else hook()


def start_receivers(agg: Any) -> None:
    """Start ``agg``'s receivers, if it folds in receivers (the engine's warm-up)."""
    hook = _hook(agg, "start_receivers")
    if hook is not None:
        hook()


def stop_receivers(agg: Any) -> None:
    """Stop ``agg``'s receivers, if it folds in receivers (the federation's close)."""
    hook = _hook(agg, "close_receivers")
    if hook is not None:
        hook()


def _hook(agg: Any, name: str) -> Any:
    """The method ``name`` of the PlaneMean in ``agg`` (inside bounds or canonical order; or
    a wrapper forwarding to one), else None."""
    while isinstance(agg, Canonical):
        agg = agg.inner
    hook = getattr(agg, name, None)
    return hook if callable(hook) else None


def _views(delta: Any, slot: Arr) -> bool:
    """Whether ``delta`` is a whole view of ``slot`` (an update read into it)."""
    return (
        isinstance(delta, np.ndarray)
        and delta.size == slot.size
        and delta.__array_interface__["data"][0] == slot.__array_interface__["data"][0]
    )


def plane_strategy(
    strategy: Strategy, receivers: int, spec: ParamSpec, *, partials: bool = False
) -> Strategy:
    """``strategy`` with its mean folded in ``receivers`` processes (0: unchanged): the plain
    mean itself, or the one inside the server's canonical order or bounds (which keep updates
    and fold them through it)."""
    if receivers == 0:
        return strategy
    agg: Any = strategy.aggregator
    if isinstance(agg, Canonical):  # canonical order or bounds (a Canonical too): its mean
        inner = PlaneMean(agg.inner, receivers, spec, partials=partials)  # type: ignore[arg-type]
        return dataclasses.replace(strategy, aggregator=dataclasses.replace(agg, inner=inner))
    agg = PlaneMean(agg, receivers, spec, partials=partials)
    return dataclasses.replace(strategy, aggregator=agg)
