"""What your own client code receives and returns, in simulation and deployment alike.

Named in a config as ``[client] train = "module:function"`` and ``evaluate =
"module:function"`` (or passed from Python), with these signatures::

    def train(params: dict[str, np.ndarray], data, task: Task) -> Result: ...
    def evaluate(params: dict[str, np.ndarray], data, task: Task | None) -> dict[str, float]: ...

``params`` is the global model the task starts from (read-only arrays, by name); ``data`` is
this client's share of the config's ``[data]`` (``data.x``, ``data.y``; ``None`` where the
config names no dataset and the code loads its own); ``task`` says which job this is (its
seed-derived ``task.rng()``, the same stream the simulator gives that job, its ``epochs``
and its per-task ``config``). :class:`Result`'s ``delta`` is ``trained - params``. An
``evaluate`` returns scalar metrics; they are weighted by ``len(data.y)`` unless it returns a
``"num_examples"``, and ``"loss"`` / ``"accuracy"`` are what the run tables show. On the
server, ``evaluate`` is called with the held-out data (``eval_data``) and ``task=None``.

``fedagg.deploy.Client(server, key, train)`` calls ``train(model, task)`` (no data: a deployed
client holds its own). They live here, with the client algorithms, rather than in
:mod:`fedagg.deploy`, so that code written against them does not depend on the transport.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Result", "Task"]


@dataclass(frozen=True)
class Task:
    """One job of one client: what a train function is told.

    Args:
        job: the job's id (with the client's name, the upload's idempotency key).
        version: the model version it trains from (the number of server updates so far).
        epochs: local epochs (fewer for a straggler doing partial work).
        seed: the federation's seed.
        client_index: the client's index (its share of the config's data).
        name: the client's name (its key's).
        config: the per-task client config (``[client] config``, through ``[client]
            schedule`` for this version), e.g. a learning rate.
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
