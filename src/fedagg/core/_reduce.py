"""Merging partial states along a tree (:func:`reduce_tree`), and the small helper the tree
rules share. See :mod:`fedagg.core.tree`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

import numpy.typing as npt

from fedagg.core.spec import ParamSpec
from fedagg.core.update import Update
from fedagg.errors import ConfigError

__all__ = ["Mergeable", "reduce_tree", "update_segments"]

Arr = npt.NDArray[Any]
S = TypeVar("S")


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


def update_segments(spec: ParamSpec, update: Update) -> list[Arr]:
    """``update``'s delta as the flat segments of ``spec``'s layout (``spec.segments``)."""
    return spec.segments(update.delta)
