"""What a client algorithm returns, and the protocol every client algorithm follows."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from fedagg.models import Examples, Model, Params, ParamsLike

__all__ = ["ClientAlgorithm", "TrainResult", "train_each"]


@dataclass(frozen=True, slots=True)
class TrainResult:
    """One client's local training: its delta (trained - start) and what it reports.

    Args:
        delta: ``trained params - params it started from``, one array per parameter.
        num_examples: the client's number of training examples (its FedAvg weight).
        steps: local SGD steps actually taken.
        metrics: scalars such as ``train_loss``, the mean of the local steps' batch losses
            (absent when no step was taken).
        extra: algorithm-specific payload for the server, e.g. SCAFFOLD's ``delta_c``.
        work: examples processed, if not ``epochs * num_examples`` (fixed local steps,
            FedAMD's anchors and miners): what a simulator charges compute time for.
    """

    delta: Params
    num_examples: int
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    work: int | None = None


class ClientAlgorithm(Protocol):
    """How a client turns the global model and its data into an update.

    ``train`` runs one client; ``train_many`` runs several and gives the same results as
    calling ``train`` on each (to float32 round-off), faster where the model supports stacked
    training. ``epochs`` overrides the algorithm's local epochs for a call (how a simulator
    gives stragglers partial work). ``state`` is the client's persistent state from its last
    call (``None`` at first); ``server_state`` is what the server sends besides the model.
    Both return, per client, the result and the client's new state (``None`` if stateless).
    """

    @property
    def name(self) -> str: ...

    def train(
        self,
        model: Model,
        params: ParamsLike,
        data: Examples,
        rng: np.random.Generator,
        *,
        epochs: int | None = None,
        state: Any = None,
        server_state: Any = None,
    ) -> tuple[TrainResult, Any]: ...

    def train_many(
        self,
        model: Model,
        params: ParamsLike,
        datas: Sequence[Examples],
        rngs: Sequence[np.random.Generator],
        *,
        epochs: Sequence[int] | None = None,
        states: Sequence[Any] | None = None,
        server_state: Any = None,
    ) -> list[tuple[TrainResult, Any]]: ...


def train_each(
    alg: Any,
    model: Model,
    params: ParamsLike,
    datas: Sequence[Examples],
    rngs: Sequence[np.random.Generator],
    epochs: Sequence[int] | None,
    states: Sequence[Any] | None,
    server_state: Any,
) -> list[tuple[TrainResult, Any]]:
    """``train_many`` as a loop of ``alg.train`` (for algorithms with no stacked form)."""
    from fedagg.errors import ConfigError

    k = len(datas)
    if len(rngs) != k or (states is not None and len(states) != k):
        raise ConfigError("train_many needs one generator (and state) per client")
    if epochs is not None and len(epochs) != k:
        raise ConfigError(f"{len(epochs)} epoch counts for {k} clients")
    sts = [None] * k if states is None else list(states)
    eps: list[int | None] = [None] * k if epochs is None else list(epochs)
    return [
        alg.train(model, params, d, r, epochs=e, state=s, server_state=server_state)
        for d, r, e, s in zip(datas, rngs, eps, sts, strict=True)
    ]
