"""How far a tree's weighted mean may be from the flat fold's: :func:`tree_error_bound` and
:func:`compensated_margin`. See :mod:`fedagg.core.tree`."""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

from fedagg.core.aggregate import Accumulator
from fedagg.errors import ConfigError

__all__ = ["compensated_margin", "tree_error_bound"]

F64 = npt.NDArray[np.float64]


def _gamma(k: int, u: float) -> float:
    if k * u >= 1:
        return math.inf
    return k * u / (1 - k * u)


def _units(dtype: npt.DTypeLike) -> tuple[float, float]:
    """The unit roundoff of a float dtype and its smallest positive (subnormal) value."""
    info = np.finfo(np.dtype(dtype))
    return float(info.eps) / 2, float(info.smallest_subnormal)


def compensated_margin(abs_weighted_sum: npt.ArrayLike, total_weight: float, n: int) -> F64:
    """How far the float64 quotient of the compensated mean may be from the exact mean.

    With the ``"float64"`` accumulator, every tree (and the flat fold) keeps each product
    ``w_i s_i x_i`` exactly (value + error, Dekker's split) and each addition's error, and
    rounds only the running compensation: the quotient is within
    ``3u|q| + 5 (n**2 + 1) u**2 * A / W`` of the exact mean ``q`` (``u = 2**-53``,
    ``A = sum |w_i s_i x_i|``; see ``fedagg.aggregators.mean``). This returns the looser
    ``(4u + 7 n**2 u**2) * A / W`` per coordinate (a generous constant: it is used to
    certify, not to estimate).
    """
    a = np.asarray(abs_weighted_sum, np.float64)
    if not total_weight > 0 or n < 0:
        raise ConfigError("total_weight must be > 0 and n >= 0")
    u = 2.0**-53
    out: F64 = (4 * u + 7 * n * n * u * u) * (a / total_weight) * (1 + 1e-12)
    return out


def tree_error_bound(
    abs_weighted_sum: npt.ArrayLike,
    total_weight: float,
    n: int,
    accumulator: Accumulator = "float32",
    *,
    dtype: npt.DTypeLike = np.float32,
) -> F64:
    """Per-coordinate bound on ``|tree - flat|`` for the weighted mean (:class:`Mean`).

    ``tree`` is the finalized result of *any* merge tree (any shape, any leaf order, any leaf
    batches, e.g. :func:`reduce_tree` of any fan-out) over ``n`` updates, ``flat`` the result
    of folding them all into one state. ``abs_weighted_sum`` is ``A = sum_i |w_i s_i x_i|`` per
    coordinate (weight x scale x value), ``total_weight`` is ``W = sum_i w_i``, ``dtype`` the
    model's dtype.

    * ``"float32"`` (plain sums; for a float32 model): both results add the *same* rounded
      terms ``t_i = fl(fl(w_i s_i) x_i)``, only in another order, and any order of ``n - 1``
      additions is within ``gamma_{n-1} * sum |t_i|`` of the exact sum, with
      ``gamma_k = k u / (1 - k u)``, ``u = 2**-24``. Hence::

          |tree - flat| <= 2 gamma_{n-1} (1+u)^2 A / W          (the sums)
                           + 2u (1 + gamma_{n+1}) (1+u)^2 A / W (each result's final rounding)
                           + 2**-49 A / W + 2**-149             (float64 division, subnormals)

      (with ``u`` the model dtype's unit roundoff when the model is float64, whose plain
      accumulator is float64).
    * ``"float64"`` (Neumaier-compensated): both quotients are within
      ``D = compensated_margin(A, W, n)`` of the exact mean ``q``, so the results are *equal*
      unless a rounding boundary of the model dtype lies within ``D`` of ``q`` (then they
      differ by one unit in the last place). ``D`` is ``~4 * 2**-53 * A / W`` for any
      realistic ``n``, so this is rare, and never happens when the exact mean is itself
      representable. The bound returned is ``2 D + ulp(A / W + D)``.
    """
    a = np.asarray(abs_weighted_sum, np.float64)
    if not (math.isfinite(total_weight) and total_weight > 0):
        raise ConfigError(f"total_weight must be finite and > 0, got {total_weight!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ConfigError(f"n must be an int >= 0, got {n!r}")
    u, tiny = _units(dtype)
    scale = a / total_weight
    if accumulator == "float32":
        g = 2 * _gamma(max(0, n - 1), u) + 2 * u * (1 + _gamma(n + 1, u))
        out: F64 = (g * (1 + u) ** 2 + 2.0**-49) * scale + tiny
        return out
    if accumulator == "float64":
        d = compensated_margin(a, total_weight, n)
        out = 2 * d + 2 * u * (scale + d) * (1 + 1e-12) + tiny
        return out
    raise ConfigError(f"accumulator must be 'float32' or 'float64', not {accumulator!r}")
