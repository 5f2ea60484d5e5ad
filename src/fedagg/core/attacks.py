"""Byzantine attacks: what the ``f`` malicious clients of a round send instead of their update.

Every attack works on flat update vectors (a client's delta flattened to 1-D). The omniscient
attacks see the honest updates of the round as a 2-D array ``honest`` of shape ``(h, d)``, one
row per honest client, and return ONE malicious vector of length ``d`` that all ``f`` attackers
send. Below, ``g_i`` are the rows of ``honest``, ``mu`` their coordinate-wise mean and
``sigma`` their coordinate-wise standard deviation (``ddof = 0`` unless stated).

* ``sign_flip(own, scale)``: ``-scale * own``, the attacker's own honest update negated
  ("bit flipping"; the Flag Aggregator repo's ``reverse`` is ``scale = 10``).
* ``gaussian(rng, d, sigma)``: ``N(0, sigma^2 I)``. RFA's "gauss" corruption draws each
  corrupted update with ``sigma = np.std(u)``, the std over the coordinates of that client's
  own update ``u``; :func:`honest_std` gives the std over all coordinates of the honest set.
* ``alie(honest, n, f, z)``: ``mu - z * sigma`` ("A Little Is Enough", Baruch et al. 2019) with
  ``s = floor(n/2 + 1) - f`` and ``z`` = ``Phi^-1((n - s) / n)`` (``"paper"``) or
  ``Phi^-1((n - f - s) / (n - f))`` (``"code"``, the KHJ / byzantine-robust-optimizer code).
* ``ipm(honest, eps)``: ``-eps * mu`` (inner-product manipulation, "Fall of Empires",
  Xie et al. 2019).
* ``min_max(honest, direction)``: ``m = mu - gamma * p`` with the largest ``gamma`` such that
  ``max_i |m - g_i| <= max_{i,j} |g_i - g_j|`` (Shejwalkar & Houmansadr, NDSS 2021).
* ``min_sum(honest, direction)``: the same with
  ``sum_i |m - g_i|^2 <= min_i sum_j |g_i - g_j|^2``.
* ``random_uniform(rng, d, low, high)``: ``U[low, high)^d`` (the Flag Aggregator's ``random``).
* ``flip_labels`` / :class:`LabelFlip`: data poisoning, ``y -> L - 1 - y``; the client then
  trains honestly on the flipped labels.

All arithmetic is in float64; vectors come back in the dtype of the honest updates (of ``own``
for :func:`sign_flip`, ``dtype`` for the random ones). Inputs are never modified. Bad
parameters, empty or non-finite inputs and mismatched shapes raise
:class:`~fedagg.errors.ConfigError`, as does a result that overflows its dtype.

For a simulator, :func:`attack` builds an :class:`Attack` object whose
:meth:`Attack.malicious` returns the ``f`` malicious rows of a round, and :meth:`Attack.craft`
also the coefficient used (``z``, ``gamma``, ``sigma``) so that it can be recorded.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any, ClassVar, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

from fedagg.errors import ConfigError

__all__ = [
    "ALIE",
    "ATTACK_KINDS",
    "IPM",
    "Attack",
    "Crafted",
    "Gaussian",
    "LabelFlip",
    "MinMax",
    "MinSum",
    "NoAttack",
    "RandomUniform",
    "SignFlip",
    "alie",
    "alie_z",
    "attack",
    "flip_labels",
    "gaussian",
    "honest_std",
    "ipm",
    "min_max",
    "min_max_gamma",
    "min_sum",
    "min_sum_gamma",
    "random_uniform",
    "sign_flip",
]

Arr: TypeAlias = npt.NDArray[Any]
F64: TypeAlias = npt.NDArray[np.float64]
Direction: TypeAlias = Literal["unit_vec", "sign", "std"]
ZFormula: TypeAlias = Literal["paper", "code"]

DIRECTIONS: tuple[str, ...] = ("unit_vec", "sign", "std")
Z_FORMULAS: tuple[str, ...] = ("paper", "code")

#: The kinds :func:`attack` knows (``"reverse"`` is ``sign_flip`` with ``scale = 10``).
ATTACK_KINDS: tuple[str, ...] = (
    "none",
    "sign_flip",
    "reverse",
    "gaussian",
    "alie",
    "ipm",
    "min_max",
    "min_sum",
    "random",
)


# --------------------------------------------------------------------------------------------
# Checks and conversions
# --------------------------------------------------------------------------------------------


def _real(name: str, value: Any) -> float:
    """``value`` as a finite float; refuses bools, strings and non-finite numbers."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return v


