"""Rényi DP of distributed DP over secure aggregation: the distributed discrete Gaussian
(Kairouz, Liu, Steinke, ICML 2021) and the distributed Skellam mechanism (Agarwal, Kairouz,
Liu, NeurIPS 2021), and Poisson subsampling of any RDP curve (Zhu & Wang, ICML 2019).

Everything is in the **integer domain** the clients add noise in: the sensitivities are
those of one client's scaled, (conditionally) rounded integer vector, the noise parameters
those of the integer noise. What the server decodes is the sum of the ``clients`` noisy
vectors; one client's removal changes it by at most ``l2_sensitivity`` (L2) and
``l1_sensitivity`` (L1). The L1 sensitivity defaults to ``l2 * min(sqrt(dim), l2)`` (for an
integer vector ``|x|_1 <= |x|_2^2`` and ``|x|_1 <= sqrt(dim) |x|_2``).

* Discrete Gaussian: each client adds N_Z(0, s^2) per coordinate; the sum is close to
  N_Z(0, n s^2) and the RDP of order a is the smallest of (Kairouz et al., Prop. 14 with
  their Theorem 1's ``tau = 10 sum_{k=1}^{n-1} exp(-2 pi^2 s^2 k / (k + 1))``, and
  ``S2 = l2 / (sqrt(n) s)``, ``S1 = l1 / (sqrt(n) s)``)::

      a/2 S2^2 + tau d,   a/2 (S2^2 + 2 S1 tau + tau^2 d),   a/2 (S2 + sqrt(d) tau)^2

* Skellam: the summed noise is Skellam with variance ``mu`` per coordinate; RDP of order a
  (Agarwal et al., Theorem 3.5)::

      a l2^2 / (2 mu) + min(((2a - 1) l2^2 + 6 l1) / (4 mu^2), 3 l1 / (2 mu))

* Subsampling: with each client taking part with probability q, the RDP of integer order a
  is at most ``log(...)/(a - 1)`` of Zhu & Wang's Theorem 5 (general upper bound); the value
  used is the smaller of that and the unamplified RDP.

These RDP values compose by addition over rounds; :func:`rdp_to_epsilon` converts them.
Integer orders only (fractional ones are rounded down, as the bounds are stated for integers).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from fedagg.errors import ConfigError

__all__ = [
    "DISTRIBUTED_ORDERS",
    "rdp_distributed_discrete_gaussian",
    "rdp_poisson_subsampled",
    "rdp_skellam",
]

#: Integer RDP orders for the distributed mechanisms: 2 ... 128 and 256.
DISTRIBUTED_ORDERS: tuple[int, ...] = (*range(2, 129), 256)


def _positive(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ConfigError(f"{name} must be a number, got {v!r}")
    x = float(v)
    if not (math.isfinite(x) and x > 0):
        raise ConfigError(f"{name} must be a finite number > 0, got {v!r}")
    return x


def _count(name: str, v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
    return v


def _int_orders(orders: Sequence[float]) -> list[int]:
    out = [math.floor(float(a)) for a in orders]
    if not out or min(out) < 2:
        raise ConfigError("orders must be a non-empty list of numbers >= 2")
    return out


def _l1(l2: float, l1: float | None, dim: int) -> float:
    return l2 * min(math.sqrt(dim), l2) if l1 is None else _positive("l1_sensitivity", l1)


def _log_comb(n: int, k: int) -> float:
    return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)


def rdp_poisson_subsampled(
    rdp: Callable[[int], float], sample_rate: float, orders: Sequence[float]
) -> np.ndarray:
    """The RDP of a mechanism run on a Poisson sample (rate q) of the clients, at each
    integer order: the smaller of ``rdp(a)`` and Zhu & Wang 2019's Theorem 5 bound
    ``log[(1-q)^(a-1) (1 + (a-1) q) + C(a,2) q^2 (1-q)^(a-2) e^rdp(2)
    + 3 sum_{l=3}^a C(a,l) q^l (1-q)^(a-l) e^((l-1) rdp(l))] / (a - 1)``."""
    q = float(sample_rate)
    if not 0 < q <= 1:
        raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    out = []
    for a in _int_orders(orders):
        plain = rdp(a)
        if q == 1:
            out.append(plain)
            continue
        log_q, log_1mq = math.log(q), math.log1p(-q)
        terms = [(a - 1) * log_1mq + math.log1p((a - 1) * q)]
        terms.append(_log_comb(a, 2) + 2 * log_q + (a - 2) * log_1mq + rdp(2))
        terms += [
            math.log(3) + _log_comb(a, k) + k * log_q + (a - k) * log_1mq + (k - 1) * rdp(k)
            for k in range(3, a + 1)
        ]
        top = max(terms)
        bound = (top + math.log(sum(math.exp(t - top) for t in terms))) / (a - 1)
        out.append(min(plain, bound))
    return np.array(out, dtype=np.float64)


def rdp_distributed_discrete_gaussian(
    *,
    l2_sensitivity: float,
    local_stddev: float,
    clients: int,
    dim: int,
    orders: Sequence[float] = DISTRIBUTED_ORDERS,
    l1_sensitivity: float | None = None,
    sample_rate: float = 1.0,
) -> np.ndarray:
    """The RDP of one round of the distributed discrete Gaussian (each of ``clients`` adds
    N_Z(0, local_stddev^2) to each of the ``dim`` coordinates of its integer vector), at each
    order (see the module docstring).

    >>> float(rdp_distributed_discrete_gaussian(
    ...     l2_sensitivity=1.0, local_stddev=4.0, clients=1, dim=10, orders=[2])[0])
    0.0625
    """
    l2 = _positive("l2_sensitivity", l2_sensitivity)
    s = _positive("local_stddev", local_stddev)
    n, d = _count("clients", clients), _count("dim", dim)
    l1 = _l1(l2, l1_sensitivity, d)
    tau = 10 * sum(math.exp(-2 * (math.pi * s) ** 2 * k / (k + 1)) for k in range(1, n))
    s2, s1 = l2 / (math.sqrt(n) * s), l1 / (math.sqrt(n) * s)

    def one(a: int) -> float:
        return min(
            a / 2 * s2**2 + tau * d,
            a / 2 * (s2**2 + 2 * s1 * tau + tau**2 * d),
            a / 2 * (s2 + math.sqrt(d) * tau) ** 2,
        )

    return rdp_poisson_subsampled(one, sample_rate, orders)


def rdp_skellam(
    *,
    l2_sensitivity: float,
    variance: float,
    dim: int,
    orders: Sequence[float] = DISTRIBUTED_ORDERS,
    l1_sensitivity: float | None = None,
    sample_rate: float = 1.0,
) -> np.ndarray:
    """The RDP of one round of the Skellam mechanism: ``variance`` is that of the *summed*
    noise per coordinate (n clients each adding :func:`skellam` noise of variance v give
    n v), at each order (see the module docstring).

    >>> float(rdp_skellam(l2_sensitivity=1.0, variance=1e6, dim=1, orders=[2])[0]) > 1e-6
    True
    """
    l2 = _positive("l2_sensitivity", l2_sensitivity)
    mu = _positive("variance", variance)
    d = _count("dim", dim)
    l1 = _l1(l2, l1_sensitivity, d)

    def one(a: int) -> float:
        extra = min(((2 * a - 1) * l2**2 + 6 * l1) / (4 * mu**2), 3 * l1 / (2 * mu))
        return a * l2**2 / (2 * mu) + extra

    return rdp_poisson_subsampled(one, sample_rate, orders)
