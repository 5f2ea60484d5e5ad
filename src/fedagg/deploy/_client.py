"""The client runtime: connect, wait for tasks, pull the model, train, push the update.

The user supplies ``train(model, task) -> Result`` (and, for federated evaluation,
``evaluate(model, task) -> {metric: value}``); everything else (TLS, signing every
request, streaming in chunks, retrying through server restarts and network errors) is here.
Uploads are idempotent (keyed by client and task), so a retry after a lost acknowledgement is
safe: the server acknowledges it without counting it again. A server with ``durability =
"retained"`` acknowledges an upload before its bytes are synced (``PushReply.retain``): the
client keeps the update (in memory: lost with this process, the task is then trained again)
until the server's committed watermark is above its task, and if the server, restarted after
a power failure, gives it that task again, it sends the update it kept instead of training
(at most :data:`~fedagg.deploy._kept.MAX_KEPT` kept: beyond, the oldest is dropped, and
trained again if given again).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from fedagg.clients import Result, Task
from fedagg.core.spec import ArrayTree, ParamSpec
from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._auth import ClientKey, Keyring, body
from fedagg.deploy._calls import CALL_METADATA, CallTokens
from fedagg.deploy._evalwire import parse_task_config, report_body
from fedagg.deploy._faults import crash_point
from fedagg.deploy._kept import Kept, KeptUpdates
from fedagg.deploy._log import client_connected, client_retry, client_task, client_uploaded
from fedagg.deploy._malloc import keep_large_buffers
from fedagg.deploy._probe import transport_mismatch
from fedagg.deploy._push import PushPlan, push_update, stream_count
from fedagg.deploy._secure import secure_body
from fedagg.deploy._secure_client import SecureJobs
from fedagg.deploy._store import checksum
from fedagg.deploy._stream_client import StreamFull, StreamPush, StreamUnreachable
from fedagg.deploy._wire import MODEL_CHUNK, decode_chunk
from fedagg.errors import ConfigError, FedaggError
from fedagg.secagg import SecureExpectations

__all__ = ["Client", "ClientError", "ClientReport", "Result", "TaskContext"]

PROTOCOL = 1
log = logging.getLogger("fedagg.client")
RETRY = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


#: whether ``transport = "auto"`` uses the data port under TLS too: not yet. Its TLS (Python's
#: ssl, OpenSSL 3.0: the client encrypts in memory, the server decrypts on its event loop) was
#: not faster than gRPC's on the loaded 2-core test machine (benchmarks/results/transport.md,
#: "stream-default" vs "default": 6-24 s against 3.4-5.3 s for 1 GiB, similar CPU); the plain
#: data port costs about a third less CPU than gRPC on both sides.
TLS_STREAM = False


class ClientError(FedaggError):
    """The server refused the client for good (bad credentials, bad input, wrong protocol)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


#: What a task tells the train function (the same :class:`fedagg.clients.Task` a simulated
#: client's code receives).
TaskContext = Task


@dataclass
class ClientReport:
    tasks: int = 0
    uploads: int = 0
    duplicates: int = 0
    skipped: int = 0
    evaluations: int = 0  # evaluation tasks reported
    retries: int = 0
    heartbeats: int = 0
    resent: int = 0  # updates kept ("retain") and sent again when given their task again
    pull_s: list[float] = field(default_factory=list)  # per task: model download
    train_s: list[float] = field(default_factory=list)
    push_s: list[float] = field(default_factory=list)  # digest, upload, durable ack


TrainFn = Callable[[ArrayTree, TaskContext], Any]
EvalFn = Callable[[ArrayTree, TaskContext], Any]


