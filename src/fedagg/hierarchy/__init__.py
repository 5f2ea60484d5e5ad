"""Hierarchical and sharded aggregation: trees of monoid states across processes and hosts.

Every decomposable aggregator is a commutative monoid, so partial aggregates merge in any order
and along any tree. This package runs that tree (the math is in :mod:`fedagg.core.tree`):

* **Across hosts, deployed**: an edge or intermediate aggregator is ``fedagg server`` with a
  ``deploy.parent`` (see :mod:`fedagg.deploy._edge`): partial states go up, models come down.
* **On one host (LIFL)**: :class:`ShmAggregator` (from :mod:`fedagg.plane`) hands each update
  to S shard workers through shared memory, written once and folded in place; the deployed
  server folds in it with ``[deploy] receivers = P``. (The socket hand-off it replaces, the
  sharded TCP flows and the tree of Ray actors are baselines in ``benchmarks/``.)

The tree-level math (exported here too): :func:`reduce_tree`, :class:`Sharded`,
:func:`tree_error_bound`, and the hierarchical variants of the non-decomposable rules
(:func:`leaf_then_mean`, :func:`tree_rfa`, :func:`tree_centered_clipping`, :func:`sketch_krum`).
"""

from fedagg.core.tree import (
    LeafThenMean,
    Sharded,
    SketchKrum,
    leaf_then_mean,
    reduce_tree,
    shard_bounds,
    sharded,
    sketch_krum,
    tree_centered_clipping,
    tree_error_bound,
    tree_rfa,
)
from fedagg.plane import AggregatorFailed, Lease, ShmAggregator

__all__ = [
    "AggregatorFailed",
    "LeafThenMean",
    "Lease",
    "Sharded",
    "ShmAggregator",
    "SketchKrum",
    "leaf_then_mean",
    "reduce_tree",
    "shard_bounds",
    "sharded",
    "sketch_krum",
    "tree_centered_clipping",
    "tree_error_bound",
    "tree_rfa",
]
