"""epsilon(...) and noise_multiplier_for(...): the accountants behind one interface, and the
exact (epsilon, delta) curve of the plain Gaussian mechanism (Balle & Wang 2018)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

from fedagg.errors import ConfigError

from ._pld import auto_step, pld_subsampled_gaussian
from ._rdp import (
    DEFAULT_ORDERS,
    log_erfc,
    rdp_subsampled_gaussian,
    rdp_to_delta,
    rdp_to_epsilon,
)

__all__ = [
    "ACCOUNTANTS",
    "Accountant",
    "delta",
    "epsilon",
    "gaussian_delta",
    "gaussian_epsilon",
    "noise_multiplier_for",
]

Accountant = Literal["rdp", "pld"]
#: The accountants :func:`epsilon` knows.
ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")

#: The PLD grid step used unless the composed losses need a coarser one.
_PLD_STEP = 1e-4
#: Mass given up (pessimistically) at each end of each PLD truncation.
_PLD_TAIL = 1e-15


def _number(name: str, value: object, lo: float, hi: float, lo_open: bool, hi_open: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    v = float(value)
    bad = (
        math.isnan(v) or v < lo or v > hi or (lo_open and v == lo) or (hi_open and v == hi)
    )  # fmt: skip
    if bad:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ConfigError(f"{name} must be in {left}{lo:g}, {hi:g}{right}, got {value!r}")
    return v


def _steps(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"steps must be an integer >= 0, got {value!r}")
    return value


def _accountant(value: object) -> str:
    if value not in ACCOUNTANTS:
        raise ConfigError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {value!r}")
    return str(value)


def epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: Accountant = "rdp",
) -> float:
    """The epsilon of ``steps`` runs of the Poisson-subsampled Gaussian mechanism at ``delta``.

    Each step includes every client (record) independently with probability ``sample_rate``,
    sums their contributions clipped to L2 norm C and adds Gaussian noise of standard
    deviation ``noise_multiplier * C``; neighbouring datasets differ by adding or removing one
    client (a user-level guarantee when a client's whole contribution is clipped together).

    Args:
        noise_multiplier: sigma > 0.
        sample_rate: q in (0, 1] (q = 1: every client every round).
        steps: the number of rounds, >= 0.
        delta: in (0, 1).
        accountant: ``"rdp"`` (Rényi DP over :data:`DEFAULT_ORDERS`, converted with Canonne
            et al.'s bound) or ``"pld"`` (the tighter privacy-loss-distribution accountant).

    Returns:
        epsilon >= 0 (an upper bound: both accountants are pessimistic; ``inf`` if none).

    Raises:
        ConfigError: an argument out of range.

    >>> round(epsilon(noise_multiplier=1.5, sample_rate=0.04, steps=2250, delta=1e-5), 2)
    7.33
    """
    sigma = _number("noise_multiplier", noise_multiplier, 0.0, math.inf, True, True)
    q = _number("sample_rate", sample_rate, 0.0, 1.0, True, False)
    d = _number("delta", delta, 0.0, 1.0, True, True)
    t = _steps(steps)
    return _epsilon(sigma, q, t, d, _accountant(accountant))


def _epsilon(sigma: float, q: float, t: int, d: float, kind: str) -> float:
    if t == 0:
        return 0.0
    if kind == "rdp":
        rdp = rdp_subsampled_gaussian(sigma, q, DEFAULT_ORDERS) * t
        return rdp_to_epsilon(DEFAULT_ORDERS, rdp, d)[0]
    step = auto_step(sigma, q, t, _PLD_STEP)
    remove, add = pld_subsampled_gaussian(sigma, q, t, step, _PLD_TAIL)
    eps = max(remove.epsilon(d), add.epsilon(d))
    # beyond the PLD's range (losses above 600: epsilon in the hundreds) report RDP's bound
    return eps if math.isfinite(eps) else _epsilon(sigma, q, t, d, "rdp")


def delta(
    *,
    epsilon: float,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant = "rdp",
) -> float:
    """The delta of ``steps`` runs of the Poisson-subsampled Gaussian mechanism at
    ``epsilon`` (the inverse view of :func:`epsilon`; same arguments and accountants).

    >>> delta(epsilon=1.0, noise_multiplier=1.0, sample_rate=1.0, steps=1) > 0.126936
    True
    """
    e = _number("epsilon", epsilon, 0.0, math.inf, False, True)
    sigma = _number("noise_multiplier", noise_multiplier, 0.0, math.inf, True, True)
    q = _number("sample_rate", sample_rate, 0.0, 1.0, True, False)
    t = _steps(steps)
    kind = _accountant(accountant)
    if t == 0:
        return 0.0
    if kind == "rdp":
        rdp = rdp_subsampled_gaussian(sigma, q, DEFAULT_ORDERS) * t
        return rdp_to_delta(DEFAULT_ORDERS, rdp, e)[0]
    step = auto_step(sigma, q, t, _PLD_STEP)
    remove, add = pld_subsampled_gaussian(sigma, q, t, step, _PLD_TAIL)
    return max(remove.delta(e), add.delta(e))


def noise_multiplier_for(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: Accountant = "rdp",
    rtol: float = 1e-3,
) -> float:
    """The smallest noise multiplier (within ``rtol``) whose :func:`epsilon` is at most the
    target: a bisection on sigma (epsilon falls as sigma grows). The value returned always
    meets the target (it is the upper end of the final bracket).

    Raises:
        ConfigError: an argument out of range, or a target no sigma below 1e6 meets.

    >>> sigma = noise_multiplier_for(epsilon=8.0, delta=1e-5, sample_rate=0.04, steps=2250)
    >>> round(sigma, 2)
    1.42
    """
    target = _number("epsilon", epsilon, 0.0, math.inf, True, True)
    d = _number("delta", delta, 0.0, 1.0, True, True)
    q = _number("sample_rate", sample_rate, 0.0, 1.0, True, False)
    t = _steps(steps)
    kind = _accountant(accountant)
    tol = _number("rtol", rtol, 0.0, 1.0, True, True)
    if t == 0:
        raise ConfigError("steps must be >= 1 to choose a noise multiplier")

    def eps(s: float) -> float:
        return _epsilon(s, q, t, d, kind)

    if kind == "pld":
        # PLD's epsilon never exceeds RDP's: the RDP answer meets the target and brackets it.
        hi = _bisect(lambda s: _epsilon(s, q, t, d, "rdp"), target, 1.0, tol)
        lo = 0.85 * hi
        while lo > 1e-3 and eps(lo) <= target:
            hi, lo = lo, 0.85 * lo
        return _bisect(eps, target, hi, tol, lo)
    return _bisect(eps, target, 1.0, tol)


def _bisect(
    eps: Callable[[float], float], target: float, hi: float, tol: float, lo: float = 0.0
) -> float:
    """The upper end of a bracket [lo, hi] of width <= tol * hi around the smallest sigma with
    ``eps(sigma) <= target`` (``eps`` falls as sigma grows); lo = 0: find a bracket first."""
    if lo == 0.0:
        while eps(hi) > target:
            lo, hi = hi, hi * 2
            if hi > 1e6:
                raise ConfigError(f"no noise multiplier below 1e6 reaches epsilon {target:g}")
        if lo == 0.0:
            lo = hi / 2
            while lo > 1e-3 and eps(lo) <= target:
                hi, lo = lo, lo / 2
    while hi - lo > tol * hi:
        mid = 0.5 * (lo + hi)
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


def _phi(z: float) -> float:
    return 0.5 * math.erfc(-z / math.sqrt(2))


def gaussian_delta(epsilon: float, noise_multiplier: float, steps: int = 1) -> float:
    """The exact delta(epsilon) of ``steps`` runs of the Gaussian mechanism (no sampling):
    ``Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)`` with ``mu = sqrt(steps)/sigma``
    (Balle & Wang 2018, Theorem 8).

    >>> round(gaussian_delta(1.0, 1.0), 6)
    0.126937
    """
    e = _number("epsilon", epsilon, 0.0, math.inf, False, True)
    sigma = _number("noise_multiplier", noise_multiplier, 0.0, math.inf, True, True)
    t = _steps(steps)
    if t == 0:
        return 0.0
    mu = math.sqrt(t) / sigma
    # e^eps Phi(-eps/mu - mu/2) in log space: it stays finite where e^eps overflows
    log_tail = math.log(0.5) + log_erfc((e / mu + mu / 2) / math.sqrt(2))
    return max(0.0, _phi(-e / mu + mu / 2) - math.exp(e + log_tail))


def gaussian_epsilon(delta: float, noise_multiplier: float, steps: int = 1) -> float:
    """The exact epsilon of ``steps`` runs of the Gaussian mechanism at ``delta``: the
    inverse of :func:`gaussian_delta` by bisection (to about 1e-12 relative)."""
    d = _number("delta", delta, 0.0, 1.0, True, True)
    sigma = _number("noise_multiplier", noise_multiplier, 0.0, math.inf, True, True)
    t = _steps(steps)
    if t == 0 or gaussian_delta(0.0, sigma, t) <= d:
        return 0.0
    lo, hi = 0.0, 1.0
    while gaussian_delta(hi, sigma, t) > d:
        lo, hi = hi, 2 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if gaussian_delta(mid, sigma, t) > d:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    return hi
