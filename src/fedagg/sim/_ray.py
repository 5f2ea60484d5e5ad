"""Client training on a Ray cluster (the optional extra ``ray``). Ray is only the executor.

A dispatch's jobs are cut into one contiguous chunk per worker; each chunk runs the same
``train_many`` the in-process executor runs, with the same per-job random streams, and the
results come back in order. The simulation (clock, policy, folding) stays in this process, so a
run gives the same model as with :class:`~fedagg.sim.LocalExecutor`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.errors import ConfigError
from fedagg.sim._exec import chunk_args, train_chunk

__all__ = ["RayExecutor"]

Arr = npt.NDArray[Any]


class RayExecutor:
    """Runs client training as Ray tasks, ``workers`` chunks per dispatch.

    Connects to ``address`` (a running cluster) or starts a local Ray instance with ``workers``
    CPUs; a Ray instance it started is shut down by :meth:`close`.
    """

    def __init__(self, workers: int = 2, address: str | None = None) -> None:
        try:
            import ray
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ConfigError(
                "the Ray executor needs the 'ray' extra: pip install fedagg[ray]"
            ) from e
        if workers < 1:
            raise ConfigError("workers must be >= 1")
        self.workers = workers
        self._ray = ray
        self._owned = not ray.is_initialized()
        if self._owned:
            ray.init(
                address=address,
                num_cpus=None if address else workers,
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        self._remote = ray.remote(train_chunk)

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
    ) -> list[tuple[Any, Any]]:
        p_ref = self._ray.put(params)
        args = chunk_args(self.workers, algorithm, model, p_ref, datas, rngs, epochs, states,
                          server_state)  # fmt: skip
        futures = [self._remote.remote(*a) for a in args]
        out: list[tuple[Any, Any]] = []
        for chunk in self._ray.get(futures):
            out.extend(chunk)
        return out

    def close(self) -> None:
        if self._owned and self._ray.is_initialized():
            self._ray.shutdown()
            self._owned = False
