"""Update: one client's contribution to a round."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from fedagg.core.spec import Delta

__all__ = ["Update"]


@dataclass(frozen=True, slots=True)
class Update:
    """A client's model delta, ``delta = client result - global model``, and its metadata.

    Args:
        delta: arrays matching the spec (list or dict), or one flat buffer.
        weight: the client's aggregation weight, typically its sample count; must be > 0.
        client_id: who sent it; named in every error about it.
        base_version: the global model version the client trained from. ``None`` skips the
            version check.
        metrics: optional scalar metrics reported by the client (loss, accuracy, ...).
        scale: a factor applied to the delta (not to the weight) when it is folded. Pre-
            transforms such as norm clipping set it so that they never copy the delta.
    """

    delta: Delta
    weight: float = 1.0
    client_id: str = ""
    base_version: int | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    scale: float = 1.0

    def is_weight_valid(self) -> bool:
        return _finite_real(self.weight) and float(self.weight) > 0

    def is_scale_valid(self) -> bool:
        return _finite_real(self.scale)


def _finite_real(x: object) -> bool:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)):
        return False
    try:
        return math.isfinite(float(x))
    except OverflowError:  # a Python int beyond float range
        return False
