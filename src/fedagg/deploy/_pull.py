"""The ``Pull`` RPC: a task's model (or a federated evaluation's), streamed to its client in
chunks of at most ``chunk_bytes``, paced, within the download slots."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._admission import parse
from fedagg.deploy._auth import body
from fedagg.deploy._evalwire import is_eval_task
from fedagg.deploy._transport import Call, CallError, Status
from fedagg.deploy._upload import paced
from fedagg.deploy._wire import encode_chunk

if TYPE_CHECKING:
    from fedagg.deploy._service import FederationService

__all__ = ["pull_call"]


def _lookup(engine: Any, job: int) -> tuple[Any, Any]:
    """Task ``job`` and its model (engine thread)."""
    task = engine.tasks.get(job)
    return task, None if task is None else engine.model(task.version)


async def pull_call(svc: FederationService, call: Call) -> None:
    """Answer one ``Pull`` call: the model a task names, streamed in chunks, paced and
    within the client's download slots (a federated evaluation task's from the evaluation)."""
    with svc.admit.opening(call):
        raw = await svc.admit.first(call)
        svc.admit.sized(raw)
        req = parse(pb.PullRequest, raw)
        edge = None
        if svc.below.is_edge(req.auth):
            edge = svc.below.auth("Pull", req.auth, body(task=req.task))
        else:
            client = svc._auth("Pull", req.auth, body(task=req.task))
    if svc.evals is None or edge is not None or not is_eval_task(req.task):
        # on the engine thread: a task the running step opened is seen only once the step
        # returns, after its durability barrier (a model leaves only once it is durable)
        task, model = await svc.in_engine(_lookup, svc.engine, req.task)
        if task is None:
            svc.unknown_task(req.task)
        assert task is not None
        if edge is not None:
            svc.below.routed(edge, task.client)
        elif task.client != client:
            raise CallError(Status.PERMISSION_DENIED, f"task {req.task} is not yours")
        owner, version = task.client, task.version
    else:  # a federated evaluation task
        owner, (version, model) = client, svc.evals.pull(client, req.task)
    if model is None:
        raise CallError(Status.FAILED_PRECONDITION, f"model version {version} is no longer kept")
    view = model.data.cast("B")
    total = len(view)
    step = svc.opt.chunk_bytes
    # at most client_uploads downloads per client until each RPC is over (gRPC may
    # buffer a whole model for a peer that stops reading: one client cannot make it
    # buffer more than a few), max_uploads being written at once (more wait); a write
    # that stalls for idle_timeout, or the stream below min_rate, is cut off
    release = svc.up.take(svc.up.pull_slots, f"client:{owner}", "model downloads")
    call.on_done(release)
    if call.done():
        release()
    async with svc.up.pulls:
        until = time.monotonic() + svc.opt.idle_timeout + total / svc.opt.min_rate
        for off in range(0, max(total, 1), step):
            msg = encode_chunk({1: version, 2: off, 4: total},
                               view[off : off + step])  # fmt: skip
            await paced(call.write(msg), svc.opt.idle_timeout, until, "download")
            svc.stats.bytes_out += min(step, total - off)
