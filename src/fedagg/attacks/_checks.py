"""The attacks' argument checks and conversions, shared by the functions and the classes.

Every check raises :class:`~fedagg.errors.ConfigError`. Arrays come in as float64 copies
(the input is never touched) and results go out through :func:`out`, which refuses a value
that is not finite in the caller's dtype.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Literal, TypeAlias

import numpy as np
import numpy.typing as npt

from fedagg.errors import ConfigError

Arr: TypeAlias = npt.NDArray[Any]
F64: TypeAlias = npt.NDArray[np.float64]
Direction: TypeAlias = Literal["unit_vec", "sign", "std"]
ZFormula: TypeAlias = Literal["paper", "code"]

DIRECTIONS: tuple[str, ...] = ("unit_vec", "sign", "std")
Z_FORMULAS: tuple[str, ...] = ("paper", "code")


def real(name: str, value: Any) -> float:
    """``value`` as a finite float; refuses bools, strings and non-finite numbers."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name} must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return v


def positive(name: str, value: Any) -> float:
    v = real(name, value)
    if v <= 0:
        raise ConfigError(f"{name} must be > 0, got {value!r}")
    return v


def integer(name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{name} must be an int, got {value!r}")
    v = int(value)
    if v < low:
        raise ConfigError(f"{name} must be >= {low}, got {v}")
    return v


def float_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ConfigError(f"dtype must be a float dtype, got {dtype!r}") from e
    if dt.kind != "f":
        raise ConfigError(f"dtype must be a float dtype, got {dt}")
    return dt


def array(name: str, a: Any, ndim: int) -> tuple[F64, np.dtype[Any]]:
    """``a`` as a float64 copy of ``ndim`` dimensions (and its own dtype), checked finite."""
    arr = np.asarray(a)
    if arr.ndim != ndim:
        shape = "(d,)" if ndim == 1 else "(rows, d)"
        raise ConfigError(f"{name} must be a {ndim}-D array {shape}, got shape {arr.shape}")
    if arr.dtype.kind != "f":
        raise ConfigError(f"{name} must hold floats, got dtype {arr.dtype}")
    if arr.shape[-1] == 0:
        raise ConfigError(f"{name} has no coordinates (d = 0)")
    copy = arr.astype(np.float64)  # always a copy: the input is never touched
    if not np.isfinite(copy).all():
        raise ConfigError(f"{name} holds NaN or Inf values")
    return copy, arr.dtype


def honest(rows: Any) -> tuple[F64, np.dtype[Any]]:
    """The honest updates ``(h, d)`` as :func:`array` gives them; refuses ``h = 0``."""
    g, dt = array("honest", rows, 2)
    if g.shape[0] == 0:
        raise ConfigError("the honest set is empty: the attack needs at least one honest update")
    return g, dt


def out(x: F64, dtype: np.dtype[Any], what: str) -> Arr:
    """``x`` cast to ``dtype``; refuses a result that is not finite there."""
    with np.errstate(over="ignore", invalid="ignore"):
        y = x.astype(dtype)
    if not np.isfinite(y).all():
        raise ConfigError(f"{what} is not finite in {dtype} (overflow)")
    return y


def quiet() -> Any:
    """Silence float64 overflow warnings; :func:`out` refuses non-finite results instead."""
    return np.errstate(over="ignore", invalid="ignore")


def generator(rng: Any) -> np.random.Generator:
    if not isinstance(rng, np.random.Generator):
        raise ConfigError(f"rng must be a numpy Generator, got {type(rng).__name__}")
    return rng


def check_nf(n: Any, f: Any) -> tuple[int, int]:
    nn = integer("n", n, 1)
    ff = integer("f", f, 0)
    if ff > nn:
        raise ConfigError(f"f = {ff} attackers cannot exceed n = {nn} clients")
    return nn, ff


def check_range(low: float, high: float) -> tuple[float, float]:
    lo, hi = real("low", low), real("high", high)
    if not lo < hi:
        raise ConfigError(f"need low < high, got low={low!r}, high={high!r}")
    return lo, hi


def check_ddof(ddof: Any, h: int | None = None) -> int:
    if isinstance(ddof, bool) or ddof not in (0, 1):
        raise ConfigError(f"ddof must be 0 or 1, got {ddof!r}")
    if h is not None and h <= ddof:
        raise ConfigError(f"a std with ddof = {ddof} needs more than {ddof} honest update(s)")
    return int(ddof)
