"""FedAMD's server policy: anchor sampling with an O(model) running sum of anchors.

Before the first round every client computes its anchor gradient at ``x_0`` (the paper's
initial full pass). Each round then samples ``clients_per_round`` clients (the same stream
as :class:`SyncPolicy`, so runs compare client for client) and makes each an anchor with
probability ``anchor_prob``, else a miner. As in the reference code (``--pr``), an integer
``anchor_prob = P >= 2`` is a period instead: all the sampled clients are anchors in the
rounds ``t`` with ``t mod P == 0`` (counting from 0), and miners otherwise. ``P = 1`` is
refused: every round would be all anchors and the model would never move. Miners receive
``d_t = S / N``; anchors refresh their stored anchors, whose differences the server adds to
``S = sum_i v_i`` as they arrive (so ``d_{t+1}`` sees them).

The miners' deltas go through the strategy: ``x <- x + lr * mean(miner deltas)``, the plain
mean of the reference (``weights="identical"``), or with ``weights="examples"`` the mean
weighted by the miners' sample counts. A round without a miner leaves the model as it was.

The server holds the model, ``S`` (float64) and the round's aggregate: O(model), never the
N anchors, which each client keeps as its own state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fedagg._checkpoint import register
from fedagg.core import kernels
from fedagg.core.strategy import ServerState, Strategy
from fedagg.errors import ConfigError, UpdateError
from fedagg.policy._events import (
    Action,
    Applied,
    Arrival,
    Commit,
    Dispatch,
    Dropout,
    Event,
    Finish,
    PolicyContext,
    Start,
    apply_or_skip,
    effective_weights,
    note_refusal,
    refusal_reason,
    round_stats,
)

__all__ = ["FedAMDPolicy", "FedAMDState"]

Arr = npt.NDArray[Any]
MinerWeights = Literal["identical", "examples"]


@register
@dataclass
class FedAMDState:
    server: ServerState
    anchor_sum: Arr  # S = sum_i v_i, float64, flat
    round: int = 0
    init_phase: bool = True
    agg: Any = None
    pending: set[int] = field(default_factory=set)
    next_job: int = 0
    started: float = 0.0
    selected: int = 0
    anchors: int = 0  # anchors refreshed this round
    folded: int = 0
    dropped: int = 0
    refused: int = 0
    late: int = 0
    loss_sum: float = 0.0
    loss_weight: float = 0.0
    weights: list[float] = field(default_factory=list)  # the miners' aggregation weights
    participants: list[int] = field(default_factory=list)
    accepted: dict[int, Any] = field(default_factory=dict)
    refusals: dict[str, int] = field(default_factory=dict)  # this round's, by reason


@dataclass(frozen=True)
class FedAMDPolicy:
    """FedAMD (module docstring). Use with :class:`fedagg.clients.FedAMD`.

    Args:
        strategy: aggregator and server optimizer of the miners' deltas.
        rounds: T.
        clients_per_round: clients sampled each round (anchors and miners together).
        anchor_prob: the probability that a sampled client is an anchor, in ``[0, 1)``; or an
            integer period ``P >= 2``: all sampled clients are anchors when ``t mod P == 0``.
        weights: ``"identical"`` (the reference's plain mean of the miners' deltas) or
            ``"examples"`` (weighted by the miners' sample counts).
    """

    strategy: Strategy
    rounds: int
    clients_per_round: int
    anchor_prob: float = 0.2
    weights: MinerWeights = "identical"

    def __post_init__(self) -> None:
        if self.rounds < 1 or self.clients_per_round < 1:
            raise ConfigError("rounds and clients_per_round must be >= 1")
        p = self.anchor_prob
        if p == 1:
            raise ConfigError(
                "anchor_prob = 1 would make every sampled client an anchor in every round "
                "(period 1), so the model would never move. Use a probability in [0, 1), or "
                "an integer period P >= 2 (all sampled clients are anchors when t mod P == 0). "
                "The reference code's pr = 1 means no anchors at all: anchor_prob = 0 here"
            )
        if not (0 <= p < 1 or (p >= 2 and float(p).is_integer())):
            raise ConfigError(f"anchor_prob must be in [0, 1) or an integer period >= 2, got {p!r}")
        if self.weights not in ("identical", "examples"):
            raise ConfigError(
                f"FedAMD's weights must be 'identical' or 'examples', not {self.weights!r}"
            )

    def init(self, server: ServerState, ctx: PolicyContext) -> FedAMDState:
        return FedAMDState(server=server, anchor_sum=np.zeros(server.spec.size, np.float64))

    def step(self, state: FedAMDState, event: Event, ctx: PolicyContext) -> list[Action]:
        if isinstance(event, Start):
            clients = tuple(range(ctx.num_clients))
            state.pending = set(range(state.next_job, state.next_job + len(clients)))
            state.next_job += len(clients)
            return [Dispatch(clients, (False,) * len(clients), {"role": "anchor"})]
        if isinstance(event, Arrival):
            if event.job not in state.pending:
                state.late += 1
                return []
            state.pending.discard(event.job)
            role = event.extra.get("role")
            if role == "anchor":
                self._anchor(state, event)
            elif role == "miner" and not state.init_phase:
                self._miner(state, event)
            else:
                state.refused += 1
                note_refusal(state.refusals, "unexpected role")
        elif isinstance(event, Dropout):
            if event.job not in state.pending:
                return []
            state.pending.discard(event.job)
            state.dropped += 1
        else:
            return []
        if state.pending:
            return []
        actions: list[Action] = []
        if state.init_phase:
            state.init_phase = False
            actions.append(Commit(dict(state.accepted)))
        else:
            self._close(state, event.now, actions)
        self._advance(state, event.now, ctx, actions)
        return actions

    def direction(self, state: FedAMDState, num_clients: int) -> Arr:
        """``d_t = S / N`` in the model's dtype (flat)."""
        return (state.anchor_sum / num_clients).astype(state.server.spec.dtype)

    # -- internals ----------------------------------------------------------------------------
    def _anchor(self, state: FedAMDState, ev: Arrival) -> None:
        spec = state.server.spec
        problem = spec.mismatch(ev.update.delta)
        if problem is not None:
            state.refused += 1
            note_refusal(state.refusals, refusal_reason(problem))
            return
        segs = spec.segments(ev.update.delta)
        if not all(kernels.all_finite(s, use_numba=False) for s in segs):
            state.refused += 1
            note_refusal(state.refusals, "non-finite values")
            return
        state.anchor_sum += spec.as_flat(ev.update.delta)
        state.anchors += 1
        if ev.client_state is not None:
            state.accepted[ev.client] = ev.client_state

    def _miner(self, state: FedAMDState, ev: Arrival) -> None:
        update = ev.update
        if self.weights == "identical" and update.is_weight_valid():
            update = replace(update, weight=1.0)  # an invalid weight is still refused
        try:
            self.strategy.aggregator.fold(state.agg, update)
        except UpdateError as e:
            state.refused += 1
            note_refusal(state.refusals, refusal_reason(e))
            return
        state.folded += 1
        state.participants.append(ev.client)
        state.weights.append(float(update.weight))
        n = float(ev.update.weight)  # the loss is averaged over the miners' examples
        state.loss_sum += n * float(ev.update.metrics.get("train_loss", math.nan))
        state.loss_weight += n

    def _advance(
        self, state: FedAMDState, now: float, ctx: PolicyContext, actions: list[Action]
    ) -> None:
        while state.round < self.rounds:
            if self._open(state, now, ctx, actions):
                return
            self._close(state, now, actions)
        actions.append(Finish())

    def _open(
        self, state: FedAMDState, now: float, ctx: PolicyContext, actions: list[Action]
    ) -> bool:
        rng = np.random.default_rng([ctx.seed, 0x5EC7, state.round])
        avail = ctx.available(state.round)
        want = min(len(avail), self.clients_per_round)
        chosen = np.sort(rng.choice(avail, size=want, replace=False)) if want else avail[:0]
        p = self.anchor_prob
        if p >= 1:
            is_anchor = np.full(want, state.round % int(p) == 0)
        else:
            is_anchor = np.random.default_rng([ctx.seed, 0xA3D, state.round]).random(want) < p
        state.agg = self.strategy.begin(state.server)
        state.started, state.selected = now, want
        state.anchors = state.folded = state.dropped = state.refused = state.late = 0
        state.loss_sum = state.loss_weight = 0.0
        state.weights, state.participants, state.accepted = [], [], {}
        state.refusals = {}
        if want == 0:
            return False
        anchors = tuple(int(c) for c, a in zip(chosen, is_anchor, strict=True) if a)
        miners = tuple(int(c) for c, a in zip(chosen, is_anchor, strict=True) if not a)
        state.pending = set(range(state.next_job, state.next_job + want))
        state.next_job += want
        if anchors:
            actions.append(Dispatch(anchors, (False,) * len(anchors), {"role": "anchor"}))
        if miners:
            d = state.server.spec.unflatten(self.direction(state, ctx.num_clients))
            actions.append(
                Dispatch(miners, (False,) * len(miners), {"role": "miner", "direction": d})
            )
        return True

    def _close(self, state: FedAMDState, now: float, actions: list[Action]) -> None:
        new = apply_or_skip(self.strategy, state.server, state.agg, 1.0) if state.folded else None
        applied = new is not None
        omega = effective_weights(state.weights, 1.0) if applied else ()
        stats = round_stats(
            state, state.round, now, applied, state.selected, state.loss_sum,
            state.loss_weight, omega, dispatched=state.selected,
        )  # fmt: skip
        if new is not None:
            state.server = new
        state.agg = None
        state.round += 1
        actions.append(Applied(stats, dict(state.accepted)))