def _positive(name: str, value: Any) -> float:
    v = _real(name, value)
    if v <= 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")
    return v


def _int(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an int, got {value!r}")
    v = int(value)
    if v < low:
        raise ConfigError(f"{name} must be >= {low}, got {v}")
    return v


def _float_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ConfigError(f"dtype must be a float dtype, got {dtype!r}") from e
    if dt.kind != "f":
        raise ConfigError(f"dtype must be a float dtype, got {dt}")
    return dt


def _array(name: str, a: Any, ndim: int) -> tuple[F64, np.dtype[Any]]:
    """``a`` as a float64 copy of ``ndim`` dimensions (and its own dtype), checked finite."""
    arr = np.asarray(a)
    if arr.ndim != ndim:
        shape = "(d,)" if ndim == 1 else "(rows, d)"
        raise ConfigError(f"{name} must be a {ndim}-D array {shape}, got shape {arr.shape}")
    if arr.dtype.kind != "f":
        raise ConfigError(f"{name} must hold floats, got dtype {arr.dtype}")
    if arr.shape[-1] == 0:
        raise ConfigError(f"{name} has no coordinates (d = 0)")
    out = arr.astype(np.float64)  # always a copy: the input is never touched
    if not np.isfinite(out).all():
        raise ConfigError(f"{name} holds NaN or Inf values")
    return out, arr.dtype


def _honest(honest: Any) -> tuple[F64, np.dtype[Any]]:
    g, dt = _array("honest", honest, 2)
    if g.shape[0] == 0:
        raise ConfigError("the honest set is empty: the attack needs at least one honest update")
    return g, dt


def _out(x: F64, dtype: np.dtype[Any], what: str) -> Arr:
    """``x`` cast to ``dtype``; refuses a result that is not finite there."""
    with np.errstate(over="ignore", invalid="ignore"):
        y = x.astype(dtype)
    if not np.isfinite(y).all():
        raise ConfigError(f"{what} is not finite in {dtype} (overflow)")
    return y


def _quiet() -> Any:
    """Silence float64 overflow warnings; :func:`_out` refuses non-finite results instead."""
    return np.errstate(over="ignore", invalid="ignore")


def _pairwise_sq(g: F64) -> F64:
    """``D[i, j] = |g_i - g_j|^2``, one row at a time (memory O(h d), exact differences)."""
    h = g.shape[0]
    d2 = np.empty((h, h), dtype=np.float64)
    with _quiet():
        for i in range(h):
            diff = g - g[i]
            d2[i] = np.einsum("ij,ij->i", diff, diff)
    if not np.isfinite(d2).all():
        raise ConfigError("honest updates too large: their squared distances overflow float64")
    return d2


# --------------------------------------------------------------------------------------------
# The attacks as functions
# --------------------------------------------------------------------------------------------


def sign_flip(own: npt.ArrayLike, scale: float = 1.0) -> Arr:
    """``-scale * own``: the attacker's own honest update, negated (``scale > 0``)."""
    k = _positive("scale", scale)
    u, dt = _array("own", own, 1)
    with _quiet():
        return _out(-k * u, dt, "sign_flip")


def honest_std(honest: npt.ArrayLike) -> float:
    """The standard deviation (``ddof = 0``) over ALL coordinates of ``honest``.

    For one update (1-D) this is RFA's ``np.std(u)``; for a set ``(h, d)`` it pools the
    ``h * d`` entries (so it also counts the spread between clients).
    """
    a = np.asarray(honest)
    g, _ = _array("honest", a, 1 if a.ndim == 1 else 2)
    if g.size == 0:
        raise ConfigError("the honest set is empty")
    return float(np.std(g))


def gaussian(
    rng: np.random.Generator, d: int, sigma: float, dtype: npt.DTypeLike = np.float32
) -> Arr:
    """A draw of ``N(0, sigma^2 I_d)`` (``sigma >= 0``), as ``sigma * rng.standard_normal(d)``."""
    n = _int("d", d, 1)
    s = _real("sigma", sigma)
    if s < 0:
        raise ConfigError(f"sigma must be >= 0, got {sigma!r}")
    dt = _float_dtype(dtype)
    z = _generator(rng).standard_normal(n)
    with _quiet():
        return _out(s * z, dt, "gaussian")


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
    n = _int("d", d, 1)
    dt = _float_dtype(dtype)
    lo, hi = _check_range(low, high)
    u = _generator(rng).random(n)
    with _quiet():
        v = _out(lo + (hi - lo) * u, dt, "random_uniform")
    return _uniform_clip(v, lo, hi)


def _uniform_clip(v: Arr, lo: float, hi: float) -> Arr:
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


def _check_range(low: float, high: float) -> tuple[float, float]:
    lo, hi = _real("low", low), _real("high", high)
    if not lo < hi:
        raise ConfigError(f"need low < high, got low={low!r}, high={high!r}")
    return lo, hi


def _generator(rng: Any) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(f"rng must be a numpy Generator, got {type(rng).__name__}")
    return rng


def _check_nf(n: Any, f: Any) -> tuple[int, int]:
    nn = _int("n", n, 1)
    ff = _int("f", f, 0)
    if ff > nn:
        raise ConfigError(f"f = {ff} attackers cannot exceed n = {nn} clients")
    return nn, ff


def alie_z(n: int, f: int, formula: ZFormula = "paper") -> float:
    """ALIE's ``z_max`` for ``n`` clients of which ``f`` attack (needs ``n > 2 f``).

    With ``s = floor(n/2 + 1) - f`` supporters needed: ``"paper"`` (Baruch et al.) gives
    ``Phi^-1((n - s) / n)``, ``"code"`` (the KHJ code, ``alittle.py``) gives
    ``Phi^-1((n - f - s) / (n - f))``. ``Phi^-1`` is ``statistics.NormalDist().inv_cdf``.
    E.g. ``n = 25, f = 5``: 0.4677 (paper), 0.2533 (code).
    """
    nn, ff = _check_nf(n, f)
    if nn <= 2 * ff:
        raise ConfigError(f"ALIE needs n > 2 f, got n = {nn}, f = {ff}")
    if formula not in Z_FORMULAS:
        raise ConfigError(f"z formula must be 'paper' or 'code', not {formula!r}")
    s = (nn + 2) // 2 - ff  # floor(n / 2 + 1) - f
    p = (nn - s) / nn if formula == "paper" else (nn - ff - s) / (nn - ff)
    if not 0.0 < p < 1.0:
        raise ConfigError(f"ALIE's z is undefined for n = {nn}, f = {ff} (Phi^-1({p:g}))")
    return NormalDist().inv_cdf(p)


def _resolve_z(z: Any, n: int, f: int) -> float:
    if isinstance(z, str):
        return alie_z(n, f, z)  # type: ignore[arg-type]  # checked inside
    return _real("z", z)


def _check_ddof(ddof: Any, h: int | None = None) -> int:
    if isinstance(ddof, bool) or ddof not in (0, 1):
        raise ConfigError(f"ddof must be 0 or 1, got {ddof!r}")
    if h is not None and h <= ddof:
        raise ConfigError(f"a std with ddof = {ddof} needs more than {ddof} honest update(s)")
    return int(ddof)


def _alie(g: F64, z: float, ddof: int) -> F64:
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
    g, dt = _honest(honest)
    zz = _resolve_z(z, n, f)
    ddof = _check_ddof(ddof, g.shape[0])
    with _quiet():
        return _out(_alie(g, zz, ddof), dt, "alie")


def ipm(honest: npt.ArrayLike, eps: float = 0.1) -> Arr:
    """Inner-product manipulation: ``-eps * mu`` (``eps > 0``; KHJ use 0.1)."""
    e = _positive("eps", eps)
    g, dt = _honest(honest)
    with _quiet():
        return _out(-e * g.mean(axis=0), dt, "ipm")


def _direction(g: F64, mu: F64, direction: str) -> F64:
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


def _search(ok: Callable[[float], bool], gamma0: float, tol: float) -> float:
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


def _check_search(direction: str, gamma0: float, tol: float) -> tuple[float, float]:
    if direction not in DIRECTIONS:
        raise ConfigError(f"direction must be 'unit_vec', 'sign' or 'std', not {direction!r}")
    g0, t = _positive("gamma0", gamma0), _positive("tol", tol)
    if t >= g0:
        raise ConfigError(f"tol must be < gamma0, got tol={tol!r}, gamma0={gamma0!r}")
    return g0, t


def _prepare(
    honest: npt.ArrayLike, direction: str, gamma0: float, tol: float
) -> tuple[F64, np.dtype[Any], F64, F64, F64, float, float]:
    g0, t = _check_search(direction, gamma0, tol)
    g, dt = _honest(honest)
    mu = g.mean(axis=0)
    p = _direction(g, mu, direction)
    return g, dt, mu, p, _pairwise_sq(g), g0, t


def _sq_dists(g: F64, m: F64) -> F64:
    diff = g - m
    out: F64 = np.einsum("ij,ij->i", diff, diff)
    return out


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


def _min_max_gamma(g: F64, mu: F64, p: F64, d2: F64, gamma0: float, tol: float) -> float:
    if not p.any():
        return 0.0  # no direction to move in: the attack is the mean itself
    bound = float(d2.max())
    at = _dists_along(g, mu, p)
    with _quiet():
        return _search(lambda gm: bool(at(gm).max() <= bound), gamma0, tol)


def _min_sum_gamma(g: F64, mu: F64, p: F64, d2: F64, gamma0: float, tol: float) -> float:
    if not p.any():
        return 0.0
    bound = float(d2.sum(axis=1).min())
    at = _dists_along(g, mu, p)
    with _quiet():
        return _search(lambda gm: bool(at(gm).sum() <= bound), gamma0, tol)


def min_max_gamma(
    honest: npt.ArrayLike,
    direction: Direction = "unit_vec",
    gamma0: float = 50.0,
    tol: float = 1e-5,
) -> float:
    """The ``gamma`` :func:`min_max` uses: the largest ``gamma`` found by the reference search
    (see :func:`min_max`) with ``max_i |mu - gamma p - g_i| <= max_{i,j} |g_i - g_j|``."""
    g, _, mu, p, d2, g0, t = _prepare(honest, direction, gamma0, tol)
    return _min_max_gamma(g, mu, p, d2, g0, t)


def min_sum_gamma(
    honest: npt.ArrayLike,
    direction: Direction = "unit_vec",
    gamma0: float = 50.0,
    tol: float = 1e-5,
) -> float:
    """The ``gamma`` :func:`min_sum` uses: the largest ``gamma`` found by the reference search
    with ``sum_i |mu - gamma p - g_i|^2 <= min_i sum_j |g_i - g_j|^2``."""
    g, _, mu, p, d2, g0, t = _prepare(honest, direction, gamma0, tol)
    return _min_sum_gamma(g, mu, p, d2, g0, t)


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
    gamma = _min_max_gamma(g, mu, p, d2, g0, t)
    with _quiet():
        return _out(mu - gamma * p, dt, "min_max")


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
    gamma = _min_sum_gamma(g, mu, p, d2, g0, t)
    with _quiet():
        return _out(mu - gamma * p, dt, "min_sum")


# --------------------------------------------------------------------------------------------
# Label flipping (data poisoning)
# --------------------------------------------------------------------------------------------


def flip_labels(y: npt.ArrayLike, num_classes: int) -> Arr:
    """``L - 1 - y`` for labels ``y`` in ``[0, L)``, ``L = num_classes`` (a new array, same
    dtype): ``9 - y`` for 10 classes."""
    big_l = _int("num_classes", num_classes, 2)
    a = np.asarray(y)
    if a.dtype.kind not in "iu":
        raise ConfigError(f"labels must be integers, got dtype {a.dtype}")
    if a.size and (int(a.min()) < 0 or int(a.max()) >= big_l):
        raise ConfigError(f"labels must lie in [0, {big_l}), got [{int(a.min())}, {int(a.max())}]")
    return (big_l - 1 - a.astype(np.int64)).astype(a.dtype)


@dataclass(frozen=True, slots=True)
class _FlippedExamples:
    x: Arr
    y: Arr
    num_classes: int


def _flipped(data: Any, num_classes: int) -> Any:
    """A copy of ``data`` (anything with ``.x`` and ``.y``) with flipped labels."""
    try:
        x, y = data.x, data.y
    except AttributeError as e:
        raise ConfigError(f"client data needs attributes x and y: {e}") from e
    flipped = flip_labels(y, num_classes)
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return dataclasses.replace(data, y=flipped)
    return _FlippedExamples(x, flipped, int(getattr(data, "num_classes", num_classes)))


@dataclass(frozen=True, slots=True)
class LabelFlip:
    """A client algorithm that trains ``inner`` on its data with labels ``y -> L - 1 - y``.

    ``inner`` is any client algorithm (``train`` / ``train_many``, see
    ``fedagg.clients.ClientAlgorithm``); examples are copied with flipped labels
    (``dataclasses.replace`` for dataclasses, else a small ``(x, y, num_classes)`` record) and
    everything else is passed through. ``name``, ``epochs`` and ``batch_size`` are the inner
    algorithm's.
    """

    inner: Any
    num_classes: int

    def __post_init__(self) -> None:
        for meth in ("train", "train_many"):
            if not callable(getattr(self.inner, meth, None)):
                raise ConfigError(f"LabelFlip needs a client algorithm with {meth}()")
        object.__setattr__(self, "num_classes", _int("num_classes", self.num_classes, 2))

    @property
    def name(self) -> str:
        return str(self.inner.name)

    @property
    def epochs(self) -> int:
        return int(self.inner.epochs)

    @property
    def batch_size(self) -> int:
        return int(self.inner.batch_size)

    def train(
        self,
        model: Any,
        params: Any,
        data: Any,
        rng: np.random.Generator,
        *,
        epochs: int | None = None,
        state: Any = None,
        server_state: Any = None,
    ) -> tuple[Any, Any]:
        """``inner.train`` on ``data`` with flipped labels."""
        out: tuple[Any, Any] = self.inner.train(
            model,
            params,
            _flipped(data, self.num_classes),
            rng,
            epochs=epochs,
            state=state,
            server_state=server_state,
        )
        return out

    def train_many(
        self,
        model: Any,
        params: Any,
        datas: Any,
        rngs: Any,
        *,
        epochs: Any = None,
        states: Any = None,
        server_state: Any = None,
    ) -> list[tuple[Any, Any]]:
        """``inner.train_many`` on every client's data with flipped labels."""
        out: list[tuple[Any, Any]] = self.inner.train_many(
            model,
            params,
            [_flipped(d, self.num_classes) for d in datas],
            rngs,
            epochs=epochs,
            states=states,
            server_state=server_state,
        )
        return out


# --------------------------------------------------------------------------------------------
# Attack objects for a simulator
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Crafted:
    """The ``f`` malicious rows of a round, and the coefficient(s) used (e.g. ``z``,
    ``gamma``, ``sigma``) for the record."""

    rows: Arr
    info: dict[str, float] = field(default_factory=dict)


class Attack:
    """What the ``f`` attackers of a round send; build one with :func:`attack`.

    :meth:`malicious` takes the round's honest updates ``honest`` (``(h, d)``), the attackers'
    own honest updates ``own`` (``(f, d)``), the numbers ``n`` of clients and ``f`` of
    attackers and a generator (for the random kinds), and returns the ``(f, d)`` malicious
    rows in ``honest``'s dtype. ``omniscient`` attacks need ``h >= 1`` and send identical
    rows; the others work per attacker (and accept ``h = 0``). ``n`` only enters ALIE's ``z``
    and is not checked against ``h + f`` (an attacker may know only some honest updates).
    """

    __slots__ = ()
    kind: ClassVar[str] = ""
    omniscient: ClassVar[bool] = False

    def malicious(
        self,
        honest: npt.ArrayLike,
        own: npt.ArrayLike,
        n: int,
        f: int,
        rng: np.random.Generator | None = None,
    ) -> Arr:
        """The ``(f, d)`` malicious rows (see the class docstring)."""
        return self.craft(honest, own, n, f, rng).rows

    def craft(
        self,
        honest: npt.ArrayLike,
        own: npt.ArrayLike,
        n: int,
        f: int,
        rng: np.random.Generator | None = None,
    ) -> Crafted:
        """:meth:`malicious`'s rows with the coefficients used."""
        nn, ff = _check_nf(n, f)
        g, dt = _array("honest", honest, 2)
        o, _ = _array("own", own, 2)
        if o.shape != (ff, g.shape[1]):
            raise ConfigError(
                f"own must have shape (f, d) = ({ff}, {g.shape[1]}), got {np.shape(own)}"
            )
        if self.omniscient and g.shape[0] == 0:
            raise ConfigError(f"the honest set is empty: {self.kind} needs honest updates")
        with _quiet():
            rows, info = self._rows(g, o, nn, ff, rng)
            return Crafted(_out(rows, dt, self.kind), info)

    def _rows(
        self, g: F64, own: F64, n: int, f: int, rng: np.random.Generator | None
    ) -> tuple[F64, dict[str, float]]:
        raise NotImplementedError


def _same(v: F64, f: int) -> F64:
    return np.tile(v, (f, 1))


@dataclass(frozen=True, slots=True)
class NoAttack(Attack):
    """The attackers send their own honest updates."""

    kind: ClassVar[str] = "none"

    def _rows(
        self, g: F64, own: F64, n: int, f: int, rng: np.random.Generator | None
    ) -> tuple[F64, dict[str, float]]:
        return own, {}


@dataclass(frozen=True, slots=True)
class SignFlip(Attack):
    """Each attacker sends ``-scale * own_i`` (:func:`sign_flip`)."""

    scale: float = 1.0
    kind: ClassVar[str] = "sign_flip"

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _positive("scale", self.scale))

    def _rows(
        self, g: F64, own: F64, n: int, f: int, rng: np.random.Generator | None
    ) -> tuple[F64, dict[str, float]]:
        return -self.scale * own, {"scale": self.scale}


