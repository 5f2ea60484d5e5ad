"""Secure aggregation (SecAgg+) in deployment: the root's record of stage requests.

:class:`fedagg.policy.SecurePolicy` (pure) runs the protocol; the root's
:class:`~fedagg.deploy._fed.Federation` carries out its ``SecureRequest`` actions and feeds
it the replies. This module is what the federation remembers about them (checkpointed with
it, rebuilt by replay):

* the stage request outstanding for each client (:class:`StageRequest`): pushed on the
  client's task stream, pushed again when the client reconnects (or after a restart) until
  it is answered; a training task of a secure round carries its stage-0 request;
* the length of each secure job's masked upload (``dims``: uint32 words), which its ``Push``
  must have (``nbytes = 4 * dim``; the values are uniform noise: no finite-value, norm or
  weight checks; the header's weight is ignored, the weight is inside the encoding).

A client's reply (the ``Secure`` RPC, :mod:`fedagg.deploy._secure_rpc`) is logged as a
``secure`` event (its round, stage and message bytes in the event's note, covered by the
log's hash chain) before the policy steps it: replay after a crash rebuilds the policy's
secure session from the log, and clients answer a re-sent request with their cached reply.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from fedagg._checkpoint import register
from fedagg.deploy._auth import body
from fedagg.deploy._store import LogItem, Note
from fedagg.errors import SecAggError, StateError
from fedagg.policy import AllAvailable, SecureRound, SecureState
from fedagg.secagg import (
    RoundParams,
    ServerSession,
    decode_request,
    encode_message,
    public_identity,
)
from fedagg.secagg import decode_reply as secagg_reply

__all__ = [
    "MAX_SECURE",
    "SecureBook",
    "SecureCtx",
    "StageRequest",
    "decode_reply",
    "encode_request",
    "params_dim",
    "reopen",
    "secure_body",
]

#: A ``Secure`` request's bytes (its reply message and signatures), checked on the raw length
#: before it is parsed: enough for a stage reply to ~2000 neighbours (a ``ShareKeys`` holds
#: one sealed bundle of ~200 bytes per neighbour).
MAX_SECURE = 512 * 1024


def secure_body(task: int, round_: int, stage: int, payload: bytes, on_behalf: int = 0) -> bytes:
    """What a ``Secure`` request's Auth signs (client and server build it here, alike)."""
    digest = hashlib.sha256(payload).hexdigest()
    return body(task=task, round=round_, stage=stage, payload=digest, on_behalf=on_behalf)


def encode_request(stage: int, message: Any) -> bytes:
    """A stage request's bytes, as a task carries them (:func:`fedagg.secagg.encode_message`):
    stage 0 the round's public :class:`~fedagg.secagg.RoundParams`, later stages the
    server's message of that stage."""
    if stage == 0 and not isinstance(message, RoundParams):
        raise StateError(f"a stage-0 secure request must be RoundParams, got {message!r}")
    return bytes(encode_message(message))


def decode_reply(stage: int, raw: bytes) -> Any:
    """A client's reply of ``stage`` from its bytes (a :class:`~fedagg.errors.SecAggError`
    if malformed, a request, or not a reply of that stage)."""
    if stage not in (0, 1, 3, 4):
        raise SecAggError(f"stage {stage} has no reply message (stage 2's is a Push)")
    return secagg_reply(stage, raw)


def params_dim(raw: bytes) -> int:
    """The masked upload's length (uint32 words) of a round, from its stage-0 request."""
    params = decode_request(0, raw)
    return int(params.dim)


@register
@dataclass(frozen=True)
class StageRequest:
    """The secure stage request last sent to ``client`` (``payload``: its bytes, base64)."""

    client: int
    job: int
    round: int
    stage: int
    payload: str
    answered: bool = False

    @property
    def raw(self) -> bytes:
        return base64.b64decode(self.payload)


