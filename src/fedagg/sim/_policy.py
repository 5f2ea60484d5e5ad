"""Round policies: state machines that turn events into actions.

A policy never reads a clock or does I/O: the engine (simulator now, gRPC server later) feeds
it events with their (virtual or real) time, and carries out the actions it returns. Its state
is a plain dataclass the engine hands back on every step, so a run can be checkpointed between
events. The synchronous policy lives here; the asynchronous ones (FedBuff, FedAsync, FedFix)
are further implementations of the same :class:`Policy` protocol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt

from fedagg.core.strategy import ServerState, Strategy
from fedagg.core.update import Update
from fedagg.errors import ConfigError, UpdateError

__all__ = [
    "Action",
    "Applied",
    "Arrival",
    "Dispatch",
    "Dropout",
    "Event",
    "Finish",
    "Policy",
    "PolicyContext",
    "RoundStats",
    "SetTimer",
    "Start",
    "SyncPolicy",
    "SyncState",
    "Timer",
]

Arr = npt.NDArray[Any]


# -- events (engine -> policy) -----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Start:
    now: float


@dataclass(frozen=True, slots=True)
class Arrival:
    """A client's update reached the server. ``extra`` carries algorithm payloads (SCAFFOLD)."""

    now: float
    client: int
    job: int
    update: Update
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Dropout:
    """A dispatched client will never report for ``job``."""

    now: float
    client: int
    job: int


@dataclass(frozen=True, slots=True)
class Timer:
    now: float
    tag: int


Event: TypeAlias = Start | Arrival | Dropout | Timer


# -- actions (policy -> engine) ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Dispatch:
    """Send the current model to ``clients``; ``epochs[i]`` overrides client i's local epochs
    (``None``: the algorithm's own). ``server_extra`` goes to every client (SCAFFOLD's c)."""

    clients: tuple[int, ...]
    epochs: tuple[int | None, ...]
    server_extra: Any = None


@dataclass(frozen=True, slots=True)
class SetTimer:
    at: float
    tag: int


@dataclass(frozen=True, slots=True)
class RoundStats:
    """What one model update folded (the engine adds evaluation and wall time)."""

    round: int
    version: int
    started: float
    ended: float
    selected: int
    dispatched: int
    folded: int
    dropped: int
    refused: int
    late: int
    weight: float
    client_loss: float
    staleness_mean: float
    participants: tuple[int, ...]
    applied: bool


@dataclass(frozen=True, slots=True)
class Applied:
    """The round closed (its model update applied if ``stats.applied``)."""

    stats: RoundStats


@dataclass(frozen=True, slots=True)
class Finish:
    pass


Action: TypeAlias = Dispatch | SetTimer | Applied | Finish


class PolicyContext(Protocol):
    """What a policy may ask of its engine: deterministic facts, no clock, no I/O."""

    @property
    def num_clients(self) -> int: ...

    @property
    def seed(self) -> int: ...

    def available(self, slot: int) -> Arr: ...


class Policy(Protocol):
    """A round or async policy: ``init`` then ``step`` for every event, in time order."""

    def init(self, server: ServerState, ctx: PolicyContext) -> Any: ...

    def step(self, state: Any, event: Event, ctx: PolicyContext) -> list[Action]: ...


