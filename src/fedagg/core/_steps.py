"""The decomposable per-iteration forms of RFA and centered clipping (one monoid per
iteration, for aggregation trees): :func:`weiszfeld_step`, :func:`clip_step`, and the
distance weighting they share. See :mod:`fedagg.core.robust`."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fedagg.core.aggregate import Composed, MeanState, compose, mean
from fedagg.core.spec import ArrayTree, ParamSpec
from fedagg.core.update import Update
from fedagg.errors import ConfigError, NonFiniteUpdate

__all__ = ["CenterWeight", "ClipStep", "clip_step", "distance_to", "weiszfeld_step"]

Arr = npt.NDArray[Any]


def distance_to(spec: ParamSpec, update: Update, center: Arr) -> float:
    """``||scale * delta - center||`` in float64, a chunk at a time (no model-sized copy)."""
    total = 0.0
    at = 0
    step = 1 << 16
    for seg in spec.segments(update.delta):
        for lo in range(0, seg.size, step):
            hi = min(seg.size, lo + step)
            x = seg[lo:hi].astype(np.float64) * float(update.scale)
            x -= center[at + lo : at + hi]
            total += float(x @ x)
        at += seg.size
    return math.sqrt(total)


@dataclass(frozen=True, slots=True)
class CenterWeight:
    """A pre-transform weighting each update by its distance to ``center``: RFA's
    ``alpha_i / max(nu, ||x_i - z||)`` (``kind="weiszfeld"``) or centered clipping's
    ``min(1, tau / ||x_i - v||)`` (``kind="clip"``, replacing the weight)."""

    center: Arr
    kind: Literal["weiszfeld", "clip"]
    radius: float

    def __call__(self, spec: ParamSpec, update: Update) -> Update:
        dist = distance_to(spec, update, self.center)
        if not math.isfinite(dist):
            raise NonFiniteUpdate(update.client_id, "delta holds NaN or Inf values")
        if self.kind == "weiszfeld":
            w = float(update.weight) / max(self.radius, dist)
        else:
            w = min(1.0, self.radius / dist) if dist > 0 else 1.0
        return replace(update, weight=w)


@dataclass(frozen=True, slots=True)
class ClipStep:
    """One centered-clipping iteration as a monoid: fold ``min(1, tau/||x_i - v||) x_i``
    (weights ``s_i``), merge along any tree, finalize ``v + (S/n)(mean - v)`` with
    ``S = sum s_i``, which is ``v + (1/n) sum s_i (x_i - v)``."""

    inner: Composed

    @property
    def decomposable(self) -> bool:
        return True

    @property
    def center(self) -> Arr:
        pre = self.inner.pre[0]
        assert isinstance(pre, CenterWeight)
        return pre.center

    def init(self, spec: ParamSpec, *, version: int | None = None) -> MeanState:
        state: MeanState = self.inner.init(spec, version=version)
        return state

    def fold(self, state: MeanState, update: Update) -> MeanState:
        out: MeanState = self.inner.fold(state, update)
        return out

    def fold_many(self, state: MeanState, updates: Iterable[Update]) -> MeanState:
        out: MeanState = self.inner.fold_many(state, updates)
        return out

    def merge(self, state: MeanState, other: MeanState) -> MeanState:
        out: MeanState = self.inner.merge(state, other)
        return out

    def count(self, state: MeanState) -> int:
        return state.count

    def finalize_flat(self, state: MeanState) -> Arr:
        mean_x = self.inner.finalize_flat(state).astype(np.float64)
        frac = (state.weight + state.weight_comp) / state.count
        v = self.center.astype(np.float64)
        out: Arr = (v + frac * (mean_x - v)).astype(state.spec.dtype)
        return out

    def finalize(self, state: MeanState) -> ArrayTree:
        return state.spec.unflatten(self.finalize_flat(state))


def weiszfeld_step(z: Arr, nu: float = 1e-5) -> Composed:
    """One smoothed-Weiszfeld iteration from ``z`` as a monoid (a weighted mean with weights
    ``alpha_i / max(nu, ||x_i - z||)``): its finalize is the next iterate."""
    if not nu > 0:
        raise ConfigError(f"nu must be > 0, got {nu!r}")
    return compose(CenterWeight(np.asarray(z, np.float64), "weiszfeld", float(nu)), mean("float64"))


def clip_step(v: Arr, tau: float = 100.0) -> ClipStep:
    """One centered-clipping iteration from ``v`` as a monoid (see :class:`ClipStep`)."""
    if not (math.isfinite(tau) and tau > 0):
        raise ConfigError(f"tau must be finite and > 0, got {tau!r}")
    return ClipStep(
        compose(CenterWeight(np.asarray(v, np.float64), "clip", float(tau)), mean("float64"))
    )
