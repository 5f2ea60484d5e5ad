"""An edge aggregator's server: a :class:`~fedagg.deploy._service.FederationService` over its
:class:`~fedagg.deploy._edge.EdgeEngine` (what the edge does is described there), served to its
subtree over gRPC, and its link to its parent (:class:`ParentLink`: the client protocol, as
an edge): it follows the parent's task stream, pulls each model version once, and sends up
the engine's forwards until the parent acknowledges them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import time
from base64 import b64encode
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt

from fedagg.core.spec import ParamSpec
from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._auth import ClientKey, Keyring, body, edge_upload_body, upload_body
from fedagg.deploy._client import PROTOCOL, RETRY, Client, ClientError
from fedagg.deploy._edge import EdgeEngine, Forward
from fedagg.deploy._engine import ServerStats
from fedagg.deploy._faults import crash_point
from fedagg.deploy._fed import Effects, TaskInfo
from fedagg.deploy._grpc import GrpcTransport
from fedagg.deploy._options import ServerOptions
from fedagg.deploy._partial import partial_buffers, partial_info
from fedagg.deploy._push import upload_chunks
from fedagg.deploy._secure import StageRequest, secure_body
from fedagg.deploy._server import Server
from fedagg.deploy._service import FederationService
from fedagg.deploy._transport import CallError, Service, Status, Transport
from fedagg.errors import FedaggError

__all__ = ["EdgeServer", "ParentLink"]

Arr = npt.NDArray[Any]
log = logging.getLogger("fedagg.edge")


class ParentLink(Client):
    """The edge's side of its parent: the client protocol, as an edge (it reuses the client's
    TLS, signing and retry plumbing)."""

    def __init__(self, parent: str, key: ClientKey, serves: Sequence[int], *,
                 ca: bytes | None = None, insecure: bool = False, retry_for: float = 120.0,
                 server_name: str | None = None, channel: Any = None) -> None:  # fmt: skip
        super().__init__(parent, key, _no_train, ca=ca, insecure=insecure, retry_for=retry_for,
                         server_name=server_name, channel=channel)  # fmt: skip
        self.serves = sorted(int(c) for c in serves)

    async def hello(self) -> None:
        serves = self.serves

        async def call() -> bytes:
            req = pb.HelloRequest(
                auth=self._auth("Hello", body(protocol=PROTOCOL, serves=serves)),
                protocol=PROTOCOL, serves=serves,
            )  # fmt: skip
            raw: bytes = await self._method("Hello", "unary_unary")(
                req.SerializeToString(), timeout=30
            )
            return raw

        reply = pb.HelloReply.FromString(await self._retry("hello", call))
        self.spec = ParamSpec.from_dict(json.loads(reply.spec_json))
        self.upload_options(reply)
        log.info("linked to the parent at %s (%s) as edge %s, serving %d clients", self.server,
                 "TLS" if self.ca is not None else "insecure", self.key.name, len(serves),
                 extra={"event": "linked", "parent": self.server})  # fmt: skip

    async def pull_model(self, task: pb.Task) -> Arr:
        async def call() -> Arr:
            return await self._pull(task)

        flat: Arr = await self._retry("pull", call)
        return flat

    async def push_forward(self, fwd: Forward) -> pb.PushReply:
        """Send one forward until the parent acknowledges it (or refuses it for good)."""
        assert self.spec is not None
        head = pb.UploadHeader(version=max(fwd.version, 0))
        buffers: list[memoryview] = []
        if fwd.relay is not None:
            u = fwd.relay
            data = np.memmap(u.path, dtype=np.uint8, mode="r")  # streamed from the page cache
            buffers = [data.data.cast("B")]
            head.task, head.weight, head.relay, head.on_behalf = u.job, u.weight, True, u.client
            head.metrics.update(u.metrics)
            head.origin.ParseFromString(fwd.origins.get((u.client, u.job), b""))
        else:
            if fwd.masked is not None:  # a secure round's masked partial (uint32, bits 0)
                buffers = [fwd.masked.data.cast("B")]
                head.partial.weight = float(len(fwd.jobs))
                head.partial.accumulator_bits = 0
            elif fwd.state is not None:
                info = partial_info(fwd.state)
                buffers = partial_buffers(fwd.state)
                head.partial.weight = float(info["weight"])
                head.partial.weight_comp = float(info["weight_comp"])
                head.partial.accumulator_bits = 64 if info["accumulator"] == "float64" else 32
            for c, j, w, loss in fwd.jobs:
                job = head.partial.jobs.add(task=j, client=c, weight=w, train_loss=loss)
                job.origin.ParseFromString(fwd.origins.get((c, j), b""))
            for c, j in fwd.dropped:
                head.partial.dropped.add(task=j, client=c, weight=1.0, train_loss=math.nan)
            head.task = fwd.jobs[0][1] if fwd.jobs else 0
        head.nbytes = sum(len(b) for b in buffers)
        metrics = dict(head.metrics)

        async def call() -> pb.PushReply:
            content = upload_body(head.task, head.version, head.weight, head.nbytes, metrics)
            auth = self._auth("Push", edge_upload_body(content, head))
            head.auth.CopyFrom(auth)
            return await self._stream_up(head, auth, buffers)

        reply: pb.PushReply = await self._retry("forward", call)
        return reply

    async def relay_secure(self, client: int, req: Any) -> pb.SecureReply:
        """Relay ``client``'s ``Secure`` request up, signed by this edge for it, with the
        client's own Auth as its origin."""
        payload = bytes(req.payload)

        async def call() -> pb.SecureReply:
            content = secure_body(req.task, req.round, req.stage, payload, client)
            up = pb.SecureRequest(
                auth=self._auth("Secure", content),
                task=req.task,
                round=req.round,
                stage=req.stage,
                payload=payload,
                on_behalf=client,
                origin=req.origin if req.HasField("origin") else req.auth,
            )
            raw = await self._method("Secure", "unary_unary")(up.SerializeToString(), timeout=30)
            got: pb.SecureReply = pb.SecureReply.FromString(raw)
            return got

        reply: pb.SecureReply = await self._retry("secure relay", call)
        return reply

    async def _stream_up(self, head: Any, auth: Any, buffers: list[memoryview]) -> pb.PushReply:
        # a relay is hashed with its client's algorithm: the parent checks the bytes against
        # the client's signed digest and this edge's trailer with that one hash
        algorithm = self.digest_algorithm
        if head.relay and head.origin.sha256:
            algorithm = head.origin.digest_algorithm or "sha256"
        chunks = upload_chunks(head.SerializeToString(), buffers, self.chunk, self.digest,
                               self.key, auth, algorithm=algorithm)  # fmt: skip
        raw = await self._method("Push", "stream_unary")(chunks)
        reply: pb.PushReply = pb.PushReply.FromString(raw)
        return reply

    async def beat(self, tasks: list[int]) -> None:
        req = pb.HeartbeatRequest(auth=self._auth("Heartbeat", body(tasks=sorted(tasks))),
                                  tasks=sorted(tasks))  # fmt: skip
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._method("Heartbeat", "unary_unary")(req.SerializeToString(), timeout=10)


