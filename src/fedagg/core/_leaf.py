"""Robust at the leaves, then a mean above (:class:`LeafThenMean`): a hierarchical rule of its
own, not the leaf rule. See :mod:`fedagg.core.tree`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy.typing as npt

from fedagg.core._reduce import reduce_tree
from fedagg.core.aggregate import Aggregator, Mean, MeanState
from fedagg.core.spec import ArrayTree, ParamSpec
from fedagg.core.update import Update
from fedagg.errors import ConfigError, EmptyAggregate

__all__ = ["LeafThenMean", "leaf_then_mean"]

Arr = npt.NDArray[Any]


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
