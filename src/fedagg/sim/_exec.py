"""What every executor shares: the training call itself and how a dispatch is cut up."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

__all__ = ["Jobs", "chunks", "split", "train_chunk"]

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


def train_chunk(jobs: Jobs) -> list[tuple[Any, Any]]:
    """One batched ``train_many`` call (stacked parameters where the model allows). A client's
    result does not depend on which others share the call, so any cut gives the same model."""
    return list(
        jobs.algorithm.train_many(
            jobs.model,
            jobs.params,
            list(jobs.datas),
            list(jobs.rngs),
            epochs=list(jobs.epochs),
            states=list(jobs.states),
            server_state=jobs.server_state,
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
                      epochs=list(jobs.epochs[a:b]), states=list(jobs.states[a:b]))
        for a, b in split(len(jobs.datas), workers)
    ]  # fmt: skip
