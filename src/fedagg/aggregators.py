"""Aggregators: the weighted mean (a commutative monoid), the Byzantine-robust rules, and
their composition with pre-transforms.

>>> import numpy as np, fedagg
>>> spec = fedagg.ParamSpec.from_arrays([np.zeros(3, np.float32)])
>>> agg = fedagg.aggregators.mean()
>>> s = agg.init(spec)
>>> s = agg.fold(s, fedagg.Update(delta=[np.ones(3, np.float32)], weight=2.0))
>>> s = agg.fold(s, fedagg.Update(delta=[np.zeros(3, np.float32)], weight=2.0))
>>> agg.finalize(s)[0].tolist()
[0.5, 0.5, 0.5]

Robust rules (``median``, ``trimmed_mean``, ``krum``, ``multi_krum``, ``bulyan``,
``geometric_median``, ``centered_clipping``, ``flag_aggregator``) keep the round's updates in a
spool (memory, or disk with ``spool=fedagg.spool.disk(dir)``) and read it in coordinate
blocks; ``weiszfeld_step`` and ``clip_step`` are the per-iteration monoids of RFA and
centered clipping.

Your own rule: subclass :class:`CustomAggregator` and write its monoid on plain data
(``init_state``, ``fold_state``, ``merge_state``, ``finalize_state``); it checkpoints like the
built-in ones (see docs/custom-aggregators.md).

Hierarchical aggregation (``fedagg.core.tree``): ``sharded`` (the mean over coordinate shards,
bit-identical to the unsharded one), ``reduce_tree`` (merge partial states along a balanced
tree) and ``tree_error_bound``; for the rules that are not monoids, ``leaf_then_mean`` (a
robust rule per leaf, then a mean: a different rule), ``tree_rfa`` and
``tree_centered_clipping`` (exact, one monoid pass per iteration) and ``sketch_krum``
(Krum on Johnson-Lindenstrauss sketches, then a masked mean: approximate).
"""

from fedagg._checkpoint import register as _register
from fedagg.core.aggregate import Aggregator, Composed, Mean, MeanState, compose, mean
from fedagg.core.custom import CustomAggregator, CustomState
from fedagg.core.robust import (
    Bulyan,
    CenteredClipping,
    ClipStep,
    CoordinateMedian,
    FlagAggregator,
    GeometricMedian,
    Krum,
    MemoryStore,
    RowStore,
    SpoolState,
    StoreFactory,
    TrimmedMean,
    bulyan,
    centered_clipping,
    clip_step,
    flag_aggregator,
    geometric_median,
    krum,
    median,
    multi_krum,
    trimmed_mean,
    weiszfeld_step,
)
from fedagg.core.tree import (
    LeafThenMean,
    MaskedMean,
    Sharded,
    ShardedState,
    SketchKrum,
    SketchState,
    compensated_margin,
    jl_dim,
    leaf_then_mean,
    reduce_tree,
    sharded,
    sketch_krum,
    tree_centered_clipping,
    tree_error_bound,
    tree_rfa,
)

_register(ShardedState)
_register(CustomState)
_register(SketchState)

__all__ = [
    "Aggregator",
    "Bulyan",
    "CenteredClipping",
    "ClipStep",
    "Composed",
    "CoordinateMedian",
    "CustomAggregator",
    "CustomState",
    "FlagAggregator",
    "GeometricMedian",
    "Krum",
    "LeafThenMean",
    "MaskedMean",
    "Mean",
    "MeanState",
    "MemoryStore",
    "RowStore",
    "Sharded",
    "ShardedState",
    "SketchKrum",
    "SketchState",
    "SpoolState",
    "StoreFactory",
    "TrimmedMean",
    "bulyan",
    "centered_clipping",
    "clip_step",
    "compensated_margin",
    "compose",
    "flag_aggregator",
    "geometric_median",
    "jl_dim",
    "krum",
    "leaf_then_mean",
    "mean",
    "median",
    "multi_krum",
    "reduce_tree",
    "sharded",
    "sketch_krum",
    "tree_centered_clipping",
    "tree_error_bound",
    "tree_rfa",
    "trimmed_mean",
    "weiszfeld_step",
]
