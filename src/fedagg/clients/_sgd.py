"""Client algorithms built on local minibatch SGD: FedAvg's, FedProx's and SCAFFOLD's."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.clients import _engine as eng
from fedagg.clients._base import TrainResult
from fedagg.errors import ConfigError
from fedagg.models import Examples, Model, Params, ParamsLike, StackedModel

__all__ = ["FedProx", "LocalSGD", "Scaffold", "scaffold_server_update"]

Arr = npt.NDArray[Any]


def _metrics(steps: int, loss: float) -> dict[str, float]:
    return {"train_loss": loss} if steps else {}


def _many_args(
    datas: Sequence[Examples],
    rngs: Sequence[np.random.Generator],
    epochs: Sequence[int] | None,
    states: Sequence[Any] | None,
    default_epochs: int,
) -> tuple[list[tuple[Arr, Arr]], list[int], list[Any]]:
    k = len(datas)
    if len(rngs) != k:
        raise ConfigError(f"{len(rngs)} generators for {k} clients")
    if epochs is not None and len(epochs) != k:
        raise ConfigError(f"{len(epochs)} epoch counts for {k} clients")
    if states is not None and len(states) != k:
        raise ConfigError(f"{len(states)} states for {k} clients")
    data = [eng.client_data(d) for d in datas]
    dims = {x.shape[1] for x, _ in data}
    if len(dims) > 1:
        raise ConfigError(f"clients' examples differ in their number of features: {sorted(dims)}")
    eps = [
        eng.resolve_epochs(default_epochs, None if epochs is None else epochs[i]) for i in range(k)
    ]
    return data, eps, [None] * k if states is None else list(states)


def _result(
    alg: Any, delta: Params, n: int, steps: int, loss: float, extra: dict[str, Any] | None = None
) -> TrainResult:
    """A client's result; with fixed local steps, its work is the examples its ``steps``
    batches held (epochs of ``ceil(n / B)`` batches, the last one of each possibly short)."""
    work = eng.examples_seen(n, steps, alg.batch_size) if alg.steps is not None else None
    return TrainResult(delta, n, steps, _metrics(steps, loss), extra or {}, work)


def _delta(trained: Params, start: Params) -> Params:
    return {k: trained[k] - v for k, v in start.items()}


def _sgd_one(
    alg: LocalSGD | FedProx,
    model: Model,
    params: ParamsLike,
    data: Examples,
    rng: np.random.Generator,
    epochs: int | None,
) -> tuple[TrainResult, None]:
    """One stateless client's local SGD, with ``alg``'s gradient correction (if any)."""
    start = eng.start_params(params)
    x, y = eng.client_data(data)
    e = eng.resolve_epochs(alg.epochs, epochs)
    correct = alg._correct(start)
    w, steps, loss = eng.run_one(
        model, start, x, y, rng, e, alg.batch_size, alg.lr, correct, max_steps=alg.steps
    )
    return _result(alg, _delta(w, start), len(y), steps, loss), None


def _sgd_many(
    alg: LocalSGD | FedProx,
    model: Model,
    params: ParamsLike,
    datas: Sequence[Examples],
    rngs: Sequence[np.random.Generator],
    epochs: Sequence[int] | None,
    states: Sequence[Any] | None,
) -> list[tuple[TrainResult, None]]:
    """:func:`_sgd_one` for each client; stacked when the model supports it."""
    start = eng.start_params(params)
    data, eps, _ = _many_args(datas, rngs, epochs, states, alg.epochs)
    if not isinstance(model, StackedModel):
        return [
            _sgd_one(alg, model, start, d, r, e) for d, r, e in zip(datas, rngs, eps, strict=True)
        ]
    make = alg._make_stacked(start)
    outs = eng.run_many(
        model, start, data, rngs, eps, alg.batch_size, alg.lr, make, max_steps=alg.steps
    )
    return [
        (_result(alg, o.delta, len(y), o.steps, o.loss), None)
        for o, (_, y) in zip(outs, data, strict=True)
    ]


# --------------------------------------------------------------------------------------------
# FedAvg's client
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalSGD:
    """FedAvg's client (McMahan et al. 2017): ``epochs`` of minibatch SGD on local data.

    Each epoch shuffles the examples with ``rng.permutation(n)`` and takes ``ceil(n / B)``
    steps ``w -= lr * grad`` on batches of ``batch_size`` (the last one may be smaller), so a
    client takes ``epochs * ceil(n / B)`` steps. Stateless.
    """

    epochs: int = 1
    batch_size: int = 10
    lr: float = 0.01
    steps: int | None = None

    def __post_init__(self) -> None:
        eng.check_hparams(self.epochs, self.batch_size, self.lr, self.steps)

    @property
    def name(self) -> str:
        return "local_sgd"

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
    ) -> tuple[TrainResult, None]:
        """Train one client from ``params``; ``epochs`` overrides the local epochs."""
        return _sgd_one(self, model, params, data, rng, epochs)

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
    ) -> list[tuple[TrainResult, None]]:
        """:meth:`train` for each client; stacked when the model supports it."""
        return _sgd_many(self, model, params, datas, rngs, epochs, states)

    def _correct(self, start: Params) -> eng.Correct | None:
        return None  # plain SGD: no gradient correction

    def _make_stacked(self, start: Params) -> eng.MakeCorrect | None:
        return None


# --------------------------------------------------------------------------------------------
# FedProx
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FedProx:
    """FedProx's client (Li et al., MLSys 2020): local SGD on ``F_i(w) + mu/2 |w - x_t|^2``.

    Each step is ``w -= lr * (grad F_i(w) + mu * (w - x_t))`` with ``x_t`` the global model the
    client started from; batching and shuffling are as in :class:`LocalSGD`, and ``mu = 0``
    gives exactly LocalSGD. The reported ``train_loss`` is that of ``F_i`` alone.

    Stragglers ("drop_percent") are the server's business: it passes a per-call ``epochs``.
    The FedProx reference code draws ``np.random.randint(low=1, high=E)``, i.e. 1..E-1 epochs
    (``high`` is exclusive); this class just honours the ``epochs`` it is given.
    """

    mu: float
    epochs: int = 1
    batch_size: int = 10
    lr: float = 0.01
    steps: int | None = None

    def __post_init__(self) -> None:
        eng.check_hparams(self.epochs, self.batch_size, self.lr, self.steps)
        if not (isinstance(self.mu, (int, float)) and math.isfinite(self.mu) and self.mu >= 0):
            raise ConfigError(f"mu must be finite and >= 0, got {self.mu!r}")

    @property
    def name(self) -> str:
        return "fedprox"

    def _correct(self, start: Params) -> eng.Correct | None:
        if self.mu == 0:
            return None
        mu = self.mu

        def correct(w: Params, g: Params) -> Params:
            return {k: g[k] + mu * (w[k] - x0) for k, x0 in start.items()}

        return correct

    def _make_stacked(self, start: Params) -> eng.MakeCorrect | None:
        if self.mu == 0:
            return None
        mu = self.mu

        def correct(w: Params, g: Params, m: int) -> Params:
            return {k: g[k] + mu * (w[k] - x0) for k, x0 in start.items()}

        return lambda members: correct

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
    ) -> tuple[TrainResult, None]:
        """Train one client from ``params``; ``epochs`` overrides the local epochs."""
        return _sgd_one(self, model, params, data, rng, epochs)

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
    ) -> list[tuple[TrainResult, None]]:
        """:meth:`train` for each client; stacked when the model supports it."""
        return _sgd_many(self, model, params, datas, rngs, epochs, states)


# --------------------------------------------------------------------------------------------
# SCAFFOLD
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scaffold:
    """SCAFFOLD's client (Karimireddy et al., ICML 2020), control variates by option II.

    ``server_state`` is the server control variate ``c`` (a dict like the params; ``None``
    means zeros); ``state`` is the client's ``c_i`` (``None`` at first, meaning zeros). Each
    local step is ``y -= lr * (g(y) - c_i + c)`` (computed as ``g + (c - c_i)``); after K
    steps the client sets ``c_i+ = c_i - c + (x - y) / (K lr)``. The result's delta is
    ``y - x`` and ``extra["delta_c"] = c_i+ - c_i``; the new state is ``c_i+``. With K = 0
    (no data or zero epochs) ``c_i`` is kept and ``delta_c`` is zero. The server combines
    the ``delta_c`` with :func:`scaffold_server_update`.
    """

    epochs: int = 1
    batch_size: int = 10
    lr: float = 0.01
    steps: int | None = None

    def __post_init__(self) -> None:
        eng.check_hparams(self.epochs, self.batch_size, self.lr, self.steps)

    @property
    def name(self) -> str:
        return "scaffold"

    def _variates(
        self, start: Params, state: Any, server_state: Any
    ) -> tuple[Params | None, Params | None]:
        """``(c_i, c - c_i)``, or None where they are zero (not given)."""
        c = None if server_state is None else eng.check_like("server_state", server_state, start)
        ci = None if state is None else eng.check_like("client state", state, start)
        if c is None and ci is None:
            return None, None
        if ci is None:
            return None, c
        if c is None:
            return ci, {k: -v for k, v in ci.items()}
        return ci, {k: c[k] - ci[k] for k in start}

    def _finish(
        self, start: Params, delta: Params, ci: Params | None, corr: Params | None, steps: int
    ) -> tuple[dict[str, Any], Params]:
        """``({"delta_c": c_i+ - c_i}, c_i+)`` from the delta ``y - x`` after ``steps``."""
        if steps == 0:
            kept = {k: np.zeros_like(v) if ci is None else ci[k].copy() for k, v in start.items()}
            return {"delta_c": {k: np.zeros_like(v) for k, v in start.items()}}, kept
        # c_i+ = (x - y) / (K lr) + (c_i - c), where x - y = -delta and c_i - c = -corr.
        new: Params = {}
        for k, d in delta.items():
            step = -d / d.dtype.type(steps * self.lr)
            new[k] = step if corr is None else step - corr[k]
        dc = (
            {k: v.copy() for k, v in new.items()}
            if ci is None
            else {k: new[k] - ci[k] for k in new}
        )
        return {"delta_c": dc}, new

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
    ) -> tuple[TrainResult, Params]:
        """Train one client from ``params`` with its ``c_i`` (state) and the server's ``c``."""
        start = eng.start_params(params)
        x, y = eng.client_data(data)
        e = eng.resolve_epochs(self.epochs, epochs)
        ci, corr = self._variates(start, state, server_state)
        correct: eng.Correct | None = None
        if corr is not None:
            cc = corr

            def correct(w: Params, g: Params) -> Params:
                return {k: g[k] + cc[k] for k in start}

        w, steps, loss = eng.run_one(
            model, start, x, y, rng, e, self.batch_size, self.lr, correct, max_steps=self.steps
        )
        delta = _delta(w, start)
        extra, new = self._finish(start, delta, ci, corr, steps)
        return _result(self, delta, len(y), steps, loss, extra), new

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
    ) -> list[tuple[TrainResult, Params]]:
        """:meth:`train` for each client; stacked when the model supports it."""
        start = eng.start_params(params)
        data, eps, sts = _many_args(datas, rngs, epochs, states, self.epochs)
        if not isinstance(model, StackedModel):
            return [
                self.train(model, start, d, r, epochs=e, state=s, server_state=server_state)
                for d, r, e, s in zip(datas, rngs, eps, sts, strict=True)
            ]
        var = [self._variates(start, s, server_state) for s in sts]
        make: eng.MakeCorrect | None = None
        if any(corr is not None for _, corr in var):

            def make(members: Sequence[int]) -> eng.StackedCorrect:
                stacked: Params = {}
                for k, v in start.items():
                    block = np.zeros((len(members), *v.shape), dtype=v.dtype)
                    for r, i in enumerate(members):
                        corr = var[i][1]
                        if corr is not None:
                            block[r] = corr[k]
                    stacked[k] = block

                def correct(w: Params, g: Params, m: int) -> Params:
                    return {k: g[k] + stacked[k][:m] for k in start}

                return correct

        outs = eng.run_many(
            model, start, data, rngs, eps, self.batch_size, self.lr, make, max_steps=self.steps
        )
        results: list[tuple[TrainResult, Params]] = []
        for o, (_, y), (ci, corr) in zip(outs, data, var, strict=True):
            extra, new = self._finish(start, o.delta, ci, corr, o.steps)
            results.append((_result(self, o.delta, len(y), o.steps, o.loss, extra), new))
        return results


