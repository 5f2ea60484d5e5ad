"""Hierarchical and sharded aggregation: trees of monoid states across processes and hosts.

Every decomposable aggregator is a commutative monoid, so partial aggregates merge in any order
and along any tree. This package runs that tree (the math is in :mod:`fedagg.core.tree`):

* **Across hosts, deployed**: an edge or intermediate aggregator is ``fedagg server`` with a
  ``deploy.parent`` (see :mod:`fedagg.deploy._edge`): partial states go up, models come down.
* **On one host (LIFL)**: :class:`ShmAggregator` hands each update to S shard workers through
  shared memory, written once and folded in place; :class:`SocketAggregator` is the socket
  hand-off it replaces; :class:`ShardReceiver` / :func:`send_sharded` split an update into S
  coordinate shards sent on S connections (application-layer flow splitting).
* **On a Ray cluster**: :class:`RayTree` runs the tree's nodes as Ray actors, children placed
  with their parent; :func:`train_round` has Ray actor workers train clients and fold straight
  into their leaf (needs the ``ray`` extra).

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
from fedagg.hierarchy._ray import (
    NodeLost,
    RayTree,
    RoundResult,
    placement_options,
    train_round,
    tree_aggregate,
    tree_shape,
)
from fedagg.hierarchy._shm import AggregatorFailed, Lease, ShmAggregator
from fedagg.hierarchy._sockets import ShardReceiver, ShardSender, SocketAggregator, send_sharded

__all__ = [
    "AggregatorFailed",
    "LeafThenMean",
    "Lease",
    "NodeLost",
    "RayTree",
    "RoundResult",
    "ShardReceiver",
    "ShardSender",
    "Sharded",
    "ShmAggregator",
    "SketchKrum",
    "SocketAggregator",
    "leaf_then_mean",
    "placement_options",
    "reduce_tree",
    "send_sharded",
    "shard_bounds",
    "sharded",
    "sketch_krum",
    "train_round",
    "tree_aggregate",
    "tree_centered_clipping",
    "tree_error_bound",
    "tree_rfa",
    "tree_shape",
]
