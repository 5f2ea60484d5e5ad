"""The simulator's tasks: what each dispatched job is told (a :class:`fedagg.clients.Task`, as
a deployed client is), and the per-task client config of a model version."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedagg.clients import Task, with_config

__all__ = ["TaskConfig", "make_tasks"]


class TaskConfig:
    """``config(version)``: the per-task client config of a model version from ``fn`` (none
    without one), computed once per version (a schedule is called once per version, not once
    per client); :meth:`algorithm` applies it to a built-in algorithm."""

    def __init__(self, fn: Callable[[int], Mapping[str, Any]] | None) -> None:
        self.fn = fn
        self._last: tuple[int, dict[str, Any]] | None = None
        self._algorithms: dict[tuple[int, str], Any] = {}

    def __call__(self, version: int) -> dict[str, Any]:
        if self.fn is None:
            return {}
        if self._last is None or self._last[0] != version:
            self._last = (version, dict(self.fn(version)))
        return self._last[1]

    def algorithm(self, algorithm: Any, config: Mapping[str, Any]) -> Any:
        """``algorithm`` with the config's hyperparameters (:func:`fedagg.clients.with_config`),
        one object per setting (an executor that caches the algorithm ships each once)."""
        key = (id(algorithm), repr(sorted(config.items())))
        if key not in self._algorithms:
            self._algorithms[key] = (algorithm, with_config(algorithm, config))
        return self._algorithms[key][1]


def make_tasks(
    jobs: Sequence[int],
    clients: Sequence[int],
    epochs: Sequence[int],
    *,
    version: int,
    seed: int,
    config: Mapping[str, Any],
) -> list[Task]:
    """One task per job: named ``client-<index>`` as the deployment's keys are."""
    return [
        Task(
            job=j,
            version=version,
            epochs=e,
            seed=seed,
            client_index=c,
            name=f"client-{c}",
            config=dict(config),
        )
        for j, c, e in zip(jobs, clients, epochs, strict=True)
    ]
