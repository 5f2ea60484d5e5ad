"""Worker momentum (Karimireddy, He, Jaggi, ICLR 2022): the client sends its momentum.

Each round the client computes one minibatch gradient ``g`` at the global model, updates its
persistent momentum ``m <- (1 - beta) g + beta m`` (``m = g`` the first time) and sends
``delta = -lr * m``. With ``beta = 0`` it is one plain SGD step. This is the distributed-SGD
setting of the Byzantine-robustness literature: robust rules see momenta, whose variance is
smaller than the gradients', which is what makes history help against ALIE-like attacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedagg.clients import _engine as eng
from fedagg.clients._base import TrainResult, train_each
from fedagg.errors import ConfigError
from fedagg.models import Examples, Model, ParamsLike

__all__ = ["WorkerMomentum"]


@dataclass(frozen=True, slots=True)
class WorkerMomentum:
    """One minibatch gradient per round, sent as ``-lr * momentum`` (module docstring)."""

    lr: float = 0.1
    batch_size: int = 32
    beta: float = 0.9

    def __post_init__(self) -> None:
        eng.check_hparams(1, self.batch_size, self.lr)
        if not 0 <= self.beta < 1:
            raise ConfigError(f"beta must be in [0, 1), got {self.beta!r}")

    @property
    def name(self) -> str:
        return "worker_momentum"

    @property
    def epochs(self) -> int:
        return 1

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
    ) -> tuple[TrainResult, Any]:
        start = eng.start_params(params)
        x, y = eng.client_data(data)
        n = len(y)
        if n == 0 or epochs == 0:
            zeros = {k: np.zeros_like(v) for k, v in start.items()}
            return TrainResult(zeros, n, 0, {}), state
        idx = rng.choice(n, min(self.batch_size, n), replace=False)
        loss, g = model.loss_and_grad(start, x[idx], y[idx])
        if state is None:
            m = {k: np.array(g[k], dtype=v.dtype, copy=True) for k, v in start.items()}
        else:
            old = eng.check_like("momentum", state, start)
            m = {
                k: v.dtype.type(1 - self.beta) * g[k] + v.dtype.type(self.beta) * old[k]
                for k, v in start.items()
            }
        delta = {k: -v.dtype.type(self.lr) * m[k] for k, v in start.items()}
        metrics = {"train_loss": float(loss)}
        return TrainResult(delta, n, 1, metrics, {}, len(idx)), m

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
    ) -> list[tuple[TrainResult, Any]]:
        return train_each(self, model, params, datas, rngs, epochs, states, server_state)
