"""Run configs: the schema with its defaults, their resolution, and the builders of what a
config describes (data, model, client algorithm, aggregator, strategy, policy).

    from fedagg import config
    cfg = config.load_config("run.toml")
    strategy = config.build_strategy(cfg)

Every key is defined once (type, default, doc, choices, bounds): ``DEFAULTS``, the checks of
``resolve_config`` and ``json_schema()`` come from those definitions; ``docs/config.md`` is
generated from them too (``python -m fedagg.config docs DIR``).

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
from fedagg.config._privacy import secure_noise
from fedagg.config._schema import (
    DEFAULTS,
    config_errors,
    json_schema,
    load_config,
    resolve_config,
)
from fedagg.config._toml import to_toml
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
    "config_errors",
    "json_schema",
    "load_config",
    "load_object",
    "metrics_aggregator",
    "resolve_config",
    "secure_noise",
    "to_toml",
]
