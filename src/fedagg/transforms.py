"""Per-update pre-transforms, composed in front of an aggregator.

>>> import fedagg
>>> agg = fedagg.aggregators.compose(fedagg.transforms.clip_norm(10.0), fedagg.aggregators.mean())
"""

from fedagg.core.aggregate import PreTransform
from fedagg.core.pretransforms import (
    ClipNorm,
    RejectNonFinite,
    clip_norm,
    reject_nonfinite,
    update_norm,
)

__all__ = [
    "ClipNorm",
    "PreTransform",
    "RejectNonFinite",
    "clip_norm",
    "reject_nonfinite",
    "update_norm",
]
