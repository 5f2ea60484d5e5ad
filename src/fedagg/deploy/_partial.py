"""Partial aggregates on the wire: a subtree's mean-monoid state, sent by an edge aggregator.

The payload is the state's sums, as they are in memory: ``sum(w * delta)`` in the
accumulator's dtype and, with the float64 accumulator, Neumaier's compensation after it (both
float64). The scalars (weight sum and its compensation, the accumulator, the model version)
travel in the upload header and are logged with the event. The root rebuilds the state and
``merge``s it: with the float64 accumulator a tree of edges gives the flat fold's model bit
for bit; with float32, within the bound of :func:`fedagg.core.tree.tree_error_bound`.

Which aggregators can be split this way: those whose state is a :class:`MeanState` (the
weighted mean, with any per-update pre-transform such as clipping, and the per-iteration
monoids of RFA and centered clipping). The robust rules that are not monoids are refused
here; see :mod:`fedagg.core.tree` for their hierarchical variants.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from fedagg.core.aggregate import Aggregator, MeanState, accumulator_dtype
from fedagg.core.spec import ParamSpec
from fedagg.errors import ConfigError, StateError

__all__ = [
    "accumulator_of",
    "load_partial",
    "mean_state",
    "partial_buffers",
    "partial_dtype",
    "partial_info",
    "partial_nbytes",
    "read_into",
]


def mean_state(state: Any) -> MeanState:
    """The :class:`MeanState` inside an aggregator's state (itself, or a wrapper's ``inner``)."""
    seen = state
    for _ in range(4):
        if isinstance(seen, MeanState):
            return seen
        seen = getattr(seen, "inner", None)
    raise ConfigError(
        "hierarchical aggregation merges mean-monoid states (mean, clip + mean, the RFA and "
        f"centered-clipping steps); {type(state).__name__} is not one: use a robust rule at "
        "the leaves and a mean above (fedagg.core.tree.leaf_then_mean)"
    )


def accumulator_of(agg: Aggregator[Any]) -> str | None:
    """The accumulator of ``agg``'s mean state, or None if it has none (cannot merge)."""
    try:
        ms = mean_state(agg.init(ParamSpec.from_arrays([np.zeros(1, np.float32)])))
    except (ConfigError, TypeError, ValueError):
        return None
    return ms.accumulator


def partial_dtype(spec: ParamSpec, accumulator: str) -> np.dtype[Any]:
    """The payload's element type (the mean state's accumulator dtype)."""
    return accumulator_dtype(spec, accumulator)


def partial_nbytes(spec: ParamSpec, accumulator: str) -> int:
    n = spec.size * partial_dtype(spec, accumulator).itemsize
    return 2 * n if accumulator == "float64" else n


def partial_info(state: Any) -> dict[str, Any]:
    ms = mean_state(state)
    return {
        "weight": ms.weight, "weight_comp": ms.weight_comp, "accumulator": ms.accumulator,
        "count": ms.count, "version": ms.version,
    }  # fmt: skip


def partial_buffers(state: Any) -> list[memoryview]:
    """The payload as byte views of the state's arrays (no copy), in wire order."""
    ms = mean_state(state)
    out = [ms.acc.data.cast("B")]
    if ms.comp is not None:
        out.append(ms.comp.data.cast("B"))
    return out


def read_into(path: str | os.PathLike[str], views: list[memoryview], what: str) -> None:
    """Fill ``views`` in turn from the file's bytes (no intermediate copy)."""
    with open(path, "rb", buffering=0) as f:
        for view in views:
            got = 0
            while got < len(view):
                k = f.readinto(view[got:])
                if not k:
                    raise StateError(f"{what} {path} is truncated")
                got += k


def load_partial(
    agg: Aggregator[Any], spec: ParamSpec, version: int | None, path: str | os.PathLike[str],
    info: dict[str, Any], count: int,
) -> Any:  # fmt: skip
    """A fresh state of ``agg`` holding the partial aggregate spooled at ``path``."""
    state = agg.init(spec, version=version)
    ms = mean_state(state)
    if info.get("accumulator") != ms.accumulator:
        raise StateError(
            f"a partial aggregate with a {info.get('accumulator')} accumulator cannot merge "
            f"into a {ms.accumulator} one: configure every tier alike"
        )
    weight, comp = float(info.get("weight", math.nan)), float(info.get("weight_comp", 0.0))
    if not (math.isfinite(weight) and weight > 0 and math.isfinite(comp)) or count < 1:
        raise StateError("a partial aggregate needs a finite weight > 0 and updates")
    arrays = [ms.acc] + ([ms.comp] if ms.comp is not None else [])
    read_into(path, [a.data.cast("B") for a in arrays], "the partial aggregate")
    ms.weight, ms.weight_comp, ms.count = weight, comp, int(count)
    return state
