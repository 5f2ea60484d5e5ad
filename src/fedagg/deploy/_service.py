"""The federation service: a transport-free server in front of an
:class:`~fedagg.deploy._engine.Engine` (the root's :class:`~fedagg.deploy._fed.Federation`,
an edge's :class:`~fedagg.deploy._edge.EdgeEngine`). A transport (:mod:`fedagg.deploy._grpc`,
:mod:`fedagg.deploy._memory`) hands it each call (:class:`~fedagg.deploy._transport.Call`);
it answers, or refuses with a :class:`~fedagg.deploy._transport.CallError`.

Threads: the asyncio loop runs the handlers (admission, streaming, spooling each upload's
chunks to disk as they arrive); one engine thread runs everything that touches the engine's
state (logging events, the policy, folding, checkpoints), fed by a bounded queue: when folding
falls behind, uploads wait for their acknowledgement and the clients slow down
(backpressure).

An upload is acknowledged only once it is durable: its spool file fsynced and renamed, its
(client, job) key committed to the event log; or, with ``durability = "retained"``, once its
key is committed, its spool synced in the background while the client keeps the update until
the committed watermark covers it (:mod:`fedagg.deploy._commit`). Admission (call credentials,
caps, request signatures, rate limits) is :mod:`fedagg.deploy._admission`, the receive path
:mod:`fedagg.deploy._upload`, the edge aggregators below :mod:`fedagg.deploy._children`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._admission import Admission, parse
from fedagg.deploy._arrivals import acknowledge, log_arrival
from fedagg.deploy._auth import Keyring, body, edge_upload_body, upload_body
from fedagg.deploy._children import Children
from fedagg.deploy._engine import Engine, Item, ServerStats
from fedagg.deploy._evaluation import Evaluation
from fedagg.deploy._fed import Effects, TaskInfo
from fedagg.deploy._ingest import Turns
from fedagg.deploy._malloc import keep_large_buffers
from fedagg.deploy._options import PROTOCOL, ServerOptions
from fedagg.deploy._progress import Progress
from fedagg.deploy._pull import pull_call
from fedagg.deploy._secure_rpc import secure_call, secure_task, upload_kind
from fedagg.deploy._shards import Shards
from fedagg.deploy._transport import Call, CallError, Messages, Status
from fedagg.deploy._upload import Uploads, check_metrics
from fedagg.deploy._wire import UPLOAD_CHUNK, WireError, decode_chunk
from fedagg.errors import ConfigError
from fedagg.policy import RoundStats

__all__ = ["FederationService", "Session"]

log = logging.getLogger("fedagg.server")
T = TypeVar("T")


@dataclass
class Session:
    """A task stream's end at the server: a client's, or an edge's for its subtree."""

    queue: asyncio.Queue[pb.Task | None] | None = None
    drop: asyncio.TimerHandle | None = None
    connected: bool = False


