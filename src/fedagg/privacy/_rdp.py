"""Rényi DP of the Poisson-subsampled Gaussian mechanism (Mironov, Talwar, Zhang 2019).

One step samples each record (client) independently with probability ``q``, sums the
clipped contributions (L2 sensitivity 1 after scaling by the clip) and adds N(0, sigma**2).
Under add/remove-one adjacency its RDP of order ``a`` is ``log(A_a) / (a - 1)`` with

    A_a = E_{z ~ N(0, sigma**2)} [ (1 - q + q * exp((2z - 1) / (2 sigma**2)))**a ].

* integer ``a``: the binomial expansion (Mironov et al. 2019, Sec. 3.2), exact up to rounding;
* fractional ``a``: the two series of Sec. 3.3 (split at the point z0 where both mixture
  components are equal) summed with the absolute values of the generalised binomial
  coefficients. Beyond ``i > a`` those coefficients alternate in sign, so the sum of absolute
  values is an upper bound of ``A_a``: the RDP reported is never below the true one (it is
  the bound dp_accounting reports too; the tests compare it with numerical integration).

RDP composes by addition over steps; :func:`rdp_to_epsilon` converts to (epsilon, delta) with
the bound of Canonne, Kamath, Steinke 2020 (Prop. 12) / Asoodeh et al. 2020, minimised over
the orders. Only ``math`` and ``numpy`` are used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedagg.errors import ConfigError

__all__ = [
    "DEFAULT_ORDERS", "log_erfc", "rdp_subsampled_gaussian", "rdp_to_delta", "rdp_to_epsilon",
]  # fmt: skip

#: The RDP orders tracked by default (those of Google's dp_accounting): 1.1 ... 10.9 by 0.1,
#: 11 ... 63, 128, 256, 512, 1024.
DEFAULT_ORDERS: tuple[float, ...] = (
    tuple(1 + x / 10 for x in range(1, 100))
    + tuple(float(a) for a in range(11, 64))
    + (128.0, 256.0, 512.0, 1024.0)
)

_MAX_TERMS = 1000
# log(k!) for the integer expansion (orders up to 1024 use 1025 terms).
_LOG_FACT = np.concatenate(([0.0], np.cumsum(np.log(np.arange(1, 4097, dtype=np.float64)))))


def log_erfc(x: float) -> float:
    """``log(erfc(x))``, accurate where ``erfc`` underflows (``x`` beyond about 26)."""
    if x < 25.0:
        return math.log(math.erfc(x))
    # Asymptotic expansion: erfc(x) = exp(-x^2)/(x sqrt(pi)) (1 - 1/(2x^2) + 3/(4x^4) - ...);
    # at x >= 25 the terms after the fourth are below 1e-14.
    inv = 1.0 / (2.0 * x * x)
    series = 1.0 - inv + 3.0 * inv**2 - 15.0 * inv**3 + 105.0 * inv**4
    return -x * x - math.log(x) - 0.5 * math.log(math.pi) + math.log(series)


def _logsumexp(v: np.ndarray) -> float:
    top = float(np.max(v))
    if not math.isfinite(top):
        return top
    return top + math.log(float(np.sum(np.exp(v - top))))


def _log_add(a: float, b: float) -> float:
    lo, hi = min(a, b), max(a, b)
    if lo == -math.inf:
        return hi
    return hi + math.log1p(math.exp(lo - hi))


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    """log A_alpha for an integer order: sum_i C(alpha, i) q^i (1-q)^(alpha-i) e^((i^2-i)/2s^2)."""
    i = np.arange(alpha + 1, dtype=np.float64)
    log_comb = _LOG_FACT[alpha] - _LOG_FACT[: alpha + 1] - _LOG_FACT[alpha::-1]
    terms = log_comb + i * math.log(q) + (alpha - i) * math.log1p(-q) + (i * i - i) / (2 * sigma**2)
    return _logsumexp(terms)


def _log_abs_comb(alpha: float, i: int) -> float:
    """log |C(alpha, i)| for a real alpha > 0 and an integer i >= 0."""
    return math.lgamma(alpha + 1) - math.lgamma(i + 1) - math.lgamma(alpha - i + 1)


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    """An upper bound of log A_alpha for a fractional order (Mironov et al. 2019, Sec. 3.3)."""
    log_a0 = log_a1 = -math.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_q, log_1mq = math.log(q), math.log1p(-q)
    last0 = last1 = -math.inf
    for i in range(_MAX_TERMS):
        coef = _log_abs_comb(alpha, i)
        j = alpha - i
        s0 = (
            coef + i * log_q + j * log_1mq + (i * i - i) / (2 * sigma**2)
            + math.log(0.5) + log_erfc((i - z0) / (math.sqrt(2) * sigma))
        )  # fmt: skip
        s1 = (
            coef + j * log_q + i * log_1mq + (j * j - j) / (2 * sigma**2)
            + math.log(0.5) + log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        )  # fmt: skip
        log_a0, log_a1 = _log_add(log_a0, s0), _log_add(log_a1, s1)
        total = _log_add(log_a0, log_a1)
        if s0 < last0 and s1 < last1 and max(s0, s1) < total - 30:
            return total
        last0, last1 = s0, s1
    return math.inf  # did not converge: this order gives no bound


def _rdp_one(q: float, sigma: float, alpha: float) -> float:
    if q == 0:
        return 0.0
    if sigma == 0 or math.isinf(alpha):
        return math.inf
    if q == 1:
        return alpha / (2 * sigma**2)
    if float(alpha).is_integer() and alpha <= 4096:
        return _log_a_int(q, sigma, int(alpha)) / (alpha - 1)
    return _log_a_frac(q, sigma, alpha) / (alpha - 1)


def _check_orders(orders: Sequence[float] | np.ndarray) -> np.ndarray:
    a = np.asarray(orders, dtype=np.float64).reshape(-1)
    if a.size == 0 or not np.all(a > 1) or np.any(np.isnan(a)):
        raise ConfigError("RDP orders must be a non-empty list of numbers > 1")
    return a


def rdp_subsampled_gaussian(
    noise_multiplier: float,
    sample_rate: float,
    orders: Sequence[float] | np.ndarray = DEFAULT_ORDERS,
) -> np.ndarray:
    """The RDP of one step of the Poisson-subsampled Gaussian mechanism at each order.

    Args:
        noise_multiplier: sigma, the noise standard deviation over the L2 sensitivity (>= 0).
        sample_rate: q, each record's (client's) probability of taking part, in [0, 1].
        orders: the RDP orders (all > 1).

    Returns:
        float64 array, one RDP value per order (``inf`` where no finite bound exists). Multiply
        by the number of steps to compose.

    >>> float(rdp_subsampled_gaussian(2.0, 1.0, [3.0])[0])  # q = 1: a / (2 sigma^2)
    0.375
    """
    sigma, q = float(noise_multiplier), float(sample_rate)
    if not (math.isfinite(sigma) and sigma >= 0):
        raise ConfigError(f"noise_multiplier must be a finite number >= 0, got {sigma!r}")
    if not 0 <= q <= 1:
        raise ConfigError(f"sample_rate must be in [0, 1], got {q!r}")
    return np.array([_rdp_one(q, sigma, float(a)) for a in _check_orders(orders)])


def rdp_to_epsilon(
    orders: Sequence[float] | np.ndarray, rdp: Sequence[float] | np.ndarray, delta: float
) -> tuple[float, float]:
    """The smallest epsilon over the orders such that RDP implies (epsilon, delta)-DP.

    Uses ``eps = rdp + log1p(-1/a) - log(delta * a) / (a - 1)`` (Canonne, Kamath, Steinke
    2020, Prop. 12), or 0 where the KL bound ``delta**2 >= 1 - exp(-rdp)`` already gives
    (0, delta)-DP; orders below 1.01 are skipped (the bound is unstable there).

    Returns:
        ``(epsilon, order)``: epsilon (>= 0, ``inf`` if no order gives a finite bound) and the
        order that attains it.

    >>> round(rdp_to_epsilon(range(2, 33), [1.1] * 31, 1e-5)[0], 6)  # a pure-DP curve
    1.327838
    """
    a = _check_orders(orders)
    r = np.asarray(rdp, dtype=np.float64).reshape(-1)
    if r.shape != a.shape:
        raise ConfigError(f"{r.size} RDP values for {a.size} orders")
    if not 0 < delta < 1:
        raise ConfigError(f"delta must be in (0, 1), got {delta!r}")
    best, best_order = math.inf, float(a[0])
    for order, value in zip(a.tolist(), r.tolist(), strict=True):
        if math.isnan(value):
            continue
        if value <= 0 or delta**2 + math.expm1(-value) > 0:
            eps = 0.0
        elif order > 1.01:
            eps = value + math.log1p(-1 / order) - math.log(delta * order) / (order - 1)
        else:
            eps = math.inf
        if eps < best:
            best, best_order = eps, order
    return max(0.0, best), best_order


def rdp_to_delta(
    orders: Sequence[float] | np.ndarray, rdp: Sequence[float] | np.ndarray, epsilon: float
) -> tuple[float, float]:
    """The smallest delta over the orders such that RDP implies (epsilon, delta)-DP: the
    inverse bound of :func:`rdp_to_epsilon` (Canonne et al. 2020, Prop. 12), and the KL bound
    ``sqrt(1 - exp(-rdp))``. Returns ``(delta, order)``."""
    a = _check_orders(orders)
    r = np.asarray(rdp, dtype=np.float64).reshape(-1)
    if r.shape != a.shape:
        raise ConfigError(f"{r.size} RDP values for {a.size} orders")
    if not (epsilon >= 0 and math.isfinite(epsilon)):
        raise ConfigError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
    best, best_order = 0.0, float(a[0])  # log delta
    for order, value in zip(a.tolist(), r.tolist(), strict=True):
        if math.isnan(value):
            continue
        log_d = -math.inf if value <= 0 else 0.5 * math.log1p(-math.exp(-value))
        if order > 1.01 and value > 0:
            log_d = min(
                log_d, (order - 1) * (value - epsilon + math.log1p(-1 / order)) - math.log(order)
            )
        if log_d < best:
            best, best_order = log_d, order
    return min(1.0, math.exp(best)), best_order
