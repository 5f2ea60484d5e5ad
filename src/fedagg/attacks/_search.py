"""Min-Max and Min-Sum (Shejwalkar & Houmansadr, NDSS 2021) and their searches for gamma.

Both send ``m = mu - gamma * p`` for the honest updates' mean ``mu`` and a perturbation
``p``, with the largest ``gamma`` the reference code's search finds under a distance bound:
``max_i |m - g_i| <= max_{i,j} |g_i - g_j|`` (Min-Max) or
``sum_i |m - g_i|^2 <= min_i sum_j |g_i - g_j|^2`` (Min-Sum). :class:`~fedagg.attacks.MinMax`
and :class:`~fedagg.attacks.MinSum` use the same helpers, so both give the same bits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.attacks import _checks as ck
from fedagg.attacks._checks import F64, Arr, Direction
from fedagg.errors import ConfigError


def pairwise_sq(g: F64) -> F64:
    """``D[i, j] = |g_i - g_j|^2``, one row at a time (memory O(h d), exact differences)."""
    h = g.shape[0]
    d2 = np.empty((h, h), dtype=np.float64)
    with ck.quiet():
        for i in range(h):
            diff = g - g[i]
            d2[i] = np.einsum("ij,ij->i", diff, diff)
    if not np.isfinite(d2).all():
        raise ConfigError("honest updates too large: their squared distances overflow float64")
    return d2


def perturbation(g: F64, mu: F64, direction: str) -> F64:
    """The perturbation ``p``: ``mu / |mu|`` (0 if ``mu = 0``), ``sign(mu)`` or the
    coordinate-wise std (``ddof = 0``; the reference's ``torch.std`` uses ``ddof = 1``, which
    only rescales ``p`` and hence ``gamma``, not the crafted vector)."""
    if direction == "unit_vec":
        norm = float(np.sqrt(np.dot(mu, mu)))
        return mu / norm if norm > 0 else np.zeros_like(mu)
    if direction == "sign":
        return np.sign(mu)
    if direction == "std":
        std: F64 = g.std(axis=0)
        return std
    raise ConfigError(f"direction must be 'unit_vec', 'sign' or 'std', not {direction!r}")


def search_gamma(ok: Callable[[float], bool], gamma0: float, tol: float) -> float:
    """The reference code's search for the largest feasible ``gamma``.

    ``gamma = gamma0``, ``step = gamma0 / 2``; while ``step >= tol``: if ``ok(gamma)``, record
    it and ``gamma += step``, else ``gamma -= step``; then ``step /= 2``. Returns the last
    feasible ``gamma`` tried (0 if none was: ``gamma = 0`` is always feasible). The search
    covers ``[0, 2 gamma0)``; on return the boundary lies within ``4 * step < 4 * tol`` above
    the result (unless it is beyond ``2 gamma0``).
    """
    gamma, step, best = gamma0, gamma0 / 2.0, 0.0
    while True:
        if ok(gamma):
            best = gamma
            gamma += step
        else:
            gamma -= step
        step /= 2.0
        if step < tol:
            return best


def check_search(direction: str, gamma0: float, tol: float) -> tuple[float, float]:
    """The checked ``(gamma0, tol)`` of a search along ``direction``."""
    if direction not in ck.DIRECTIONS:
        raise ConfigError(f"direction must be 'unit_vec', 'sign' or 'std', not {direction!r}")
    g0, t = ck.positive("gamma0", gamma0), ck.positive("tol", tol)
    if t >= g0:
        raise ConfigError(f"tol must be < gamma0, got tol={tol!r}, gamma0={gamma0!r}")
    return g0, t


def _prepare(
    honest: npt.ArrayLike, direction: str, gamma0: float, tol: float
) -> tuple[F64, np.dtype[Any], F64, F64, F64, float, float]:
    g0, t = check_search(direction, gamma0, tol)
    g, dt = ck.honest(honest)
    mu = g.mean(axis=0)
    p = perturbation(g, mu, direction)
    return g, dt, mu, p, pairwise_sq(g), g0, t


def _dists_along(g: F64, mu: F64, p: F64) -> Callable[[float], F64]:
    """``gamma -> |mu - gamma p - g_i|^2`` for every i, as the quadratic
    ``a_i - 2 gamma b_i + gamma^2 c`` (one pass over the data, then O(h) per gamma)."""
    diff = mu - g
    a = np.einsum("ij,ij->i", diff, diff)
    b = diff @ p
    c = float(p @ p)

    def at(gamma: float) -> F64:
        out: F64 = a - 2.0 * gamma * b + gamma * gamma * c
        return out

    return at


def gamma_max(g: F64, mu: F64, p: F64, d2: F64, gamma0: float, tol: float) -> float:
    """Min-Max's ``gamma`` for checked rows ``g``, their mean ``mu``, the perturbation ``p``
    and their squared distances ``d2`` (:func:`pairwise_sq`)."""
    if not p.any():
        return 0.0  # no direction to move in: the attack is the mean itself
    bound = float(d2.max())
    at = _dists_along(g, mu, p)
    with ck.quiet():
        return search_gamma(lambda gm: bool(at(gm).max() <= bound), gamma0, tol)


def gamma_sum(g: F64, mu: F64, p: F64, d2: F64, gamma0: float, tol: float) -> float:
    """Min-Sum's ``gamma``, with the arguments of :func:`gamma_max`."""
    if not p.any():
        return 0.0
    bound = float(d2.sum(axis=1).min())
    at = _dists_along(g, mu, p)
    with ck.quiet():
        return search_gamma(lambda gm: bool(at(gm).sum() <= bound), gamma0, tol)


