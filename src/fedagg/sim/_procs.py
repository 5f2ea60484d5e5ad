"""Client training in worker processes on this machine: uses every core for the training and
the (lazy) generation of client data, which the GIL keeps on one core in-process.

Workers receive a lazy view of the clients' data (the dataset object and the client ids), not
the examples: a generated dataset makes each client's examples in the worker that trains it.
Each worker runs the same ``train_many`` with the same per-job random streams, and a client's
result does not depend on which others share its call, so the model is the one the in-process
executor gives, bit for bit.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.errors import ConfigError
from fedagg.jobs import Jobs, chunks, train_chunk

__all__ = ["ClientSlice", "ProcessExecutor"]

Arr = npt.NDArray[Any]


class ClientSlice(Sequence[Any]):
    """Clients ``ids`` of a dataset's client sequence, fetched on access (picklable)."""

    def __init__(self, clients: Sequence[Any], ids: Sequence[int]) -> None:
        self.clients = clients
        self.ids = list(ids)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return ClientSlice(self.clients, self.ids[i])
        return self.clients[self.ids[i]]

    def __iter__(self) -> Iterator[Any]:
        return (self.clients[c] for c in self.ids)


def _init_worker() -> None:
    """One BLAS thread per worker: the workers already use every core."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return
    threadpool_limits(1)


class ProcessExecutor:
    """Trains a dispatch's clients in ``workers`` processes (spawned once, reused)."""

    lazy_data = True

    def __init__(self, workers: int = 2) -> None:
        if workers < 1:
            raise ConfigError("workers must be >= 1")
        self.workers = workers
        self._pool: ProcessPoolExecutor | None = None

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            ctx = multiprocessing.get_context("spawn")  # no fork of numba's threads
            self._pool = ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_init_worker)
        return self._pool

    def train(
        self,
        algorithm: Any,
        model: Any,
        params: dict[str, Arr],
        datas: Sequence[Any],
        rngs: Sequence[np.random.Generator],
        epochs: Sequence[int],
        states: Sequence[Any],
        server_state: Any,
        tasks: Sequence[Any] | None = None,
    ) -> list[tuple[Any, Any]]:
        plain = {name: np.array(v) for name, v in params.items()}  # writable copies pickle
        pool = self._get_pool()
        jobs = Jobs(algorithm, model, plain, datas, rngs, epochs, states, server_state, tasks)
        futures = [pool.submit(train_chunk, c) for c in chunks(jobs, self.workers)]
        out: list[tuple[Any, Any]] = []
        for f in futures:
            out.extend(f.result())
        return out

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
