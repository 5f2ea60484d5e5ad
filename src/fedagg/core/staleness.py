"""Staleness functions: how much an update trained on an old model version still counts.

``tau`` is the number of server steps taken since the model the client trained from
(``current version - update.base_version``), so a fresh update has ``tau = 0`` and every
function below gives it the weight 1.

* ``constant()``: ``s(tau) = 1``.
* ``polynomial(a)``: ``s(tau) = (1 + tau) ** -a`` (FedAsync's ``s_a``; with ``a = 0.5`` it is
  FedBuff's ``1 / sqrt(1 + tau)``).
* ``hinge(a, b)``: ``s(tau) = 1`` if ``tau <= b`` else ``1 / (a (tau - b) + 1)`` (FedAsync).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from fedagg.errors import ConfigError

__all__ = ["Staleness", "constant", "fedbuff_staleness", "hinge", "polynomial"]

Kind = Literal["constant", "polynomial", "hinge"]


@dataclass(frozen=True, slots=True)
class Staleness:
    """A staleness weight ``s(tau)`` in (0, 1]; see the module docstring for the kinds."""

    kind: Kind = "constant"
    a: float = 0.5
    b: float = 4.0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "polynomial", "hinge"):
            raise ConfigError(
                f"staleness must be 'constant', 'polynomial' or 'hinge', not {self.kind!r}"
            )
        if not (math.isfinite(self.a) and self.a >= 0):
            raise ConfigError(f"staleness parameter a must be finite and >= 0, got {self.a!r}")
        if not (math.isfinite(self.b) and self.b >= 0):
            raise ConfigError(f"staleness parameter b must be finite and >= 0, got {self.b!r}")

    def __call__(self, tau: int) -> float:
        if tau < 0:
            raise ValueError(f"staleness cannot be negative, got {tau}")
        if self.kind == "constant":
            return 1.0
        if self.kind == "polynomial":
            return float((1.0 + tau) ** -self.a)
        return 1.0 if tau <= self.b else 1.0 / (self.a * (tau - self.b) + 1.0)


def constant() -> Staleness:
    """``s(tau) = 1``: staleness is ignored."""
    return Staleness("constant")


def polynomial(a: float = 0.5) -> Staleness:
    """``s(tau) = (1 + tau) ** -a``."""
    return Staleness("polynomial", a=float(a))


def hinge(a: float = 10.0, b: float = 4.0) -> Staleness:
    """``s(tau) = 1`` up to ``b`` steps, then ``1 / (a (tau - b) + 1)``."""
    return Staleness("hinge", a=float(a), b=float(b))


def fedbuff_staleness() -> Staleness:
    """FedBuff's ``1 / sqrt(1 + tau)``."""
    return polynomial(0.5)
