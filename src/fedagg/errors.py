"""The one exception tree of fedagg.

Every error fedagg raises on purpose is a :class:`FedaggError`; errors from dependencies are
translated at the boundary and never reach users raw::

    FedaggError
    ├── ConfigError          (also ValueError)  an invalid hyperparameter or option
    ├── SpecError            (also ValueError)  arrays that cannot form a ParamSpec
    ├── UpdateError          (also ValueError)  one client's update was refused; state unchanged
    │   ├── SpecMismatch                        structure, shape or dtype differs from the spec
    │   ├── StaleUpdate                         trained from another model version
    │   ├── NonFiniteUpdate                     NaN or Inf values (or overflow when weighted)
    │   └── InvalidWeight                       weight is zero, negative or not finite
    ├── EmptyAggregate                          finalize() with no update folded
    │   └── TooFewUpdates                       fewer updates than a robust rule needs
    ├── StateError                              a checkpoint that cannot be read or does not fit
    └── SecAggError                             secure aggregation refused an input or a round

``UpdateError`` carries ``client_id`` and ``reason`` so that a server can answer the client and
log the refusal; its message names both.
"""

from __future__ import annotations

__all__ = [
    "ConfigError",
    "EmptyAggregate",
    "FedaggError",
    "InvalidWeight",
    "NonFiniteUpdate",
    "SecAggError",
    "SpecError",
    "SpecMismatch",
    "StaleUpdate",
    "StateError",
    "TooFewUpdates",
    "UpdateError",
]


class FedaggError(Exception):
    """Base class of every error fedagg raises on purpose."""


class ConfigError(FedaggError, ValueError):
    """An invalid hyperparameter or option, raised when the object is built."""


class SpecError(FedaggError, ValueError):
    """Arrays that cannot form a :class:`~fedagg.ParamSpec`."""


class UpdateError(FedaggError, ValueError):
    """A client's update was refused. The aggregator state is exactly as it was before."""

    def __init__(self, client_id: str, reason: str) -> None:
        self.client_id = client_id
        self.reason = reason
        who = repr(client_id) if client_id else "<anonymous>"
        super().__init__(f"update from client {who} refused: {reason}")


class SpecMismatch(UpdateError):
    """The update's structure, names, shapes or dtypes differ from the spec."""


class StaleUpdate(UpdateError):
    """The update was trained from a model version other than the one being aggregated."""


class NonFiniteUpdate(UpdateError):
    """The update holds NaN or Inf, or overflows once weighted."""


class InvalidWeight(UpdateError):
    """The update's weight is zero, negative or not finite."""


class EmptyAggregate(FedaggError):
    """``finalize`` was called on a state into which no update was folded."""


class TooFewUpdates(EmptyAggregate):
    """The round holds fewer updates than the rule needs (e.g. Krum needs n >= 2f + 3)."""


class StateError(FedaggError):
    """A saved state that cannot be read, or that does not match what it is loaded into."""


class SecAggError(FedaggError):
    """Secure aggregation refused an input (a share, a seed, a masked vector) or abandoned a
    round (too few shares or survivors, an inconsistent or forged message)."""
