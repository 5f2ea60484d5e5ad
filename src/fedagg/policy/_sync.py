"""Synchronous rounds (FedAvg, FedProx's stragglers, SCAFFOLD's control variate, FedAU's
weighting): the first implementation of the :class:`~fedagg.policy.Policy` protocol; the
asynchronous ones (FedBuff, FedAsync, FedFix) and FedAMD's are further ones.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fedagg._checkpoint import register
from fedagg.core.participation import Weighting
from fedagg.core.strategy import ServerState, Strategy
from fedagg.errors import ConfigError, StateError, UpdateError
from fedagg.policy._events import (
    Action,
    Applied,
    Arrival,
    Dispatch,
    Dropout,
    Event,
    Finish,
    Merge,
    PolicyContext,
    RoundStats,
    SetTimer,
    Start,
    Timer,
    apply_or_skip,
    effective_weights,
    note_refusal,
    refusal_reason,
    round_stats,
    settled_reason,
)

__all__ = ["SyncPolicy", "SyncState"]

Arr = npt.NDArray[Any]


# -- synchronous rounds ------------------------------------------------------------------------
@register
@dataclass
class SyncState:
    """The synchronous policy's whole state (a value the engine holds)."""

    server: ServerState
    round: int = 0
    agg: Any = None
    open: bool = False
    started: float = 0.0
    selected: int = 0
    pending: set[int] = field(default_factory=set)  # jobs of this round not yet reported
    dispatched: int = 0
    folded: int = 0
    dropped: int = 0
    refused: int = 0
    late: int = 0
    loss_sum: float = 0.0
    weight_sum: float = 0.0
    participants: list[int] = field(default_factory=list)
    control: dict[str, Arr] | None = None  # SCAFFOLD's server control variate c
    control_sum: dict[str, Arr] | None = None
    accepted: dict[int, Any] = field(default_factory=dict)
    next_job: int = 0
    weights: list[float] = field(default_factory=list)  # the aggregation weight of each folded
    weighting: Any = None  # the participation weighting's state (FedAU's estimator)
    #: each folded update's (claimed weight, train loss), as ``weight_sum``/``loss_sum`` add them
    claims: list[tuple[float, float]] = field(default_factory=list)
    refusals: dict[str, int] = field(default_factory=dict)  # this round's, by reason


