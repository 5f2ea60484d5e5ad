"""Attack objects for a simulator: what the ``f`` attackers of a round send, and the factory.

:func:`attack` builds an :class:`Attack` of one of :data:`ATTACK_KINDS`; its
:meth:`Attack.malicious` returns the ``(f, d)`` malicious rows of a round and
:meth:`Attack.craft` also the coefficient used (``z``, ``gamma``, ``sigma``), for the record.
The simulator's adversary hook (``fedagg.sim.Simulation``'s ``attack``) calls
:meth:`Attack.malicious` with the honest updates of each dispatch. The rows are the vectors of
the functions in :mod:`fedagg.attacks._vectors` and :mod:`fedagg.attacks._search`, computed
by the same helpers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
import numpy.typing as npt

from fedagg.attacks import _checks as ck
from fedagg.attacks._checks import F64, Arr, Direction, ZFormula
from fedagg.attacks._search import check_search, gamma_max, gamma_sum, pairwise_sq, perturbation
from fedagg.attacks._vectors import alie_row, resolve_z, uniform_clip
from fedagg.errors import ConfigError

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
        nn, ff = ck.check_nf(n, f)
        g, dt = ck.array("honest", honest, 2)
        o, _ = ck.array("own", own, 2)
        if o.shape != (ff, g.shape[1]):
            raise ConfigError(
                f"own must have shape (f, d) = ({ff}, {g.shape[1]}), got {np.shape(own)}"
            )
        if self.omniscient and g.shape[0] == 0:
            raise ConfigError(f"the honest set is empty: {self.kind} needs honest updates")
        with ck.quiet():
            rows, info = self._rows(g, o, nn, ff, rng)
            return Crafted(ck.out(rows, dt, self.kind), info)

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
        object.__setattr__(self, "scale", ck.positive("scale", self.scale))

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
            s = ck.real("sigma", self.sigma)
            if s < 0:
                raise ConfigError(f"sigma must be >= 0, got {self.sigma!r}")
            object.__setattr__(self, "sigma", s)

    def _rows(
        self, g: F64, own: F64, n: int, f: int, rng: np.random.Generator | None
    ) -> tuple[F64, dict[str, float]]:
        z = ck.generator(rng).standard_normal(own.shape)
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
        lo, hi = ck.check_range(self.low, self.high)
        object.__setattr__(self, "low", lo)
        object.__setattr__(self, "high", hi)

    def _rows(
        self, g: F64, own: F64, n: int, f: int, rng: np.random.Generator | None
    ) -> tuple[F64, dict[str, float]]:
        rows: F64 = self.low + (self.high - self.low) * ck.generator(rng).random(own.shape)
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
        return Crafted(uniform_clip(out.rows, self.low, self.high), out.info)


@dataclass(frozen=True, slots=True)
class ALIE(Attack):
    """All attackers send :func:`alie`'s ``mu - z * sigma``; ``info["z"]`` is the z used."""

    z: ZFormula | float = "paper"
    ddof: int = 0
    kind: ClassVar[str] = "alie"
    omniscient: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if isinstance(self.z, str):
            if self.z not in ck.Z_FORMULAS:
                raise ConfigError(f"z must be 'paper', 'code' or a number, not {self.z!r}")
        else:
            object.__setattr__(self, "z", ck.real("z", self.z))
        object.__setattr__(self, "ddof", ck.check_ddof(self.ddof))

    def _rows(
        self, g: F64, own: F64, n: int, f: int, rng: np.random.Generator | None
    ) -> tuple[F64, dict[str, float]]:
        z = resolve_z(self.z, n, f)
        ck.check_ddof(self.ddof, g.shape[0])
        return _same(alie_row(g, z, self.ddof), f), {"z": z}


@dataclass(frozen=True, slots=True)
class IPM(Attack):
    """All attackers send :func:`ipm`'s ``-eps * mu``."""

    eps: float = 0.1
    kind: ClassVar[str] = "ipm"
    omniscient: ClassVar[bool] = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps", ck.positive("eps", self.eps))

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
        g0, t = check_search(self.direction, self.gamma0, self.tol)
        object.__setattr__(self, "gamma0", g0)
        object.__setattr__(self, "tol", t)

    def _rows(
        self, g: F64, own: F64, n: int, f: int, rng: np.random.Generator | None
    ) -> tuple[F64, dict[str, float]]:
        mu = g.mean(axis=0)
        p = perturbation(g, mu, self.direction)
        search = gamma_max if self.kind == "min_max" else gamma_sum
        gamma = search(g, mu, p, pairwise_sq(g), self.gamma0, self.tol)
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
