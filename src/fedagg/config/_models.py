"""Your model and your code, from a config: ``[model] factory`` / ``init``, ``[client] train``
/ ``evaluate``, ``eval_data`` and ``[strategy] aggregator = "module:Class"``. Used by the
builders of :mod:`fedagg.config._build`, so the simulator and the deployment read them alike.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedagg.config._user import Named, load_object
from fedagg.core.aggregate import Aggregator
from fedagg.errors import ConfigError

__all__ = ["build_eval_data", "is_user_aggregator", "user_aggregator", "user_model", "user_path"]


def user_path(cfg: Mapping[str, Any], path: str) -> Path:
    """A file named in the config: absolute, or relative to ``code_path`` (default: the
    working directory)."""
    p = Path(path)
    return p if p.is_absolute() else Path(cfg["code_path"] or os.getcwd()) / p


def named(cfg: Mapping[str, Any], key: str) -> Named | None:
    """The function ``key`` (e.g. ``"client.train"``) names, imported lazily; None if unset."""
    section, _, name = key.partition(".")
    ref = cfg[section][name] if name else cfg[section]
    if not ref:
        return None
    fn = Named(ref, key=key, code_path=cfg["code_path"])
    fn.resolve()  # fail now, naming the key, not in the first client
    return fn


def _is_torch_module(obj: Any) -> bool:
    if not (hasattr(obj, "named_parameters") and hasattr(obj, "state_dict")):
        return False
    import torch

    return isinstance(obj, torch.nn.Module)


def _data_args(fn: Any, args: Mapping[str, Any], data: Any) -> dict[str, Any]:
    """``args``, plus the dataset's ``num_features`` and ``num_classes`` for a factory that
    names them as parameters (and does not get them from ``[model] args``)."""
    out = dict(args)
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin or a C function: no signature to read
        return out
    for name in ("num_features", "num_classes"):
        if name in params and name not in out and hasattr(data, name):
            out[name] = int(getattr(data, name))
    return out


def _factory_model(
    cfg: Mapping[str, Any], init: dict[str, Any] | None, data: Any
) -> tuple[Any, Any]:
    """The ``[model] factory``'s model, and ``init`` without the module's buffers."""
    from fedagg import models

    m = cfg["model"]
    fn = load_object(m["factory"], key="model.factory", code_path=cfg["code_path"])
    if not callable(fn):
        raise ConfigError(f"model.factory = {m['factory']!r} is not callable")
    if not isinstance(m["args"], Mapping):
        raise ConfigError("model.args must be a table of the factory's keyword arguments")
    try:
        obj = fn(**_data_args(fn, m["args"], data))
    except Exception as e:  # the user's code: say which key called it
        raise ConfigError(
            f"model.factory = {m['factory']!r} failed with model.args = {dict(m['args'])}: "
            f"{type(e).__name__}: {e}"
        ) from e
    if _is_torch_module(obj):
        if init is not None:  # a state_dict also holds buffers (BatchNorm's statistics)
            buffers = {n for n, _ in obj.named_buffers()}
            init = {k: v for k, v in init.items() if k not in buffers}
        return models.from_torch(obj), init
    if isinstance(obj, Mapping):
        if not cfg["client"]["train"]:
            raise ConfigError(
                f"model.factory = {m['factory']!r} returned a dict of arrays, which has no "
                'built-in training: name your train function in [client] train = "module:function"'
            )
        return models.from_arrays(obj), init
    raise ConfigError(
        f"model.factory = {m['factory']!r} returned a {type(obj).__name__}: expected a "
        "torch.nn.Module or a dict of arrays"
    )


def user_model(cfg: Mapping[str, Any], data: Any, builtin: Any) -> Any:
    """The ``[model]`` of a config: a factory's model, or the initial parameters of ``init``
    alone (with a ``[client] train``), or ``builtin(data)`` (the named built-in model),
    starting from ``init`` if set, evaluated by ``[client] evaluate`` if set."""
    from fedagg import models

    m, c = cfg["model"], cfg["client"]
    evaluate = named(cfg, "client.evaluate")
    init = models.read_params(user_path(cfg, m["init"])) if m["init"] else None
    if m["factory"]:
        base, init = _factory_model(cfg, init, data)
    elif init is not None and (c["train"] or data is None):
        if not c["train"]:
            raise ConfigError(
                "model.init alone (no model.factory, no dataset) is a model of arrays: it "
                'needs your train function, [client] train = "module:function"'
            )
        base, init = models.from_arrays(init), None
    elif data is None:
        raise ConfigError(
            f"model.name = {m['name']!r} is built from the dataset, but data.name = 'none': "
            "set model.factory or model.init"
        )
    else:
        base = builtin(data)
    if isinstance(base, models.ArrayModel):
        if init is not None:  # the factory's arrays give the names, shapes and dtypes
            base.params = models.check_params(base.params, init, "model.init")
        base.evaluate_fn = evaluate
        return base
    if init is None and evaluate is None:
        return base
    return models.Initialized(base, init, evaluate)


def build_eval_data(cfg: Mapping[str, Any]) -> Any:
    """``eval_data``: held-out examples (``.x``, ``.y``) from a ``.npz`` file with arrays ``x``
    and ``y``, or a ``"module:function"`` returning ``(x, y)``; None if unset."""
    from fedagg import models

    ref = cfg["eval_data"]
    if not ref:
        return None
    if ref.endswith(".npz") or ":" not in ref:
        path = user_path(cfg, ref)
        try:
            with np.load(path, allow_pickle=False) as z:
                x, y = z["x"], z["y"]
        except KeyError as e:
            raise ConfigError(f"eval_data = {ref!r} must hold arrays 'x' and 'y' ({e})") from e
        except (OSError, ValueError, EOFError) as e:
            raise ConfigError(f"eval_data = {ref!r}: cannot read it ({e})") from e
    else:
        fn = Named(ref, key="eval_data", code_path=cfg["code_path"])
        out = fn()
        if not isinstance(out, (tuple, list)) or len(out) != 2:
            raise ConfigError(f"eval_data = {ref!r} must return (x, y), got {type(out).__name__}")
        x, y = (np.asarray(a) for a in out)
    if len(x) != len(y) or not len(y):
        raise ConfigError(
            f"eval_data = {ref!r}: x has {len(x)} rows and y {len(y)}; they must be equal and > 0"
        )
    return models.EvalData(np.asarray(x), np.asarray(y))


def is_user_aggregator(name: str) -> bool:
    return ":" in name


def user_aggregator(s: Mapping[str, Any], code_path: str) -> Any:
    """``[strategy] aggregator = "module:Class"``, called with ``aggregator_args``."""
    ref = s["aggregator"]
    cls = load_object(ref, key="strategy.aggregator", code_path=code_path)
    if not callable(cls):
        raise ConfigError(f"strategy.aggregator = {ref!r} is not a class or a function")
    args = s.get("aggregator_args", {})
    if not isinstance(args, Mapping):
        raise ConfigError("strategy.aggregator_args must be a table of keyword arguments")
    try:
        agg = cls(**args)
    except Exception as e:  # the user's code: say which key made it
        raise ConfigError(
            f"strategy.aggregator = {ref!r} with aggregator_args = {dict(args)} failed: "
            f"{type(e).__name__}: {e}"
        ) from e
    if not isinstance(agg, Aggregator):
        raise ConfigError(
            f"strategy.aggregator = {ref!r} made a {type(agg).__name__}, not an aggregator "
            "(subclass fedagg.aggregators.CustomAggregator: see docs/custom-aggregators.md)"
        )
    return agg
