"""What a policy and its engine say to each other, and what every policy shares.

A policy never reads a clock or does I/O: the engine (the simulator, or the deployment's
server) feeds it events with their (virtual or real) time, and carries out the actions it
returns. Its state is a plain dataclass the engine hands back on every step, so a run can be
checkpointed between events.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

import numpy as np
import numpy.typing as npt

from fedagg.core.strategy import ServerState, Strategy
from fedagg.core.update import Update
from fedagg.errors import EmptyAggregate, InvalidWeight, StaleUpdate, UpdateError

__all__ = [
    "Action",
    "AllAvailable",
    "Applied",
    "Arrival",
    "Commit",
    "Dispatch",
    "Dropout",
    "Event",
    "Finish",
    "MaskedMerge",
    "Merge",
    "Policy",
    "PolicyContext",
    "RoundStats",
    "SecureContext",
    "SecureReply",
    "SecureRequest",
    "SetTimer",
    "Start",
    "Timer",
    "apply_or_skip",
    "effective_weights",
    "format_refusals",
    "note_refusal",
    "partial_epochs",
    "refusal_reason",
    "round_stats",
    "settled_reason",
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
    client_state: Any = None  # the client's new persistent state, kept only if accepted
    update_bytes: int = 0  # what the upload weighed (for traffic accounting)


@dataclass(frozen=True, slots=True)
class Merge:
    """A partial aggregate from a subtree (an edge aggregator): several clients' updates,
    already folded by the same aggregator into ``state``, merged into the round's aggregate
    with the monoid's ``merge``. ``jobs`` holds ``(client, job, weight, train_loss)`` for
    each update it covers; it is taken whole or (if any of its jobs is no longer pending)
    not at all."""

    now: float
    jobs: tuple[tuple[int, int, float, float], ...]
    state: Any


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


@dataclass(frozen=True, slots=True)
class SecureReply:
    """Secure aggregation (:class:`fedagg.policy.SecurePolicy`): a client's reply to the
    request of ``stage`` of secure round ``round`` (a :mod:`fedagg.secagg` message:
    ``AdvertiseKeys`` at stage 0, ``ShareKeys`` 1, ``ConsistencySignature`` 3,
    ``UnmaskResponse`` 4; the masked input of stage 2 arrives as an :class:`Arrival` whose
    delta is the uint32 masked vector)."""

    now: float
    client: int
    job: int
    round: int
    stage: int
    message: Any


@dataclass(frozen=True, slots=True)
class MaskedMerge:
    """Secure aggregation through an edge: the wrap-around uint32 sum of the masked inputs of
    ``jobs`` (``(client, job, train_loss)`` each) of secure round ``round``, folded by an edge
    that never saw a plaintext update."""

    now: float
    round: int
    jobs: tuple[tuple[int, int, float], ...]
    values: Arr


Event: TypeAlias = Start | Arrival | Merge | Dropout | Timer | SecureReply | MaskedMerge


# -- actions (policy -> engine) ----------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Dispatch:
    """Send the current model to ``clients``. ``partial[i]`` marks a straggler that does only
    part of its local work (the engine draws 1..E-1 epochs for it, as the FedProx code does,
    and gives it the duration of a full job). ``server_extra`` goes to every client
    (SCAFFOLD's c); the policy hands over a value it will not change afterwards."""

    clients: tuple[int, ...]
    partial: tuple[bool, ...]
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
    staleness_max: int = 0
    omega: tuple[float, ...] = ()  # each participant's effective weight: x += lr * sum(w * d)
    #: why updates were refused: ``(reason, count)`` sorted by reason, the counts adding up
    #: to ``refused`` (see :func:`refusal_reason`)
    refusals: tuple[tuple[str, int], ...] = ()
    #: the run's (epsilon, delta)-DP epsilon after this round
    #: (:class:`~fedagg.policy.PrivatePolicy`); NaN without differential privacy
    epsilon: float = math.nan


@dataclass(frozen=True, slots=True)
class Applied:
    """The round closed (its model update applied if ``stats.applied``). ``client_states``
    are the new persistent states of the clients whose updates it applied (SCAFFOLD's c_i):
    a client whose update was late, refused or not applied keeps its old state."""

    stats: RoundStats
    client_states: dict[int, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Commit:
    """Keep these clients' new persistent states now, outside a model update (FedAMD's
    initial anchors)."""

    client_states: dict[int, Any]


@dataclass(frozen=True, slots=True)
class Finish:
    pass


@dataclass(frozen=True, slots=True)
class SecureRequest:
    """Secure aggregation: send each client of ``messages`` (client -> message, with its job
    in ``jobs``) its request of ``stage`` of secure round ``round``: stage 0 the round's
    public :class:`fedagg.secagg.RoundParams` (advertise your keys), 1 a ``KeyDirectory``
    (share your secrets), 2 ``ForwardedShares`` (mask and upload your update when trained),
    3 a ``ConsistencyRequest`` (sign the survivor set), 4 an ``UnmaskRequest``. A client's
    reply comes back as a :class:`SecureReply` (stage 2's as an :class:`Arrival`)."""

    round: int
    stage: int
    messages: Mapping[int, Any]
    jobs: Mapping[int, int]


Action: TypeAlias = Dispatch | SetTimer | Applied | Commit | Finish | SecureRequest


class PolicyContext(Protocol):
    """What a policy may ask of its engine: deterministic facts, no clock, no I/O."""

    @property
    def num_clients(self) -> int: ...

    @property
    def seed(self) -> int: ...

    def available(self, slot: int) -> Arr: ...


class SecureContext(PolicyContext, Protocol):
    """A context that can also name each client's long-term Ed25519 identity (raw 32-byte
    public key), as a trusted PKI would: what :class:`fedagg.policy.SecurePolicy` checks the
    clients' signatures with. The simulator makes a key per client; a deployment reads its
    ``authorized_keys``."""

    def identity(self, client: int) -> bytes: ...


class Policy(Protocol):
    """A round or async policy: ``init`` then ``step`` for every event, in time order."""

    def init(self, server: ServerState, ctx: PolicyContext) -> Any: ...

    def step(self, state: Any, event: Event, ctx: PolicyContext) -> list[Action]: ...


class AllAvailable:
    """A :class:`PolicyContext` in which every client is available in every slot (a
    deployment's server, or an edge aggregator's own policy)."""

    def __init__(self, num_clients: int, seed: int) -> None:
        self._n = num_clients
        self._seed = seed
        self._all = np.arange(num_clients)

    @property
    def num_clients(self) -> int:
        return self._n

    @property
    def seed(self) -> int:
        return self._seed

    def available(self, slot: int) -> Arr:
        return self._all


def partial_epochs(full: int, seed: int, job: int) -> int:
    """A straggler's epochs (a :class:`Dispatch` with ``partial`` set): uniform on 1..E-1
    (FedProx's ``randint(1, E)``), 1 if E <= 1. The same draw in the simulator and in
    deployment."""
    if full <= 1:
        return 1
    return int(np.random.default_rng([seed, 0x5A1, job]).integers(1, full))


def round_stats(
    state: Any,
    round_: int,
    now: float,
    applied: bool,
    selected: int,
    loss_sum: float,
    loss_weight: float,
    omega: tuple[float, ...],
    staleness: Sequence[int] = (),
    dispatched: int | None = None,
) -> RoundStats:
    """The stats of a closed round or server step, from the fields every policy state has
    (``server``, ``started``, ``folded``, ``dropped``, ``refused``, ``late``,
    ``participants``, and ``dispatched`` unless given)."""
    return RoundStats(
        round=round_,
        version=state.server.version,
        started=state.started,
        ended=now,
        selected=selected,
        dispatched=state.dispatched if dispatched is None else dispatched,
        folded=state.folded,
        dropped=state.dropped,
        refused=state.refused,
        late=state.late,
        weight=loss_weight,
        client_loss=loss_sum / loss_weight if loss_weight else math.nan,
        staleness_mean=math.fsum(staleness) / len(staleness) if staleness else 0.0,
        participants=tuple(state.participants),
        applied=applied,
        staleness_max=max(staleness, default=0),
        omega=omega if applied else (),
        refusals=tuple(sorted(getattr(state, "refusals", {}).items())),
    )


# -- refusal reasons ---------------------------------------------------------------------------
#: A reason's length cap, and the distinct reasons one round keeps (more count as "other"):
#: the reason text derives from what clients send, so neither may grow without bound.
MAX_REASON = 48
MAX_REASONS = 8


def refusal_reason(error: BaseException | str) -> str:
    """A short, stable reason for a refused update, from the error its check raised (or that
    error's reason text): ``"dtype float64, expected float32"``, ``"shape"``,
    ``"non-finite values"``, ``"overflow"``, ``"invalid weight"``, ``"stale"``, ... Never a
    client id and never longer than :data:`MAX_REASON` characters; the text of an error this
    does not know (a custom aggregator's) is kept, its numbers masked, cut to that length."""
    if isinstance(error, StaleUpdate):
        return "stale"
    if isinstance(error, InvalidWeight):
        return "invalid weight"
    text = error.reason if isinstance(error, UpdateError) else str(error)
    if isinstance(error, UpdateError) and error.client_id:
        text = re.sub(rf"(?<![\w-]){re.escape(error.client_id)}(?![\w-])", "<client>", text)
    text = " ".join(text.split())
    m = re.search(r"dtype (.+?), expected (\S+)", text)
    if m:
        return f"dtype {m[1][:16]}, expected {m[2][:16]}"
    low = text.lower()
    for needles, reason in _REASONS:
        if any(n in low for n in needles):
            return reason
    return re.sub(r"\d+", "#", text)[:MAX_REASON] or "refused"


_REASONS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("nan or inf", "non-finite"), "non-finite values"),
    (("overflow",), "overflow"),
    (("shape",), "shape"),
    (("names differ",), "array names"),
    (("arrays, expected",), "array count"),
    (("buffer",), "buffer size"),
    (("model version",), "stale"),
    (("weight", "scale"), "invalid weight"),
)


