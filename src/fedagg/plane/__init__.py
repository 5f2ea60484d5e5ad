"""One host's aggregation data plane over shared memory (LIFL's design), below both the
deployment and the hierarchy.

:class:`ShmAggregator` hands each update to W worker processes through a ring of model-sized
shared-memory slots: written once, validated in the caller (Mean's rules: a refused update
changes no state), folded in place by the workers, each owning coordinate shards of the
accumulator. The weighted mean is element-wise, so the result is bit for bit that of one
in-process :func:`fedagg.aggregators.mean` fold. A worker that dies raises
:class:`AggregatorFailed` (no hang).

Used by the deployed server (``[deploy] receivers``: :mod:`fedagg.deploy._receivers`) and
re-exported by :mod:`fedagg.hierarchy`.
"""

from fedagg.plane._kernels import copy_peak, fold_validated, peak, set_threads
from fedagg.plane._service import SHM_PREFIX
from fedagg.plane._shards import AggregatorFailed
from fedagg.plane._shm import Lease, ShmAggregator

__all__ = [
    "SHM_PREFIX",
    "AggregatorFailed",
    "Lease",
    "ShmAggregator",
    "copy_peak",
    "fold_validated",
    "peak",
    "set_threads",
]
