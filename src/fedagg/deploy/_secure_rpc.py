"""The ``Secure`` RPC: a client's reply to a secure aggregation stage request, at the server.

Before anything is parsed the request is capped on its length (:data:`MAX_SECURE`); it is
then authenticated (its Auth signs :func:`~fedagg.deploy._secure.secure_body`, fresh, never
replayed, within the caller's rate limit) before anything else is looked at: nothing before
authentication costs more than a constant. Then it must answer the request outstanding for
its client (job, round, stage), its message must decode as a reply of that stage (a
:class:`~fedagg.errors.SecAggError` is INVALID_ARGUMENT: nothing changes), and it is logged
(durable) as a ``secure`` event before it is acknowledged and before the policy steps it. A
second reply to an answered request is acknowledged as a duplicate, not logged again.

Through edge aggregators: an edge authenticates its client's request as above and relays it
to its parent (``on_behalf`` the client, the client's own Auth as ``origin``); the root
checks the edge (its signature, the client in its subtree) and the client's signature over
the same reply, and answers; the edge passes the answer back down.
"""

from __future__ import annotations

import asyncio
import base64
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._admission import parse
from fedagg.deploy._auth import AuthError
from fedagg.deploy._engine import Engine, Item
from fedagg.deploy._secure import MAX_SECURE, decode_reply, secure_body
from fedagg.deploy._store import EventRow, Note
from fedagg.deploy._transport import Call, CallError, Status
from fedagg.errors import SecAggError

if TYPE_CHECKING:
    from fedagg.deploy._service import FederationService

__all__ = ["secure_call", "secure_task", "upload_kind"]


def secure_task(job: int, client: int, round_: int, stage: int, payload: bytes) -> pb.Task:
    """A stage request as its client's task stream carries it (its task id is the job's)."""
    return pb.Task(task=job, client=client,
                   secagg=pb.SecureStage(round=round_, stage=stage, payload=payload))  # fmt: skip


async def secure_call(svc: FederationService, call: Call) -> bytes:
    """Answer one ``Secure`` call (see the module's docstring)."""
    with svc.admit.opening(call):
        raw = await svc.admit.first(call)
        if len(raw) > MAX_SECURE:  # on the length, before parsing
            raise CallError(Status.INVALID_ARGUMENT,
                            f"request of {len(raw)} bytes: at most {MAX_SECURE}")  # fmt: skip
        req = parse(pb.SecureRequest, raw)
        payload = bytes(req.payload)
        content = secure_body(req.task, req.round, req.stage, payload, req.on_behalf)
        if svc.below.is_edge(req.auth):  # an edge relaying its client's reply
            edge = svc.below.auth("Secure", req.auth, content)
            client = int(req.on_behalf)
            svc.below.routed(edge, client)
            mine = secure_body(req.task, req.round, req.stage, payload)  # what the client signed
            try:
                signer = svc.keys.verify("Secure", req.origin, mine)
            except AuthError as e:
                raise CallError(Status.UNAUTHENTICATED, f"origin: {e.reason}") from None
            if signer != client:
                raise CallError(Status.PERMISSION_DENIED, "the origin is another client's")
        else:
            client = svc.progress.seen(svc.admit.verify(svc.keys, "Secure", req.auth, content))
            if req.on_behalf or req.HasField("origin"):
                raise CallError(Status.PERMISSION_DENIED, "only edge aggregators relay")
        if svc.relay_secure is not None:  # this is an edge: its parent decides
            reply = await svc.relay_secure(client, req)
        else:
            reply = await _accept(svc, client, req, payload)
    return bytes(reply.SerializeToString())


async def _accept(svc: FederationService, client: int, req: Any, payload: bytes) -> Any:
    book = getattr(svc.engine, "secure", None)
    if book is None:
        raise CallError(Status.FAILED_PRECONDITION, "this server runs no secure aggregation")
    job, round_, stage = int(req.task), int(req.round), int(req.stage)
    problem = book.problem(client, job, round_, stage)
    if problem == "duplicate":
        return pb.SecureReply(task=job, duplicate=True)
    if problem is not None:
        raise CallError(
            Status.FAILED_PRECONDITION,
            f"no open secure request of round {round_}, stage {stage} for task {job}",
        )
    try:
        decode_reply(stage, payload)  # checked here: a malformed message is never logged
    except SecAggError as e:
        raise CallError(Status.INVALID_ARGUMENT, f"secure stage {stage}: {e}") from None
    note = Note({"round": round_, "stage": stage,
                 "message": base64.b64encode(payload).decode()})  # fmt: skip
    done: asyncio.Future[EventRow | None] = asyncio.get_running_loop().create_future()
    await svc.queue.put(Item(("secure", svc.now(), client, job, stage, note), done))
    row = await done
    return pb.SecureReply(task=job, duplicate=row is None)


def upload_kind(engine: Engine, head: Any) -> tuple[int | None, np.dtype[Any]]:
    """An upload header's size and weight checked against its task: a secure round's job
    uploads its masked update (``4 * dim`` bytes of uint32, any weight: the weight is inside
    the encoding), any other job the model's size with a finite weight > 0. Returns the
    masked length (None for a plaintext update) and the values' dtype."""
    spec = engine.spec
    dim = engine.secure_dim(int(head.task))
    if dim is None and head.nbytes != spec.nbytes and not engine.ready():
        # maybe a masked upload for a task this edge has not learnt again since its restart
        raise CallError(Status.UNAVAILABLE,
                        "this edge aggregator is catching up with its parent: retry")  # fmt: skip
    if dim is not None:
        if head.nbytes != 4 * dim:
            raise CallError(
                Status.INVALID_ARGUMENT,
                f"task {head.task} is of a secure aggregation round: its upload is the masked "
                f"update, {4 * dim} bytes ({dim} x uint32), not {head.nbytes}",
            )
        return dim, np.dtype(np.uint32)
    if head.nbytes != spec.nbytes:
        raise CallError(
            Status.INVALID_ARGUMENT,
            f"update has {head.nbytes} bytes, the model {spec.nbytes} ({spec.size} x {spec.dtype})",
        )
    if not (math.isfinite(head.weight) and head.weight > 0):
        raise CallError(Status.INVALID_ARGUMENT, "weight must be finite and > 0")
    return None, spec.dtype
