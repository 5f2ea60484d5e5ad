"""The Flag Aggregator: a subspace fit of the unit-normalised updates, on their Gram matrix.
See :mod:`fedagg.core.robust`."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fedagg.core._spool import BLOCK_BYTES, Spooled, SpoolState, StoreFactory, need_updates
from fedagg.errors import ConfigError

__all__ = ["FlagAggregator", "flag_aggregator"]

Arr = npt.NDArray[Any]
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class FlagAggregator(Spooled):
    """The Flag Aggregator (Almasi et al., ICLR 2024): the m-dimensional subspace Y that
    best reconstructs the unit-normalised updates (IRLS on the "sine median" objective
    ``sum_i sqrt(1 - ||Y^T g_i||^2)`` plus ``lam`` times the pairwise term), then
    ``(1/m) Y Y^T sum_i g_i``.

    Everything runs on the p x p Gram matrix (plain products, not centred: angles need each
    inner product to its own relative precision): the scatter matrix is
    ``G (diag(a^2) + L) G^T`` with L the Laplacian of the pairwise weights, so an IRLS step is
    a p x p eigenproblem, O(n p^2 + p^3) for any ``lam``. The first weights are those the
    reference's random start ``Y0`` gives in high dimension, where ``||Y0^T g||^2 = 0``:
    ``a_i = (1 + eps)^(-1/4)`` and ``b_ij = lam / (p (p - 1)) (1 + eps)^(-1/4)``, so ``lam``
    acts from the first step; the result is always an SVD result, never a start. Updates
    whose scaled values are all zero are left out (they have no direction; their norm is
    exactly 0). ``m`` defaults to ``ceil(p / 2)`` (the reference's scripts: p=7 -> 4,
    p=15 -> 8).
    ``norm="unit"`` returns the reference's aggregate of unit vectors; ``"median"`` rescales
    it by the median update norm, so it is a delta on the updates' scale.
    """

    m: int | None = None
    lam: float = 0.0
    iters: int = 3
    eps: float = 1e-7
    tol: float = 1e-10
    norm: Literal["unit", "median"] = "unit"

    def __post_init__(self) -> None:
        if self.m is not None and (isinstance(self.m, bool) or self.m < 1):
            raise ConfigError(f"m must be None or >= 1, got {self.m!r}")
        if not (math.isfinite(self.lam) and self.lam >= 0) or self.iters < 1:
            raise ConfigError("the Flag Aggregator needs lam >= 0 and iters >= 1")
        if self.norm not in ("unit", "median"):
            raise ConfigError(f"norm must be 'unit' or 'median', not {self.norm!r}")

    def coefficients(self, g: F64) -> tuple[F64, int]:
        """The aggregate as a combination of the raw updates, and the subspace size used."""
        norms = np.sqrt(np.maximum(np.diag(g), 0.0))
        keep = np.flatnonzero(norms > 0)
        coef = np.zeros(len(g))
        if len(keep) == 0:
            return coef, 0
        p = len(keep)
        k = g[np.ix_(keep, keep)] / np.outer(norms[keep], norms[keep])  # unit-vector Gram
        m = min(self.m if self.m is not None else -(-p // 2), p)
        a, b = self._start(p)
        best: tuple[float, F64] | None = None
        for _ in range(self.iters):
            proj = self._projector(k, a, b, m)  # P with ||Y^T G e||^2 = e^T K P K e
            obj, a, b = self._weights(k, proj, p)
            if best is not None and best[0] - obj <= self.tol:
                if obj < best[0]:
                    best = (obj, proj)
                break
            if best is None or obj < best[0]:
                best = (obj, proj)
            if obj <= self.tol:
                break
        assert best is not None
        proj = best[1]
        c = proj @ (k @ np.ones(p)) / m  # (1/m) Y Y^T sum g_i, over the unit vectors
        coef[keep] = c / norms[keep]
        if self.norm == "median":
            coef *= float(np.median(norms[keep]))
        return coef, m

    def _start(self, p: int) -> tuple[F64, F64]:
        """The first IRLS weights: the reference's, at a start orthogonal to every update."""
        w0 = (1.0 + self.eps) ** -0.25
        a = np.full(p, w0)
        b = np.zeros((p, p))
        if self.lam > 0 and p > 1:
            b[...] = self.lam / (p * (p - 1)) * w0
            np.fill_diagonal(b, 0.0)
        return a, b

    def _projector(self, k: F64, a: F64, b: F64, m: int) -> F64:
        """``Q`` (p x p) such that ``Y Y^T = G Q G^T`` for the top-m eigenvectors Y of the
        weighted scatter ``G C G^T``, ``C = diag(a^2) + L(b^2)``."""
        w = b**2  # symmetric; every ordered pair (i, j) adds w_ij (e_i - e_j)(e_i - e_j)^T
        c = np.diag(a**2) + 2.0 * (np.diag(w.sum(axis=1)) - w)
        ev, evec = np.linalg.eigh(c)
        r = evec * np.sqrt(np.maximum(ev, 0.0))  # C = R R^T
        mm = r.T @ k @ r  # M^T M with M = G R
        lam, w_ = np.linalg.eigh(mm)
        order = np.argsort(lam)[::-1][:m]
        lam, w_ = lam[order], w_[:, order]
        good = lam > lam.max(initial=0.0) * 1e-12
        lam, w_ = lam[good], w_[:, good]
        t = r @ w_  # Y = G t diag(lam)^-1/2
        q: F64 = (t / lam) @ t.T
        return q

    def _weights(self, k: F64, proj: F64, p: int) -> tuple[float, F64, F64]:
        """The objective at this subspace and the next IRLS weights."""
        kpk = k @ proj @ k  # e_i^T K P K e_j = <Y^T g_i, Y^T g_j>
        r = np.clip(np.diag(kpk), 0.0, None)
        sin2 = np.abs(1.0 - r)
        obj = float(np.sqrt(sin2).sum())
        a = (sin2 + self.eps) ** -0.25
        b = np.zeros((p, p))
        if self.lam > 0 and p > 1:
            dr = r[:, None] + r[None, :] - 2.0 * kpk  # ||Y^T (g_i - g_j)||^2
            pair = np.abs(1.0 - dr)
            np.fill_diagonal(pair, 0.0)
            scale = self.lam / (p * (p - 1))
            obj += scale * float(np.sqrt(pair).sum())
            b = scale * (pair + self.eps) ** -0.25
            np.fill_diagonal(b, 0.0)
        return obj, a, b

    def finalize_flat(self, state: SpoolState) -> Arr:
        need_updates(state, 1, "the Flag Aggregator")
        coef, _ = self.coefficients(self._gram(state, centre=False).full())
        return self._combine(state, coef)


def flag_aggregator(
    m: int | None = None,
    lam: float = 0.0,
    *,
    iters: int = 3,
    norm: Literal["unit", "median"] = "unit",
    spool: StoreFactory | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> FlagAggregator:
    """The Flag Aggregator with subspace size ``m`` (default ``ceil(p/2)``)."""
    return FlagAggregator(spool, block_bytes, m, lam, iters, 1e-7, 1e-10, norm)