class FederationService:
    """Serve ``engine`` to whatever transport hands it calls: ``await service.start()``,
    then :meth:`handle` each call; ``await service.wait()`` until the federation ends."""

    def __init__(
        self,
        engine: Engine,
        keyring: Keyring,
        options: ServerOptions,
        *,
        on_round: Callable[[RoundStats], None] | None = None,
        edges: Keyring | None = None,
        serves: set[int] | None = None,
        edge_clients: Mapping[str, Collection[int]] | None = None,
    ) -> None:
        if len(keyring.names) > options.max_clients:
            raise ConfigError(f"{len(keyring.names)} clients exceed max_clients")
        if len(keyring.names) != engine.ctx.num_clients:
            raise ConfigError("the keyring and the federation disagree on the number of clients")
        self.engine = engine
        self.keys = keyring
        self.opt = options
        self.on_round = on_round
        #: called with the effects of every step, after the service applied them (an edge
        #: sends its forwards)
        self.on_effects: Callable[[Effects], None] | None = None
        self.admit = Admission(options, keyring, edges, edge_clients or {})
        self.sessions = [Session() for _ in keyring.names]
        #: edge aggregators below this server (their own keyring), the sessions of their
        #: task streams, and which of them each routed client's tasks go to
        self.edges = edges
        self.edge_sessions = {n: Session() for n in (edges.names if edges else [])}
        self.route: dict[int, str] = {}
        #: the clients this server may serve (an edge aggregator's subtree); None: all
        self.serves = serves
        self.stats = ServerStats()
        self._ex = ThreadPoolExecutor(1, thread_name_prefix="fedagg-engine")
        self.io = ThreadPoolExecutor(2, thread_name_prefix="fedagg-spool")
        self.up = Uploads(options, engine, self.io, self.stats)
        self.turns = Turns(options.ingest, engine, self.io, self.in_engine)  # fold leases
        self.shards = Shards(self)  # uploads split across parallel streams
        self.below = Children(self)
        self.queue: asyncio.Queue[Item] = asyncio.Queue(options.queue)
        self._done = asyncio.Event()
        self._engine_task: asyncio.Task[None] | None = None
        self._mono0 = time.monotonic()
        self._base = 0.0
        self._start_sent = False
        self.accepted: set[tuple[int, int]] = set()  # (client, job) keys already logged
        self.retained = False  # durability = "retained" in effect (see open)
        self._failure: BaseException | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.keep_rounds = 100_000  # round stats kept in memory (all are in the state DB)
        #: evaluation (the root's, see :mod:`fedagg.deploy._evaluation`), and the per-task
        #: client config of a model version, as it travels with a task (JSON; "": none)
        self.evals: Evaluation | None = None
        self.task_config: Callable[[int], str] = lambda version: ""
        self.progress = Progress(self)  # log lines and status.json (fedagg status)
        #: an edge's relay of its clients' secure aggregation replies to its parent (None at
        #: the root, which answers them)
        self.relay_secure: Callable[[int, Any], Awaitable[Any]] | None = None
        #: the data port for uploads (:mod:`fedagg.deploy._stream`; 0: none), told to clients
        self.data_port = 0

    async def handle(self, call: Call) -> bytes | None:
        """Answer ``call`` (see :class:`~fedagg.deploy._transport.Service`)."""
        try:
            if call.method == "Hello":
                return await self._unary(call, self._hello)
            if call.method == "Heartbeat":
                return await self._unary(call, self._heartbeat)
            if call.method == "Report" and self.evals is not None:
                return await self._unary(call, self.evals.report)
            if call.method == "Push":
                return await self._push(call)
            if call.method == "Secure":
                return await secure_call(self, call)
            if call.method == "Tasks":
                await self._tasks(call)
                return None
            if call.method == "Pull":
                await pull_call(self, call)
                return None
            raise CallError(Status.UNIMPLEMENTED, f"no method {call.method!r}")
        except CallError as e:
            self.stats.refused += 1
            self.progress.refused(call.method, call.peer, e)
            raise

    async def _unary(self, call: Call, fn: Callable[[bytes], Any]) -> bytes:
        """A one-message call: its request read and size-checked before ``fn`` parses and
        authenticates it, all while the call counts as opening (see
        :meth:`~fedagg.deploy._admission.Admission.opening`)."""
        with self.admit.opening(call):
            raw = await self.admit.first(call)
            self.admit.sized(raw)
            reply = await fn(raw)
        return bytes(reply.SerializeToString())

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Open the engine (recovering its state) and start serving it."""
        await self.run(await self.open())

    async def open(self) -> Effects:
        """Open the engine: what it says to do first, for :meth:`run`."""
        keep_large_buffers()
        loop = asyncio.get_running_loop()
        durability = getattr(self.engine, "set_durability", None)  # the root's Federation
        if durability is not None:
            durability(self.opt.durability, self.opt.fsync)
        effects = await loop.run_in_executor(self._ex, self.engine.open)
        self.retained = self.up.defer_sync = self._committer() is not None
        await loop.run_in_executor(self._ex, self.engine.warmup)
        self.accepted = await loop.run_in_executor(self._ex, self.engine.store.accepted_keys)
        self._base, self._mono0 = self.engine.now, time.monotonic()
        self._start_sent = self.engine.started
        await loop.run_in_executor(self._ex, self.progress.opened)  # the resume line
        return effects

    async def run(self, effects: Effects) -> None:
        """Start the engine task and apply the engine's first ``effects``."""
        self._engine_task = asyncio.create_task(self._engine())
        self.progress.start()
        self.apply(effects)
        if effects.finished:
            self._done.set()

    async def in_engine(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the engine thread (where everything touching the engine runs)."""
        return await asyncio.get_running_loop().run_in_executor(self._ex, fn, *args)

    def fail(self, error: BaseException) -> None:
        """Stop serving: :meth:`wait` raises ``error``."""
        self._failure = error
        self._done.set()

    async def drain(self, timeout: float) -> None:
        """After the end: wait (up to ``timeout``) for the clients and edges below to read
        "finished" and hang up, so none is left retrying against a closed port."""
        deadline = time.monotonic() + timeout
        sessions = [*self.sessions, *self.edge_sessions.values()]
        while time.monotonic() < deadline and any(s.queue is not None for s in sessions):
            await asyncio.sleep(0.05)

    def now(self) -> float:
        return self._base + (time.monotonic() - self._mono0)

    async def wait(self) -> None:
        await self._done.wait()
        if self._failure is not None:
            raise self._failure

    async def stop(self) -> None:
        """Stop the engine and close the engine's state (the transport has stopped)."""
        if self._engine_task is not None:
            self._engine_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._engine_task
        self._ex.submit(self.engine.close).result()
        self.progress.stop()
        self._ex.shutdown()
        self.io.shutdown()

    # -- the engine ----------------------------------------------------------------------------
    async def _engine(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                batch = [await self.queue.get()]
                while not self.queue.empty() and len(batch) < 256:
                    batch.append(self.queue.get_nowait())
                rows = await loop.run_in_executor(
                    self._ex, self.engine.log, [i.event for i in batch]
                )
                if self.retained:  # acknowledged as durable (or below the watermark): sync
                    late: set[int] = getattr(self.engine, "late", set())
                    for i, r in zip(batch, rows, strict=True):
                        i.retain = i.retain and r is not None and r.job not in late
                    if any(r is not None and r.upload is not None and not i.retain
                           for i, r in zip(batch, rows, strict=True)):  # fmt: skip
                        seq = max(r.seq for r in rows if r is not None)
                        await loop.run_in_executor(self._ex, self._committer().flush, seq)
                for item, row in zip(batch, rows, strict=True):
                    if row is not None:
                        for u in row.parts or ((row.upload,) if row.upload else ()):
                            self.accepted.add((u.client, u.job))
                    if item.done is not None and not item.done.done():
                        item.done.set_result(row)
                live = [r for r in rows if r is not None]
                if live:
                    effects = await loop.run_in_executor(
                        self._ex, functools.partial(self.engine.step, live, defer=True)
                    )
                    self.apply(effects)  # the next tasks go out while it checkpoints
                    await loop.run_in_executor(self._ex, self.engine.settle)
                    self.progress.settled()
                    if effects.rounds:  # keys of closed jobs: the log answers for them
                        lo = effects.min_open_job
                        self.accepted = {k for k in self.accepted if k[1] >= lo}
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a bug or a disk error: stop serving, report it
            log.exception("federation engine failed")
            self._failure = e
            self._done.set()

    def _committer(self) -> Any:
        """The engine's spool committer (``durability = "retained"``), or None."""
        return getattr(self.engine, "committer", None)

    def watermark(self) -> int:
        """Every acknowledged upload of a job below this one is durable (0 without
        ``durability = "retained"``: every acknowledged upload is)."""
        c = self._committer()
        return int(c.watermark) if c is not None else 0

    def ack(self, task: int, duplicate: bool, retain: bool) -> pb.PushReply:
        """An upload's acknowledgement (``retain``: the client keeps it until the watermark
        is above ``task``)."""
        return pb.PushReply(task=task, duplicate=duplicate, retain=retain,
                            watermark=self.watermark() if retain else 0)  # fmt: skip

    def enqueue(self, kind: str, client: int | None = None, job: int | None = None,
                        tag: int | None = None) -> None:  # fmt: skip
        item = Item((kind, self.now(), client, job, tag, None))
        task = asyncio.get_running_loop().create_task(self.queue.put(item))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def apply(self, effects: Effects) -> None:
        loop = asyncio.get_running_loop()
        for t in effects.tasks:
            edge = self.route.get(t.client)
            s = self.sessions[t.client] if edge is None else self.edge_sessions[edge]
            if s.queue is not None:
                s.queue.put_nowait(self.task_msg(t))
            elif s.drop is None:  # nobody to hand it to: a dropout unless it connects in time
                if edge is None:
                    s.drop = loop.call_later(self.opt.client_timeout, self.drop, t.client)
                else:
                    s.drop = loop.call_later(self.opt.client_timeout, self.below.drop, edge)
        for q in effects.secure:  # stage requests: pushed again when their client reconnects
            edge = self.route.get(q.client)
            s = self.sessions[q.client] if edge is None else self.edge_sessions[edge]
            if s.queue is not None:
                s.queue.put_nowait(secure_task(q.job, q.client, q.round, q.stage, q.raw))
        for at, tag in effects.timers:
            delay = max(0.0, at - self.now())
            if math.isfinite(delay):
                loop.call_later(delay, self.enqueue, "timer", None, None, tag)
        self.progress.effects(effects)  # round started and closed lines, the end
        for r in effects.rounds:
            self.stats.rounds.append(r)
            del self.stats.rounds[: -self.keep_rounds]
            if self.on_round is not None:
                self.on_round(r)
        if self.evals is not None and effects.round_models:
            self.evals.after(effects)
        if self.on_effects is not None:
            self.on_effects(effects)
        if effects.finished:
            for s in [*self.sessions, *self.edge_sessions.values()]:
                if s.queue is not None:
                    s.queue.put_nowait(pb.Task(finished=True))
            self._done.set()

    def task_msg(self, t: TaskInfo) -> pb.Task:
        msg = pb.Task(task=t.job, version=t.version, epochs=t.epochs, seed=self.engine.seed,
                      client=t.client, config=t.config or self.task_config(t.version),
                      watermark=self.watermark())  # fmt: skip
        if t.secure is not None:  # the stage-0 request of its secure round rides on it
            r = t.secure
            msg.secagg.CopyFrom(pb.SecureStage(round=r.round, stage=0, payload=r.raw))
        return msg

    def drop(self, client: int) -> None:
        s = self.sessions[client]
        s.drop = None
        if s.connected:
            return
        loop = asyncio.get_running_loop()

        async def go() -> None:
            jobs = await loop.run_in_executor(self._ex, self._open_jobs, client)
            for job in jobs:
                log.info("client %s timed out: dropped out of job %d", self.keys.names[client], job)
                self.enqueue("dropout", client, job)

        self._background.add(task := loop.create_task(go()))
        task.add_done_callback(self._background.discard)

    def _open_jobs(self, client: int) -> list[int]:
        return sorted(t.job for t in self.engine.tasks.values() if t.client == client)

    def connected(self) -> int:
        """Clients connected, directly or through a connected edge aggregator."""
        routed = sum(self.edge_sessions[e].connected for e in self.route.values())
        direct = sum(s.connected for c, s in enumerate(self.sessions) if c not in self.route)
        return direct + routed

    def maybe_start(self) -> None:
        if self._start_sent or self.engine.started:
            return
        need = self.opt.wait_for or len(self.sessions)
        if self.connected() >= need:
            self._start_sent = True
            self.enqueue("start")
            self.progress.start_sent()

    def _auth(self, method: str, auth: Any, content: bytes) -> int:
        return self.progress.seen(self.admit.verify(self.keys, method, auth, content))

    def unknown_task(self, task: int) -> None:
        """Refuse a request for a task this server does not know: for good (the task is
        closed), or, at an edge still learning its subtree's tasks from its parent, for now."""
        if not self.engine.ready():
            raise CallError(
                Status.UNAVAILABLE,
                "this edge aggregator is catching up with its parent: retry",
            )
        raise CallError(Status.FAILED_PRECONDITION, f"task {task} is not open")

    async def _hello(self, raw: bytes) -> pb.HelloReply:
        req = parse(pb.HelloRequest, raw)
        if self.below.is_edge(req.auth):
            return self.below.hello(req)
        client = self._auth("Hello", req.auth, body(protocol=req.protocol))
        if self.serves is not None and client not in self.serves:
            raise CallError(
                Status.PERMISSION_DENIED,
                f"client {req.auth.client!r} is not served by this edge aggregator",
            )
        self.below.check_direct(client)
        if req.protocol != PROTOCOL:
            raise CallError(
                Status.FAILED_PRECONDITION,
                f"protocol {req.protocol} not supported (this server speaks {PROTOCOL})",
            )
        spec = self.engine.spec
        return pb.HelloReply(
            protocol=PROTOCOL, client_index=client, spec_json=json.dumps(spec.to_dict()),
            model_bytes=spec.nbytes, chunk_bytes=self.opt.chunk_bytes, digest=self.opt.digest,
            digest_algorithm=self.opt.digest_algorithm,
            max_streams=self.shards.most() if hasattr(self.engine, "ingest") else 1,
            retained=self.retained, data_port=self.data_port,
        )  # fmt: skip

    async def _heartbeat(self, raw: bytes) -> pb.HeartbeatReply:
        """A client at work says it is alive: if its task stream is down (a proxy that cuts
        idle streams, a reconnect in progress), its tasks do not count as dropped yet."""
        req = parse(pb.HeartbeatRequest, raw)
        loop = asyncio.get_running_loop()
        if self.below.is_edge(req.auth):
            name = self.below.auth("Heartbeat", req.auth, body(tasks=sorted(req.tasks)))
            es = self.edge_sessions[name]
            if es.drop is not None:
                es.drop.cancel()
                es.drop = loop.call_later(self.opt.client_timeout, self.below.drop, name)
            return pb.HeartbeatReply(server_time_ms=int(time.time() * 1000))
        client = self._auth("Heartbeat", req.auth, body(tasks=sorted(req.tasks)))
        s = self.sessions[client]
        if s.drop is not None:
            s.drop.cancel()
            s.drop = loop.call_later(self.opt.client_timeout, self.drop, client)
        return pb.HeartbeatReply(server_time_ms=int(time.time() * 1000),
                                 watermark=self.watermark())  # fmt: skip

    async def _tasks(self, call: Call) -> None:
        edge: str | None = None
        with self.admit.opening(call):
            raw = await self.admit.first(call)
            self.admit.sized(raw)
            req = parse(pb.TasksRequest, raw)
            if self.below.is_edge(req.auth):
                edge = self.below.auth("Tasks", req.auth, body())
            else:
                client = self._auth("Tasks", req.auth, body())
                self.below.check_direct(client)
        if edge is not None:
            await self.below.tasks(call, edge)
            return
        await self.stream_tasks(call, self.sessions[client], {client}, lambda: self.drop(client))

    async def stream_tasks(
        self, call: Call, s: Session, clients: set[int], drop: Callable[[], None]
    ) -> None:
        """A task stream (a client's, or an edge's for its subtree): the open tasks of
        ``clients``, then new ones as they come, heartbeats when idle. When it ends, ``drop``
        runs after ``client_timeout`` unless the stream is back by then."""
        loop = asyncio.get_running_loop()
        if s.queue is not None:  # a second stream replaces the first
            s.queue.put_nowait(None)
        queue: asyncio.Queue[pb.Task | None] = asyncio.Queue()
        s.queue, s.connected = queue, True
        self.progress.joined(s, clients)
        if s.drop is not None:
            s.drop.cancel()
            s.drop = None
        for t in await loop.run_in_executor(self._ex, self._open_tasks_of, clients):
            queue.put_nowait(self.task_msg(t))
        book = getattr(self.engine, "secure", None)
        for r in await self.in_engine(book.open_for, clients) if book is not None else ():
            queue.put_nowait(secure_task(r.job, r.client, r.round, r.stage, r.raw))
        for ask in self.evals.tasks_of(s, clients) if self.evals is not None else ():
            queue.put_nowait(ask)  # evaluation tasks asked and not yet reported
        queue.put_nowait(pb.Task(heartbeat=True, watermark=self.watermark()))  # the open tasks' end
        if self.engine.finished:
            queue.put_nowait(pb.Task(finished=True))
        self.maybe_start()
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(queue.get(), self.opt.heartbeat)
                except TimeoutError:
                    msg = pb.Task(heartbeat=True, watermark=self.watermark())
                if msg is None:
                    return
                await call.write(msg.SerializeToString())
                if msg.finished:
                    return
        finally:
            if s.queue is queue:
                s.queue, s.connected = None, False
                self.progress.left(s, clients)
                if s.drop is None and not self.engine.finished:
                    s.drop = loop.call_later(self.opt.client_timeout, drop)

    def _open_tasks_of(self, clients: set[int]) -> list[TaskInfo]:
        """Their open tasks ("retained": but for one whose upload is logged, not yet stepped,
        which its client would send again)."""
        skip = self.accepted if self.retained else set()
        return sorted((t for t in self.engine.tasks.values()
                       if t.client in clients and (t.client, t.job) not in skip),
                      key=lambda t: t.job)  # fmt: skip

    async def _push(self, call: Call) -> bytes:
        t0 = time.perf_counter()
        with self.admit.opening(call) as authenticated:
            reply = await self._push_one(call, authenticated)
        self.progress.pushed(reply.duplicate, time.perf_counter() - t0)  # deploy.metrics
        return bytes(reply.SerializeToString())

    async def _push_one(self, call: Call, authenticated: Callable[[], None]) -> pb.PushReply:
        # the header: checked before anything is committed
        raw = await self.admit.first(call, "upload header")
        it = Messages(call)
        try:
            first = decode_chunk(raw, UPLOAD_CHUNK)
        except WireError as e:
            raise CallError(Status.INVALID_ARGUMENT, f"malformed chunk: {e}") from None
        if first.header is None:
            raise CallError(Status.INVALID_ARGUMENT, "the first message needs a header")
        self.admit.sized(first.header)
        head = parse(pb.UploadHeader, bytes(first.header))
        metrics = check_metrics(head.metrics)
        content = upload_body(head.task, head.version, head.weight, head.nbytes, metrics,
                              head.shard, head.shards)  # fmt: skip
        keyring = self.keys
        origin: Any = None  # a relayed update's client signatures
        origin_sha = b""
        if self.below.is_edge(head.auth):
            assert self.edges is not None
            edge = self.below.auth("Push", head.auth, edge_upload_body(content, head))
            authenticated()
            keyring = self.edges
            if head.shards > 1:
                raise CallError(Status.INVALID_ARGUMENT, "an edge's upload is not split in shards")
            if not head.relay:
                async with self.up.slot(f"edge:{edge}", it, head.nbytes) as rest:
                    return await self.below.push_partial(edge, first, rest, head)
            client = int(head.on_behalf)
            self.below.routed(edge, client)
            self.below.verify_origin(client, head.origin, head.task, head.version, head.weight,
                                head.nbytes, metrics)  # fmt: skip
            origin = pb.Origin(auth=head.origin.auth, sha256=head.origin.sha256, metrics=metrics,
                               trailer_signature=head.origin.trailer_signature,
                               digest_algorithm=head.origin.digest_algorithm)  # fmt: skip
            origin_sha = bytes(origin.sha256)
        else:
            client = self._auth("Push", head.auth, content)
            authenticated()
            if head.relay or head.partial.jobs or head.partial.dropped:
                raise CallError(Status.PERMISSION_DENIED, "only edge aggregators relay or merge")
        dim, dtype = upload_kind(self.engine, head)  # a plaintext or a masked update
        retain = self.retained and keyring is self.keys and dim is None  # kept by its client
        duplicate = (client, head.task) in self.accepted
        problem = None if duplicate else self.engine.task_problem(client, head.task, head.version)
        if problem == "unknown":
            # maybe accepted before a restart pruned it: ask the log
            loop = asyncio.get_running_loop()
            dup = await loop.run_in_executor(
                self._ex, self.engine.store.has_upload, client, head.task
            )
            if not dup:
                self.unknown_task(head.task)
            duplicate = True
        elif problem == "denied":
            raise CallError(
                Status.PERMISSION_DENIED, f"task {head.task} was given to another client"
            )
        elif problem == "version":
            version = self.engine.tasks[head.task].version
            raise CallError(
                Status.INVALID_ARGUMENT,
                f"task {head.task} trains from version {version}, not {head.version}",
            )
        if head.shards > 1:  # one shard of an upload split across parallel streams
            self.shards.check(head, dim is not None)
            return await self.shards.push(client, first, it, head, dtype, keyring, duplicate)
        async with (
            self.up.one_upload(client, head.task),
            self.up.slot(f"client:{client}", it, head.nbytes) as rest,
        ):
            # the slot is held until the upload is acknowledged (backpressure)
            if duplicate:  # a retry of an accepted upload (of this size): read it, acknowledge
                what = f"re-sent upload of accepted task {head.task}"
                await self.up.read_unspooled(first, rest, head, dtype.itemsize, what)
                self.stats.duplicates += 1
                return self.ack(head.task, True, retain)
            t0 = time.perf_counter()
            lease = await self.turns.take(client, head, dim is not None)  # fold on receive
            queued = False
            try:
                path, digest, check, tsig = await self.up.receive(
                    client, first, rest, head, dtype, keyring, origin_sha, finite=dim is None,
                    lease=lease,
                )  # fmt: skip
                self.stats.receive_s += time.perf_counter() - t0
                if origin is None:  # the client's own upload: its signatures are the origin
                    origin = pb.Origin(auth=head.auth, sha256=digest, trailer_signature=tsig,
                                       metrics=metrics,
                                       digest_algorithm=self.opt.digest_algorithm)  # fmt: skip
                self.engine.keep_origin(client, head.task, origin.SerializeToString())
                item = await log_arrival(self, client, head, path, digest, check, metrics, dim,
                                              lease, retain)  # fmt: skip
                queued = True
            finally:
                await self.turns.end(lease, queued)
            return await acknowledge(self, client, head, path, item, lease)
