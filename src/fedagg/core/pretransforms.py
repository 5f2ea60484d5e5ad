"""Per-update pre-transforms, applied before the aggregator (see ``aggregate.compose``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedagg.core import kernels
from fedagg.core.aggregate import scaled
from fedagg.core.spec import ParamSpec
from fedagg.core.update import Update
from fedagg.errors import ConfigError, NonFiniteUpdate

__all__ = ["ClipNorm", "RejectNonFinite", "clip_norm", "reject_nonfinite", "update_norm"]


def update_norm(spec: ParamSpec, update: Update) -> float:
    """The L2 norm of an update's delta (before its ``scale``), accumulated in float64."""
    use_numba = kernels.HAVE_NUMBA
    segs = spec.segments(update.delta)
    return math.sqrt(math.fsum(kernels.sum_squares(s, use_numba=use_numba) for s in segs))


@dataclass(frozen=True, slots=True)
class ClipNorm:
    """Scale each delta so that its L2 norm is at most ``max_norm`` (weights unchanged).

    The norm pass also refuses non-finite deltas. The delta is never copied: the factor goes
    into ``Update.scale``.
    """

    max_norm: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_norm) and self.max_norm > 0):
            raise ConfigError(f"max_norm must be finite and > 0, got {self.max_norm!r}")

    def __call__(self, spec: ParamSpec, update: Update) -> Update:
        norm = update_norm(spec, update) * abs(update.scale)
        if not math.isfinite(norm):
            raise NonFiniteUpdate(update.client_id, "delta holds NaN or Inf values")
        if norm <= self.max_norm:
            return update
        return scaled(update, self.max_norm / norm)


@dataclass(frozen=True, slots=True)
class RejectNonFinite:
    """Refuse any delta holding NaN or Inf, in a separate read pass.

    The mean already refuses them as it folds; use this in front of aggregators that do not.
    """

    def __call__(self, spec: ParamSpec, update: Update) -> Update:
        use_numba = kernels.HAVE_NUMBA
        if not all(kernels.all_finite(s, use_numba=use_numba) for s in spec.segments(update.delta)):
            raise NonFiniteUpdate(update.client_id, "delta holds NaN or Inf values")
        return update


def clip_norm(max_norm: float) -> ClipNorm:
    """Per-update L2 norm clipping to ``max_norm``."""
    return ClipNorm(float(max_norm))


def reject_nonfinite() -> RejectNonFinite:
    """Refuse updates holding NaN or Inf."""
    return RejectNonFinite()
