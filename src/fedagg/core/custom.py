"""A public base for your own aggregator: write the monoid on plain data, get the rest.

Subclass :class:`CustomAggregator` and write four methods over a state that is plain data
(numpy arrays, numbers, strings, and lists or str-keyed dicts of them)::

    class ClippedMean(CustomAggregator):
        def __init__(self, max_norm: float = 1.0):
            self.max_norm = max_norm

        def init_state(self, size, dtype):             # the identity element
            return {"sum": np.zeros(size), "weight": 0.0}

        def fold_state(self, state, delta, weight):    # add one update
            scale = min(1.0, self.max_norm / max(float(np.linalg.norm(delta)), 1e-12))
            state["sum"] += (weight * scale) * delta
            state["weight"] += weight
            return state

        def merge_state(self, state, other):           # combine two partial states
            state["sum"] += other["sum"]
            state["weight"] += other["weight"]
            return state

        def finalize_state(self, state):               # the aggregated delta (flat)
            return state["sum"] / state["weight"]

The base does the rest: checks every update against the model (weight, version, names,
shapes, dtype; NaN or Inf values are refused with a reason), keeps the count, checks and
casts the result, and wraps the state in :class:`CustomState`, which checkpoints (and resumes)
with the rest of a deployment's state. ``delta`` is the update's flat buffer in the model's
dtype (read-only: do not modify it); ``weight`` is its aggregation weight (times any
pre-transform's scale). See docs/custom-aggregators.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.core.aggregate import check_update
from fedagg.core.spec import ArrayTree, ParamSpec
from fedagg.core.update import Update
from fedagg.errors import ConfigError, EmptyAggregate, NonFiniteUpdate, StateError

__all__ = ["CustomAggregator", "CustomState"]

Arr = npt.NDArray[Any]


@dataclass(eq=False)
class CustomState:
    """A :class:`CustomAggregator`'s state: the model's spec, the version it aggregates, how
    many updates and how much weight it holds, and your ``data`` (what ``init_state`` made)."""

    spec: ParamSpec
    version: int | None
    count: int
    weight: float
    data: Any

    def check(self) -> None:
        """Raise StateError unless the fields are consistent (called when a state is loaded)."""
        if not (isinstance(self.count, int) and self.count >= 0):
            raise StateError(f"inconsistent CustomState: count {self.count!r}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise StateError(f"inconsistent CustomState: weight {self.weight!r}")


class CustomAggregator:
    """The base of your own aggregator (see the module docstring for an example).

    Write ``init_state(size, dtype)``, ``fold_state(state, delta, weight)``,
    ``merge_state(state, other)`` and ``finalize_state(state)``; each may update the state in
    place and must return it. Set ``decomposable = False`` if ``merge_state`` is not exact (an
    edge aggregator then does not merge partial states of it).

    The base implements the :class:`~fedagg.core.aggregate.Aggregator` protocol (``init``,
    ``fold``, ``fold_many``, ``merge``, ``finalize``, ``finalize_flat``, ``count``), so the
    simulator, every policy and the deployment use it like a built-in rule.
    """

    #: whether ``merge_state`` is exact, so partial states combine along any tree
    decomposable: bool = True

    @property
    def name(self) -> str:
        return type(self).__name__

    # -- yours ----------------------------------------------------------------------------------
    def init_state(self, size: int, dtype: np.dtype[Any]) -> Any:
        """The empty state for a model of ``size`` parameters of ``dtype``."""
        raise NotImplementedError(f"{self.name} must define init_state(size, dtype)")

    def fold_state(self, state: Any, delta: Arr, weight: float) -> Any:
        """``state`` with one update added: its flat ``delta`` (read-only) and ``weight``."""
        raise NotImplementedError(f"{self.name} must define fold_state(state, delta, weight)")

    def merge_state(self, state: Any, other: Any) -> Any:
        """``state`` combined with ``other`` (another partial state; do not modify it)."""
        raise NotImplementedError(f"{self.name} must define merge_state(state, other)")

    def finalize_state(self, state: Any) -> Arr:
        """The aggregated delta as one flat array of the model's size."""
        raise NotImplementedError(f"{self.name} must define finalize_state(state)")

    # -- the protocol, from the above -----------------------------------------------------------
    def init(self, spec: ParamSpec, *, version: int | None = None) -> CustomState:
        return CustomState(spec, version, 0, 0.0, self.init_state(spec.size, spec.dtype))

    def _checked(self, state: CustomState, update: Update) -> tuple[Arr, float]:
        check_update(state.spec, state.version, update)
        flat = state.spec.as_flat(update.delta)
        if not np.isfinite(flat).all():
            raise NonFiniteUpdate(update.client_id, "delta holds NaN or Inf values")
        view = flat.view()
        view.flags.writeable = False
        return view, float(update.weight) * float(update.scale)

    def fold(self, state: CustomState, update: Update) -> CustomState:
        return self.fold_many(state, (update,))

    def fold_many(self, state: CustomState, updates: Iterable[Update]) -> CustomState:
        """Validate every update first (all or none are folded), then fold them in order."""
        checked = [(u, *self._checked(state, u)) for u in updates]
        for u, x, w in checked:
            state.data = self.fold_state(state.data, x, w)
            state.count += 1
            state.weight += float(u.weight)
        return state

    def merge(self, state: CustomState, other: CustomState) -> CustomState:
        if other.spec != state.spec:
            raise StateError("cannot merge states of different specs")
        if other.version != state.version:
            raise StateError(f"cannot merge version {other.version} into {state.version}")
        if other.count == 0:
            return state
        state.data = self.merge_state(state.data, other.data)
        state.count += other.count
        state.weight += other.weight
        return state

    def finalize_flat(self, state: CustomState) -> Arr:
        if state.count == 0:
            raise EmptyAggregate("no update was folded: nothing to finalize")
        out = np.asarray(self.finalize_state(state.data))
        if out.shape != (state.spec.size,):
            raise ConfigError(
                f"{self.name}.finalize_state returned shape {out.shape}; expected a flat "
                f"array of the model's {state.spec.size} parameters"
            )
        if not np.isfinite(out).all():
            raise StateError(f"{self.name}.finalize_state returned NaN or Inf values")
        return np.array(out, dtype=state.spec.dtype)  # a copy the caller may scale in place

    def finalize(self, state: CustomState) -> ArrayTree:
        return state.spec.unflatten(self.finalize_flat(state))

    def count(self, state: CustomState) -> int:
        return state.count
