"""What your own client code receives and returns, in simulation and deployment alike.

A ``[client] train = "module:function"`` function has the signature::

    def train(params: dict[str, np.ndarray], data, task: fedagg.Task) -> fedagg.Result

``params`` is the global model the task trains from (named arrays, read-only: copy before
changing them), ``data`` the client's training examples (``data.x``, ``data.y``), ``task`` the
job (its seed-derived ``task.rng()``, its ``epochs``, the per-task ``config``). It returns a
:class:`Result` whose ``delta`` is ``trained - params``.

A ``[client] evaluate = "module:function"`` function has the signature::

    def evaluate(params: dict[str, np.ndarray], data, task: fedagg.Task | None) -> dict[str, float]

and returns metrics (``"loss"`` and ``"accuracy"`` fill the run table's columns). It is
weighted by ``len(data.y)`` when metrics are combined, unless it returns ``"num_examples"``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Result", "Task"]


@dataclass(frozen=True)
class Task:
    """One job of one client: what your ``train`` and ``evaluate`` functions are told.

    Args:
        job: the job's id (with the client's name, the upload's idempotency key).
        version: the model version it trains from (the number of server updates so far: the
            round, for synchronous rounds).
        epochs: local epochs (fewer for a straggler doing partial work).
        seed: the federation's seed.
        client_index: the client's index (its share of the config's data).
        name: the client's name (its key's, in deployment; ``client-<index>`` simulated).
        config: the per-task client config (``[client] config`` and ``schedule``).
        kind: ``"train"`` or ``"evaluate"`` (a federated evaluation task).
    """

    job: int
    version: int
    epochs: int
    seed: int
    client_index: int
    name: str = ""
    config: Mapping[str, Any] = field(default_factory=dict)
    kind: str = "train"

    def rng(self) -> np.random.Generator:
        """The job's generator: the same stream in the simulator and in deployment."""
        return np.random.default_rng([self.seed, 0x7A1, self.job])


@dataclass(frozen=True)
class Result:
    """What a train function returns: ``delta = trained - received`` (arrays like the
    model, or one flat array), the aggregation weight (sample count) and scalar metrics."""

    delta: Any
    num_examples: float
    metrics: Mapping[str, float] = field(default_factory=dict)
