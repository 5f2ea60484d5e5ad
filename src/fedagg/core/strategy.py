"""Strategies: one-line recipes composing pre-transforms, an aggregator and a server optimizer.

A strategy owns no mutable attributes; the server's state is a value::

    s = fedagg.strategies.fedadam(lr=0.1)
    server = s.init(initial_params)
    agg = s.begin(server)                      # the round's empty aggregate
    agg = s.aggregator.fold(agg, update)       # as updates arrive
    server = s.apply(server, agg)              # finalize, optimizer step, version + 1

Swapping a piece is an argument, not a subclass: ``fedadam(aggregator=some_robust_rule)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.core import optim
from fedagg.core.aggregate import Aggregator, PreTransform, compose, mean
from fedagg.core.aggregate import donate as donate_state
from fedagg.core.optim import Flavor, OptState, ServerOptimizer
from fedagg.core.spec import ArrayTree, ParamSpec
from fedagg.core.update import Update
from fedagg.errors import ConfigError, StateError

__all__ = [
    "ServerState",
    "Strategy",
    "fedadagrad",
    "fedadam",
    "fedavg",
    "fedavgm",
    "fedyogi",
    "strategy",
]

Arr = npt.NDArray[Any]


@dataclass(slots=True)
class ServerState:
    """The global model (flat, in the spec's layout), its version and the optimizer state."""

    spec: ParamSpec
    params: Arr
    version: int
    opt: OptState
    carry: Arr | None = None  # what a stateful aggregator keeps across rounds (CC's center)

    def check(self) -> None:
        """Raise StateError unless the fields are consistent (used when a state is loaded)."""
        if not (
            isinstance(self.params, np.ndarray)
            and self.params.shape == (self.spec.size,)
            and self.params.dtype == self.spec.dtype
            and isinstance(self.version, int)
            and (
                self.carry is None
                or (isinstance(self.carry, np.ndarray) and self.carry.shape == self.params.shape)
            )
        ):
            raise StateError("inconsistent ServerState (params do not match the spec)")
        self.opt.check()

    @property
    def model(self) -> ArrayTree:
        """The global model as a list or dict of views."""
        return self.spec.unflatten(self.params)


@dataclass(frozen=True, slots=True)
class Strategy:
    """An aggregator (with its pre-transforms) followed by a server optimizer."""

    name: str
    aggregator: Aggregator[Any]
    optimizer: ServerOptimizer

    def init(self, params: ArrayTree, *, version: int = 0) -> ServerState:
        spec = ParamSpec.from_arrays(params)
        flat = spec.as_flat(params).copy()
        return ServerState(spec, flat, version, self.optimizer.init(flat))

    def begin(self, server: ServerState, *, version: int | None = -1) -> Any:
        """The empty aggregate of a round on the current model version (``version=None``
        accepts updates of any version: asynchronous policies weigh staleness themselves)."""
        v = server.version if version == -1 else version
        state = self.aggregator.init(server.spec, version=v)
        if _carries(self.aggregator):
            state.center = server.carry
        return state

    def apply(
        self, server: ServerState, agg_state: Any, *, scale: float = 1.0, donate: bool = False
    ) -> ServerState:
        """Finalize the round's aggregate and take one optimizer step.

        ``scale`` multiplies the aggregated delta before the step: how a policy turns the
        weighted mean into the sum it wants (FedAU's division by N rather than by the number
        of participants, FedFix's unbiased weights). ``scale=1`` leaves it untouched.

        Like ``fold``, this consumes ``server``: its optimizer state is updated in place and
        shared with the returned state (copy it first, e.g. with ``fedagg.loads(dumps(s))``, to
        keep the old one). ``server.params`` is never written: the new parameters are a new
        buffer (whoever still holds the old ones, a download or an evaluation, reads them
        unchanged).

        ``donate=True`` also consumes ``agg_state`` (what a policy's round close does): the
        mean is computed into the aggregate's own sums where it can (see
        :func:`~fedagg.core.aggregate.donate`), and the step and the new parameters into that
        same buffer: one model-sized buffer for the whole close, the same bits."""
        if not (math.isfinite(scale) and scale > 0):
            raise ConfigError(f"scale must be finite and > 0, got {scale!r}")
        if donate:
            donate_state(agg_state)
        delta = self.aggregator.finalize_flat(agg_state)
        if scale != 1.0:
            delta *= delta.dtype.type(scale)
        carry = delta.copy() if _carries(self.aggregator) else server.carry
        # the delta is this call's own buffer (finalized here): the step may overwrite it (an
        # optimizer of another kind, e.g. a wrapper, is called as the protocol has it)
        kw = {"donate": True} if type(self.optimizer) is ServerOptimizer else {}
        params, opt_state = self.optimizer.step(server.opt, server.params, delta, **kw)
        return ServerState(server.spec, params, server.version + 1, opt_state, carry)

    def round(self, server: ServerState, updates: Iterable[Update]) -> ServerState:
        """Fold ``updates`` (all or none) and apply them: one synchronous round."""
        agg = self.aggregator.fold_many(self.begin(server), updates)
        return self.apply(server, agg)


def _carries(agg: Any) -> bool:
    """Whether the aggregator (or the one a composition wraps) carries state across rounds."""
    return bool(getattr(getattr(agg, "inner", agg), "carries", False))


def strategy(
    name: str,
    optimizer: ServerOptimizer,
    *,
    aggregator: Aggregator[Any] | None = None,
    pre: Iterable[PreTransform] = (),
) -> Strategy:
    """A strategy from parts: ``pre`` transforms, ``aggregator`` (default: the weighted mean),
    and ``optimizer``."""
    agg: Aggregator[Any] = mean() if aggregator is None else aggregator
    pre = tuple(pre)
    if pre:
        agg = compose(*pre, agg)
    return Strategy(name, agg, optimizer)


def fedavg(
    lr: float = 1.0, *, aggregator: Aggregator[Any] | None = None, pre: Iterable[PreTransform] = ()
) -> Strategy:
    """FedAvg (McMahan et al. 2017): weighted mean, then ``x += lr * delta`` (lr = 1)."""
    return strategy("fedavg", optim.sgd(lr), aggregator=aggregator, pre=pre)


def fedavgm(
    lr: float = 1.0,
    momentum: float = 0.9,
    *,
    aggregator: Aggregator[Any] | None = None,
    pre: Iterable[PreTransform] = (),
) -> Strategy:
    """FedAvgM (Hsu et al. 2019): server momentum on the mean delta."""
    return strategy("fedavgm", optim.momentum(lr, momentum), aggregator=aggregator, pre=pre)


def fedadam(
    lr: float = 0.1,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
    flavor: Flavor = "paper",
    *,
    aggregator: Aggregator[Any] | None = None,
    pre: Iterable[PreTransform] = (),
) -> Strategy:
    """FedAdam (Reddi et al. 2021)."""
    opt = optim.adam(lr, beta1, beta2, tau, flavor)
    return strategy("fedadam", opt, aggregator=aggregator, pre=pre)


def fedyogi(
    lr: float = 0.01,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
    flavor: Flavor = "paper",
    *,
    aggregator: Aggregator[Any] | None = None,
    pre: Iterable[PreTransform] = (),
) -> Strategy:
    """FedYogi (Reddi et al. 2021)."""
    opt = optim.yogi(lr, beta1, beta2, tau, flavor)
    return strategy("fedyogi", opt, aggregator=aggregator, pre=pre)


def fedadagrad(
    lr: float = 0.1,
    beta1: float | None = None,
    tau: float = 1e-3,
    flavor: Flavor = "paper",
    *,
    aggregator: Aggregator[Any] | None = None,
    pre: Iterable[PreTransform] = (),
) -> Strategy:
    """FedAdagrad (Reddi et al. 2021). ``beta1=None`` is the flavor's default: 0.9 for
    ``"paper"`` (as FedAdam and FedYogi), 0 for ``"flower"`` (Flower's FedAdagrad)."""
    opt = optim.adagrad(lr, beta1, tau, flavor)
    return strategy("fedadagrad", opt, aggregator=aggregator, pre=pre)
