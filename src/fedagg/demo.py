"""``fedagg demo``: federated softmax regression on scikit-learn's digits, a recipe over the
library (``fedagg.data``, ``models.LogReg``, ``clients.LocalSGD``, ``sim.Simulation``): FedAvg,
then FedAdam, on the same clients. With ``inject_bad``, one update of FedAvg's round 2 holds
NaN; the aggregator refuses it and the round goes on. Deterministic by ``seed``; importing has
no side effects. ``run_demo(seed=0, rounds=10, inject_bad=True, on_record=print)``"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np

import fedagg
from fedagg import data, sim
from fedagg.clients import LocalSGD
from fedagg.models import LogReg

__all__ = ["Refusal", "RoundRecord", "check_settings", "federated_digits", "run_demo"]

TEST_FRACTION, ALPHA = 0.25, 0.5  # held-out share; Dirichlet concentration of the label skew
LOCAL_EPOCHS, BATCH_SIZE, CLIENT_LR = 5, 32, 0.5
FEDADAM_LR, FEDADAM_TAU = 0.2, 1e-3
MAX_CLIENTS = 200
BAD_CLIENT_ROUND = 2  # the round of the first strategy in which one update holds NaN


class Refusal(NamedTuple):  # an update the aggregator refused: who sent it and why
    client_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One round. ``params_sha256`` fingerprints the global model after it; ``agg_ms`` (fold,
    finalize and optimizer step) is left out of equality, so equal runs give equal records."""

    strategy: str
    round: int
    test_loss: float
    test_accuracy: float
    clients: int
    refused: tuple[Refusal, ...]
    params_sha256: str
    agg_ms: float = field(compare=False)


def federated_digits(seed: int, num_clients: int) -> data.FederatedData:
    return data.load("digits", num_clients=num_clients, partition="label_dirichlet",
                     alpha=ALPHA, test_fraction=TEST_FRACTION, seed=seed)  # fmt: skip


@dataclass
class _Watch:
    """A strategy's aggregator or optimizer, noting its time, whose updates it refuses (the
    simulator counts them) and the model it makes. In round ``nan_in``, the second update to
    arrive holds NaN, as if that client's training had diverged."""

    inner: Any
    log: dict[str, Any]
    nan_in: int | None = None

    def __getattr__(self, name: str) -> Any:  # the rest is the wrapped object's
        return getattr(self.inner, name)

    def _timed(self, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args)
        except fedagg.UpdateError as e:
            self.log["refused"].append(Refusal(f"client-{int(e.client_id):02d}", e.reason))
            raise
        finally:
            self.log["seconds"] += time.perf_counter() - t0

    def fold(self, state: Any, update: fedagg.Update) -> Any:
        self.log["arrivals"] += 1
        if (self.log["round"], self.log["arrivals"]) == (self.nan_in, 2):
            delta = {k: np.array(v) for k, v in update.delta.items()}  # type: ignore[union-attr]
            delta["W"][3, 7] = np.nan
            update = replace(update, delta=delta)
        return self._timed(self.inner.fold, state, update)

    def finalize_flat(self, state: Any) -> Any:
        return self._timed(self.inner.finalize_flat, state)

    def step(self, opt: Any, params: Any, delta: Any) -> Any:
        new, opt = self._timed(self.inner.step, opt, params, delta)
        self.log["sha256"] = hashlib.sha256(np.ascontiguousarray(new).tobytes()).hexdigest()
        return new, opt


def check_settings(seed: int, rounds: int, clients: int, per_round: int) -> None:
    """Raise :class:`~fedagg.ConfigError` unless :func:`run_demo` can run these settings."""
    if not (isinstance(seed, (int, np.integer)) and seed >= 0 and rounds >= 1):
        raise fedagg.ConfigError(f"need seed >= 0 and rounds >= 1, got {seed!r} and {rounds}")
    if not 1 <= per_round <= clients <= MAX_CLIENTS:
        raise fedagg.ConfigError(f"need 1 <= per_round <= clients <= {MAX_CLIENTS}, got "
                                 f"per_round={per_round}, clients={clients}")  # fmt: skip


def run_demo(
    seed: int = 0, rounds: int = 10, clients: int = 20, per_round: int = 10, *,
    inject_bad: bool = False, on_record: Callable[[RoundRecord], None] | None = None,
) -> list[RoundRecord]:  # fmt: skip
    """Simulate ``rounds`` synchronous rounds of FedAvg, then of FedAdam, on the same data and
    client schedule; a record per round. With ``inject_bad``, one update of FedAvg's round
    ``min(2, rounds)`` holds NaN."""
    check_settings(seed, rounds, clients, per_round)
    fd = federated_digits(seed, clients)
    agg, tiny = fedagg.aggregators.mean(), [np.zeros(4, np.float32)]  # compile the fold kernels,
    state = agg.fold(agg.init(fedagg.ParamSpec.from_arrays(tiny)), fedagg.Update(tiny))
    with contextlib.suppress(fedagg.NonFiniteUpdate):  # the NaN path too, before timing them
        agg.fold(state, fedagg.Update([np.full(4, np.nan, np.float32)]))
    fedadam = fedagg.strategies.fedadam(lr=FEDADAM_LR, tau=FEDADAM_TAU, flavor="paper")
    records: list[RoundRecord] = []
    for strategy in (fedagg.strategies.fedavg(), fedadam):
        bad = min(BAD_CLIENT_ROUND, rounds) if inject_bad and not records else None
        log: dict[str, Any] = {"round": 1, "arrivals": 0, "refused": [], "seconds": 0.0}
        opt: Any = _Watch(strategy.optimizer, log)
        watched = fedagg.Strategy(strategy.name, _Watch(strategy.aggregator, log, bad), opt)

        def record(rec: sim.RoundRecord, name: str = strategy.name, log: Any = log) -> None:
            records.append(RoundRecord(
                name, rec.stats.round + 1, rec.test_loss, rec.test_accuracy, rec.stats.folded,
                tuple(log["refused"]), log["sha256"], log["seconds"] * 1e3,
            ))  # fmt: skip
            log.update(round=log["round"] + 1, arrivals=0, refused=[], seconds=0.0)
            if on_record is not None:
                on_record(records[-1])

        sim.Simulation(
            fd, LogReg(fd.num_features, fd.num_classes),
            LocalSGD(epochs=LOCAL_EPOCHS, batch_size=BATCH_SIZE, lr=CLIENT_LR), watched,
            sim.SyncPolicy(watched, rounds, per_round), sim.SystemModel(len(fd.clients), seed),
            seed=seed, on_round=record,
        ).run()  # fmt: skip
    return records