# -- synchronous rounds ------------------------------------------------------------------------
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
    next_job: int = 0


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
    (FedProx) has each do ``randint(1, epochs)`` local epochs, i.e. 1..epochs-1 as in the
    FedProx code (1 when epochs is 1).
    """

    strategy: Strategy
    rounds: int
    clients_per_round: int
    over_select: float = 0.0
    deadline: float = math.inf
    min_updates: int = 1
    stragglers: float = 0.0
    straggler_mode: Literal["drop", "partial"] = "drop"
    epochs: int = 1
    scaffold: bool = False

    def __post_init__(self) -> None:
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
        if self.scaffold:
            state.control = {k: np.zeros_like(v) for k, v in _as_dict(server.model).items()}
        return state

    def step(self, state: SyncState, event: Event, ctx: PolicyContext) -> list[Action]:
        if isinstance(event, Start):
            return self._open(state, event.now, ctx)
        if isinstance(event, Arrival):
            return self._arrival(state, event, ctx)
        if isinstance(event, Dropout):
            if state.open and event.job in state.pending:
                state.pending.discard(event.job)
                state.dropped += 1
                return self._maybe_close(state, event.now, ctx)
            return []
        if state.open and event.tag == state.round:  # the round's deadline
            return self._close(state, event.now, ctx)
        return []

    # -- round lifecycle ----------------------------------------------------------------------
    def _open(self, state: SyncState, now: float, ctx: PolicyContext) -> list[Action]:
        rng = np.random.default_rng([ctx.seed, 0x5EC7, state.round])
        avail = ctx.available(state.round)
        want = min(len(avail), math.ceil(self.clients_per_round * (1 + self.over_select)))
        chosen = np.sort(rng.choice(avail, size=want, replace=False)) if want else avail[:0]
        n_slow = round(self.stragglers * len(chosen))
        slow = set(rng.choice(chosen, size=n_slow, replace=False).tolist()) if n_slow else set()
        clients: list[int] = []
        epochs: list[int | None] = []
        for c in chosen.tolist():
            if c in slow and self.straggler_mode == "drop":
                continue
            clients.append(c)
            partial = c in slow and self.epochs > 1
            epochs.append(
                int(rng.integers(1, self.epochs)) if partial else (1 if c in slow else None)
            )
        state.agg = self.strategy.begin(state.server)
        state.open, state.started, state.selected = True, now, len(chosen)
        state.pending = set(range(state.next_job, state.next_job + len(clients)))
        state.next_job += len(clients)
        state.dispatched, state.folded, state.dropped, state.refused, state.late = (
            len(clients),
            0,
            0,
            0,
            0,
        )
        state.loss_sum = state.weight_sum = 0.0
        state.participants = []
        if self.scaffold and state.control is not None:
            state.control_sum = {k: np.zeros_like(v) for k, v in state.control.items()}
        actions: list[Action] = []
        if clients:
            actions.append(Dispatch(tuple(clients), tuple(epochs), state.control))
        if math.isfinite(self.deadline):
            actions.append(SetTimer(now + self.deadline, state.round))
        if not clients:
            actions.extend(self._close(state, now, ctx))
        return actions

    def _arrival(self, state: SyncState, ev: Arrival, ctx: PolicyContext) -> list[Action]:
        if not state.open or ev.job not in state.pending:
            state.late += 1  # from a closed round: ignored
            return []
        state.pending.discard(ev.job)
        try:
            self.strategy.aggregator.fold(state.agg, ev.update)
        except UpdateError:
            state.refused += 1
            return self._maybe_close(state, ev.now, ctx)
        state.folded += 1
        state.participants.append(ev.client)
        w = float(ev.update.weight)
        state.weight_sum += w
        state.loss_sum += w * float(ev.update.metrics.get("train_loss", math.nan))
        if state.control_sum is not None and "delta_c" in ev.extra:
            for k, v in ev.extra["delta_c"].items():
                state.control_sum[k] += v
        return self._maybe_close(state, ev.now, ctx)

    def _maybe_close(self, state: SyncState, now: float, ctx: PolicyContext) -> list[Action]:
        if state.folded >= self.clients_per_round or not state.pending:
            return self._close(state, now, ctx)
        return []

    def _close(self, state: SyncState, now: float, ctx: PolicyContext) -> list[Action]:
        applied = state.folded >= self.min_updates
        version = state.server.version
        if applied:
            state.server = self.strategy.apply(state.server, state.agg)
            if state.control is not None and state.control_sum is not None:
                for k, v in state.control_sum.items():  # SCAFFOLD: c += sum(delta_c) / N
                    state.control[k] += v / v.dtype.type(ctx.num_clients)
        stats = RoundStats(
            round=state.round,
            version=version,
            started=state.started,
            ended=now,
            selected=state.selected,
            dispatched=state.dispatched,
            folded=state.folded,
            dropped=state.dropped,
            refused=state.refused,
            late=state.late,
            weight=state.weight_sum,
            client_loss=state.loss_sum / state.weight_sum if state.weight_sum else math.nan,
            staleness_mean=0.0,
            participants=tuple(state.participants),
            applied=applied,
        )
        state.open = False
        state.pending = set()
        state.agg = None
        state.round += 1
        actions: list[Action] = [Applied(stats)]
        if state.round >= self.rounds:
            actions.append(Finish())
        else:
            actions.extend(self._open(state, now, ctx))
        return actions


def _as_dict(model: Any) -> dict[str, Arr]:
    if isinstance(model, dict):
        return model
    return {str(i): a for i, a in enumerate(model)}
