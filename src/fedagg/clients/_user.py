"""Your train function as a client algorithm: what ``[client] train = "module:function"``
runs, in the simulator (any executor) and in a deployed client alike.

The function receives the global parameters (read-only arrays by name), the client's data
(``None`` without a dataset) and its :class:`~fedagg.clients.Task`, and returns a
:class:`~fedagg.clients.Result`. Its delta is checked against the model's parameters (names,
shapes) and cast to their dtype: a float64 delta for a float32 model is fine.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.clients._base import TrainResult
from fedagg.clients._task import Result, Task
from fedagg.errors import ConfigError
from fedagg.models import Params, ParamsLike

__all__ = ["BUILTIN_KEYS", "UserTrain", "fit_delta", "with_config"]

#: The per-task config keys the built-in client algorithms honour (their same-named fields).
BUILTIN_KEYS = ("lr", "mu", "beta")

Arr = npt.NDArray[Any]
TrainFn = Callable[[Params, Any, Task], Result]


def fit_delta(delta: Any, params: ParamsLike, who: str = "train") -> Params:
    """``delta`` (a dict of arrays by name, or one flat array over the parameters in order)
    as arrays shaped and typed like ``params``. Any float or integer dtype is cast to the
    parameter's; wrong names, shapes or sizes raise :class:`ConfigError` naming the parameter."""
    names = list(params)
    if isinstance(delta, Mapping):
        missing = sorted(set(names) - set(delta))
        extra = sorted(set(map(str, delta)) - set(names))
        if missing or extra:
            raise ConfigError(
                f"{who} returned a delta whose names differ from the model's: missing "
                f"{missing}, unexpected {extra}"
            )
        out: Params = {}
        for n in names:
            a = np.asarray(delta[n])
            want = np.asarray(params[n])
            if a.shape != want.shape:
                raise ConfigError(
                    f"{who} returned a delta for parameter {n!r} of shape {a.shape}, the "
                    f"model's is {want.shape}"
                )
            out[n] = _cast(a, want.dtype, f"{who}'s delta for parameter {n!r}")
        return out
    if isinstance(delta, np.ndarray) or hasattr(delta, "__array__"):
        flat = np.asarray(delta)
        size = sum(int(np.asarray(params[n]).size) for n in names)
        if flat.ndim != 1 or flat.size != size:
            raise ConfigError(
                f"{who} returned a flat delta of shape {flat.shape}; the model has {size} "
                f"parameters in all ({', '.join(names)})"
            )
        out = {}
        lo = 0
        for n in names:
            want = np.asarray(params[n])
            part = flat[lo : lo + want.size].reshape(want.shape)
            out[n] = _cast(part, want.dtype, f"{who}'s delta for parameter {n!r}")
            lo += want.size
        return out
    raise ConfigError(
        f"{who} returned a delta of type {type(delta).__name__}: expected a dict of arrays by "
        "parameter name or one flat array"
    )


def _cast(a: Arr, dtype: np.dtype[Any], what: str) -> Arr:
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise ConfigError(f"{what} has dtype {a.dtype}, not a number")
    return np.array(a, dtype=dtype)  # a copy: the caller's arrays stay theirs


def _as_result(out: Any, params: ParamsLike, who: str) -> TrainResult:
    if not isinstance(out, Result):
        raise ConfigError(
            f"{who} must return fedagg.clients.Result(delta, num_examples, metrics), got "
            f"{type(out).__name__}"
        )
    n = float(out.num_examples)
    if not np.isfinite(n) or n <= 0:
        raise ConfigError(f"{who} returned num_examples = {out.num_examples!r}; it must be > 0")
    metrics = {str(k): float(v) for k, v in dict(out.metrics).items()}
    num: Any = int(n) if n == int(n) else n  # the aggregation weight
    return TrainResult(fit_delta(out.delta, params, who), num, 0, metrics)


@dataclass(frozen=True)
class UserTrain:
    """A client algorithm that calls ``train(params, data, task) -> Result``.

    Args:
        train: your function. To run it in worker processes, pass a picklable callable that
            finds it there (the config does: it names the function by reference).
        epochs: the default ``task.epochs``.
        name_: what run tables call the algorithm (default: the function's name).

    It takes the simulator's tasks (``takes_tasks``): each call gets the job's
    :class:`Task` (job, model version, epochs, seed, client index, name, per-task config).
    Called without one (``train`` from Python), it makes one from the arguments it has.
    """

    train_fn: TrainFn
    epochs: int = 1
    name_: str = ""
    takes_tasks = True

    @property
    def name(self) -> str:
        return self.name_ or f"user:{getattr(self.train_fn, '__name__', 'train')}"

    def train(
        self,
        model: Any,
        params: ParamsLike,
        data: Any,
        rng: np.random.Generator,
        *,
        epochs: int | None = None,
        state: Any = None,
        server_state: Any = None,
        task: Task | None = None,
    ) -> tuple[TrainResult, Any]:
        if task is None:
            task = Task(job=0, version=0, epochs=self.epochs if epochs is None else epochs,
                        seed=0, client_index=0)  # fmt: skip
        view = {k: _readonly(np.asarray(v)) for k, v in params.items()}
        out = self.train_fn(view, data, task)
        return _as_result(out, params, self.name), None

    def train_many(
        self,
        model: Any,
        params: ParamsLike,
        datas: Sequence[Any],
        rngs: Sequence[np.random.Generator],
        *,
        epochs: Sequence[int] | None = None,
        states: Sequence[Any] | None = None,
        server_state: Any = None,
        tasks: Sequence[Task] | None = None,
    ) -> list[tuple[TrainResult, Any]]:
        k = len(datas)
        if tasks is not None and len(tasks) != k:
            raise ConfigError(f"{len(tasks)} tasks for {k} clients")
        eps: list[int | None] = [None] * k if epochs is None else list(epochs)
        return [
            self.train(
                model,
                params,
                datas[i],
                rngs[i],
                epochs=eps[i],
                task=None if tasks is None else tasks[i],
            )
            for i in range(k)
        ]


def _readonly(a: Arr) -> Arr:
    v = a.view()
    v.flags.writeable = False
    return v


def with_config(algorithm: Any, config: Mapping[str, Any]) -> Any:
    """A built-in ``algorithm`` with the per-task config's :data:`BUILTIN_KEYS` (e.g. a
    scheduled ``lr``) as its hyperparameters; unchanged if it takes tasks itself or the
    config sets none of its fields."""
    if not config or getattr(algorithm, "takes_tasks", False):
        return algorithm
    if not dataclasses.is_dataclass(algorithm) or isinstance(algorithm, type):
        return algorithm
    fields = {f.name for f in dataclasses.fields(algorithm)}
    changes: dict[str, Any] = {}
    for k in BUILTIN_KEYS:
        if k in config and k in fields:
            v = config[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ConfigError(f"client config {k!r} = {v!r} must be a number")
            changes[k] = float(v)
    if not changes or all(getattr(algorithm, k) == v for k, v in changes.items()):
        return algorithm
    return dataclasses.replace(algorithm, **changes)