class Client:
    """A federation client. ``Client(server, key, train, ca=...).run()`` blocks until the
    federation finishes.

    Args:
        server: ``host:port``.
        key: the client's :class:`ClientKey` (``ClientKey.load("alice.key")``).
        train: ``train(model, task) -> Result`` (or a ``fedagg.clients`` TrainResult).
            ``task.config`` is the per-task config the server sent (``[client] config``
            through its schedule for this model version).
        evaluate: ``evaluate(model, task) -> {metric: value}`` for the server's federated
            evaluation tasks (``task.kind == "evaluate"``); a ``"num_examples"`` entry is the
            metrics' weight (default 1). None: this client reports no metrics (weight 0).
        ca: the CA certificate (PEM bytes) that signed the server's; None needs
            ``insecure=True``.
        retry_for: give up after this many seconds without reaching the server.
        heartbeat: while training, tell the server every this many seconds that the client
            is alive (keeps its task open if the task stream is down).
        keyring: the federation's ``authorized_keys`` (:class:`Keyring`): the peers' identity
            keys secure aggregation checks their signatures with; without it this client
            refuses secure aggregation rounds.
        channel: a channel to call the server on instead of connecting to ``server``: any
            object with a ``grpc.aio`` channel's multi-callables, e.g. a
            :class:`~fedagg.deploy._memory.MemoryChannel` (one per client: the client closes
            it when it is done).
        expect: this client's own minimums for a secure round
            (:class:`fedagg.secagg.SecureExpectations`, :func:`client_from_config` builds them
            from the config): a round whose parameters fall short is refused. None: only the
            cohort size (>= 3) and the protocol's majority threshold are checked.
        streams: split each upload across this many parallel streams (``[deploy] streams``;
            0: one below 64 MiB, else 2), at most the server's ``max_streams``.
        transport: how uploads travel (``[deploy] transport``): ``"auto"``: over the
            server's data port (:mod:`fedagg.deploy._stream`) when its hello advertises one,
            it connects, and the connection is without TLS (Python's TLS measured slower than
            gRPC's here: see :data:`TLS_STREAM`), else (and from then on, for the rest of the
            run) over gRPC; ``"stream"``: the data port also under TLS; ``"grpc"``: always
            gRPC. Everything else always goes over gRPC.
    """

    def __init__(
        self,
        server: str,
        key: ClientKey,
        train: TrainFn,
        *,
        evaluate: EvalFn | None = None,
        ca: bytes | None = None,
        insecure: bool = False,
        retry_for: float = 120.0,
        server_name: str | None = None,
        heartbeat: float = 10.0,
        channel: Any = None,
        keyring: Keyring | None = None,
        expect: SecureExpectations | None = None,
        streams: int = 0,
        transport: str = "auto",
    ) -> None:
        if ca is None and not insecure:
            raise ConfigError("TLS is on by default: give the CA certificate, or insecure=True")
        self.server = server
        self.key = key
        self._tokens = CallTokens(key)
        self.train = train
        self.evaluate = evaluate
        self.ca = ca
        self.retry_for = retry_for
        self.server_name = server_name
        self.heartbeat = heartbeat
        self.report = ClientReport()
        self.spec: ParamSpec | None = None
        self.index = -1
        self._channel: Any = channel  # a grpc.aio.Channel, or one like it
        self._probe = channel is None  # on a failed connection: a TLS mismatch? (_probe.py)
        self._stream: Any = None  # the open task stream
        #: secure aggregation rounds, checked against this keyring (the trusted PKI)
        self.secure = SecureJobs(key, keyring, expect)
        if not 0 <= streams <= 64:
            raise ConfigError("streams must be in [0, 64]")
        self.streams = streams  # parallel streams per upload (0: by size); see _push.py
        if transport not in ("auto", "stream", "grpc"):
            raise ConfigError('transport must be "auto", "stream" or "grpc"')
        self.transport = transport
        self.data_port = 0  # the server's data port (HelloReply.data_port), once known
        self._data: StreamPush | None = None  # Push over it (None: over gRPC)
        self.chunk, self.digest, self.digest_algorithm, self.max_streams = 0, True, "sha256", 0
        self._running: dict[int, asyncio.Task[None]] = {}  # secure tasks training
        #: updates acknowledged as "retain", by task, until a watermark is above the task
        self.kept = KeptUpdates()  # at most MAX_KEPT (deploy._kept): the oldest dropped
        self._streams = 0  # task streams opened

    def run(self) -> ClientReport:
        return asyncio.run(self.run_async())

    async def run_async(self) -> ClientReport:
        keep_large_buffers()
        try:
            await self._loop()
        finally:
            for task in list(self._running.values()):  # secure rounds still training
                task.cancel()
            if self._channel is not None:
                await self._channel.close()
        return self.report

    # -- plumbing ----------------------------------------------------------------------------
    def _connect(self) -> grpc.aio.Channel:
        opts: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", 80 << 20),
            ("grpc.max_send_message_length", 80 << 20),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.enable_retries", 0),
        ]
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))
        if self.ca is None:
            return grpc.aio.insecure_channel(self.server, options=opts)
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca)
        return grpc.aio.secure_channel(self.server, creds, options=opts)

    @property
    def channel(self) -> Any:
        if self._channel is None:
            self._channel = self._connect()
        return self._channel

    def _auth(self, method: str, content: bytes) -> pb.Auth:
        return pb.Auth(**self.key.sign(method, content))

    def _method(self, name: str, kind: str) -> Callable[..., Any]:
        """``name``'s multi-callable; each call carries call credentials (metadata, see
        :mod:`fedagg.deploy._calls`: passed directly, cheaper than a channel interceptor)."""
        multi = getattr(self.channel, kind)(f"/fedagg.v1.Federation/{name}")

        def call(request: Any, **kw: Any) -> Any:
            return multi(request, metadata=((CALL_METADATA, self._tokens(name)),), **kw)

        return call

    async def _retry(self, what: str, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` until it succeeds, retrying transient failures with backoff."""
        start = time.monotonic()
        delay = 0.05
        while True:
            try:
                return await fn()
            except grpc.aio.AioRpcError as e:
                code = e.code()
                skewed = code == grpc.StatusCode.UNAUTHENTICATED and "clock skew" in (
                    e.details() or ""
                )  # delayed past the window: re-signed with a fresh timestamp on retry
                if code == grpc.StatusCode.UNAVAILABLE:  # a TLS mismatch? (_probe.py)
                    await self._mismatch(str(e.details()))
                if (code not in RETRY and not skewed) or time.monotonic() - start > self.retry_for:
                    raise ClientError(code, e.details() or "") from None
                self.report.retries += 1
                pause = delay * (0.5 + random.random())
                client_retry(what, code.name, str(e.details()), self.report.retries, pause)
                await asyncio.sleep(pause)
                delay = min(delay * 2, 2.0)

    async def _mismatch(self, details: str | None) -> None:
        """A ClientError if this client and the server disagree on TLS (see _probe.py)."""
        why = (
            await transport_mismatch(self.server, self.ca is not None, details)
            if self._probe
            else None
        )
        if why is not None:
            raise ClientError(grpc.StatusCode.UNAVAILABLE, why)

    # -- the protocol ----------------------------------------------------------------------------
    async def _hello(self) -> None:
        if self._probe and self.ca is None:  # fail fast against a TLS server
            await self._mismatch(None)

        async def call() -> bytes:
            req = pb.HelloRequest(auth=self._auth("Hello", body(protocol=PROTOCOL)),
                                  protocol=PROTOCOL)  # fmt: skip
            raw: bytes = await self._method("Hello", "unary_unary")(
                req.SerializeToString(), timeout=30
            )
            return raw

        reply = pb.HelloReply.FromString(await self._retry("hello", call))
        self.spec = ParamSpec.from_dict(json.loads(reply.spec_json))
        self.index = reply.client_index
        self.upload_options(reply)
        client_connected(self.server, self.ca is not None, self.key.name, self.index,
                         self.spec.size, self.spec.nbytes)  # fmt: skip

    def upload_options(self, reply: pb.HelloReply) -> None:
        """How this client uploads, as the server's hello says: chunk size, digest and its
        algorithm ("" is sha256: a server of before the choice), the most parallel streams
        (0: a server of before them, one stream)."""
        self.chunk = int(reply.chunk_bytes)
        self.digest = bool(reply.digest)
        self.digest_algorithm = str(reply.digest_algorithm) or "sha256"
        self.max_streams = int(reply.max_streams)
        wants = self.transport == "stream" or (
            self.transport == "auto" and (self.ca is None or TLS_STREAM)
        )
        port = int(reply.data_port) if wants and self._channel_is_grpc() else 0
        if port != self.data_port:
            self.data_port = port
            self._data = self._stream_push(port) if port else None

    def _channel_is_grpc(self) -> bool:
        """Whether this client reaches the server over the network (not an in-process
        channel given to it): only then is there a data port to connect to."""
        return self._probe

    def _stream_push(self, port: int) -> StreamPush:
        host = self.server.rpartition(":")[0].strip("[]")
        return StreamPush(host, port, self.ca, self._tokens, server_name=self.server_name)

    async def _loop(self) -> None:
        await self._hello()
        done: set[int] = set()
        start = time.monotonic()
        delay = 0.05
        while True:
            try:
                req = pb.TasksRequest(auth=self._auth("Tasks", body()))
                stream = self._method("Tasks", "unary_stream")(req.SerializeToString())
                self._stream = stream
                self._streams += 1
                async for raw in stream:
                    start, delay = time.monotonic(), 0.05
                    t = pb.Task.FromString(raw)
                    self._covered(t.watermark)
                    if t.heartbeat:
                        continue
                    if t.finished:
                        log.info("the federation finished: %d tasks", self.report.tasks,
                                 extra={"event": "finished"})  # fmt: skip
                        return
                    if t.HasField("secagg") and (t.secagg.stage > 0 or t.task in done):
                        await self._stage(t)  # a stage request of a secure round
                        continue
                    if t.task in done:
                        lost = self.kept.lost(t.task, self._streams)  # the server lost it:
                        if lost == "resend":  # send the kept update
                            await self._resend(t)
                        elif lost == "train":  # (dropped: MAX_KEPT)
                            await self._do(t)
                        continue
                    if t.HasField("secagg"):  # trains while the round's stages go on
                        done.add(t.task)
                        await self._stage(t)
                        job = asyncio.create_task(self._do(t))
                        self._running[t.task] = job
                        job.add_done_callback(self._trained)
                        continue
                    await self._do(t)
                    done.add(t.task)
            except grpc.aio.AioRpcError as e:
                if e.code() not in RETRY or time.monotonic() - start > self.retry_for:
                    raise ClientError(e.code(), e.details() or "") from None
                client_retry(
                    "tasks", e.code().name, str(e.details()), self.report.retries + 1, delay
                )
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise  # we are being cancelled, not just the stream
            self.report.retries += 1
            await asyncio.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, 2.0)

    def _context(self, t: pb.Task) -> TaskContext:
        """What the user's code is told about task ``t``; a malformed task (config, kind) is
        a ConfigError naming the task (the server speaks another protocol)."""
        kind = t.kind or "train"
        if kind not in ("train", "evaluate"):
            raise ConfigError(f"task {t.task}: unknown kind {kind[:32]!r} (update the client)")
        try:
            config = parse_task_config(t.config)
        except ConfigError as e:
            raise ConfigError(f"task {t.task} from the server: {e}") from None
        return TaskContext(t.task, t.version, t.epochs, t.seed, self.index, self.key.name,
                           config, kind)  # fmt: skip

    async def _do(self, t: pb.Task) -> None:
        assert self.spec is not None
        ctx = self._context(t)
        client_task(t.task, ctx.kind, t.version, t.epochs)
        if ctx.kind == "evaluate":
            await self._evaluate(t, ctx)
            return
        self.report.tasks += 1
        t0 = time.perf_counter()
        try:
            flat = await self._retry("pull", lambda: self._pull(t))
        except ClientError as e:
            if e.code == grpc.StatusCode.FAILED_PRECONDITION:  # the task closed meanwhile
                log.info("task %d closed before its model was pulled: skipped", t.task)
                self.report.skipped += 1
                return
            raise
        model = self.spec.unflatten(flat)
        loop = asyncio.get_running_loop()
        t1 = time.perf_counter()
        beats = asyncio.create_task(self._beat(t.task))
        try:
            result = await loop.run_in_executor(None, self.train, model, ctx)
        finally:
            beats.cancel()
        t2 = time.perf_counter()
        delta = self.spec.as_flat(result.delta)
        delta = np.ascontiguousarray(delta, dtype=self.spec.dtype)
        metrics = {k: float(v) for k, v in dict(getattr(result, "metrics", {}) or {}).items()}
        weight = float(result.num_examples)
        if t.HasField("secagg"):  # only the masked update leaves the client
            masked = await self.secure.masked(t.task, delta, weight, self.retry_for)
            if masked is None:
                self.report.skipped += 1
                return
            delta, weight = masked, 1.0  # the weight is inside the encoding
            crash_point("client-secure-2")
        try:
            reply = await self._retry("push", lambda: self._push(t, delta, weight, metrics))
        except ClientError as e:
            if e.code == grpc.StatusCode.FAILED_PRECONDITION:
                log.info("task %d closed before its upload: skipped (%s)", t.task, e.message)
                self.report.skipped += 1
                return
            raise
        t3 = time.perf_counter()
        client_uploaded(t.task, t1 - t0, t2 - t1, delta.nbytes, t3 - t2, reply.duplicate)
        self.report.pull_s.append(t1 - t0)
        self.report.train_s.append(t2 - t1)
        self.report.push_s.append(time.perf_counter() - t2)
        if reply.duplicate:
            self.report.duplicates += 1
        else:
            self.report.uploads += 1
        self._keep(t, reply, delta, weight, metrics)

    def _keep(self, t: pb.Task, reply: pb.PushReply, delta: np.ndarray[Any, Any], weight: float,
              metrics: dict[str, float]) -> None:  # fmt: skip
        """Keep an update acknowledged as "retain" until a watermark is above its task."""
        if reply.retain and reply.watermark <= t.task:
            self.kept.keep(t.task, Kept(t.version, t.epochs, t.config, self._streams, delta,
                                        checksum(delta.data.cast("B")), weight, metrics),
                           reply.watermark)  # fmt: skip
        self._covered(reply.watermark)

    def _covered(self, watermark: int) -> None:
        """The server's committed watermark: the updates kept for tasks below it are durable."""
        self.kept.covered(watermark)

    async def _resend(self, t: pb.Task) -> None:
        """Task ``t`` again, whose update this client kept: the server lost it (a power failure
        before it was synced). Sent again as it was, not trained again (a different task under
        the same id, which should not happen, is trained)."""
        k = self.kept.pop(t.task)
        same = (k.version, k.epochs, k.config) == (t.version, t.epochs, t.config)
        if not same or checksum(k.delta.data.cast("B")) != k.check:  # (its arrays reused)
            await self._do(t)
            return
        log.info("task %d: given again (the server lost the upload): sending the kept update",
                 t.task, extra={"event": "resend", "task": t.task})  # fmt: skip
        try:
            reply = await self._retry("push", lambda: self._push(t, k.delta, k.weight, k.metrics))
        except ClientError as e:
            if e.code == grpc.StatusCode.FAILED_PRECONDITION:
                log.info("task %d closed before its upload: skipped (%s)", t.task, e.message)
                return
            raise
        self.report.resent += 1
        self._keep(t, reply, k.delta, k.weight, k.metrics)

    def _trained(self, task: asyncio.Task[None]) -> None:
        """A secure round's task ended (trained and uploaded, or failed: logged)."""
        for job, t in list(self._running.items()):
            if t is task:
                del self._running[job]
        if not task.cancelled() and task.exception() is not None:
            e = task.exception()
            log.error("a secure aggregation task failed: %s: %s", type(e).__name__, e)

    async def _stage(self, t: pb.Task) -> None:
        """Answer a stage request of a secure round (see :mod:`fedagg.deploy._secure_client`)
        with a ``Secure`` call; a stage-0 reply the server already holds from an earlier
        process of this client is not ours: this client leaves that round."""
        s = t.secagg
        job, round_, stage, payload = t.task, s.round, s.stage, bytes(s.payload)
        if stage == 0:
            reply = self.secure.begin(job, round_, payload, int(t.version))
        else:
            reply = self.secure.answer(job, round_, stage, payload)
        if reply is None:
            return
        crash_point(f"client-secure-{stage}")
        tries = 0

        async def call() -> pb.SecureReply:
            nonlocal tries
            tries += 1
            content = secure_body(job, round_, stage, reply)
            req = pb.SecureRequest(auth=self._auth("Secure", content), task=job, round=round_,
                                   stage=stage, payload=reply)  # fmt: skip
            raw = await self._method("Secure", "unary_unary")(req.SerializeToString(), timeout=30)
            got: pb.SecureReply = pb.SecureReply.FromString(raw)
            return got

        try:
            got = await self._retry("secure", call)
        except ClientError as e:
            if e.code != grpc.StatusCode.FAILED_PRECONDITION:
                raise
            log.info("task %d: secure stage %d closed before the reply: %s", job, stage, e.message)
            self.secure.abandon(job, f"stage {stage} closed")
            return
        if got.duplicate and stage == 0 and tries == 1 and not self.secure.sent(job):
            self.secure.abandon(job, "the server holds another process's keys for it")
        self.secure.mark_sent(job)

    async def _evaluate(self, t: pb.Task, ctx: TaskContext) -> None:
        """A federated evaluation task: pull its model version, evaluate, report."""
        assert self.spec is not None
        try:
            flat = await self._retry("pull", lambda: self._pull(t))
        except ClientError as e:
            if e.code == grpc.StatusCode.FAILED_PRECONDITION:  # the evaluation closed
                self.report.skipped += 1
                return
            raise
        weight, metrics = 0.0, dict[str, float]()
        if self.evaluate is not None:
            model = self.spec.unflatten(flat)
            loop = asyncio.get_running_loop()
            try:  # a failing evaluation is reported empty: training goes on
                out = await loop.run_in_executor(None, self.evaluate, model, ctx)
                weight, metrics = eval_output(out, f"evaluation task {t.task}")
            except Exception as e:
                log.error("evaluating version %d failed: %s: %s", t.version, type(e).__name__, e)
        try:
            await self._retry("report", lambda: self._report(t, weight, metrics))
        except ClientError as e:
            if e.code not in (grpc.StatusCode.FAILED_PRECONDITION,
                              grpc.StatusCode.INVALID_ARGUMENT):  # fmt: skip
                raise
            log.warning("evaluation of version %d not counted: %s", t.version, e.message)
            self.report.skipped += 1
            return
        self.report.evaluations += 1

    async def _report(self, t: pb.Task, weight: float, metrics: dict[str, float]) -> None:
        content = report_body(t.task, t.version, weight, metrics)
        req = pb.ReportRequest(auth=self._auth("Report", content), task=t.task,
                               version=t.version, num_examples=weight, metrics=metrics)  # fmt: skip
        await self._method("Report", "unary_unary")(req.SerializeToString(), timeout=30)

    async def _beat(self, task: int) -> None:
        """Heartbeats while a task trains; a failed one is not an error (the next may pass)."""
        call = self._method("Heartbeat", "unary_unary")
        while True:
            await asyncio.sleep(self.heartbeat)
            req = pb.HeartbeatRequest(auth=self._auth("Heartbeat", body(tasks=[task])),
                                      tasks=[task])  # fmt: skip
            try:
                raw = await call(req.SerializeToString(), timeout=self.heartbeat)
                self._covered(pb.HeartbeatReply.FromString(raw).watermark)
                self.report.heartbeats += 1
            except grpc.aio.AioRpcError as e:
                log.debug("heartbeat: %s", e.code().name)

    async def _pull(self, t: pb.Task) -> np.ndarray[Any, Any]:
        assert self.spec is not None
        req = pb.PullRequest(auth=self._auth("Pull", body(task=t.task)), task=t.task)
        flat = np.empty(self.spec.size, dtype=self.spec.dtype)
        view = flat.data.cast("B")
        got = 0
        async for raw in self._method("Pull", "unary_stream")(req.SerializeToString()):
            c = decode_chunk(raw, MODEL_CHUNK)
            off, n = c.ints.get(2, 0), len(c.data)
            if c.ints.get(1, 0) != t.version or c.ints.get(4, 0) != len(view) or off != got:
                raise ConfigError("the server sent a model that does not fit the task")
            view[off : off + n] = c.data
            got += n
        if got != len(view):
            raise ConfigError(f"truncated model: {got} of {len(view)} bytes")
        return flat

    async def _push(
        self, t: pb.Task, delta: np.ndarray[Any, Any], weight: float, metrics: dict[str, float]
    ) -> pb.PushReply:
        data = delta.data.cast("B")
        streams = stream_count(len(data), delta.size, self.streams, self.max_streams)
        if t.HasField("secagg"):  # a masked upload goes whole
            streams = 1
        plan = PushPlan(int(t.task), int(t.version), weight, metrics, self.chunk, self.digest,
                        self.digest_algorithm, streams)  # fmt: skip
        if self._data is not None:  # the data port, unless it cannot be reached
            try:
                return await push_update(self._data, self.key, self._auth, data, delta.itemsize,
                                         plan)  # fmt: skip
            except StreamFull as e:  # busy (or flooded) now: this upload over gRPC
                log.warning("the data port is full (%s): this upload goes over gRPC", e,
                            extra={"event": "data_port_full"})  # fmt: skip
            except StreamUnreachable as e:
                log.warning("the data port is unreachable (%s): uploads go over gRPC", e,
                            extra={"event": "data_port_unreachable"})  # fmt: skip
                self._data = None
        return await push_update(self._method("Push", "stream_unary"), self.key, self._auth,
                                 data, delta.itemsize, plan)  # fmt: skip


def eval_output(out: Any, what: str) -> tuple[float, dict[str, float]]:
    """An evaluate function's answer as a report: (weight, metrics). Its ``num_examples``
    (default 1) is the weight; values that are not finite numbers are left out (logged)."""
    if not isinstance(out, Mapping):
        raise ConfigError(f"{what}: evaluate must return a dict of metrics, got "
                          f"{type(out).__name__}")  # fmt: skip
    metrics: dict[str, float] = {}
    weight = 1.0
    for k, v in out.items():
        try:
            x = float(v)
        except (TypeError, ValueError):
            x = math.nan
        if not math.isfinite(x):
            log.warning("%s: metric %r = %r is not a finite number: left out", what, k, v)
        elif k == "num_examples":
            weight = max(x, 0.0)
        else:
            metrics[str(k)] = x
    return weight, metrics