@register
@dataclass
class SecureBook:
    """The stage requests outstanding, by client, and each secure job's masked length."""

    requests: dict[int, StageRequest] = field(default_factory=dict)
    dims: dict[int, int] = field(default_factory=dict)
    rounds: dict[int, int] = field(default_factory=dict)  # job -> its secure round

    def request(self, round_: int, stage: int, messages: Mapping[int, Any],
                jobs: Mapping[int, int]) -> list[StageRequest]:  # fmt: skip
        """Record a ``SecureRequest`` action: the clients it names get their new requests
        (returned, to send); any other client still holding a request of that round has
        dropped out of it (its late replies are refused)."""
        out = []
        for client, msg in messages.items():
            c = int(client)
            if c not in jobs:
                raise StateError(f"secure request of round {round_}: no job for client {c}")
            job = int(jobs[c])
            raw = encode_request(stage, msg)
            if stage == 0:
                self.remember(job, int(round_), int(msg.dim))
            r = StageRequest(c, job, int(round_), int(stage), base64.b64encode(raw).decode())
            self.requests[c] = r
            out.append(r)
        for c in [c for c, r in self.requests.items() if r.round == round_ and c not in messages]:
            del self.requests[c]
        return out

    def problem(self, client: int, job: int, round_: int, stage: int) -> str | None:
        """Why a reply (client, job, round, stage) is not the one awaited: ``"duplicate"``
        (that request was answered, or the client's round has moved past that stage: a
        retry whose first attempt counted, or one too late, which the round went on
        without), ``"stale"`` (no such request is open); None if it is."""
        r = self.requests.get(client)
        if r is None or (r.job, r.round) != (job, round_) or stage > r.stage:
            return "stale"
        return "duplicate" if r.answered or stage < r.stage else None

    def fresh(self, events: Sequence[LogItem]) -> tuple[list[LogItem], list[int]]:
        """The events of a batch to log but the secure replies that answer no open request
        (answered before, or earlier in the batch), and the positions of those left out."""
        out: list[LogItem] = []
        dup: list[int] = []
        seen: set[int] = set()
        for i, ev in enumerate(events):
            kind, _, client, job, _, note = ev
            if kind == "secure" and isinstance(note, Note) and client is not None:
                r, s = int(note.info["round"]), int(note.info["stage"])
                if client in seen or self.problem(client, int(job or 0), r, s):
                    dup.append(i)
                    continue
                seen.add(client)
            out.append(ev)
        return out, dup

    def answered(self, client: int) -> None:
        r = self.requests.get(client)
        if r is not None:
            self.requests[client] = replace(r, answered=True)

    def open_for(self, clients: set[int]) -> list[StageRequest]:
        """The unanswered requests of ``clients`` past stage 0 (a stage-0 request rides on
        its training task), to push again to a reconnected stream."""
        return [r for c, r in sorted(self.requests.items())
                if c in clients and not r.answered and r.stage > 0]  # fmt: skip

    def remember(self, job: int, round_: int, dim: int) -> None:
        """``job`` is of secure round ``round_``, its masked upload ``dim`` words long. The
        jobs of the rounds before the previous one are forgotten (a retry of an upload of the
        previous round is still recognised as masked, and acknowledged as a duplicate)."""
        keep = {round_, max(self.rounds.values(), default=round_)}
        for j in [j for j, r in self.rounds.items() if r not in keep]:
            self.dims.pop(j, None)
            self.rounds.pop(j, None)
        self.dims[job], self.rounds[job] = dim, round_

    def arrived(self, client: int, job: int, upload: bool) -> None:
        """Job ``job`` of ``client`` resolved (its masked upload arrived, or it dropped out):
        an upload answers its stage-2 request."""
        r = self.requests.get(client)
        if upload and r is not None and r.job == job and r.stage == 2:
            self.requests[client] = replace(r, answered=True)


class SecureCtx(AllAvailable):
    """The root's policy context: every client available, and each client's long-term
    Ed25519 identity (raw public key) from the keyring, as
    :class:`fedagg.policy.SecureContext` asks."""

    def __init__(self, num_clients: int, seed: int, identities: Sequence[bytes]) -> None:
        super().__init__(num_clients, seed)
        self._ids = list(identities)
        #: central DP's noise key (:class:`fedagg.policy.PrivatePolicy`): a secret kept in the
        #: state directory, so the released model's noise cannot be rebuilt from the config
        self.noise_secret: bytes | None = None

    def identity(self, client: int) -> bytes:
        if not 0 <= client < len(self._ids):
            raise SecAggError(
                f"no identity key for client {client}: secure aggregation needs the keyring"
            )
        return self._ids[client]


def reopen(state: Any, tasks: Mapping[int, Any], ctx: Any) -> None:
    """After a checkpoint is loaded: rebuild the open secure round of a
    :class:`~fedagg.policy.SecureState` (not checkpointed: its session holds the round's
    state), so that replaying the log after the checkpoint resumes it.

    A federation checkpoints only after a round closes (``checkpoint_updates`` is refused
    under secure aggregation), in the step that dispatched the next round: its secure round
    had just opened (stage 0, no reply yet), which its public parameters (on its tasks) and
    the clients' identities rebuild exactly. Anything else is a :class:`StateError`."""
    if not isinstance(state, SecureState) or state.open is not None:
        return
    inner = state.inner
    mine = sorted((t for t in tasks.values() if t.secure is not None), key=lambda t: t.job)
    if not mine:
        if inner.pending:
            raise StateError(
                f"the checkpoint holds round {inner.round} open without its secure round's "
                "parameters: it cannot be resumed"
            )
        return
    rid = max(t.secure.round for t in mine)
    mine = [t for t in mine if t.secure.round == rid]
    params = decode_request(0, mine[0].secure.raw)
    clients = tuple(int(t.client) for t in mine)
    jobs = [int(t.job) for t in mine]
    same = params.round_id == rid and (rid & 0xFFFFFFFF) == inner.round
    if not same or set(jobs) != set(inner.pending):
        raise StateError(
            f"the checkpoint's secure round {rid} does not match its open round "
            f"{inner.round}: it cannot be resumed"
        )
    ids = {c + 1: public_identity(ctx.identity(c)) for c in clients}
    session = ServerSession(params.config(), ids)
    state.open = SecureRound(rid, clients, jobs, params, session)
