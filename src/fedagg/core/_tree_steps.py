"""RFA and centered clipping across an aggregation tree, one monoid pass per iteration
(:func:`tree_rfa`, :func:`tree_centered_clipping`). See :mod:`fedagg.core.tree`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.core._reduce import reduce_tree
from fedagg.core._steps import distance_to
from fedagg.core.aggregate import Mean, MeanState, check_update
from fedagg.core.spec import ParamSpec
from fedagg.core.update import Update
from fedagg.errors import ConfigError, EmptyAggregate, NonFiniteUpdate

__all__ = ["tree_centered_clipping", "tree_rfa"]

Arr = npt.NDArray[Any]
F64 = npt.NDArray[np.float64]


def _quotient(state: MeanState) -> F64:
    """``(acc + comp) / W`` of a float64 mean state, kept in float64 (no rounding to the
    model dtype between iterations)."""
    out: F64 = (state.acc.astype(np.float64) + (0.0 if state.comp is None else state.comp)) / (
        state.weight + state.weight_comp
    )
    return out


def _center_pass(
    spec: ParamSpec,
    version: int | None,
    leaves: Sequence[Sequence[Update]],
    center: F64 | None,
    weight: Any,
    fanout: int,
) -> tuple[MeanState, float]:
    """One pass over the tree: each leaf folds its updates, reweighted by
    ``weight(update, distance to center)``, into a float64 mean (the monoid of
    :func:`weiszfeld_step` / :func:`clip_step`; the distance is read once and also summed,
    weighted, for RFA's objective); the leaf states merge by :func:`reduce_tree`."""
    agg = Mean("float64")
    states: list[MeanState] = []
    obj = 0.0
    for ups in leaves:
        st = agg.init(spec, version=version)
        batch = []
        for u in ups:
            check_update(spec, version, u)
            dist = 0.0 if center is None else distance_to(spec, u, center)
            if not math.isfinite(dist):
                raise NonFiniteUpdate(u.client_id, "delta holds NaN or Inf values")
            w, o = weight(u, dist)
            obj += o
            batch.append(replace(u, weight=w))
        states.append(agg.fold_many(st, batch))
    root = reduce_tree(agg, states, fanout) if states else agg.init(spec, version=version)
    if root.count == 0:
        raise EmptyAggregate("no update was folded: nothing to finalize")
    return root, obj


def tree_rfa(
    leaves: Sequence[Sequence[Update]],
    spec: ParamSpec,
    *,
    maxiter: int = 4,
    nu: float = 1e-5,
    ftol: float = 1e-6,
    weighted: bool = True,
    fanout: int = 2,
    version: int | None = None,
) -> Arr:
    """RFA's geometric median (:func:`~fedagg.aggregators.geometric_median`, same defaults)
    computed across an aggregation tree, one monoid pass per iteration.

    Pass 0 is the weighted mean ``z0`` (``alpha_i = n_i / sum n``, or ``1/n`` when not
    ``weighted``). Pass ``k`` broadcasts ``z_k``; each leaf folds ``beta_i x_i`` with
    ``beta_i = alpha_i / max(nu, ||x_i - z_k||)`` (the :func:`weiszfeld_step` monoid) and sums
    ``alpha_i ||x_i - z_k||`` (the objective at ``z_k``); :func:`reduce_tree` merges; the root
    forms ``z_{k+1}``. It stops as the flat rule does: after ``maxiter`` steps, or at ``z_k``
    once ``|obj(z_{k-1}) - obj(z_k)| <= ftol * obj(z_k)`` (known one pass later, so an early
    stop costs one extra pass). Iterates stay in float64; only the result is cast to the
    model's dtype. It equals the flat rule up to float64 rounding (distances are computed
    directly here, from the Gram matrix there): the results agree to the last float32 bit or
    so.
    """
    if maxiter < 1 or not nu > 0 or not ftol >= 0:
        raise ConfigError("tree_rfa needs maxiter >= 1, nu > 0 and ftol >= 0")

    def alpha(u: Update) -> float:
        return float(u.weight) if weighted else 1.0

    root, _ = _center_pass(spec, version, leaves, None, lambda u, d: (alpha(u), 0.0), fanout)
    total = root.weight + root.weight_comp  # sum alpha_i
    z = _quotient(root)
    prev: float | None = None
    for _ in range(maxiter):
        root, obj_sum = _center_pass(
            spec,
            version,
            leaves,
            z,
            lambda u, d: (alpha(u) / max(nu, d), alpha(u) * d),
            fanout,
        )
        obj = obj_sum / total
        if prev is not None and abs(prev - obj) <= ftol * max(obj, 1e-300):
            break
        prev = obj
        z = _quotient(root)
    return z.astype(spec.dtype)


def tree_centered_clipping(
    leaves: Sequence[Sequence[Update]],
    spec: ParamSpec,
    tau: float = 100.0,
    iters: int = 1,
    v0: npt.ArrayLike | None = None,
    *,
    fanout: int = 2,
    version: int | None = None,
) -> Arr:
    """Centered clipping (:func:`~fedagg.aggregators.centered_clipping`) across an
    aggregation tree: ``iters`` passes of the :func:`clip_step` monoid.

    Each pass broadcasts ``v``; each leaf folds ``s_i x_i`` with weights
    ``s_i = min(1, tau / ||x_i - v||)``; :func:`reduce_tree` merges; the root forms
    ``v + (sum s_i x_i - (sum s_i) v) / n``. ``v0`` defaults to zero, as in the flat rule
    when no previous aggregate is carried. Iterates stay in float64; the result is cast to the
    model's dtype. Each client has one vote (weights are not used), as in the flat rule.
    """
    if not (math.isfinite(tau) and tau > 0) or iters < 1:
        raise ConfigError("centered clipping needs tau > 0 and iters >= 1")
    v = np.zeros(spec.size) if v0 is None else np.array(v0, np.float64).reshape(-1)
    if v.shape != (spec.size,):
        raise ConfigError(f"v0 must have {spec.size} values, got {v.shape}")

    def clip(u: Update, d: float) -> tuple[float, float]:
        return (min(1.0, tau / d) if d > 0 else 1.0), 0.0

    for _ in range(iters):
        root, _ = _center_pass(spec, version, leaves, v, clip, fanout)
        num = root.acc.astype(np.float64)
        if root.comp is not None:
            num += root.comp
        num -= (root.weight + root.weight_comp) * v
        v = v + num / root.count
    out: Arr = v.astype(spec.dtype)
    return out
