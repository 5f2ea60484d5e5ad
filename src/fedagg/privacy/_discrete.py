"""Integer noise for distributed DP: the discrete Gaussian (Canonne, Kamath, Steinke 2020,
as used by Kairouz, Liu, Steinke, ICML 2021) and the Skellam distribution (Agarwal, Kairouz,
Liu, NeurIPS 2021). Each client adds such noise to its integer-encoded update before secure
aggregation, so the server sees only the noisy sum.

Both are vectorised numpy samplers drawing from a caller-supplied ``numpy.random.Generator``
(seed it per client and round for reproducible simulations; from the OS in deployment).

**Discrete Gaussian** N_Z(0, sigma**2) (P[x] proportional to exp(-x**2 / (2 sigma**2)) on the
integers), by the rejection sampler of Canonne et al. (Algorithm 3): draw
Y ~ discrete Laplace with scale ``t = floor(sigma) + 1`` (a difference of two geometric
variables), accept with probability ``exp(-(|Y| - sigma**2/t)**2 / (2 sigma**2))``; the
expected number of rounds is below 2 for every sigma. The acceptance test uses
floating-point ``exp`` and uniforms rather than the paper's exact Bernoulli(exp(-x)) on
rationals: the output distribution differs from the ideal by rounding only (relative ~1e-16
per probability), and the sampler is not constant-time.

**Skellam** of variance v: Poisson(v/2) - Poisson(v/2); sums of independent Skellam
variables are Skellam (variances add), which makes its distributed-DP analysis simple.

Their accounting is in :mod:`._distributed`.
"""

from __future__ import annotations

import math

import numpy as np

from fedagg.errors import ConfigError

__all__ = ["discrete_gaussian", "skellam"]


def _size(size: int | tuple[int, ...]) -> tuple[int, ...]:
    shape = (size,) if isinstance(size, int | np.integer) else tuple(size)
    if any(isinstance(s, bool) or not isinstance(s, int | np.integer) or s < 0 for s in shape):
        raise ConfigError(f"size must be a non-negative integer or a shape, got {size!r}")
    return tuple(int(s) for s in shape)


def discrete_gaussian(
    sigma: float, size: int | tuple[int, ...], rng: np.random.Generator
) -> np.ndarray:
    """``size`` independent draws of the discrete Gaussian N_Z(0, sigma**2), as int64.

    >>> x = discrete_gaussian(3.0, 100_000, np.random.default_rng(0))
    >>> bool(abs(x.var() - 9.0) < 0.2)
    True
    """
    if isinstance(sigma, bool) or not isinstance(sigma, int | float):
        raise ConfigError(f"sigma must be a number, got {sigma!r}")
    s = float(sigma)
    if not (math.isfinite(s) and s > 0):
        raise ConfigError(f"sigma must be a finite number > 0, got {sigma!r}")
    shape = _size(size)
    n = math.prod(shape)
    t = math.floor(s) + 1
    p = -math.expm1(-1.0 / t)  # success probability of the geometric parts
    out = np.empty(n, dtype=np.int64)
    filled = 0
    while filled < n:
        want = n - filled
        batch = int(want * 2.2) + 16  # acceptance > 1/2: usually one pass
        y = (rng.geometric(p, batch) - rng.geometric(p, batch)).astype(np.int64)
        accept = rng.random(batch) < np.exp(-((np.abs(y) - s * s / t) ** 2) / (2 * s * s))
        got = y[accept][:want]
        out[filled : filled + got.size] = got
        filled += got.size
    return out.reshape(shape)


def skellam(variance: float, size: int | tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """``size`` independent draws of the Skellam distribution of mean 0 and ``variance``,
    Poisson(variance/2) - Poisson(variance/2), as int64. Variances add: n clients each
    drawing variance v give a sum of variance n v (see :func:`rdp_skellam`).

    >>> x = skellam(9.0, 100_000, np.random.default_rng(0))
    >>> bool(abs(x.var() - 9.0) < 0.2)
    True
    """
    if isinstance(variance, bool) or not isinstance(variance, int | float):
        raise ConfigError(f"variance must be a number, got {variance!r}")
    v = float(variance)
    if not (math.isfinite(v) and v > 0):
        raise ConfigError(f"variance must be a finite number > 0, got {variance!r}")
    shape = _size(size)
    return (rng.poisson(v / 2, shape) - rng.poisson(v / 2, shape)).astype(np.int64)