@dataclass(frozen=True, slots=True)
class Gaussian(Attack):
    """Each attacker sends its own draw of ``N(0, sigma^2 I)`` (:func:`gaussian`).

    ``sigma`` is a number, ``"own"`` (per attacker, ``np.std`` of its own honest update, as
    RFA's "gauss") or ``"honest"`` (:func:`honest_std` of the round's honest updates). The
    rows are ``sigma * rng.standard_normal((f, d))``.
    """

    sigma: float | Literal["own", "honest"] = "own"
    kind: ClassVar[str] = "gaussian"

    def __post_init__(self) -> None:
        if isinstance(self.sigma, str):
            if self.sigma not in ("own", "honest"):
                raise ConfigError(f"sigma must be a number, 'own' or 'honest', not {self.sigma!r}")
        else:
            s = _real("sigma", self.sigma)
            if s < 0:
                raise ConfigError(f"sigma must be >= 0, got {self.sigma!r}")
            object.__setattr__(self, "sigma", s)

    def _rows(
        self, g: F64, own: F64, n: int, f: int, rng: np.random.Generator | None
    ) -> tuple[F64, dict[str, float]]:
        z = _generator(rng).standard_normal(own.shape)
        if self.sigma == "own":
            rows: F64 = own.std(axis=1, keepdims=True) * z
            return rows, {}
        if self.sigma == "honest":
            if g.shape[0] == 0:
                raise ConfigError("sigma='honest' needs at least one honest update")
            s = float(np.std(g))
        else:
            s = float(self.sigma)
        return s * z, {"sigma": s}


