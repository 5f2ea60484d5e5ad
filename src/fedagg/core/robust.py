"""Byzantine-robust aggregators in bounded memory.

A robust rule is not a monoid: it needs every update of the round. Each one keeps the
round's updates in a :class:`RowStore` as they arrive (in memory by default; on disk with
:func:`fedagg.spool.disk`, so 200 updates of 25M parameters fit in a few hundred MiB of RAM)
and reads them back in *coordinate blocks* of bounded size:

* coordinate-wise rules (median, trimmed mean, Bulyan's last stage) sort one block at a time;
* distance-based rules (Krum, Multi-Krum, Bulyan's selection, RFA's geometric median,
  centered clipping, the Flag Aggregator) need only the n x n Gram matrix of the updates,
  built block by block in one pass. Their iterations run on n-vectors of coefficients (every
  iterate is a combination of the updates), and one last pass forms the result.

So memory is O(n**2 + n * block) beyond the store whatever the model size, and the store
streams. Every rule reads the same blocks in the same order whatever the store, and the Gram
matrix is summed over fixed chunks of :data:`GRAM_CHUNK` coordinates whatever the block size,
so a spooled or blocked result equals the in-memory one bit for bit. Rankings (Krum,
Multi-Krum, Bulyan) do not hinge on the last bits of those sums, which BLAS kernels, thread
counts and CPUs round differently: scores within :data:`TIE_RTOL` of the best are ties, won by
the earliest folded update, so the same updates give the same picks on every machine.

Updates are unweighted here (each client one vote), except RFA, which uses ``alpha_i = n_i /
sum n`` as its reference code does. A pre-transform's ``Update.scale`` (clipping) is applied
as the rows are read. ``decomposable`` is False; ``merge`` concatenates the stores (exact, but
O(n * model)). RFA and centered clipping also have a decomposable per-iteration form (a
monoid per iteration), for aggregation trees: :func:`weiszfeld_step`, :func:`clip_step`.

The rules live in one module per family, all re-exported here: the row stores and spool state
(``_spool``), the Gram matrix (``_gram``), the coordinate-wise rules (``_coordinatewise``),
Krum, Multi-Krum and Bulyan (``_krum``), RFA's geometric median and centered clipping
(``_iterative``), the Flag Aggregator (``_flag``) and the per-iteration monoids (``_steps``).
"""

from fedagg.core._coordinatewise import CoordinateMedian, TrimmedMean, median, trimmed_mean
from fedagg.core._flag import FlagAggregator, flag_aggregator
from fedagg.core._gram import GRAM_CHUNK, Gram, gram, gram_sum
from fedagg.core._iterative import (
    CenteredClipping,
    GeometricMedian,
    centered_clipping,
    geometric_median,
)
from fedagg.core._krum import (
    TIE_RTOL,
    Bulyan,
    Krum,
    bulyan,
    krum,
    krum_pick,
    multi_krum,
    pick_best,
)
from fedagg.core._spool import BLOCK_BYTES as BLOCK_BYTES
from fedagg.core._spool import MemoryStore, RowStore, SpoolState, StoreFactory
from fedagg.core._spool import memory_store as memory_store
from fedagg.core._spool import to_memory as to_memory
from fedagg.core._steps import CenterWeight, ClipStep, clip_step, distance_to, weiszfeld_step
from fedagg.errors import TooFewUpdates

__all__ = [
    "GRAM_CHUNK",
    "TIE_RTOL",
    "Bulyan",
    "CenterWeight",
    "CenteredClipping",
    "ClipStep",
    "CoordinateMedian",
    "FlagAggregator",
    "GeometricMedian",
    "Gram",
    "Krum",
    "MemoryStore",
    "RowStore",
    "SpoolState",
    "StoreFactory",
    "TooFewUpdates",
    "TrimmedMean",
    "bulyan",
    "centered_clipping",
    "clip_step",
    "distance_to",
    "flag_aggregator",
    "geometric_median",
    "gram",
    "gram_sum",
    "krum",
    "krum_pick",
    "median",
    "multi_krum",
    "pick_best",
    "trimmed_mean",
    "weiszfeld_step",
]
