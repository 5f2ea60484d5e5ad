"""Run configs: the schema with its defaults, their resolution, and the builders of what a
config describes (data, model, client algorithm, aggregator, strategy, policy).

    from fedagg import config
    cfg = config.load_config("run.toml")
    strategy = config.build_strategy(cfg)

This package sits below both the simulator (:mod:`fedagg.sim`) and the deployment
(:mod:`fedagg.deploy`), which read the same configs.
"""

from fedagg.config._build import (
    build_aggregator,
    build_algorithm,
    build_data,
    build_model,
    build_policy,
    build_strategy,
)
from fedagg.config._models import build_eval_data
from fedagg.config._schema import DEFAULTS, load_config, resolve_config
from fedagg.config._user import (
    Named,
    aggregate_metrics,
    client_config,
    load_object,
    metrics_aggregator,
)

__all__ = [
    "DEFAULTS",
    "Named",
    "aggregate_metrics",
    "build_aggregator",
    "build_algorithm",
    "build_data",
    "build_eval_data",
    "build_model",
    "build_policy",
    "build_strategy",
    "client_config",
    "load_config",
    "load_object",
    "metrics_aggregator",
    "resolve_config",
]
