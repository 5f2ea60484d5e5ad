"""What a deployed client's own train function receives and returns.

``fedagg.deploy.Client(server, key, train)`` calls ``train(model, task) -> Result`` for each
task: ``model`` is the global model the task trains from (named arrays), ``task`` the job (its
seed-derived ``task.rng()``, the same stream the simulator gives that job, and its
``epochs``). The :class:`Result`'s ``delta`` is ``trained - model``. They live here, with the
client algorithms, rather than in :mod:`fedagg.deploy`, so that code written against them does
not depend on the transport.
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
    """

    job: int
    version: int
    epochs: int
    seed: int
    client_index: int
    name: str = ""

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
