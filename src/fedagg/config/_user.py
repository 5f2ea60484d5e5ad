"""Your code, named in a config: ``"module:function"`` references, the per-task client config
and the aggregation of client metrics. Shared by the simulator and the deployment so that a
reference means the same thing in both.
"""

from __future__ import annotations

import importlib
import math
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedagg.errors import ConfigError

__all__ = [
    "Named",
    "aggregate_metrics",
    "client_config",
    "load_object",
    "metrics_aggregator",
]

_TYPES = (bool, int, float, str)


def load_object(ref: str, *, key: str, code_path: str | os.PathLike[str] = "") -> Any:
    """The object ``ref = "package.module:name"`` names (``name`` may be dotted), imported with
    ``code_path`` (default: the working directory) searched first. Errors are
    :class:`ConfigError` naming the config ``key``."""
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise ConfigError(f"{key} must be 'module:name' (e.g. 'mycode:train'), got {ref!r}")
    mod_name, _, attr = ref.partition(":")
    if not mod_name or not attr or not all(p.isidentifier() for p in attr.split(".")):
        raise ConfigError(f"{key} must be 'module:name' (e.g. 'mycode:train'), got {ref!r}")
    where = str(Path(code_path or os.getcwd()).resolve())
    if where not in sys.path:
        sys.path.insert(0, where)
    try:
        obj: Any = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"{key} = {ref!r}: cannot import {mod_name!r} ({e}); searched {where} "
                          "first (set code_path)") from e  # fmt: skip
    except Exception as e:  # the module itself failed: say which key loaded it
        raise ConfigError(f"{key} = {ref!r}: importing {mod_name!r} failed: "
                          f"{type(e).__name__}: {e}") from e  # fmt: skip
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{key} = {ref!r}: {mod_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


class Named:
    """A function named by reference (``"module:function"``), imported on first call: it
    pickles as its name, so worker processes import it themselves (from ``code_path``)."""

    def __init__(self, ref: str, *, key: str, code_path: str | os.PathLike[str] = "") -> None:
        self.ref = ref
        self.key = key
        self.code_path = str(code_path)
        self._fn: Callable[..., Any] | None = None

    @property
    def __name__(self) -> str:  # what run tables call it
        return self.ref.partition(":")[2]

    def resolve(self) -> Callable[..., Any]:
        """The function (imported now if not yet); ConfigError unless it is callable."""
        if self._fn is None:
            fn = load_object(self.ref, key=self.key, code_path=self.code_path)
            if not callable(fn):
                raise ConfigError(f"{self.key} = {self.ref!r} is not callable")
            self._fn = fn
        return self._fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.resolve()(*args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {"ref": self.ref, "key": self.key, "code_path": self.code_path, "_fn": None}

    def __repr__(self) -> str:
        return f"Named({self.ref!r})"


def client_config(cfg: Mapping[str, Any], version: int) -> dict[str, Any]:
    """The per-task client config for a task training from model ``version``: ``[client]
    config``, updated by ``[client] schedule(version, config)`` if one is named. Values must
    be booleans, numbers or strings (they travel with each task)."""
    c = cfg["client"]
    base = dict(c["config"])
    if c["schedule"]:
        fn = load_object(c["schedule"], key="client.schedule", code_path=cfg["code_path"])
        out = fn(int(version), dict(base))
        if not isinstance(out, Mapping):
            raise ConfigError(f"client.schedule must return a dict, got {type(out).__name__}")
        base.update(out)
    for k, v in base.items():
        if not isinstance(k, str) or not isinstance(v, _TYPES):
            raise ConfigError(
                f"client config {k!r} = {v!r}: values must be bool, int, float or str"
            )
    return base


def aggregate_metrics(reports: Sequence[tuple[float, Mapping[str, float]]]) -> dict[str, float]:
    """The default ``eval_metrics``: each metric's mean over the clients that reported it,
    weighted by their ``num_examples`` (clients with no examples count with weight 0); NaN
    or infinite values are left out."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for n, metrics in reports:
        w = float(n)
        if not math.isfinite(w) or w < 0:
            continue
        for k, v in metrics.items():
            x = float(v)
            if k == "num_examples" or not math.isfinite(x):
                continue
            sums[k] = sums.get(k, 0.0) + w * x
            weights[k] = weights.get(k, 0.0) + w
    return {k: sums[k] / weights[k] for k in sorted(sums) if weights[k] > 0}


def metrics_aggregator(
    cfg: Mapping[str, Any],
) -> Callable[[Sequence[tuple[float, Mapping[str, float]]]], dict[str, float]]:
    """``eval_metrics``: the weighted mean, or the named ``"module:function"``."""
    ref = cfg["eval_metrics"]
    if not ref:
        return aggregate_metrics
    fn = load_object(ref, key="eval_metrics", code_path=cfg["code_path"])
    if not callable(fn):
        raise ConfigError(f"eval_metrics = {ref!r} is not callable")

    def agg(reports: Sequence[tuple[float, Mapping[str, float]]]) -> dict[str, float]:
        out = fn(list(reports))
        if not isinstance(out, Mapping):
            raise ConfigError(f"eval_metrics must return a dict, got {type(out).__name__}")
        return {str(k): float(v) for k, v in out.items()}

    return agg
