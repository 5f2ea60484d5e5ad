"""FedAMD's client (Wu et al., ICML 2023, "Anchor Sampling for Federated Learning with
Partial Client Participation").

Each round the server splits its sampled clients into *anchors* and *miners*, and tells each
its role in ``server_state``:

* ``{"role": "anchor"}``: compute a large-batch gradient ``v`` at the global model (the whole
  local set by default, ``anchor_batch`` examples otherwise). The client keeps ``v`` as its
  persistent state and sends ``v - v_old`` (``v_old = 0`` the first time): the server keeps
  only the running sum ``S = sum_i v_i`` (O(model)), never the N anchors.
* ``{"role": "miner", "direction": d}`` with ``d = S / N``: ``steps`` recursive
  variance-reduced (SARAH/PAGE) steps from ``y_0 = x``, ``g_0 = d``::

      y_{k+1} = y_k - lr * g_k
      g_{k+1} = g_k + grad f(y_{k+1}; B_k) - grad f(y_k; B_k)     (one minibatch B_k)

  and send ``delta = y_K - x``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedagg.clients import _engine as eng
from fedagg.clients._base import TrainResult, train_each
from fedagg.errors import ConfigError
from fedagg.models import Examples, Model, Params, ParamsLike

__all__ = ["FedAMD"]


@dataclass(frozen=True, slots=True)
class FedAMD:
    """FedAMD's anchor and miner client (module docstring).

    Args:
        steps: K, the miner's local steps.
        batch_size: the miner's minibatch size.
        lr: the miner's local learning rate.
        anchor_batch: examples in an anchor's gradient (``None``: all local examples).
    """

    steps: int = 10
    batch_size: int = 64
    lr: float = 0.01
    anchor_batch: int | None = None

    def __post_init__(self) -> None:
        eng.check_hparams(1, self.batch_size, self.lr, self.steps)
        if self.anchor_batch is not None and (
            isinstance(self.anchor_batch, bool)
            or not isinstance(self.anchor_batch, int)
            or self.anchor_batch < 1
        ):
            raise ConfigError(
                f"anchor_batch must be None or an int >= 1, got {self.anchor_batch!r}"
            )

    @property
    def name(self) -> str:
        return "fedamd"

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
        if not isinstance(server_state, Mapping) or server_state.get("role") not in (
            "anchor",
            "miner",
        ):
            raise ConfigError("FedAMD needs server_state {'role': 'anchor' | 'miner', ...}")
        if len(y) == 0:
            zeros = {k: np.zeros_like(v) for k, v in start.items()}
            return TrainResult(zeros, 0, 0, {}, {"role": server_state["role"]}, 0), state
        if server_state["role"] == "anchor":
            return self._anchor(model, start, x, y, rng, state)
        direction = eng.check_like("direction", server_state.get("direction", {}), start)
        return self._miner(model, start, x, y, rng, direction), state

    def _anchor(
        self, model: Model, start: Params, x: Any, y: Any, rng: np.random.Generator, old: Any
    ) -> tuple[TrainResult, Params]:
        n = len(y)
        if self.anchor_batch is not None and self.anchor_batch < n:
            idx = np.sort(rng.choice(n, self.anchor_batch, replace=False))
            x, y = x[idx], y[idx]
        loss, g = model.loss_and_grad(start, x, y)
        v = {k: np.array(g[k], dtype=start[k].dtype, copy=True) for k in start}
        prev = None if old is None else eng.check_like("anchor state", old, start)
        diff = {k: v[k] - prev[k] if prev is not None else v[k].copy() for k in start}
        metrics = {"anchor_loss": float(loss)}
        return TrainResult(diff, n, 0, metrics, {"role": "anchor"}, len(y)), v

    def _miner(
        self,
        model: Model,
        start: Params,
        x: Any,
        y: Any,
        rng: np.random.Generator,
        direction: Params,
    ) -> TrainResult:
        n = len(y)
        w = {k: np.array(v, copy=True) for k, v in start.items()}
        g = {k: np.array(direction[k], copy=True) for k in start}
        lr = {k: v.dtype.type(self.lr) for k, v in start.items()}
        order = rng.permutation(n)
        at = 0
        total = 0.0
        seen = 0
        for _ in range(self.steps):
            if at >= n:
                order, at = rng.permutation(n), 0
            idx = order[at : at + self.batch_size]
            at += self.batch_size
            xb, yb = x[idx], y[idx]
            seen += 2 * len(idx)  # two gradients on the same batch
            nxt = {k: w[k] - lr[k] * g[k] for k in w}
            loss, g_new = model.loss_and_grad(nxt, xb, yb)
            _, g_old = model.loss_and_grad(w, xb, yb)
            for k in g:
                g[k] += g_new[k] - g_old[k]
            w = nxt
            total += float(loss)
        delta = {k: w[k] - start[k] for k in start}
        metrics = {"train_loss": total / self.steps}
        return TrainResult(delta, n, self.steps, metrics, {"role": "miner"}, seen)

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
