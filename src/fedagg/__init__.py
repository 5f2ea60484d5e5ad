"""fedagg: federated learning with fast, lean, trustworthy model-update aggregation.

The curated public API. Sub-namespaces: :mod:`fedagg.aggregators`, :mod:`fedagg.transforms`,
:mod:`fedagg.optimizers`, :mod:`fedagg.strategies`, :mod:`fedagg.staleness`,
:mod:`fedagg.weighting`, :mod:`fedagg.errors`. Modules under
``fedagg.core`` are private: import from here.
"""

from fedagg import (
    aggregators,
    attacks,
    errors,
    optimizers,
    spool,
    staleness,
    strategies,
    transforms,
    weighting,
)
from fedagg._checkpoint import dumps, load, loads, save
from fedagg.core.aggregate import Aggregator
from fedagg.core.spec import ArrayTree, ParamSpec
from fedagg.core.strategy import ServerState, Strategy
from fedagg.core.update import Update
from fedagg.errors import (
    ConfigError,
    EmptyAggregate,
    FedaggError,
    InvalidWeight,
    NonFiniteUpdate,
    SpecError,
    SpecMismatch,
    StaleUpdate,
    StateError,
    TooFewUpdates,
    UpdateError,
)

__version__ = "0.1.0"

__all__ = [
    "Aggregator",
    "ArrayTree",
    "ConfigError",
    "EmptyAggregate",
    "FedaggError",
    "InvalidWeight",
    "NonFiniteUpdate",
    "ParamSpec",
    "ServerState",
    "SpecError",
    "SpecMismatch",
    "StaleUpdate",
    "StateError",
    "Strategy",
    "TooFewUpdates",
    "Update",
    "UpdateError",
    "__version__",
    "aggregators",
    "attacks",
    "dumps",
    "errors",
    "load",
    "loads",
    "optimizers",
    "save",
    "spool",
    "staleness",
    "strategies",
    "transforms",
    "weighting",
]