def scaffold_server_update(
    c: ParamsLike | None, delta_cs_sum: ParamsLike, num_clients_total: int
) -> Params:
    """SCAFFOLD's server control-variate update ``c + sum(delta_c) / N``, as a new dict.

    ``delta_cs_sum`` is the sum of the round's clients' ``delta_c``; ``N`` is the total number
    of clients (not the number in the round). ``c = None`` means zeros. Pure: ``c`` is not
    modified. The result has ``c``'s dtypes (those of ``delta_cs_sum`` when ``c`` is None).
    """
    if (
        isinstance(num_clients_total, bool)
        or not isinstance(num_clients_total, (int, np.integer))
        or num_clients_total < 1
    ):
        raise ConfigError(f"num_clients_total must be an int >= 1, got {num_clients_total!r}")
    total = eng.start_params(delta_cs_sum)
    base = {k: np.zeros_like(v) for k, v in total.items()} if c is None else eng.start_params(c)
    if set(base) != set(total):
        raise ConfigError(f"c has parameters {sorted(base)}, delta_cs_sum {sorted(total)}")
    out: Params = {}
    for k, v in base.items():
        s = np.asarray(total[k])
        if s.shape != v.shape:
            raise ConfigError(f"delta_cs_sum[{k!r}] has shape {s.shape}, expected {v.shape}")
        out[k] = (v + s / num_clients_total).astype(v.dtype, copy=False)
    return out
