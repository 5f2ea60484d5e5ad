"""Trees and shards of monoid states: the pure math behind hierarchical aggregation.

Nothing here does I/O. See :mod:`fedagg.hierarchy` and :mod:`fedagg.plane` for the processes
and shared memory that run it. What is here:

* :class:`Sharded` splits every update into ``S`` coordinate slices (zero-copy views) and
  keeps one weighted-mean state per slice, so ``S`` workers can each own one slice; the
  result equals the unsharded mean bit for bit.
* :func:`reduce_tree` merges partial states along a balanced tree of a given fan-out, and
  :func:`tree_error_bound` states how far a tree's result may be from the flat fold's.
* Hierarchical forms of the rules that are not monoids: :class:`LeafThenMean` (a robust rule
  at each leaf, a mean above: a *different* rule, documented as such), the exact multi-pass
  drivers :func:`tree_rfa` and :func:`tree_centered_clipping` (one monoid per iteration), and
  :class:`SketchKrum` (Krum on Johnson-Lindenstrauss sketches, then a masked mean: an
  approximation with a stated error).

Each concept has its own module, all re-exported here: :func:`reduce_tree` (``_reduce``),
the error bounds (``_error_bounds``), :class:`Sharded` (``_sharded``), :class:`LeafThenMean`
(``_leaf``), :func:`tree_rfa` and :func:`tree_centered_clipping` (``_tree_steps``) and
:class:`SketchKrum` (``_sketch``).
"""

from fedagg.core._error_bounds import compensated_margin, tree_error_bound
from fedagg.core._leaf import LeafThenMean, leaf_then_mean
from fedagg.core._reduce import Mergeable as Mergeable
from fedagg.core._reduce import reduce_tree
from fedagg.core._sharded import Sharded, ShardedState, shard_bounds, sharded
from fedagg.core._sketch import MaskedMean, SketchKrum, SketchState, jl_dim, sketch_krum
from fedagg.core._tree_steps import tree_centered_clipping, tree_rfa

__all__ = [
    "LeafThenMean",
    "MaskedMean",
    "Sharded",
    "ShardedState",
    "SketchKrum",
    "SketchState",
    "compensated_margin",
    "jl_dim",
    "leaf_then_mean",
    "reduce_tree",
    "shard_bounds",
    "sharded",
    "sketch_krum",
    "tree_centered_clipping",
    "tree_error_bound",
    "tree_rfa",
]