def _no_train(model: Any, task: Any) -> Any:  # pragma: no cover - an edge never trains
    raise FedaggError("an edge aggregator does not train")


class EdgeServer:
    """An edge aggregator's server: a :class:`~fedagg.deploy._service.FederationService` over
    an :class:`EdgeEngine`, served over gRPC (or another ``transport``), with a link to its
    parent."""

    def __init__(
        self, engine: EdgeEngine, keyring: Keyring, options: ServerOptions, link: ParentLink,
        *, edges: Keyring | None = None, serves: set[int] | None = None,
        edge_clients: Mapping[str, Collection[int]] | None = None,
        transport: Callable[[Service, ServerOptions], Transport] = GrpcTransport,
    ) -> None:  # fmt: skip
        self.fed = engine
        # the same service and transport as a root's, plus the link up and the forwards
        self.server = Server(
            engine, keyring, options, edges=edges, serves=serves, edge_clients=edge_clients,
            transport=transport,
        )  # fmt: skip
        self.service: FederationService = self.server.service
        self.service.on_effects = self._forward
        self.service.relay_secure = self._relay_secure
        self.opt = options
        self.serves = serves
        self.link = link
        self._linked = asyncio.Event()
        self._link_task: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[None]] = set()
        self._versions: dict[asyncio.Task[None], int] = {}  # each send's model version
        self._born = time.time()  # (a client seen after this has reached this process)

    @property
    def stats(self) -> ServerStats:
        return self.server.stats

    @property
    def port(self) -> int:
        return self.server.port

    def connected(self) -> int:
        return self.server.connected()

    async def start(self) -> None:
        await self.server.start()
        # a fresh edge links up once its subtree is connected (as a root waits for its
        # clients before the first round), or after client_timeout with whoever came; a
        # restarted one at once (its clients are busy retrying what they were doing)
        need = self.opt.wait_for or len(self.serves or ())
        deadline = time.monotonic() + self.opt.client_timeout
        fresh = self.fed.seq == 0
        said = -math.inf
        while fresh and self.connected() < need and time.monotonic() < deadline:
            if time.monotonic() - said >= 5.0:  # say so every few seconds
                said = time.monotonic()
                log.info("waiting for %d of this edge's clients before linking to the parent: "
                         "%d connected (deploy.wait_for = %d; at most client_timeout)", need,
                         self.connected(), self.opt.wait_for,
                         extra={"event": "waiting", "need": need})  # fmt: skip
            await asyncio.sleep(0.05)
        await self.link.hello()
        self._linked.set()
        self._link_task = asyncio.create_task(self._follow_parent())

    async def wait(self) -> None:
        await self.server.wait()

    async def drain(self, timeout: float) -> None:
        """After the end: wait (up to ``timeout``) for the subtree's clients and edges to
        read "finished" and hang up, so none is left retrying against a closed port. A
        restarted edge also waits for the clients whose uploads it replayed from its log to
        connect once: they were busy with it when it died and may still be retrying (the run
        can end before they are back, its forwards needing no client)."""
        deadline = time.monotonic() + timeout
        names = self.service.keys.names
        seen = self.service.progress.last_seen  # each client's last call or task stream
        waiting = {names[c] for c in self.fed.replayed_clients}
        while time.monotonic() < deadline and any(
            seen.get(n, -math.inf) < self._born for n in waiting
        ):
            await asyncio.sleep(0.05)
        await self.server.drain(max(0.0, deadline - time.monotonic()))

    async def stop(self, grace: float = 1.0) -> None:
        for t in [self._link_task, *self._sends]:
            if t is not None:
                t.cancel()
        await self.link.channel.close()
        await self.server.stop(grace)

    async def _relay_secure(self, client: int, req: Any) -> pb.SecureReply:
        """A client's secure aggregation reply, passed up for it; the parent's answer (or
        refusal, with its status) passed back down."""
        await self._linked.wait()
        try:
            reply = await self.link.relay_secure(client, req)
        except ClientError as e:
            raise CallError(Status[e.code.name], e.message) from None
        await self.service.in_engine(self.fed.secure.answered, client)
        return reply

    def _forward(self, effects: Effects) -> None:
        for fwd in [] if self.fed.finished else effects.forward:
            # after the sends of earlier versions: a parent that restarted hears of a round
            # it had taken before (a duplicate) before it hears of the next one
            before = [t for t, v in self._versions.items() if v < fwd.version]
            task = asyncio.get_running_loop().create_task(self._send(fwd, before))
            self._sends.add(task)
            self._versions[task] = fwd.version
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sends.discard(task)
        self._versions.pop(task, None)

    async def _send(self, fwd: Forward, before: Sequence[asyncio.Task[None]] = ()) -> None:
        if before:
            await asyncio.wait(before)
        await self._linked.wait()
        keys = [(c, j) for c, j, _, _ in fwd.jobs]
        if keys:
            fwd.origins = await self.service.in_engine(self.fed.origins_of, keys)
        while True:
            try:
                reply = await self.link.push_forward(fwd)
                log.info("forwarded %d jobs of version %d%s (%s)", len(fwd.jobs), fwd.version,
                         " (duplicate)" if reply.duplicate else "",
                         "a relayed update" if fwd.relay is not None else "a partial aggregate",
                         extra={"event": "forwarded", "version": fwd.version,
                                "jobs": len(fwd.jobs), "duplicate": reply.duplicate})  # fmt: skip
                break
            except ClientError as e:
                if e.code in RETRY:  # the parent is away: keep the updates, try again
                    log.warning("forward of version %d: %s; retrying", fwd.version, e.message)
                    await asyncio.sleep(1.0)
                    continue
                # refused for good (the parent dropped these jobs): nothing to count them in
                log.warning("parent refused %d jobs of version %d: %s", len(fwd.jobs),
                            fwd.version, e.message)  # fmt: skip
                break
        crash_point("edge-forwarded")
        keys = [(c, j) for c, j, _, _ in fwd.jobs] + list(fwd.dropped)
        for c, j in keys:
            self.service.enqueue("acked", c, j)
        await asyncio.sleep(0)
        for p in fwd.paths:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)

    async def _follow_parent(self) -> None:
        """The parent's task stream: fetch each new model version, then hand the tasks down."""
        link = self.link
        start, delay = time.monotonic(), 0.05
        beats = asyncio.create_task(self._beat_parent())
        again = False
        try:
            while True:
                try:
                    self.fed.synced = False
                    if again:  # the parent may have restarted (and forgotten this subtree)
                        await link.hello()
                    again = True
                    req = pb.TasksRequest(auth=link._auth("Tasks", body()))
                    stream = link._method("Tasks", "unary_stream")(req.SerializeToString())
                    async for raw in stream:
                        start, delay = time.monotonic(), 0.05
                        t = pb.Task.FromString(raw)
                        if t.heartbeat:
                            self.fed.synced = True
                            continue
                        if t.finished:
                            effects = await self.service.in_engine(self.fed.finish)
                            self.service.apply(effects)
                            return
                        secure = None
                        if t.HasField("secagg"):  # a stage request of a secure round
                            s = t.secagg
                            secure = StageRequest(
                                int(t.client),
                                int(t.task),
                                int(s.round),
                                int(s.stage),
                                b64encode(s.payload).decode(),
                            )
                        if secure is not None and secure.stage > 0:  # for a client below
                            effects = await self.service.in_engine(self.fed.secure_down, secure)
                            self.service.apply(effects)
                            continue
                        if self.fed.model(t.version) is None:
                            self.fed.models[t.version] = await link.pull_model(t)
                        info = TaskInfo(
                            int(t.task),
                            int(t.client),
                            int(t.version),
                            int(t.epochs),
                            str(t.config),
                            secure,
                        )  # the parent's client config (and stage-0 request), passed on
                        effects = await self.service.in_engine(
                            self.fed.add_tasks, [info], int(t.seed)
                        )
                        self.service.apply(effects)
                except grpc.aio.AioRpcError as e:
                    if time.monotonic() - start > link.retry_for:
                        raise ClientError(e.code(), e.details() or "") from None
                except ClientError as e:
                    if e.code != grpc.StatusCode.FAILED_PRECONDITION:
                        raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        except asyncio.CancelledError:
            raise
        except BaseException as e:
            log.exception("edge link failed")
            self.service.fail(e)
        finally:
            beats.cancel()

    async def _beat_parent(self) -> None:
        while True:
            await asyncio.sleep(self.opt.heartbeat)
            await self.link.beat(sorted(self.fed.tasks))
