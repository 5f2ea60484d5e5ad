"""A config's evaluation, as a deployment runs it: the held-out data (``eval_data``), the
server's evaluate function, a client's (``[client] evaluate`` or the model's own) and the
per-task client config of each model version (``[client] config`` through its schedule).

The signatures are :mod:`fedagg.clients`'s: ``evaluate(params, data, task) ->
{metric: value}``, ``task=None`` on the server; ``data`` has ``.x`` and ``.y``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy.typing as npt

from fedagg.clients import Task
from fedagg.config import build_data, build_eval_data, build_model, client_config, load_object
from fedagg.core.spec import ArrayTree
from fedagg.deploy._evalwire import encode_task_config
from fedagg.errors import ConfigError
from fedagg.models import EvalData

__all__ = ["load_eval_data", "server_evaluator", "task_configs", "user_evaluator"]

Arr = npt.NDArray[Any]


def load_eval_data(cfg: Mapping[str, Any], data: Any = None) -> EvalData | None:
    """``eval_data`` (:func:`fedagg.config.build_eval_data`: a ``.npz`` file with arrays ``x``
    and ``y``, or ``"module:function"`` returning ``(x, y)``); ``""``: the test split of
    ``data`` (the config's dataset), None without one."""
    held = build_eval_data(cfg)
    if held is not None:
        return held  # type: ignore[no-any-return]
    test = getattr(data, "test", None)
    return EvalData(test.x, test.y) if test is not None and len(test.y) else None


def user_evaluator(cfg: Mapping[str, Any]) -> Callable[..., Any] | None:
    """``[client] evaluate``, loaded (None if not set)."""
    ref = cfg["client"]["evaluate"]
    if not ref:
        return None
    fn = load_object(ref, key="client.evaluate", code_path=cfg["code_path"])
    if not callable(fn):
        raise ConfigError(f"client.evaluate = {ref!r} is not callable")
    return fn  # type: ignore[no-any-return]


def _model_metrics(model: Any, params: Any, data: Any) -> dict[str, float]:
    loss, acc = model.evaluate(params, data.x, data.y)
    return {"loss": float(loss), "accuracy": float(acc)}


def server_evaluator(
    cfg: Mapping[str, Any],
) -> Callable[[dict[str, Arr]], Mapping[str, float]] | None:
    """The server's evaluation of the global model: ``[client] evaluate(params, held_out,
    None)``, or the model's own (loss, accuracy), on :func:`load_eval_data`. None if there is
    nothing to evaluate on (no ``eval_data`` and no test split) or nothing to evaluate with."""
    data = build_data(cfg, int(cfg["seed"]))
    held = load_eval_data(cfg, data)
    if held is None:
        return None
    user = user_evaluator(cfg)
    if user is not None:
        return lambda params: user(params, held, None)
    model = build_model(cfg, data)
    if not callable(getattr(model, "evaluate", None)):
        return None
    return lambda params: _model_metrics(model, params, held)


def _client_data(data: Any, index: int) -> Any:
    """A client's data to evaluate on: its test split if the dataset has one, else its
    training share (None without a dataset)."""
    tests = getattr(data, "client_tests", None)
    if tests is not None and len(tests[index]):
        return tests[index]
    clients = getattr(data, "clients", None)
    return None if clients is None else clients[index]


def client_evaluator(cfg: Mapping[str, Any]) -> Callable[[ArrayTree, Task], dict[str, float]]:
    """A built-in client's evaluate function (see :func:`fedagg.deploy.config_evaluator`):
    the dataset and model are built at its first call."""
    user = user_evaluator(cfg)
    lock = threading.Lock()
    built: list[Any] = []

    def evaluate(params: ArrayTree, task: Task) -> dict[str, float]:
        with lock:
            if not built:
                data = build_data(cfg, int(cfg["seed"]))
                built[:] = [data, None if user is not None else build_model(cfg, data)]
        data, model = built
        named = params if isinstance(params, dict) else {str(i): a for i, a in enumerate(params)}
        mine = _client_data(data, task.client_index)
        if user is not None:
            out = dict(user(named, mine, task))
        elif mine is None or not len(mine.y):
            return {"num_examples": 0.0}
        else:
            out = _model_metrics(model, named, mine)
        if "num_examples" not in out and mine is not None:
            out["num_examples"] = float(len(mine.y))
        return out

    return evaluate


def task_configs(cfg: Mapping[str, Any], keep: int = 64) -> Callable[[int], str]:
    """The per-task client config of each model version as it travels (JSON, "" for none),
    the schedule called once per version (the last ``keep`` versions cached)."""
    c = cfg["client"]
    if not c["config"] and not c["schedule"]:
        return lambda version: ""
    cache: dict[int, str] = {}

    def get(version: int) -> str:
        if version not in cache:
            cache[version] = encode_task_config(client_config(cfg, version))
            for v in sorted(cache)[:-keep]:
                del cache[v]
        return cache[version]

    get(0)  # a bad config or schedule fails now, not at the first task
    return get
