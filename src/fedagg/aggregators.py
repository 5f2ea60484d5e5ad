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
"""

from fedagg.core.aggregate import Aggregator, Composed, Mean, MeanState, compose, mean
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

__all__ = [
    "Aggregator",
    "Bulyan",
    "CenteredClipping",
    "ClipStep",
    "Composed",
    "CoordinateMedian",
    "FlagAggregator",
    "GeometricMedian",
    "Krum",
    "Mean",
    "MeanState",
    "MemoryStore",
    "RowStore",
    "SpoolState",
    "StoreFactory",
    "TrimmedMean",
    "bulyan",
    "centered_clipping",
    "clip_step",
    "compose",
    "flag_aggregator",
    "geometric_median",
    "krum",
    "mean",
    "median",
    "multi_krum",
    "trimmed_mean",
    "weiszfeld_step",
]
