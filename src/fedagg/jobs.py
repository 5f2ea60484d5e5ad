"""Client training jobs as executors run them: the batch of jobs, the training call itself,
how a batch is cut up, and starting Ray. Shared by the simulator's executors
(:mod:`fedagg.sim`) and the Ray aggregation tree (``benchmarks/_ray_tree.py``)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from fedagg.errors import ConfigError

__all__ = ["Jobs", "chunks", "init_ray", "split", "train_chunk"]

Arr = npt.NDArray[Any]


class Jobs(NamedTuple):
    """A batch of client training jobs: the arguments of :meth:`Executor.train
    <fedagg.sim.Executor.train>`, one entry per job in each sequence (picklable)."""

    algorithm: Any
    model: Any
    params: dict[str, Arr]
    datas: Sequence[Any]
    rngs: Sequence[np.random.Generator]
    epochs: Sequence[int]
    states: Sequence[Any]
    server_state: Any
    #: each job's :class:`fedagg.clients.Task`, for algorithms that take tasks (``takes_tasks``)
    tasks: Sequence[Any] | None = None


def train_chunk(jobs: Jobs) -> list[tuple[Any, Any]]:
    """One batched ``train_many`` call (stacked parameters where the model allows). A client's
    result does not depend on which others share the call, so any cut gives the same model.
    An algorithm that takes tasks (``takes_tasks``) gets each job's task."""
    kw: dict[str, Any] = {}
    if jobs.tasks is not None and getattr(jobs.algorithm, "takes_tasks", False):
        kw["tasks"] = list(jobs.tasks)
    return list(
        jobs.algorithm.train_many(
            jobs.model,
            jobs.params,
            list(jobs.datas),
            list(jobs.rngs),
            epochs=list(jobs.epochs),
            states=list(jobs.states),
            server_state=jobs.server_state,
            **kw,
        )
    )


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges cutting ``n`` jobs into at most ``parts`` contiguous, even chunks."""
    k = max(1, min(parts, n))
    bounds = [n * i // k for i in range(k + 1)]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def chunks(jobs: Jobs, workers: int) -> list[Jobs]:
    """``jobs`` cut into at most ``workers`` contiguous chunks, for :func:`train_chunk`."""
    return [
        jobs._replace(datas=jobs.datas[a:b], rngs=list(jobs.rngs[a:b]),
                      epochs=list(jobs.epochs[a:b]), states=list(jobs.states[a:b]),
                      tasks=None if jobs.tasks is None else list(jobs.tasks[a:b]))
        for a, b in split(len(jobs.datas), workers)
    ]  # fmt: skip


def init_ray(address: str | None, num_cpus: int | None) -> tuple[Any, bool]:
    """The ``ray`` module, started here unless already running; True when it was started here."""
    try:
        import ray
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ConfigError("this needs the 'ray' extra: pip install fedagg[ray]") from e
    if ray.is_initialized():
        return ray, False
    ray.init(
        address=address,
        num_cpus=None if address else num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
    )
    return ray, True