def min_max_gamma(
    honest: npt.ArrayLike,
    direction: Direction = "unit_vec",
    gamma0: float = 50.0,
    tol: float = 1e-5,
) -> float:
    """The ``gamma`` :func:`min_max` uses: the largest ``gamma`` found by the reference search
    (see :func:`min_max`) with ``max_i |mu - gamma p - g_i| <= max_{i,j} |g_i - g_j|``."""
    g, _, mu, p, d2, g0, t = _prepare(honest, direction, gamma0, tol)
    return gamma_max(g, mu, p, d2, g0, t)


def min_sum_gamma(
    honest: npt.ArrayLike,
    direction: Direction = "unit_vec",
    gamma0: float = 50.0,
    tol: float = 1e-5,
) -> float:
    """The ``gamma`` :func:`min_sum` uses: the largest ``gamma`` found by the reference search
    with ``sum_i |mu - gamma p - g_i|^2 <= min_i sum_j |g_i - g_j|^2``."""
    g, _, mu, p, d2, g0, t = _prepare(honest, direction, gamma0, tol)
    return gamma_sum(g, mu, p, d2, g0, t)


def min_max(
    honest: npt.ArrayLike,
    direction: Direction = "unit_vec",
    gamma0: float = 50.0,
    tol: float = 1e-5,
) -> Arr:
    """Min-Max (Shejwalkar & Houmansadr, NDSS 2021): ``m = mu - gamma * p``.

    ``p`` is ``mu / |mu|`` (``"unit_vec"``), ``sign(mu)`` (``"sign"``) or the coordinate-wise
    std of the honest updates (``"std"``, ``ddof = 0``). ``gamma`` is the largest value with
    ``max_i |m - g_i| <= max_{i,j} |g_i - g_j|`` found by the reference code's search: start
    at ``gamma0`` with ``step = gamma0 / 2``; ``gamma += step`` if the condition holds, else
    ``gamma -= step``; ``step /= 2``; stop once ``step < tol`` and keep the last ``gamma``
    that held. It searches ``[0, 2 gamma0)`` and ends within ``4 tol`` of the boundary.
    If ``p = 0`` (``mu = 0``, or identical updates for ``"std"``), ``gamma = 0`` and ``m = mu``.
    :func:`min_max_gamma` returns the ``gamma``.
    """
    g, dt, mu, p, d2, g0, t = _prepare(honest, direction, gamma0, tol)
    gamma = gamma_max(g, mu, p, d2, g0, t)
    with ck.quiet():
        return ck.out(mu - gamma * p, dt, "min_max")


def min_sum(
    honest: npt.ArrayLike,
    direction: Direction = "unit_vec",
    gamma0: float = 50.0,
    tol: float = 1e-5,
) -> Arr:
    """Min-Sum (same paper): :func:`min_max` with the condition
    ``sum_i |m - g_i|^2 <= min_i sum_j |g_i - g_j|^2`` (the reference code's min over the
    honest updates' score sums). Since ``sum_i |m - g_i|^2 = sum_i |mu - g_i|^2 +
    h gamma^2 |p|^2``, the exact boundary is ``gamma* = min_i |g_i - mu| / |p|``.
    :func:`min_sum_gamma` returns the ``gamma``.
    """
    g, dt, mu, p, d2, g0, t = _prepare(honest, direction, gamma0, tol)
    gamma = gamma_sum(g, mu, p, d2, g0, t)
    with ck.quiet():
        return ck.out(mu - gamma * p, dt, "min_sum")
