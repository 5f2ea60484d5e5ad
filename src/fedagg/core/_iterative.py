"""RFA's geometric median and centered clipping: iterations on the n-vector of coefficients
that combine the updates, over their Gram matrix. See :mod:`fedagg.core.robust`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.core._spool import BLOCK_BYTES, Spooled, SpoolState, StoreFactory, need_updates
from fedagg.errors import ConfigError

__all__ = ["CenteredClipping", "GeometricMedian", "centered_clipping", "geometric_median"]

Arr = npt.NDArray[Any]
F64 = npt.NDArray[np.float64]


def _dist_to_combo(g: F64, coef: F64) -> F64:
    """``||x_i - sum_j coef_j x_j||`` for every row i, from the Gram matrix."""
    gc = g @ coef
    d2 = np.diag(g) - 2.0 * gc + float(coef @ gc)
    return np.sqrt(np.maximum(d2, 0.0))


@dataclass(frozen=True, slots=True)
class GeometricMedian(Spooled):
    """RFA's smoothed Weiszfeld (Pillutla et al.): ``z0`` = the weighted mean;
    ``beta_i = alpha_i / max(nu, ||z - x_i||)``, ``z <- sum beta_i x_i / sum beta_i``, at most
    ``maxiter`` times or until the objective ``sum alpha_i ||z - x_i||`` changes by at most
    ``ftol`` relative. ``alpha_i = n_i / sum n`` (``weighted``) or ``1/n``."""

    maxiter: int = 4
    nu: float = 1e-5
    ftol: float = 1e-6
    weighted: bool = True

    def __post_init__(self) -> None:
        if self.maxiter < 1 or not self.nu > 0 or not self.ftol >= 0:
            raise ConfigError("geometric median needs maxiter >= 1, nu > 0 and ftol >= 0")

    def coefficients(self, g: F64, weights: Sequence[float]) -> F64:
        """The median as a combination of the updates (coefficients sum to 1)."""
        n = len(weights)
        alpha = np.asarray(weights, np.float64) if self.weighted else np.ones(n)
        alpha = alpha / alpha.sum()
        coef = alpha.copy()
        obj = float(alpha @ _dist_to_combo(g, coef))
        for _ in range(self.maxiter):
            dist = _dist_to_combo(g, coef)
            beta = alpha / np.maximum(self.nu, dist)
            coef = beta / beta.sum()
            new = float(alpha @ _dist_to_combo(g, coef))
            done = abs(obj - new) <= self.ftol * max(new, 1e-300)
            obj = new
            if done:
                break
        out: F64 = coef
        return out

    def finalize_flat(self, state: SpoolState) -> Arr:
        need_updates(state, 1, "the geometric median")
        coef = self.coefficients(self._gram(state).full(), state.weights)
        return self._combine(state, coef)


@dataclass(frozen=True, slots=True)
class CenteredClipping(Spooled):
    """Centered clipping (Karimireddy, He, Jaggi 2021): ``L`` times,
    ``v <- v + (1/n) sum_i (x_i - v) min(1, tau / ||x_i - v||)``, from ``v0`` = the previous
    round's aggregate (carried by the strategy in ``ServerState.carry``; zero at first)."""

    tau: float = 100.0
    iters: int = 1

    def __post_init__(self) -> None:
        if not (math.isfinite(self.tau) and self.tau > 0) or self.iters < 1:
            raise ConfigError("centered clipping needs tau > 0 and iters >= 1")

    @property
    def carries(self) -> bool:
        return True

    def coefficients(self, g: F64) -> F64:
        """The result over [x_1..x_n, v0] (the Gram matrix's last row is v0)."""
        n = len(g) - 1
        coef = np.zeros(n + 1)
        coef[n] = 1.0
        for _ in range(self.iters):
            dist = _dist_to_combo(g, coef)[:n]
            s = np.minimum(1.0, self.tau / np.maximum(dist, 1e-300)) / n
            coef = coef * (1.0 - s.sum())
            coef[:n] += s
        return coef

    def finalize_flat(self, state: SpoolState) -> Arr:
        n = need_updates(state, 1, "centered clipping")
        v0 = state.center
        if v0 is None:
            v0 = np.zeros(state.spec.size, state.spec.dtype)
        coef = self.coefficients(self._gram(state, v0).full())
        out = self._combine(state, coef[:n])
        if coef[n] != 0.0:
            out += (coef[n] * v0.astype(np.float64)).astype(state.spec.dtype)
        return out


def geometric_median(
    maxiter: int = 4,
    nu: float = 1e-5,
    ftol: float = 1e-6,
    *,
    weighted: bool = True,
    spool: StoreFactory | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> GeometricMedian:
    """RFA's geometric median (smoothed Weiszfeld)."""
    return GeometricMedian(spool, block_bytes, maxiter, nu, ftol, weighted)


def centered_clipping(
    tau: float = 100.0,
    iters: int = 1,
    *,
    spool: StoreFactory | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> CenteredClipping:
    """Centered clipping with radius ``tau`` and ``iters`` iterations."""
    return CenteredClipping(spool, block_bytes, tau, iters)