@dataclass(frozen=True, slots=True)
class RandomUniform(Attack):
    """Each attacker sends its own draw of ``U[low, high)^d`` (:func:`random_uniform`)."""

    low: float = 0.0
    high: float = 1.0
    kind: ClassVar[str] = "random"

    def __post_init__(self) -> None:
        lo, hi = _check_range(self.low, self.high)
        object.__setattr__(self, "low", lo)
        object.__setattr__(self, "high", hi)

    def _rows(
        self, g: F64, own: F64, n: int, f: int, rng: np.random.Generator | None
    ) -> tuple[F64, dict[str, float]]:
        rows: F64 = self.low + (self.high - self.low) * _generator(rng).random(own.shape)
        return rows, {}

    def craft(
        self,
        honest: npt.ArrayLike,
        own: npt.ArrayLike,
        n: int,
        f: int,
        rng: np.random.Generator | None = None,
    ) -> Crafted:
        out = Attack.craft(self, honest, own, n, f, rng)
        return Crafted(_uniform_clip(out.rows, self.low, self.high), out.info)


@dataclass(frozen=True, slots=True)
class ALIE(Attack):
    """All attackers send :func:`alie`'s ``mu - z * sigma``; ``info["z"]`` is the z used."""

    z: ZFormula | float = "paper"
    ddof: int = 0
    kind: ClassVar[str] = "alie"
    omniscient: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.z, str):
            if self.z not in Z_FORMULAS:
                raise ConfigError(f"z must be 'paper', 'code' or a number, not {self.z!r}")
        else:
            object.__setattr__(self, "z", _real("z", self.z))
        object.__setattr__(self, "ddof", _check_ddof(self.ddof))

    def _rows(
        self, g: F64, own: F64, n: int, f: int, rng: np.random.Generator | None
    ) -> tuple[F64, dict[str, float]]:
        z = _resolve_z(self.z, n, f)
        _check_ddof(self.ddof, g.shape[0])
        return _same(_alie(g, z, self.ddof), f), {"z": z}