def note_refusal(refusals: dict[str, int], reason: str, count: int = 1) -> None:
    """Count ``count`` refusals for ``reason`` in a round's ``refusals`` (a policy state's
    field): at most :data:`MAX_REASONS` distinct reasons, the rest under ``"other"``."""
    reason = reason[:MAX_REASON]
    if reason not in refusals and len(refusals) >= MAX_REASONS:
        reason = "other"
    refusals[reason] = refusals.get(reason, 0) + count


def settled_reason(agg: Any, client_id: str) -> str:
    """Why an aggregator that folds at the round's close (:meth:`Canonical.settle
    <fedagg.deploy.Canonical.settle>`) refused ``client_id``'s update: the reason it
    recorded in its state's ``refused`` list of ``(client_id, reason)``, if it keeps one."""
    recorded = getattr(agg, "refused", None)
    if isinstance(recorded, list):
        for item in reversed(recorded):
            if isinstance(item, tuple) and len(item) == 2 and item[0] == client_id:
                return refusal_reason(str(item[1]))
    return "refused at close"


def format_refusals(refusals: Sequence[tuple[str, int]] | Mapping[str, int]) -> str:
    """``"dtype float64, expected float32: 3; non-finite values: 1"`` ("" for none)."""
    items = sorted(refusals.items()) if isinstance(refusals, Mapping) else list(refusals)
    return "; ".join(f"{reason}: {n}" for reason, n in items)


def apply_or_skip(
    strategy: Strategy, server: ServerState, agg: Any, mass: float
) -> ServerState | None:
    """The round's new server state, or None if the rule cannot finalize this round (a
    robust rule given fewer updates than it needs): the model then stays as it was. The
    round's aggregate ``agg`` is consumed (donated: the close's one model-sized buffer); the
    caller drops it."""
    try:
        return strategy.apply(server, agg, scale=mass, donate=True)
    except EmptyAggregate:
        return None


def effective_weights(weights: list[float], mass: float) -> tuple[float, ...]:
    """Each folded update's coefficient in ``x += lr * sum(omega_i * delta_i)``: the mean's
    ``w_i / sum(w)`` times the policy's mass."""
    total = math.fsum(weights)
    return tuple(w * mass / total for w in weights) if total > 0 else ()