@dataclass(frozen=True)
class SyncPolicy:
    """FedAvg-style synchronous rounds.

    Each round samples ``clients_per_round * (1 + over_select)`` of the clients available in
    that round (uniformly, without replacement, seeded by (seed, round)) and folds updates as
    they arrive. The round closes when ``clients_per_round`` updates were folded, when every
    dispatched client reported or dropped, or at ``deadline`` virtual seconds after it opened;
    it is applied if at least ``min_updates`` were folded, else the model stays as it was.
    Updates arriving after their round closed are counted as late and ignored.

    Stragglers (FedProx's "drop_percent"): a fraction ``stragglers`` of the selected clients
    is slow this round. ``straggler_mode="drop"`` (FedAvg) leaves them out; ``"partial"``
    (FedProx) has each do 1..E-1 of its E local epochs in the time of a full job, as in the
    FedProx code (1 when E is 1). ``scaffold=True`` keeps SCAFFOLD's server control variate
    c and adds ``sum(delta_c) / N`` to it after each applied round.

    ``sampling="poisson"`` picks each available client independently with probability
    ``q = clients_per_round / num_clients`` (seeded the same way; the cohort's size varies,
    what DP accountants assume) and closes the round only when every sampled client reported
    or dropped (or at the deadline); ``over_select`` must then be 0.

    ``weighting`` (see :mod:`fedagg.weighting`) sets each participant's weight and the
    normaliser: the default weighs by sample count over the participants (FedAvg);
    ``fedau()`` estimates ``1/p_n`` online and divides by N (FedAU).
    """

    strategy: Strategy
    rounds: int
    clients_per_round: int
    over_select: float = 0.0
    deadline: float = math.inf
    min_updates: int = 1
    stragglers: float = 0.0
    straggler_mode: Literal["drop", "partial"] = "drop"
    scaffold: bool = False
    weighting: Weighting | None = None
    sampling: Literal["fixed", "poisson"] = "fixed"

    def __post_init__(self) -> None:
        if self.sampling not in ("fixed", "poisson"):
            raise ConfigError(f"sampling must be 'fixed' or 'poisson', got {self.sampling!r}")
        if self.sampling == "poisson" and self.over_select:
            raise ConfigError("over_select must be 0 with Poisson sampling")
        if self.rounds < 1 or self.clients_per_round < 1:
            raise ConfigError("rounds and clients_per_round must be >= 1")
        if self.over_select < 0 or not self.deadline > 0:
            raise ConfigError("over_select must be >= 0 and deadline > 0")
        if not 1 <= self.min_updates <= self.clients_per_round:
            raise ConfigError("min_updates must be in [1, clients_per_round]")
        if not 0 <= self.stragglers <= 1 or self.straggler_mode not in ("drop", "partial"):
            raise ConfigError("stragglers must be in [0, 1]; straggler_mode 'drop' or 'partial'")

    def init(self, server: ServerState, ctx: PolicyContext) -> SyncState:
        state = SyncState(server=server)
        if self.weighting is not None:
            state.weighting = self.weighting.init(ctx.num_clients)
        if self.scaffold:
            state.control = {k: np.zeros_like(v) for k, v in _as_dict(server.model).items()}
        return state

    def step(self, state: SyncState, event: Event, ctx: PolicyContext) -> list[Action]:
        if isinstance(event, Start):
            return self._advance(state, event.now, ctx, [])
        if isinstance(event, Arrival):
            return self._arrival(state, event, ctx)
        if isinstance(event, Merge):
            return self._merge(state, event, ctx)
        if isinstance(event, Dropout):
            if state.open and event.job in state.pending:
                state.pending.discard(event.job)
                state.dropped += 1
                return self._maybe_close(state, event.now, ctx)
            return []
        if isinstance(event, Timer) and state.open and event.tag == state.round:  # deadline
            return self._close(state, event.now, ctx)
        return []

    # -- round lifecycle ----------------------------------------------------------------------
    def _advance(
        self, state: SyncState, now: float, ctx: PolicyContext, actions: list[Action]
    ) -> list[Action]:
        """Open rounds until one dispatches (a round with nobody available closes at once,
        unapplied), or finish."""
        while state.round < self.rounds:
            dispatch = self._open(state, now, ctx)
            if dispatch is not None:
                actions.append(dispatch)
                if math.isfinite(self.deadline):
                    actions.append(SetTimer(now + self.deadline, state.round))
                return actions
            actions.append(Applied(self._stats(state, now, applied=False)))
            if self.weighting is not None:
                self.weighting.observe(state.weighting, [])
            state.round += 1
        actions.append(Finish())
        return actions

    def _open(self, state: SyncState, now: float, ctx: PolicyContext) -> Dispatch | None:
        rng = _sampling_rng(ctx, state.round)
        avail = ctx.available(state.round)
        if self.sampling == "poisson":  # each client independently, q = cpr / N
            q = min(1.0, self.clients_per_round / ctx.num_clients)
            chosen = np.sort(avail[rng.random(len(avail)) < q])
        else:
            want = min(len(avail), math.ceil(self.clients_per_round * (1 + self.over_select)))
            chosen = np.sort(rng.choice(avail, size=want, replace=False)) if want else avail[:0]
        n_slow = round(self.stragglers * len(chosen))
        slow = set(rng.choice(chosen, size=n_slow, replace=False).tolist()) if n_slow else set()
        drop = self.straggler_mode == "drop"
        clients = [c for c in chosen.tolist() if not (drop and c in slow)]
        state.agg = self.strategy.begin(state.server)
        state.open, state.started, state.selected = True, now, len(chosen)
        state.pending = set(range(state.next_job, state.next_job + len(clients)))
        state.next_job += len(clients)
        state.dispatched = len(clients)
        state.folded = state.dropped = state.refused = state.late = 0
        state.loss_sum = state.weight_sum = 0.0
        state.participants = []
        state.weights = []
        state.claims = []
        state.refusals = {}
        state.accepted = {}
        if self.scaffold and state.control is not None:
            state.control_sum = {k: np.zeros_like(v) for k, v in state.control.items()}
        if not clients:
            return None
        # SCAFFOLD's c is sent as a copy: the server updates its own c in place after the
        # round, and what a client received must not change with it (nor change it)
        sent = None if state.control is None else {k: v.copy() for k, v in state.control.items()}
        return Dispatch(tuple(clients), tuple(c in slow for c in clients), sent)

    def _arrival(self, state: SyncState, ev: Arrival, ctx: PolicyContext) -> list[Action]:
        if not state.open or ev.job not in state.pending:
            state.late += 1  # from a closed round: ignored
            return []
        state.pending.discard(ev.job)
        delta_c = ev.extra.get("delta_c")
        if (delta_c is not None) != self.scaffold:
            raise ConfigError(
                "SCAFFOLD clients need SyncPolicy(scaffold=True), and only they send delta_c"
            )
        if delta_c is not None and not _fits(delta_c, state.control):
            state.refused += 1  # malformed control-variate update: refuse the whole update
            note_refusal(state.refusals, "malformed control variate")
            return self._maybe_close(state, ev.now, ctx)
        update = ev.update
        if self.weighting is not None:
            w = self.weighting.weight(state.weighting, ev.client, float(update.weight))
            update = replace(update, weight=w)
        try:
            self.strategy.aggregator.fold(state.agg, update)
        except UpdateError as e:
            state.refused += 1
            note_refusal(state.refusals, refusal_reason(e))
            return self._maybe_close(state, ev.now, ctx)
        state.folded += 1
        state.participants.append(ev.client)
        state.weights.append(float(update.weight))
        if ev.client_state is not None:
            state.accepted[ev.client] = ev.client_state
        w = float(ev.update.weight)
        loss = float(ev.update.metrics.get("train_loss", math.nan))
        state.claims.append((w, loss))
        state.weight_sum += w
        state.loss_sum += w * loss
        if state.control_sum is not None and delta_c is not None:
            for k, v in delta_c.items():
                state.control_sum[k] += v
        return self._maybe_close(state, ev.now, ctx)

    def _merge(self, state: SyncState, ev: Merge, ctx: PolicyContext) -> list[Action]:
        if self.weighting is not None or self.scaffold:
            raise ConfigError(
                "partial aggregates (edge aggregators) need per-update weights fixed at the "
                "edge: participation weighting (FedAU) and SCAFFOLD work only without edges"
            )
        jobs = [j for _, j, _, _ in ev.jobs]
        if not state.open or not all(j in state.pending for j in jobs):
            state.late += len(jobs)  # from a closed round (or partly resolved): ignored
            return []
        try:
            self.strategy.aggregator.merge(state.agg, ev.state)
        except (UpdateError, StateError) as e:
            state.pending.difference_update(jobs)
            state.refused += len(jobs)
            why = refusal_reason(e) if isinstance(e, UpdateError) else "partial aggregate mismatch"
            note_refusal(state.refusals, why, len(jobs))
            return self._maybe_close(state, ev.now, ctx)
        state.pending.difference_update(jobs)
        for client, _, w, loss in ev.jobs:
            state.folded += 1
            state.participants.append(client)
            state.weights.append(w)
            state.claims.append((w, loss))
            state.weight_sum += w
            state.loss_sum += w * loss
        return self._maybe_close(state, ev.now, ctx)

    def _maybe_close(self, state: SyncState, now: float, ctx: PolicyContext) -> list[Action]:
        full = self.sampling == "fixed" and state.folded >= self.clients_per_round
        if full or not state.pending:  # a Poisson sample waits for all its clients
            return self._close(state, now, ctx)
        return []

    def _settle(self, state: SyncState) -> None:
        """An aggregator that keeps updates until the round closes (the server's canonical
        order, :meth:`fedagg.deploy.Canonical.settle`) folds them now: those its fold refuses
        count as refused, not folded, and leave the round's participants and losses."""
        settle = getattr(self.strategy.aggregator, "settle", None)
        if settle is None or state.agg is None:
            return
        for u in settle(state.agg):
            i = next((i for i, c in enumerate(state.participants) if str(c) == u.client_id), None)
            if i is None:
                continue
            client = state.participants.pop(i)
            state.weights.pop(i)
            if i < len(state.claims):
                state.claims.pop(i)
            state.accepted.pop(client, None)
            state.folded -= 1
            state.refused += 1
            note_refusal(state.refusals, settled_reason(state.agg, u.client_id))
            # the sums as if the refused update had never been added (same order, same bits)
            state.weight_sum = state.loss_sum = 0.0
            for w, loss in state.claims:
                state.weight_sum += w
                state.loss_sum += w * loss

    def _close(self, state: SyncState, now: float, ctx: PolicyContext) -> list[Action]:
        self._settle(state)
        applied = state.folded >= self.min_updates
        mass = 1.0
        if self.weighting is not None and applied:
            mass = self.weighting.mass(state.weighting, state.weights, ctx.num_clients)
        new = apply_or_skip(self.strategy, state.server, state.agg, mass) if applied else None
        applied = new is not None
        stats = self._stats(state, now, applied, mass)
        if self.weighting is not None:
            self.weighting.observe(state.weighting, state.participants)
        if new is not None:
            state.server = new
            if state.control is not None and state.control_sum is not None:
                for k, v in state.control_sum.items():  # SCAFFOLD: c += sum(delta_c) / N
                    state.control[k] += v / v.dtype.type(ctx.num_clients)
        kept = dict(state.accepted) if applied else {}
        state.open = False
        state.pending = set()
        state.agg = None
        state.round += 1
        return self._advance(state, now, ctx, [Applied(stats, kept)])

    def _stats(self, state: SyncState, now: float, applied: bool, mass: float = 1.0) -> RoundStats:
        omega = effective_weights(state.weights, mass) if applied else ()
        return round_stats(
            state,
            state.round,
            now,
            applied,
            state.selected,
            state.loss_sum,
            state.weight_sum,
            omega,
        )