@dataclass(frozen=True, slots=True)
class IPM(Attack):
    """All attackers send :func:`ipm`'s ``-eps * mu``."""

    eps: float = 0.1
    kind: ClassVar[str] = "ipm"
    omniscient: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", _positive("eps", self.eps))

    def _rows(
        self, g: F64, own: F64, n: int, f: int, rng: np.random.Generator | None
    ) -> tuple[F64, dict[str, float]]:
        return _same(-self.eps * g.mean(axis=0), f), {"eps": self.eps}


@dataclass(frozen=True, slots=True)
class _Search(Attack):
    """``mu - gamma p`` with the largest ``gamma`` the constraint of ``kind`` allows."""

    direction: Direction = "unit_vec"
    gamma0: float = 50.0
    tol: float = 1e-5
    omniscient: ClassVar[bool] = True

    def __post_init__(self) -> None:
        g0, t = _check_search(self.direction, self.gamma0, self.tol)
        object.__setattr__(self, "gamma0", g0)
        object.__setattr__(self, "tol", t)

    def _rows(
        self, g: F64, own: F64, n: int, f: int, rng: np.random.Generator | None
    ) -> tuple[F64, dict[str, float]]:
        mu = g.mean(axis=0)
        p = _direction(g, mu, self.direction)
        search = _min_max_gamma if self.kind == "min_max" else _min_sum_gamma
        gamma = search(g, mu, p, _pairwise_sq(g), self.gamma0, self.tol)
        return _same(mu - gamma * p, f), {"gamma": gamma}


