"""Secure aggregation as a policy wrapper: SecAgg+ around synchronous rounds.

:class:`SecurePolicy` steps an inner :class:`~fedagg.policy.SyncPolicy` and runs one SecAgg+
round (:mod:`fedagg.secagg`) beside each of its rounds; like every policy it is pure (no I/O,
no clock), so the simulator and the deployment carry out the same actions.

* The inner's ``Dispatch`` passes through (the engine trains those clients) and opens a secure
  round: a :class:`~fedagg.secagg.ServerSession` over the dispatched clients (id = client
  index + 1), ``RoundParams`` sent to each as the stage-0 :class:`SecureRequest`, and a stage
  timer (``SetTimer`` with a negative tag, never an inner round's).
* :class:`SecureReply` events feed the session; a stage closes when every expected reply came
  (or its client dropped out) or at its timer, and the next stage's request goes out. Stage 2
  (the masked uploads: :class:`Arrival` events whose ``update.delta`` is the uint32 masked
  vector, or an edge's :class:`MaskedMerge`) has no timer of its own: it closes when every job
  uploaded or dropped, when ``clients_per_round`` uploads came, or at the inner's deadline
  (that ``Timer`` is not forwarded while the secure round is open): without a deadline, a
  client that neither uploads nor is reported dropped holds the round open.
* Once unmasked, the survivors' sum is decoded to ``(sum w_i x_i, sum w_i)`` (weights
  ``min(w, max_weight) / max_weight``) and handed to the inner as ONE partial aggregate: a
  ``Merge`` whose jobs all carry the mean weight ``W * max_weight / m`` (each client's weight
  stays secret), after a ``Dropout`` for every other job of the round; the inner closes and
  applies the round (server optimizer and all).
* If the protocol is abandoned (too many dropouts for the threshold), the inner gets a
  ``Dropout`` for every job and closes the round unapplied (skipped); the jobs still in the
  protocol count as refused with the reason ``"secure aggregation abandoned at stage s"``
  (a message refused by the session counts under ``"secagg: bad stage-s message"``).

The metrics a client reports (``train_loss``) and who took part stay visible to the server.

**Distributed DP** (``noise`` = ``"gaussian"`` or ``"skellam"`` with ``noise_multiplier`` z):
each round's ``RoundParams`` carry the noise, sized so that ``noise_clients`` shares (default
half of ``clients_per_round``, rounded up) make the sum's noise z times the sensitivity, so
every client adds its share of integer noise before masking (the
:class:`~fedagg.secagg.Encoder`'s module docs) and every weight is 1: the decoded mean is the
noisy sum over the m survivors divided by m. A round with fewer than ``noise_clients``
survivors is abandoned at the close of stage 2 (and the clients refuse to unmask it:
:class:`~fedagg.secagg.SecureClient`), so every decoded sum holds at least that many noise
shares, what the accounting assumes; more survivors only add noise.
:meth:`SecurePolicy.dp_encoder` is the round's encoder, for the accounting
(:func:`fedagg.privacy.distributed_rdp`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedagg._checkpoint import register
from fedagg.core.aggregate import Composed, Mean
from fedagg.core.strategy import ServerState, Strategy
from fedagg.errors import ConfigError, SecAggError
from fedagg.policy._events import (
    Action,
    Arrival,
    Dispatch,
    Dropout,
    Event,
    MaskedMerge,
    Merge,
    PolicyContext,
    SecureReply,
    SecureRequest,
    SetTimer,
    Timer,
    note_refusal,
)
from fedagg.policy._sync import SyncPolicy, SyncState
from fedagg.policy._wraps import Wraps
from fedagg.secagg import (
    AdvertiseKeys,
    ConsistencySignature,
    Encoder,
    MaskedInput,
    RoundParams,
    ServerSession,
    ShareKeys,
    UnmaskResponse,
    decode_reply,
    public_identity,
)

__all__ = ["SecurePolicy", "SecureRound", "SecureState", "stage_tag"]

_REPLIES: dict[int, type[Any]] = {
    0: AdvertiseKeys,
    1: ShareKeys,
    3: ConsistencySignature,
    4: UnmaskResponse,
}


def stage_tag(round_id: int, stage: int) -> int:
    """The (negative) timer tag of ``stage`` of secure round ``round_id``."""
    return -(round_id * 8 + stage) - 1


class SecureRound:
    """The open secure round of a :class:`SecureState` (not checkpointed: it holds the
    session's keys; a restarted server resumes it by replaying its events, or restarts the
    round with a fresh ``round_id``)."""

    def __init__(
        self,
        rid: int,
        clients: tuple[int, ...],
        jobs: list[int],
        params: RoundParams | None = None,
        session: ServerSession | None = None,
    ) -> None:
        self.rid = rid
        self._params = params
        self._session = session
        self.clients = clients
        self.job_of = dict(zip(clients, jobs, strict=True))
        self.jobs = set(jobs)
        self.stage = 0
        self.expected: set[int] = {c + 1 for c in clients}  # ids whose reply this stage awaits
        self.replied: set[int] = set()
        self.gone: set[int] = set()  # jobs that dropped out (Dropout events)
        self.bad: dict[int, str] = {}  # job -> why a message of it was refused
        self.losses: dict[int, float] = {}  # job -> train loss of its folded masked upload

    @property
    def params(self) -> RoundParams:
        assert self._params is not None
        return self._params

    @property
    def session(self) -> ServerSession:
        if self._session is None:
            raise SecAggError(f"secure round {self.rid} did not start")
        return self._session


@register
@dataclass
class SecureState:
    """:class:`SecurePolicy`'s state: the inner policy's, the open secure round, and the
    ``epoch`` that makes round ids unique across restarts (``round_id = epoch << 32 |
    round``: a deployment that restarts a round bumps it)."""

    inner: SyncState
    epoch: int = 0
    open: Any = field(default=None, metadata={"transient": True})  # SecureRound | None
    last_abandon: str = ""  # the full reason of the last abandoned secure round

    @property
    def server(self) -> ServerState:
        return self.inner.server


@dataclass(frozen=True)
class SecurePolicy(Wraps):
    """SecAgg+ around a :class:`SyncPolicy` (module docs).

    Args:
        inner: the synchronous rounds (mean aggregator without pre-transforms, example
            weights, no SCAFFOLD).
        neighbors: ``k`` (0: :func:`~fedagg.secagg.default_degree`).
        threshold: ``t`` (0: :func:`~fedagg.secagg.default_threshold`).
        clip: the L2 bound each update is clipped to before encoding.
        bits: the field Z_2^bits (``ceil(log2 n)`` of them headroom).
        rotation: a randomised Hadamard rotation before rounding (a public seed per round).
        max_weight: the public weight cap.
        stage_timeout: how long stages 0, 1, 3 and 4 wait for replies.
        chunk: words unmasked at a time.
        noise: distributed DP: ``"gaussian"`` (discrete) or ``"skellam"`` ("" : none).
        noise_multiplier: z for ``noise`` (the summed noise of ``noise_clients`` clients
            has standard deviation about z x clip).
        noise_clients: the fewest survivors a distributed-DP round is unmasked with (0:
            ``ceil(clients_per_round / 2)``).
    """

    inner: SyncPolicy
    neighbors: int = 0
    threshold: int = 0
    clip: float = 10.0
    bits: int = 32
    rotation: bool = False
    max_weight: float = 1000.0
    stage_timeout: float = 30.0
    chunk: int = 1 << 16
    noise: str = ""
    noise_multiplier: float = 0.0
    noise_clients: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.inner, SyncPolicy):
            raise ConfigError(
                "secure aggregation runs with sync rounds (policy kind 'sync'); async, FedBuff "
                "per-buffer cohorts and FedAMD are not implemented"
            )
        if self.inner.scaffold:
            raise ConfigError(
                "SCAFFOLD's control variates need plaintext: not with secure aggregation"
            )
        if self.inner.weighting is not None:
            raise ConfigError(
                "secure aggregation weighs by the clients' own (secret) weights: participation "
                "weighting (FedAU, 'participating', 'all') needs plaintext; use 'examples'"
            )
        mean_of(self.inner.strategy)
        for name in ("neighbors", "threshold"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ConfigError(f"{name} must be an integer >= 0, got {v!r}")
        if not (math.isfinite(self.stage_timeout) and self.stage_timeout > 0):
            raise ConfigError(f"stage_timeout must be finite and > 0, got {self.stage_timeout}")
        if not (math.isfinite(self.max_weight) and self.max_weight > 0):
            raise ConfigError(f"max_weight must be finite and > 0, got {self.max_weight}")
        most = math.ceil(self.inner.clients_per_round * (1 + self.inner.over_select))
        Encoder(float(self.clip), self.bits, max(2, most))  # bits leave room for the sum
        v = self.noise_clients
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"noise_clients must be an integer >= 0, got {v!r}")
        if self.noise:
            self.dp_encoder(1, max(2, most))  # checks the noise and that bits leave a grid

    @property
    def min_survivors(self) -> int:
        """The fewest survivors a distributed-DP round is unmasked with (``noise_clients``)."""
        return self.noise_clients or max(1, math.ceil(self.inner.clients_per_round / 2))

    def dp_encoder(self, d: int, clients: int) -> Encoder:
        """The distributed-DP encoder of a round of ``clients`` clients and a ``d``-element
        model (what :meth:`RoundParams.encoder` gives; for the accounting)."""
        if not self.noise:
            raise ConfigError("no distributed DP: noise is not set")
        return Encoder(
            float(self.clip), self.bits, clients, 0 if self.rotation else None, self.noise,
            float(self.noise_multiplier), self.min_survivors, d,
        )  # fmt: skip

    # -- what the engines read ----------------------------------------------------------------
    def init(self, server: ServerState, ctx: PolicyContext) -> SecureState:
        return SecureState(self.inner.init(server, ctx))

    def round_id(self, state: SecureState) -> int:
        """The id of the secure round of the inner's current round."""
        return (state.epoch << 32) | state.inner.round

    # -- events -------------------------------------------------------------------------------
    def step(self, state: SecureState, event: Event, ctx: PolicyContext) -> list[Action]:
        r: SecureRound | None = state.open
        out: list[Action] = []
        feed: list[Event] = []
        if r is None:
            if isinstance(event, SecureReply | MaskedMerge | Merge):
                return []  # of a round that is over (or a plaintext partial: never folded)
            feed.append(event)
        elif isinstance(event, Merge):  # an edge's plaintext partial: refused, never folded
            for c, j, _, _ in event.jobs:
                if r.job_of.get(c) == j:
                    r.bad.setdefault(j, "secagg: plaintext partial refused")
                    if r.stage == 2:
                        r.expected.discard(c + 1)
            self._maybe_next(state, r, event.now, ctx, out, feed)
        elif isinstance(event, SecureReply):
            self._reply(state, r, event, ctx, out, feed)
        elif isinstance(event, Arrival) and event.job in r.jobs:
            self._masked(state, r, event, ctx, out, feed)
        elif isinstance(event, MaskedMerge):
            self._merged(state, r, event, ctx, out, feed)
        elif isinstance(event, Dropout) and event.job in r.jobs:
            r.gone.add(event.job)
            u = event.client + 1
            r.expected.discard(u)
            self._maybe_next(state, r, event.now, ctx, out, feed)
        elif isinstance(event, Timer) and event.tag < 0:
            if event.tag == stage_tag(r.rid, r.stage) and r.stage != 2:
                self._next(state, r, event.now, ctx, out, feed)
        elif isinstance(event, Timer) and event.tag == state.inner.round:  # the deadline
            if r.stage < 2:
                self._abandon(state, r, "the round's deadline passed before the uploads", feed,
                              event.now)  # fmt: skip
            elif r.stage == 2:
                self._next(state, r, event.now, ctx, out, feed)
        else:
            feed.append(event)
        self._run(state, feed, ctx, out)
        return out

    def _run(
        self, state: SecureState, feed: list[Event], ctx: PolicyContext, out: list[Action]
    ) -> None:
        """Step the inner with ``feed`` (and whatever its actions lead to), in order."""
        while feed:
            ev = feed.pop(0)
            for a in self.inner.step(state.inner, ev, ctx):
                out.append(a)
                if isinstance(a, Dispatch):
                    self._open(state, a, getattr(ev, "now", 0.0), ctx, out, feed)

    # -- the round's stages -------------------------------------------------------------------
    def _open(
        self,
        state: SecureState,
        a: Dispatch,
        now: float,
        ctx: PolicyContext,
        out: list[Action],
        feed: list[Event],
    ) -> None:
        inner = state.inner
        clients = tuple(a.clients)
        jobs = list(range(inner.next_job - len(clients), inner.next_job))
        rid = self.round_id(state)
        seed = b"%d|%d" % (ctx.seed, rid)
        rot = None
        if self.rotation:
            rot = int.from_bytes(hashlib.sha256(b"fedagg/secagg/rotation|" + seed).digest(), "big")
        identity = getattr(ctx, "identity", None)
        if identity is None:
            raise ConfigError("secure aggregation needs an engine that names client identities")
        try:
            params = RoundParams.make(
                rid,
                tuple(c + 1 for c in clients),
                inner.server.spec.size,
                hashlib.sha256(b"fedagg/secagg/graph|" + seed).digest(),
                degree=self.neighbors,
                threshold=self.threshold,
                clip=self.clip,
                bits=self.bits,
                rotation=rot,
                max_weight=self.max_weight,
                chunk=self.chunk,
                noise=self.noise,
                noise_multiplier=float(self.noise_multiplier),
                noise_clients=self.min_survivors,
            )
            ids = {c + 1: public_identity(identity(c)) for c in clients}
            session = ServerSession(params.config(), ids)
        except (ConfigError, SecAggError) as e:
            state.open = r = SecureRound(rid, clients, jobs)
            self._abandon(state, r, f"cannot start: {e}", feed, now)
            return
        r = SecureRound(rid, clients, jobs, params, session)
        state.open = r
        self._request(r, {c: params for c in clients}, now, out)

    def _request(self, r: SecureRound, msgs: dict[int, Any], now: float, out: list[Action]) -> None:
        """Send stage ``r.stage``'s messages (keyed by client) and set its timer."""
        live = {c: m for c, m in msgs.items() if r.job_of[c] not in r.gone}
        r.expected = {c + 1 for c in live}
        r.replied = set()
        out.append(SecureRequest(r.rid, r.stage, live, {c: r.job_of[c] for c in live}))
        if r.stage != 2:
            out.append(SetTimer(now + self.stage_timeout, stage_tag(r.rid, r.stage)))

    def _reply(
        self,
        state: SecureState,
        r: SecureRound,
        ev: SecureReply,
        ctx: PolicyContext,
        out: list[Action],
        feed: list[Event],
    ) -> None:
        if ev.round != r.rid or ev.stage != r.stage or r.job_of.get(ev.client) != ev.job:
            return  # stale: another round or stage
        u = ev.client + 1
        if u in r.replied:
            return  # a repeated reply (a client that re-sent): the first one counts
        msg = ev.message
        try:
            if isinstance(msg, bytes | bytearray | memoryview):
                msg = decode_reply(ev.stage, bytes(msg))
            want = _REPLIES.get(ev.stage)
            if want is None or not isinstance(msg, want) or msg.sender != u:
                raise SecAggError(f"not client {u}'s stage-{ev.stage} reply")
            s = r.session
            if isinstance(msg, AdvertiseKeys):
                s.receive_advertise(msg)
            elif isinstance(msg, ShareKeys):
                s.receive_shares(msg)
            elif isinstance(msg, ConsistencySignature):
                s.receive_signature(msg)
            else:
                s.receive_unmask(msg)
        except SecAggError:
            r.bad.setdefault(ev.job, f"secagg: bad stage-{ev.stage} message")
        r.replied.add(u)
        r.expected.discard(u)
        self._maybe_next(state, r, ev.now, ctx, out, feed)

    def _masked(
        self,
        state: SecureState,
        r: SecureRound,
        ev: Arrival,
        ctx: PolicyContext,
        out: list[Action],
        feed: list[Event],
    ) -> None:
        if r.stage != 2:
            return  # after stage 2 closed: not folded (the job counts as dropped)
        u = ev.client + 1
        try:
            y = ev.update.delta
            if not isinstance(y, np.ndarray):
                raise SecAggError("a masked upload must be one flat uint32 array")
            r.session.receive_masked(MaskedInput(u, y))
        except SecAggError:
            r.bad.setdefault(ev.job, "secagg: bad stage-2 message")
        else:
            r.losses[ev.job] = float(ev.update.metrics.get("train_loss", math.nan))
        r.expected.discard(u)
        self._maybe_next(state, r, ev.now, ctx, out, feed)

    def _merged(
        self,
        state: SecureState,
        r: SecureRound,
        ev: MaskedMerge,
        ctx: PolicyContext,
        out: list[Action],
        feed: list[Event],
    ) -> None:
        if ev.round != r.rid or r.stage != 2:
            return
        jobs = [j for _, j, _ in ev.jobs]
        try:
            if any(r.job_of.get(c) != j for c, j, _ in ev.jobs):
                raise SecAggError("a masked sum names jobs outside the round")
            r.session.receive_masked_sum([c + 1 for c, _, _ in ev.jobs], ev.values)
        except SecAggError:
            for j in jobs:
                if j in r.jobs:
                    r.bad.setdefault(j, "secagg: bad masked sum")
        else:
            r.losses.update((j, float(loss)) for _, j, loss in ev.jobs)
        for c, _, _ in ev.jobs:
            r.expected.discard(c + 1)
        self._maybe_next(state, r, ev.now, ctx, out, feed)

    def _maybe_next(
        self,
        state: SecureState,
        r: SecureRound,
        now: float,
        ctx: PolicyContext,
        out: list[Action],
        feed: list[Event],
    ) -> None:
        while state.open is r and (
            not r.expected or (r.stage == 2 and len(r.losses) >= self.inner.clients_per_round)
        ):
            self._next(state, r, now, ctx, out, feed)

    def _next(
        self,
        state: SecureState,
        r: SecureRound,
        now: float,
        ctx: PolicyContext,
        out: list[Action],
        feed: list[Event],
    ) -> None:
        """Close stage ``r.stage`` and open the next (or finish the round)."""
        by_client = {c + 1: c for c in r.clients}
        msgs: Mapping[int, Any]
        try:
            s = r.session
            if r.stage == 4:
                self._finish(state, r, now, feed)
                return
            if r.stage == 0:
                msgs = s.close_advertise()
            elif r.stage == 1:
                msgs = s.close_shares()
            elif r.stage == 2:
                if not s.survivors:
                    raise SecAggError("no masked upload arrived")
                if self.noise and len(s.survivors) < self.min_survivors:
                    raise SecAggError(
                        f"{len(s.survivors)} masked uploads, fewer than the {self.min_survivors} "
                        "noise shares distributed DP needs"
                    )
                msgs = s.close_masked()
            else:
                msgs = s.close_consistency()
        except SecAggError as e:
            self._abandon(state, r, str(e), feed, now)
            return
        r.stage += 1
        self._request(r, {by_client[u]: m for u, m in msgs.items()}, now, out)

    def _finish(self, state: SecureState, r: SecureRound, now: float, feed: list[Event]) -> None:
        total = r.session.finish()
        survivors = sorted(r.session.survivors)
        m, d = len(survivors), r.params.d
        vec, w = r.params.encoder().decode(total, m, d)
        if not w > 0:
            raise SecAggError("the decoded total weight is zero")
        server = state.inner.server
        vec /= w  # in place: the server holds O(model), whatever n
        x = vec.astype(server.spec.dtype)
        if not np.isfinite(x).all():
            raise SecAggError("the decoded mean is not finite in the model's dtype")
        weight = w * float(self.max_weight)
        part = self.strategy.begin(server)
        mean_of(self.strategy).fold_trusted(part, [x], [weight])
        done = {r.job_of[u - 1] for u in survivors}
        merged = tuple(
            (c, r.job_of[c], weight / m, r.losses.get(r.job_of[c], math.nan))
            for c in r.clients
            if r.job_of[c] in done
        )
        self._close(state, r, [j for j in r.jobs if j not in done], None, feed, now)
        feed.append(Merge(now, merged, part))

    def _abandon(
        self, state: SecureState, r: SecureRound, why: str, feed: list[Event], now: float
    ) -> None:
        state.last_abandon = why
        self._close(state, r, sorted(r.jobs), f"secure aggregation abandoned at stage {r.stage}",
                    feed, now)  # fmt: skip

    def _close(
        self,
        state: SecureState,
        r: SecureRound,
        lost: list[int],
        reason: str | None,
        feed: list[Event],
        now: float,
    ) -> None:
        """End the secure round: ``lost`` jobs reach the inner as ``Dropout`` events, counted
        as dropped if they dropped out, else as refused (a refused message's reason, or the
        abandon ``reason``)."""
        inner = state.inner
        client_of = {j: c for c, j in r.job_of.items()}
        refused: dict[str, int] = {}
        for j in lost:
            why = r.bad.get(j) if j not in r.gone else None
            why = why or (reason if j not in r.gone else None)
            if why is not None and j in inner.pending:
                refused[why] = refused.get(why, 0) + 1
        for why, n in sorted(refused.items()):
            note_refusal(inner.refusals, why, n)
            inner.refused += n
            inner.dropped -= n  # the Dropout events below add them back: net, refused
        if reason is not None and not refused:
            note_refusal(inner.refusals, reason, 0)
        state.open = None
        feed.extend(Dropout(now, client_of[j], j) for j in sorted(lost))


def mean_of(strategy: Strategy) -> Mean:
    """The strategy's weighted mean, which secure aggregation feeds one decoded partial; any
    other aggregator (a robust or custom rule, or pre-transforms such as ``clip_norm``, which
    need each plaintext update) is refused with :class:`ConfigError`."""
    agg: Any = strategy.aggregator
    if isinstance(agg, Composed) and not agg.pre:
        agg = agg.inner
    if isinstance(agg, Composed):
        raise ConfigError(
            "strategy pre-transforms (e.g. [strategy] clip_norm) need plaintext updates: under "
            "secure aggregation, clip before masking with [secure_aggregation] clip"
        )
    if not isinstance(agg, Mean):
        raise ConfigError(
            f"secure aggregation needs the mean aggregator, not {type(agg).__name__}: robust "
            "rules need plaintext; clip before masking with [secure_aggregation] clip"
        )
    return agg
