"""The attacks that craft one vector from simple statistics: sign flipping, Gaussian noise,
uniform random vectors, ALIE and IPM, as pure functions on flat update vectors.

Each takes the attacker's own update (``sign_flip``), a generator (``gaussian``,
``random_uniform``) or the round's honest updates ``(h, d)`` (``alie``, ``ipm``) and returns
one vector of length ``d``, computed in float64 and returned in the input's dtype (``dtype``
for the random ones). The :class:`~fedagg.attacks.Attack` objects of
:mod:`fedagg.attacks._kinds` use the same helpers, so both give the same bits.
"""

from __future__ import annotations

from statistics import NormalDist
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.attacks import _checks as ck
from fedagg.attacks._checks import F64, Arr, ZFormula
from fedagg.errors import ConfigError


def sign_flip(own: npt.ArrayLike, scale: float = 1.0) -> Arr:
    """``-scale * own``: the attacker's own honest update, negated (``scale > 0``)."""
    k = ck.positive("scale", scale)
    u, dt = ck.array("own", own, 1)
    with ck.quiet():
        return ck.out(-k * u, dt, "sign_flip")


def honest_std(honest: npt.ArrayLike) -> float:
    """The standard deviation (``ddof = 0``) over ALL coordinates of ``honest``.

    For one update (1-D) this is RFA's ``np.std(u)``; for a set ``(h, d)`` it pools the
    ``h * d`` entries (so it also counts the spread between clients).
    """
    a = np.asarray(honest)
    g, _ = ck.array("honest", a, 1 if a.ndim == 1 else 2)
    if g.size == 0:
        raise ConfigError("the honest set is empty")
    return float(np.std(g))


def gaussian(
    rng: np.random.Generator, d: int, sigma: float, dtype: npt.DTypeLike = np.float32
) -> Arr:
    """A draw of ``N(0, sigma^2 I_d)`` (``sigma >= 0``), as ``sigma * rng.standard_normal(d)``."""
    n = ck.integer("d", d, 1)
    s = ck.real("sigma", sigma)
    if s < 0:
        raise ConfigError(f"sigma must be >= 0, got {sigma!r}")
    dt = ck.float_dtype(dtype)
    z = ck.generator(rng).standard_normal(n)
    with ck.quiet():
        return ck.out(s * z, dt, "gaussian")


def random_uniform(
    rng: np.random.Generator,
    d: int,
    low: float = 0.0,
    high: float = 1.0,
    dtype: npt.DTypeLike = np.float32,
) -> Arr:
    """A draw of ``U[low, high)^d``: ``low + (high - low) * rng.random(d)``.

    The Flag Aggregator's ``random`` attack (``U[0, 1)``). Values that round up to ``high``
    (or below ``low``) in ``dtype`` are moved to the nearest representable value inside.
    """
    n = ck.integer("d", d, 1)
    dt = ck.float_dtype(dtype)
    lo, hi = ck.check_range(low, high)
    u = ck.generator(rng).random(n)
    with ck.quiet():
        v = ck.out(lo + (hi - lo) * u, dt, "random_uniform")
    return uniform_clip(v, lo, hi)


def uniform_clip(v: Arr, lo: float, hi: float) -> Arr:
    """``v`` with values outside ``[lo, hi)`` after rounding to its dtype moved just inside."""
    dt = v.dtype
    top, bottom = dt.type(hi), dt.type(lo)
    if float(top) >= hi:
        top = np.nextafter(top, dt.type(-np.inf))
    if float(bottom) < lo:
        bottom = np.nextafter(bottom, dt.type(np.inf))
    if not bottom <= top:
        raise ConfigError(f"no {dt} value lies in [{lo!r}, {hi!r})")
    return np.clip(v, bottom, top)


def alie_z(n: int, f: int, formula: ZFormula = "paper") -> float:
    """ALIE's ``z_max`` for ``n`` clients of which ``f`` attack (needs ``n > 2 f``).

    With ``s = floor(n/2 + 1) - f`` supporters needed: ``"paper"`` (Baruch et al.) gives
    ``Phi^-1((n - s) / n)``, ``"code"`` (the KHJ code, ``alittle.py``) gives
    ``Phi^-1((n - f - s) / (n - f))``. ``Phi^-1`` is ``statistics.NormalDist().inv_cdf``.
    E.g. ``n = 25, f = 5``: 0.4677 (paper), 0.2533 (code).
    """
    nn, ff = ck.check_nf(n, f)
    if nn <= 2 * ff:
        raise ConfigError(f"ALIE needs n > 2 f, got n = {nn}, f = {ff}")
    if formula not in ck.Z_FORMULAS:
        raise ConfigError(f"z formula must be 'paper' or 'code', not {formula!r}")
    s = (nn + 2) // 2 - ff  # floor(n / 2 + 1) - f
    p = (nn - s) / nn if formula == "paper" else (nn - ff - s) / (nn - ff)
    if not 0.0 < p < 1.0:
        raise ConfigError(f"ALIE's z is undefined for n = {nn}, f = {ff} (Phi^-1({p:g}))")
    return NormalDist().inv_cdf(p)


def resolve_z(z: Any, n: int, f: int) -> float:
    """ALIE's ``z``: :func:`alie_z` of ``n`` and ``f`` for a formula name, else the number."""
    if isinstance(z, str):
        return alie_z(n, f, z)  # type: ignore[arg-type]  # checked inside
    return ck.real("z", z)


def alie_row(g: F64, z: float, ddof: int) -> F64:
    """``mu - z * sigma`` of the checked float64 honest rows ``g``."""
    result: F64 = g.mean(axis=0) - z * g.std(axis=0, ddof=ddof)
    return result


def alie(
    honest: npt.ArrayLike,
    n: int,
    f: int,
    z: ZFormula | float = "paper",
    *,
    ddof: int = 0,
) -> Arr:
    """ALIE: ``mu - z * sigma`` (coordinate-wise mean and std of the honest updates).

    ``z`` is ``"paper"`` or ``"code"`` (see :func:`alie_z`, whose value to record) or a
    number used as is (the Flag Aggregator repo hard-codes 0.21). ``sigma`` uses ``ddof = 0``
    (population std) by default; the KHJ code's ``torch.std`` is ``ddof = 1``.
    """
    g, dt = ck.honest(honest)
    zz = resolve_z(z, n, f)
    ddof = ck.check_ddof(ddof, g.shape[0])
    with ck.quiet():
        return ck.out(alie_row(g, zz, ddof), dt, "alie")


def ipm(honest: npt.ArrayLike, eps: float = 0.1) -> Arr:
    """Inner-product manipulation: ``-eps * mu`` (``eps > 0``; KHJ use 0.1)."""
    e = ck.positive("eps", eps)
    g, dt = ck.honest(honest)
    with ck.quiet():
        return ck.out(-e * g.mean(axis=0), dt, "ipm")