@dataclass(frozen=True, slots=True)
class MinMax(_Search):
    """All attackers send :func:`min_max`'s vector; ``info["gamma"]`` is the gamma used."""

    kind: ClassVar[str] = "min_max"


@dataclass(frozen=True, slots=True)
class MinSum(_Search):
    """All attackers send :func:`min_sum`'s vector; ``info["gamma"]`` is the gamma used."""

    kind: ClassVar[str] = "min_sum"


_KINDS: dict[str, type[Attack]] = {
    "none": NoAttack,
    "sign_flip": SignFlip,
    "reverse": SignFlip,
    "gaussian": Gaussian,
    "alie": ALIE,
    "ipm": IPM,
    "min_max": MinMax,
    "min_sum": MinSum,
    "random": RandomUniform,
}


def attack(kind: str, **params: Any) -> Attack:
    """The :class:`Attack` of ``kind`` (one of :data:`ATTACK_KINDS`) with ``params``.

    ``attack("alie", z="code")``, ``attack("min_max", direction="sign")``,
    ``attack("reverse")`` (= ``sign_flip`` with ``scale = 10``, the Flag Aggregator repo's).
    Unknown kinds or parameters raise :class:`~fedagg.errors.ConfigError`.
    """
    cls = _KINDS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ConfigError(f"unknown attack {kind!r}; expected one of {list(ATTACK_KINDS)}")
    if kind == "reverse":
        params = {"scale": 10.0, **params}
    try:
        return cls(**params)
    except TypeError as e:
        raise ConfigError(f"bad parameters for attack {kind!r}: {e}") from e
