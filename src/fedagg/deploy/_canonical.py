"""Canonical fold order: a round's updates are kept (as read-only views of their spool files)
and folded at its close in a fixed order, so a deployment's result does not depend on the
order in which uploads arrived; overflow is excluded before anything is folded."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg._checkpoint import register
from fedagg.core import kernels
from fedagg.core.aggregate import F64_SAFE, Aggregator, check_update
from fedagg.core.spec import ArrayTree, ParamSpec
from fedagg.core.strategy import Strategy
from fedagg.core.update import Update
from fedagg.deploy._partial import accumulator_of
from fedagg.errors import FedaggError, NonFiniteUpdate, StateError, UpdateError

__all__ = ["Canonical", "CanonicalState", "canonical_strategy", "spool_key"]

Arr = npt.NDArray[Any]
log = logging.getLogger("fedagg.server")


@register
@dataclass(eq=False)
class CanonicalState:
    inner: Any
    spec: ParamSpec
    version: int | None
    pending: list[Update] = field(default_factory=list)
    #: ``sum |weight * scale| * max|delta|`` over ``pending``: what folding them can add
    bound: float = 0.0
    #: ``(client_id, reason)`` of the updates the round's fold refused, in key order
    refused: list[tuple[str, str]] = field(default_factory=list)

    def checkpoint_view(self) -> CanonicalState:
        if self.pending:
            raise StateError("a canonical-order aggregate is saved only between rounds")
        return self

    @property
    def center(self) -> Any:
        return getattr(self.inner, "center", None)

    @center.setter
    def center(self, value: Any) -> None:
        self.inner.center = value


@dataclass(frozen=True)
class Canonical:
    """Folds a round's updates in a canonical order (``key``), whatever order they arrived in.

    Float addition is not associative, so a mean folded in arrival order depends, in its last
    bits, on network timing. This wrapper validates each update on arrival (metadata; values
    were checked as they streamed in) and keeps it, as a view of its spool file (no copy, no
    memory), until ``finalize`` folds them all in key order: the result depends only on *which*
    updates were accepted. The price is that folding waits for the round to close.

    The fold at the round's close must not fail, or the round could never close (and a
    restart, replaying the same updates, would fail again). So, for a mean-monoid aggregator,
    an arriving update is refused (:class:`NonFiniteUpdate`, through the policy's ordinary
    refusal path) when ``|weight * scale| * max|delta|``, added to the same bound of the
    updates already kept, could overflow the accumulator: the kept updates' sum then cannot.
    Should the fold at the close still refuse an update (a rule's own check), the others are
    folded one by one in key order and the refused ones skipped and recorded in
    :attr:`CanonicalState.refused` (and returned by :meth:`settle`, which the policies call as
    a round closes, so they count as refused, not folded): the same updates give the same
    outcome on every replay.
    """

    inner: Aggregator[Any]
    key: Callable[[Update], Any]
    #: the bound kept updates must stay under (None: no mean accumulator, no bound)
    limit: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        object.__setattr__(self, "limit", _overflow_limit(self.inner))

    @property
    def decomposable(self) -> bool:
        return bool(self.inner.decomposable)

    def init(self, spec: ParamSpec, *, version: int | None = None) -> CanonicalState:
        return CanonicalState(self.inner.init(spec, version=version), spec, version)

    def _admit(
        self, state: CanonicalState, bound: float, update: Update, peak: float | None = None
    ) -> float:
        """Check ``update`` and return the pending bound with it (raises UpdateError).
        ``peak``: a bound on ``max|delta|`` already computed (else one pass computes it)."""
        check_update(state.spec, state.version, update)
        limit = self.limit
        if limit is None:
            return bound
        if state.spec.dtype.itemsize > 4:
            limit = F64_SAFE  # a float64 model always gets a float64 accumulator
        if peak is None:
            segs = state.spec.segments(update.delta)
            peak = max(
                (kernels.max_abs(s, use_numba=kernels.HAVE_NUMBA) for s in segs), default=0.0
            )
        if not math.isfinite(peak):
            raise NonFiniteUpdate(update.client_id, "delta holds NaN or Inf values")
        w = abs(float(update.weight) * float(update.scale))
        size = w * peak
        problem = None
        if not max(w, abs(float(update.weight))) <= limit:  # weights are cast to its dtype
            problem = f"weight {update.weight:.3g} overflows the round's accumulator"
        elif not bound + size <= limit:  # Python floats: inf, no warning
            problem = (
                f"weighted delta too large: |weight| * max|delta| = {size:.3g} would overflow "
                f"the round's accumulator (room left {max(0.0, limit - bound):.3g})"
            )
        if problem is not None:
            e = NonFiniteUpdate(update.client_id, problem)
            log.warning("%s", e)
            raise e
        return bound + size

    def fold(self, state: CanonicalState, update: Update) -> CanonicalState:
        state.bound = self._admit(state, state.bound, update)
        state.pending.append(update)
        return state

    def fold_many(self, state: CanonicalState, updates: Iterable[Update]) -> CanonicalState:
        ups = list(updates)
        bound = state.bound
        for u in ups:
            bound = self._admit(state, bound, u)
        state.pending += ups
        state.bound = bound
        return state

    def merge(self, state: CanonicalState, other: CanonicalState) -> CanonicalState:
        self.inner.merge(state.inner, other.inner)
        state.pending += other.pending
        state.bound += other.bound
        return state

    def holds(self, state: Any) -> bool:
        """Whether an update arriving in ``state`` (the policy's current aggregate) is kept
        until the round closes, so is read as a view of its spool file: always, here."""
        return True

    def settle(self, state: CanonicalState) -> list[Update]:
        """Fold the kept updates now (the round is closing); returns those the fold refused
        (also recorded in :attr:`CanonicalState.refused`), for the round's stats."""
        return self._flush(state)

    def _flush(self, state: CanonicalState) -> list[Update]:
        refused: list[Update] = []
        if state.pending:
            ordered = sorted(state.pending, key=self.key)
            state.pending, state.bound = [], 0.0
            try:
                state.inner = self.inner.fold_many(state.inner, ordered)
            except UpdateError:
                # a refused batch leaves the state unchanged: fold one by one, skip the bad
                for u in ordered:
                    try:
                        state.inner = self.inner.fold(state.inner, u)
                    except UpdateError as e:
                        state.refused.append((e.client_id, e.reason))
                        refused.append(u)
                        log.warning("at the round's fold: %s", e)
        return refused

    def finalize_flat(self, state: CanonicalState) -> Arr:
        self._flush(state)
        return self.inner.finalize_flat(state.inner)

    def finalize(self, state: CanonicalState) -> ArrayTree:
        self._flush(state)
        return self.inner.finalize(state.inner)

    def count(self, state: CanonicalState) -> int:
        return int(self.inner.count(state.inner)) + len(state.pending)


def _overflow_limit(agg: Aggregator[Any]) -> float | None:
    """What the pending updates' bound must stay under for ``agg``'s mean accumulator: half
    the float32 range (room for the sums' rounding), or the float64 accumulator's own
    per-update bound; None if ``agg`` has no mean accumulator."""
    try:
        acc = accumulator_of(agg)
    except FedaggError:  # a rule that cannot even start on a one-coordinate model
        return None
    if acc is None:
        return None
    return float(np.finfo(np.float32).max) / 2 if acc == "float32" else F64_SAFE


def spool_key(update: Update) -> str:
    """The canonical order's key of an update: its spool file's name."""
    return str(getattr(update.delta, "filename", ""))


def canonical_strategy(strategy: Strategy) -> Strategy:
    agg = Canonical(strategy.aggregator, spool_key)
    return dataclasses.replace(strategy, aggregator=agg)


# -- the engine ----------------------------------------------------------------------------------