def _fits(delta_c: Any, control: dict[str, Arr] | None) -> bool:
    """Whether a SCAFFOLD delta_c has the control variate's names and shapes, all finite."""
    if control is None or not isinstance(delta_c, dict) or set(delta_c) != set(control):
        return False
    return all(
        isinstance(v, np.ndarray) and v.shape == control[k].shape and bool(np.isfinite(v).all())
        for k, v in delta_c.items()
    )


def _as_dict(model: Any) -> dict[str, Arr]:
    if isinstance(model, dict):
        return model
    return {str(i): a for i, a in enumerate(model)}


def _sampling_rng(ctx: PolicyContext, round_: int) -> np.random.Generator:
    """The generator of one round's cohort (and simulated stragglers). In a deployment with
    DP the context holds a ``noise_secret`` (the server's ``dp.key``): the cohorts derive from
    it, so nobody holding the config's seed can recompute them (amplification by sampling
    needs the sample to be secret). Without one (a simulation) they derive from the run's
    seed, the stream existing runs replay."""
    secret = getattr(ctx, "noise_secret", None)
    if isinstance(secret, bytes) and len(secret) >= 16:
        key = hashlib.sha256(b"fedagg sampling secret\0" + secret + f"\0{round_}".encode()).digest()
        return np.random.default_rng(int.from_bytes(key, "little"))
    return np.random.default_rng([ctx.seed, 0x5EC7, round_])
