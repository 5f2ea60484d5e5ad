"""The federation server: gRPC (grpc.aio) in front of a :class:`Federation`.

Threads: the asyncio loop runs the RPC handlers (authentication, streaming, spooling each
upload's chunks to disk as they arrive); one engine thread runs everything that touches the
federation's state (logging events, the policy, folding, checkpoints), fed by a bounded
queue: when folding falls behind, uploads wait for their acknowledgement and the clients
slow down (backpressure).

An upload is acknowledged only once it is durable: its spool file fsynced and renamed, its
(client, job) key committed to the event log.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import hashlib
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import numpy as np
from google.protobuf.message import DecodeError

from fedagg.core import kernels
from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._auth import (
    AUTH_FAILED,
    AuthError,
    Keyring,
    NonceCache,
    RateLimited,
    RateLimiter,
    body,
    edge_upload_body,
    upload_body,
)
from fedagg.deploy._calls import CALL_METADATA, VerifiedCalls, call_method
from fedagg.deploy._faults import crash_point
from fedagg.deploy._fed import Effects, Federation, TaskInfo
from fedagg.deploy._malloc import keep_large_buffers
from fedagg.deploy._partial import partial_dtype, partial_nbytes
from fedagg.deploy._store import EventRow, LogItem, PartialRows, UploadRow, new_checksum
from fedagg.deploy._wire import UPLOAD_CHUNK, WireError, decode_chunk, encode_chunk, leading_name
from fedagg.errors import ConfigError
from fedagg.policy import RoundStats

__all__ = ["PROTOCOL", "Server", "ServerOptions"]

PROTOCOL = 1
SERVICE = "fedagg.v1.Federation"
log = logging.getLogger("fedagg.server")
T = TypeVar("T")

#: An upload's metrics: at most MAX_METRICS, each named by 1 to MAX_METRIC_NAME characters of
#: ``A-Z a-z 0-9 _ . : / -``, each a finite float. They are checked before anything else is
#: done for the upload (its signature, spool file, state DB row), so a header stuffed with
#: metrics costs the server nothing. (Module constants: the ``[deploy]`` table has no limits
#: section.)
MAX_METRICS = 64
MAX_METRIC_NAME = 64
_METRIC_NAME = re.compile(rf"[A-Za-z0-9_.:/\-]{{1,{MAX_METRIC_NAME}}}")
#: The first message of an RPC (an upload's header, not its data) is at most MAX_REQUEST
#: bytes; one signed by an edge aggregator's name may carry per-client lists (the clients it
#: serves, their tasks, a partial's jobs with their clients' signatures and metrics):
#: EDGE_PER_CLIENT more bytes per client in its scope (``deploy.edge_clients``). Checked on
#: the raw bytes, before parsing. (gRPC's message limit, ``chunk_bytes`` + 64 KiB, caps it.)
MAX_REQUEST = 16 * 1024
#: RPCs one caller may have opening at once (credentials checked, first message not yet read
#: and authenticated): each may make gRPC hold up to its message limit.
OPENING_PER_CALLER = 8
#: the caller of the RPC being handled (each RPC runs in its own task, with its own context)
_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("fedagg_caller", default="")
#: An upload's data comes in chunks of at most ``chunk_bytes``, split where the client likes
#: (at its arrays' ends, say): at most ``nbytes / min(MIN_CHUNK, chunk_bytes)`` + 2 per array
#: of the model + 8 of them, so tiny chunks cannot multiply the per-message cost of an upload.
MIN_CHUNK = 64 * 1024
EDGE_PER_CLIENT = 6 * 1024


@dataclass(frozen=True)
class ServerOptions:
    """How the server listens, authenticates and limits (the ``[deploy]`` config table).

    Args:
        listen: ``host:port`` (port 0 picks a free one; see :attr:`Server.port`).
        tls: ``(cert_pem, key_pem)`` bytes, or None to run without TLS (needs
            ``insecure=True``: there is no silent fallback).
        chunk_bytes: the largest data chunk accepted in an upload (and sent in a pull).
        queue: accepted events waiting for the engine; beyond it, uploads wait (backpressure).
        client_timeout: seconds a client with open tasks may stay disconnected before its
            tasks count as dropped out.
        heartbeat: seconds between keep-alives on an idle task stream.
        wait_for: clients that must be connected before the first round (0: all).
        rate, burst: per-client request rate limit (token bucket; rate 0 disables it).
        skew: allowed clock skew of signed requests, seconds (also the nonce memory).
        fsync: fsync each spooled upload before acknowledging it (durable across a power
            loss, not only a process crash).
        max_clients: refuse a keyring larger than this.
        max_uploads: uploads received at once, and models sent at once; more wait (held back
            by gRPC flow control), so the server's memory does not grow with the number of
            clients.
        adaptive_window: let gRPC grow each stream's flow-control window (BDP probing):
            faster for a few large uploads, but memory then grows with concurrent clients.
        digest: require a signed sha256 of every upload's bytes (end-to-end payload
            authenticity, also through a TLS-terminating proxy). It costs a hash pass on
            both sides (~1 GB/s per core); with TLS end to end, turning it off loses nothing
            in transit (the channel authenticates every byte).
        first_timeout: seconds an RPC may take to send its first message (an upload's
            header), which is read, size-capped (:data:`MAX_REQUEST`) and authenticated
            before the RPC takes a slot, a file or a thread.
        idle_timeout: seconds an upload holding a slot may go without sending a message.
        min_rate: progress floor of an upload holding a slot, bytes/s: it must end within
            ``idle_timeout + nbytes / min_rate`` seconds of taking its slot.
        client_uploads: slots one client (or one edge's partials) may hold at once, out of
            ``max_uploads``; beyond, an upload is refused (RESOURCE_EXHAUSTED: clients retry
            later). 2: an upload and a concurrent retry of it (after a lost connection).
        preauth: RPCs opening at once (call credentials verified, first message not yet
            read and authenticated), over all peers; beyond, a new RPC is refused at once
            (RESOURCE_EXHAUSTED: clients retry) and costs nothing. A call without valid call
            credentials (see :mod:`fedagg.deploy._calls`) is refused before it opens.
        preauth_per_peer: the same, per peer IP address, so one host cannot take them all
            (and :data:`OPENING_PER_CALLER` per caller).
    """

    listen: str = "127.0.0.1:7531"
    tls: tuple[bytes, bytes] | None = None
    insecure: bool = False
    chunk_bytes: int = 4 << 20
    queue: int = 64
    client_timeout: float = 30.0
    heartbeat: float = 10.0
    wait_for: int = 0
    rate: float = 50.0
    burst: float = 200.0
    skew: float = 60.0
    fsync: bool = True
    max_clients: int = 100_000
    max_uploads: int = 8
    adaptive_window: bool = False
    digest: bool = True
    first_timeout: float = 10.0
    idle_timeout: float = 30.0
    min_rate: float = 64 * 1024.0
    client_uploads: int = 2
    preauth: int = 64
    preauth_per_peer: int = 32

    def __post_init__(self) -> None:
        if self.tls is None and not self.insecure:
            raise ConfigError("TLS is on by default: give certificates, or insecure=True")
        if self.chunk_bytes < 4096 or self.chunk_bytes > (64 << 20):
            raise ConfigError("chunk_bytes must be in [4 KiB, 64 MiB]")
        if self.queue < 1 or self.client_timeout <= 0 or self.heartbeat <= 0:
            raise ConfigError("queue, client_timeout and heartbeat must be > 0")
        if self.max_uploads < 1 or self.client_uploads < 1:
            raise ConfigError("max_uploads and client_uploads must be >= 1")
        if not (self.first_timeout > 0 and self.idle_timeout > 0 and self.min_rate > 0):
            raise ConfigError("first_timeout, idle_timeout and min_rate must be > 0")
        if self.preauth < 1 or self.preauth_per_peer < 1:
            raise ConfigError("preauth and preauth_per_peer must be >= 1")


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class _Session:
    queue: asyncio.Queue[pb.Task | None] | None = None
    drop: asyncio.TimerHandle | None = None
    connected: bool = False


@dataclass
class _Item:
    event: LogItem
    done: asyncio.Future[EventRow | None] | None = None


@dataclass
class ServerStats:
    uploads: int = 0
    duplicates: int = 0
    refused: int = 0
    bytes_in: int = 0
    receive_s: float = 0.0  # in upload handlers: checking, hashing, spooling chunks
    rounds: list[RoundStats] = field(default_factory=list)


class Server:
    """Serve ``fed`` over gRPC: ``await server.start()``, then ``await server.wait()``."""

    def __init__(
        self,
        fed: Federation,
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
        if len(keyring.names) != fed.ctx.num_clients:
            raise ConfigError("the keyring and the federation disagree on the number of clients")
        self.fed = fed
        self.keys = keyring
        self.opt = options
        self.on_round = on_round
        # per client: what the rate limit lets through in a skew window, and some room
        per_client = 10_000
        if options.rate > 0:
            per_client = max(1_000, int(options.burst + options.rate * options.skew) + 64)
        self.nonces = NonceCache(options.skew, per_client)
        self.calls = VerifiedCalls(options.skew)  # call credentials recently verified
        self.rate = RateLimiter(options.rate, options.burst)
        self.sessions = [_Session() for _ in keyring.names]
        #: edge aggregators below this server (their own keyring), the sessions of their
        #: task streams, and which of them each routed client's tasks go to
        self.edges = edges
        self.edge_sessions = {n: _Session() for n in (edges.names if edges else [])}
        self.route: dict[int, str] = {}
        #: the clients each edge aggregator may claim (``deploy.edge_clients``); an edge not
        #: in it may claim none
        self.edge_clients = {n: frozenset(cs) for n, cs in (edge_clients or {}).items()}
        #: the clients this server may serve (an edge aggregator's subtree); None: all
        self.serves = serves
        self.stats = ServerStats()
        self.port = 0
        self._ex = ThreadPoolExecutor(1, thread_name_prefix="fedagg-engine")
        self._io = ThreadPoolExecutor(2, thread_name_prefix="fedagg-spool")
        self._server: grpc.aio.Server | None = None
        self._queue: asyncio.Queue[_Item] | None = None
        self._uploads: asyncio.Semaphore | None = None
        self._slots: dict[str, int] = {}  # upload slots held, by owner (client or edge)
        self._pull_slots: dict[str, int] = {}  # model streams in progress, by owner
        self._inflight: set[tuple[int, int]] = set()  # (client, task) uploads being received
        #: RPCs opening (first message not yet read and authenticated): in all ("*"), by
        #: peer address ("peer:..."), by caller ("caller:...")
        self._opening: dict[str, int] = {}
        self._pulls: asyncio.Semaphore | None = None
        self._done: asyncio.Event | None = None
        self._engine_task: asyncio.Task[None] | None = None
        self._mono0 = time.monotonic()
        self._base = 0.0
        self._start_sent = False
        self._accepted: set[tuple[int, int]] = set()  # (client, job) keys already logged
        self._failure: BaseException | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.keep_rounds = 100_000  # round stats kept in memory (all are in the state DB)

    # -- lifecycle ---------------------------------------------------------------------------
    def now(self) -> float:
        return self._base + (time.monotonic() - self._mono0)

    async def start(self) -> None:
        keep_large_buffers()
        loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue(self.opt.queue)
        self._uploads = asyncio.Semaphore(self.opt.max_uploads)
        self._pulls = asyncio.Semaphore(self.opt.max_uploads)
        self._done = asyncio.Event()
        effects = await loop.run_in_executor(self._ex, self.fed.open)
        await loop.run_in_executor(self._ex, self.fed.warmup)
        self._accepted = await loop.run_in_executor(self._ex, self.fed.store.accepted_keys)
        self._base, self._mono0 = self.fed.now, time.monotonic()
        self._start_sent = self.fed.started
        msg = self.opt.chunk_bytes + 64 * 1024
        opts = [
            ("grpc.max_receive_message_length", msg),
            ("grpc.max_send_message_length", msg),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            # a connection must finish its TLS and HTTP/2 handshakes within first_timeout, and
            # one without RPCs is closed after a minute (every client keeps a task stream)
            ("grpc.server_handshake_timeout_ms", int(self.opt.first_timeout * 1000)),
            ("grpc.max_connection_idle_ms", 60_000),
            ("grpc.so_reuseport", 0),
            # a fixed per-stream window (no BDP probing): an upload waiting for its slot holds
            # 64 KiB in gRPC, not megabytes; the adaptive window is ~2x faster for one big
            # upload but makes memory grow with the number of clients pushing at once
            ("grpc.http2.bdp_probe", int(self.opt.adaptive_window)),
        ]
        server = grpc.aio.server(options=opts, maximum_concurrent_rpcs=None)
        server.add_generic_rpc_handlers([self._handlers()])
        if self.opt.tls is not None:
            cert, key = self.opt.tls
            creds = grpc.ssl_server_credentials([(key, cert)])
            self.port = server.add_secure_port(self.opt.listen, creds)
        else:
            self.port = server.add_insecure_port(self.opt.listen)
        if self.port == 0:
            raise ConfigError(f"cannot listen on {self.opt.listen}")
        await server.start()
        self._server = server
        self._engine_task = asyncio.create_task(self._engine())
        self._apply(effects)
        if effects.finished:
            self._done.set()

    async def wait(self) -> None:
        assert self._done is not None
        await self._done.wait()
        if self._failure is not None:
            raise self._failure

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
        if self._engine_task is not None:
            self._engine_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._engine_task
        self._ex.submit(self.fed.close).result()
        self._ex.shutdown()
        self._io.shutdown()

    # -- the engine ----------------------------------------------------------------------------
    async def _engine(self) -> None:
        assert self._queue is not None and self._done is not None
        loop = asyncio.get_running_loop()
        try:
            while True:
                batch = [await self._queue.get()]
                while not self._queue.empty() and len(batch) < 256:
                    batch.append(self._queue.get_nowait())
                rows = await loop.run_in_executor(self._ex, self.fed.log, [i.event for i in batch])
                for item, row in zip(batch, rows, strict=True):
                    if row is not None:
                        for u in row.parts or ((row.upload,) if row.upload else ()):
                            self._accepted.add((u.client, u.job))
                    if item.done is not None and not item.done.done():
                        item.done.set_result(row)
                live = [r for r in rows if r is not None]
                if live:
                    effects = await loop.run_in_executor(self._ex, self.fed.step, live)
                    self._apply(effects)
                    if effects.rounds:  # keys of closed jobs: the log answers for them
                        lo = effects.min_open_job
                        self._accepted = {k for k in self._accepted if k[1] >= lo}
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # a bug or a disk error: stop serving, report it
            log.exception("federation engine failed")
            self._failure = e
            self._done.set()

    def _enqueue_nowait(self, kind: str, client: int | None = None, job: int | None = None,
                        tag: int | None = None) -> None:  # fmt: skip
        assert self._queue is not None
        item = _Item((kind, self.now(), client, job, tag, None))
        task = asyncio.get_running_loop().create_task(self._queue.put(item))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _apply(self, effects: Effects) -> None:
        loop = asyncio.get_running_loop()
        for t in effects.tasks:
            edge = self.route.get(t.client)
            s = self.sessions[t.client] if edge is None else self.edge_sessions[edge]
            if s.queue is not None:
                s.queue.put_nowait(self._task_msg(t))
            elif s.drop is None:  # nobody to hand it to: a dropout unless it connects in time
                if edge is None:
                    s.drop = loop.call_later(self.opt.client_timeout, self._drop, t.client)
                else:
                    s.drop = loop.call_later(self.opt.client_timeout, self._drop_edge, edge)
        for at, tag in effects.timers:
            delay = max(0.0, at - self.now())
            if math.isfinite(delay):
                loop.call_later(delay, self._enqueue_nowait, "timer", None, None, tag)
        for r in effects.rounds:
            self.stats.rounds.append(r)
            del self.stats.rounds[: -self.keep_rounds]
            log.info(
                "round %d: folded %d, dropped %d, version %d", r.round + 1, r.folded,
                r.dropped, r.version,
            )  # fmt: skip
            if self.on_round is not None:
                self.on_round(r)
        if effects.finished:
            for s in [*self.sessions, *self.edge_sessions.values()]:
                if s.queue is not None:
                    s.queue.put_nowait(pb.Task(finished=True))
            assert self._done is not None
            self._done.set()

    def _task_msg(self, t: TaskInfo) -> pb.Task:
        return pb.Task(task=t.job, version=t.version, epochs=t.epochs, seed=self.fed.seed,
                       client=t.client)  # fmt: skip

    def _drop(self, client: int) -> None:
        s = self.sessions[client]
        s.drop = None
        if s.connected:
            return
        loop = asyncio.get_running_loop()

        async def go() -> None:
            jobs = await loop.run_in_executor(self._ex, self._open_jobs, client)
            for job in jobs:
                log.info("client %s dropped out of job %d", self.keys.names[client], job)
                self._enqueue_nowait("dropout", client, job)

        self._background.add(task := loop.create_task(go()))
        task.add_done_callback(self._background.discard)

    def _drop_edge(self, name: str) -> None:
        """An edge aggregator stayed away for ``client_timeout``: every open job of its
        subtree is a dropout (what it accepted and did not forward is re-sent, and refused,
        if it comes back: the parent neither double counts nor waits for it)."""
        s = self.edge_sessions[name]
        s.drop = None
        if s.connected:
            return
        for c in [c for c, e in self.route.items() if e == name]:
            self.sessions[c].connected = False
            self._drop(c)

    def _open_jobs(self, client: int) -> list[int]:
        return sorted(t.job for t in self.fed.tasks.values() if t.client == client)

    def connected(self) -> int:
        """Clients connected, directly or through a connected edge aggregator."""
        routed = sum(self.edge_sessions[e].connected for e in self.route.values())
        direct = sum(s.connected for c, s in enumerate(self.sessions) if c not in self.route)
        return direct + routed

    def _maybe_start(self) -> None:
        if self._start_sent or self.fed.started:
            return
        need = self.opt.wait_for or len(self.sessions)
        if self.connected() >= need:
            self._start_sent = True
            self._enqueue_nowait("start")

    # -- authentication ------------------------------------------------------------------------
    def _verify(self, keyring: Keyring, method: str, auth: Any, content: bytes) -> int:
        """``auth`` signs ``content`` for ``method``, by the caller the call's credentials
        named (see :meth:`_caller`): the index of its key in ``keyring``."""
        try:
            if not auth.client or not auth.signature:
                raise AuthError("missing credentials: every request must be signed")
            if auth.client != _CALLER.get():
                log.info("%s refused: signed by %r in a call by %r", method, auth.client,
                         _CALLER.get())  # fmt: skip
                raise AuthError(AUTH_FAILED)
            self.nonces.check_time(auth)
            index = keyring.verify(method, auth, content)
            self.nonces.check(auth, rate=self.rate)  # rate-limited: no nonce recorded
        except RateLimited as e:
            raise _Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, e.reason) from None
        except AuthError as e:
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, e.reason) from None
        return index

    def _auth(self, method: str, auth: Any, content: bytes) -> int:
        return self._verify(self.keys, method, auth, content)

    def _is_edge(self, auth: Any) -> bool:
        return self.edges is not None and auth.client in self.edges.index

    def _auth_edge(self, method: str, auth: Any, content: bytes) -> str:
        assert self.edges is not None
        self._verify(self.edges, method, auth, content)
        return str(auth.client)

    def _caller(self, context: Any, method: str) -> str:
        """The name a call's credentials (``fedagg-call-bin`` metadata, see
        :mod:`fedagg.deploy._calls`) are signed by, verified as the call opens, before any of
        its messages is read (UNAUTHENTICATED if missing, stale, replayed or forged)."""
        token = None
        for key, value in context.invocation_metadata() or ():
            if key == CALL_METADATA:
                token = value
        signs = call_method(method)
        if isinstance(token, bytes) and (known := self.calls.caller(token, signs)) is not None:
            return known  # a reused token, verified earlier in its window
        try:
            if not isinstance(token, bytes):
                raise AuthError(
                    f"missing call credentials ({CALL_METADATA} metadata): every call must "
                    "be signed (update the client)"
                )
            try:
                auth = pb.Auth.FromString(token)
            except (DecodeError, ValueError):
                raise AuthError("malformed call credentials") from None
            edge = self.edges is not None and auth.client in self.edges.index
            keyring = self.edges if edge and self.edges is not None else self.keys
            if not auth.client or not auth.signature:
                raise AuthError("missing call credentials: every call must be signed")
            self.nonces.check_time(auth)  # the window only: a call credential is reused
            keyring.verify(signs, auth, b"")
        except AuthError as e:
            raise _Abort(grpc.StatusCode.UNAUTHENTICATED, e.reason) from None
        self.calls.add(token, signs, str(auth.client), int(auth.timestamp_ms))
        return str(auth.client)

    def _unknown_task(self, task: int) -> None:
        """Refuse a request for a task this server does not know: for good (the task is
        closed), or, at an edge still learning its subtree's tasks from its parent, for now."""
        if not self.fed.ready():
            raise _Abort(
                grpc.StatusCode.UNAVAILABLE,
                "this edge aggregator is catching up with its parent: retry",
            )
        raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, f"task {task} is not open")

    def _routed(self, edge: str, client: int) -> None:
        if self.route.get(client) != edge:
            raise _Abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"client {client} is not in the subtree of edge {edge!r}",
            )

    def _edge_live(self, edge: str) -> bool:
        """The edge's task stream is open, or closed less than ``client_timeout`` ago (its
        subtree is not dropped yet): it holds the clients it claimed."""
        s = self.edge_sessions[edge]
        return s.connected or s.drop is not None

    def _held(self, client: int, edge: str) -> bool:
        """Whether ``client`` is served otherwise than through ``edge``: it has a direct task
        stream open here, or another edge holds it (see :meth:`_edge_live`)."""
        other = self.route.get(client)
        if other is not None and other != edge:
            return self._edge_live(other)
        return other is None and self.sessions[client].queue is not None

    def _check_direct(self, client: int) -> None:
        """A client connecting directly: refused while an edge aggregator holds it (its tasks
        go there); once that edge is gone (dropped after ``client_timeout``), the client is
        served directly from now on, and the edge cannot claim it back while it is connected."""
        edge = self.route.get(client)
        if edge is None:
            return
        if self._edge_live(edge):
            raise _Abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"client {self.keys.names[client]!r} is served through an edge aggregator here",
            )
        del self.route[client]

    def _verify_origin(
        self, client: int, origin: Any, task: int, version: int, weight: float, nbytes: int,
        metrics: Mapping[str, float],
    ) -> None:  # fmt: skip
        """An update an edge forwards (relayed, or a job of a partial) must carry its client's
        own signatures (``Origin``), checked here with the client's key: the header signature
        over the same upload body (task, version, weight, size, metrics) and the trailer
        signature over (that signature, the digest). With ``digest`` on, the digest must be
        there (a relay's bytes are then checked against it as they arrive).

        The client's timestamp and nonce are not checked for freshness: the edge's own
        request around them is (signed, fresh, never replayed), the client's signature only
        proves what the client sent, and the (client, job) idempotency key stops the same job
        from being counted twice whatever carries it."""
        why = None
        if len(origin.sha256) not in (0, 32) or (self.opt.digest and not origin.sha256):
            why = "no client digest" if not origin.sha256 else "a malformed digest"
        elif not origin.auth.signature or not origin.trailer_signature:
            why = "no client signature"
        else:
            content = upload_body(task, version, weight, nbytes, dict(metrics))
            try:
                who = self.keys.verify("Push", origin.auth, content)
                signed = origin.auth.signature + origin.sha256
                self.keys.verify("PushTrailer", origin.auth, signed, origin.trailer_signature)
            except AuthError:
                why = "the client's signature does not verify"
            else:
                if who != client:
                    why = "signed by another client"
        if why is not None:
            log.info("job %d of client %d refused: %s", task, client, why)
            raise _Abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"job {task} of client {client}: {why} (an edge forwards only what its "
                "clients signed)",
            )

    def _keep_origin(self, client: int, job: int, origin: Any) -> None:
        """An accepted upload's client signatures: an edge aggregator keeps them to forward
        (:class:`~fedagg.deploy._edge.EdgeServer`); the root has no use for them."""

    # -- handlers ------------------------------------------------------------------------------
    def _handlers(self) -> grpc.GenericRpcHandler:
        # Every method is served as a stream (the wire is the same for a unary call): the
        # handler runs as soon as a call opens, so its first message is awaited under
        # ``first_timeout`` and counted against the unauthenticated caps, never held by gRPC,
        # unbounded, before our code runs. Raw bytes in and out: we parse (and report
        # malformed input) ourselves.
        ident = None
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Hello": grpc.stream_unary_rpc_method_handler(
                    self._unary(self._hello, "Hello"), ident, ident
                ),
                "Tasks": grpc.stream_stream_rpc_method_handler(self._tasks, ident, ident),
                "Pull": grpc.stream_stream_rpc_method_handler(self._pull, ident, ident),
                "Push": grpc.stream_unary_rpc_method_handler(self._push, ident, ident),
                "Heartbeat": grpc.stream_unary_rpc_method_handler(
                    self._unary(self._heartbeat, "Heartbeat"), ident, ident
                ),
            },
        )

    def _unary(
        self, fn: Callable[[bytes, Any], Any], method: str
    ) -> Callable[[AsyncIterator[bytes], Any], Any]:
        """A one-message RPC: its request read and size-checked before ``fn`` parses and
        authenticates it, all as an unauthenticated RPC (see :meth:`_unauthenticated`)."""

        async def handler(stream: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> bytes:
            try:
                with self._unauthenticated(context, method):
                    raw = await self._first(stream.__aiter__())
                    self._sized(raw)
                    reply = await fn(raw, context)
                return bytes(reply.SerializeToString())
            except _Abort as e:
                self.stats.refused += 1
                await context.abort(e.code, e.message)
            raise AssertionError("unreachable")

        return handler

    @contextlib.contextmanager
    def _unauthenticated(self, context: Any, method: str) -> Iterator[Callable[[], None]]:
        """An RPC opening: its call credentials verified (:meth:`_caller`) before anything is
        read, then counted as opening until the returned function is called (its first
        message read and authenticated) or it ends. At most ``preauth`` RPCs open at once,
        ``preauth_per_peer`` per peer address and :data:`OPENING_PER_CALLER` per caller;
        beyond, refused at once (RESOURCE_EXHAUSTED: retry later)."""
        opening = self._opening
        peer = "peer:" + _peer_host(str(context.peer() or ""))
        if (
            opening.get("*", 0) >= self.opt.preauth
            or opening.get(peer, 0) >= self.opt.preauth_per_peer
        ):
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "too many requests are being opened at once: retry later",
            )
        caller = self._caller(context, method)
        if opening.get("caller:" + caller, 0) >= OPENING_PER_CALLER:
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{OPENING_PER_CALLER} calls of yours are being opened: retry later",
            )
        _CALLER.set(caller)
        authenticated = _hold(opening, "*", peer, "caller:" + caller)
        try:
            yield authenticated
        finally:
            authenticated()

    async def _first(self, it: AsyncIterator[bytes], what: str = "request") -> bytes:
        """An RPC's first message (``what``), within ``first_timeout``."""
        try:
            async with asyncio.timeout(self.opt.first_timeout):
                return await it.__anext__()
        except TimeoutError:
            raise _Abort(
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no {what} within {self.opt.first_timeout:g}s",
            ) from None
        except StopAsyncIteration:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"empty {what}") from None

    def _sized(self, raw: bytes | memoryview) -> None:
        """Refuse a request (an upload's header) larger than :data:`MAX_REQUEST`, plus
        :data:`EDGE_PER_CLIENT` per client of its scope if it names an edge: checked on its
        length, before it is parsed."""
        cap = MAX_REQUEST
        if self.edges is not None:
            name = leading_name(raw)
            if name in self.edges.index:
                cap += EDGE_PER_CLIENT * len(self.edge_clients.get(name, ()))
        if len(raw) > cap:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"request of {len(raw)} bytes: at most {cap} (data goes in upload chunks)",
            )

    @staticmethod
    def _parse(cls: Any, raw: bytes) -> Any:
        try:
            return cls.FromString(raw)
        except (DecodeError, ValueError) as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {e}") from None

    async def _hello(self, raw: bytes, context: Any) -> pb.HelloReply:
        req = self._parse(pb.HelloRequest, raw)
        if self._is_edge(req.auth):
            return self._edge_hello(req)
        client = self._auth("Hello", req.auth, body(protocol=req.protocol))
        if self.serves is not None and client not in self.serves:
            raise _Abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"client {req.auth.client!r} is not served by this edge aggregator",
            )
        self._check_direct(client)
        if req.protocol != PROTOCOL:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol {req.protocol} not supported (this server speaks {PROTOCOL})",
            )
        spec = self.fed.spec
        return pb.HelloReply(
            protocol=PROTOCOL, client_index=client, spec_json=json.dumps(spec.to_dict()),
            model_bytes=spec.nbytes, chunk_bytes=self.opt.chunk_bytes, digest=self.opt.digest,
        )  # fmt: skip

    def _edge_hello(self, req: Any) -> pb.HelloReply:
        serves = sorted(int(c) for c in req.serves)
        name = self._auth_edge("Hello", req.auth, body(protocol=req.protocol, serves=serves))
        if req.protocol != PROTOCOL:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol {req.protocol} not supported (this server speaks {PROTOCOL})",
            )
        # its scope (deploy.edge_clients): a client out of range, not served here or not in
        # the scope gets the same words (an edge learns nothing of other names or indices)
        scope = self.edge_clients.get(name, frozenset())
        bad = [c for c in serves if c not in scope or not 0 <= c < len(self.sessions)
               or (self.serves is not None and c not in self.serves)]  # fmt: skip
        if bad:
            log.info("edge %r refused: claims clients %s outside its scope", name, bad[:5])
            raise _Abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"edge {name!r} may not serve clients {bad[:5]} here (deploy.edge_clients)",
            )
        held = [c for c in serves if self._held(c, name)]
        if held:
            log.info("edge %r refused: clients %s are served directly or by another edge",
                     name, held[:5])  # fmt: skip
            raise _Abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"edge {name!r} claims clients {held[:5]} that are connected directly or "
                "through another edge",
            )
        for c in serves:
            self.route[c] = name
        spec = self.fed.spec
        return pb.HelloReply(
            protocol=PROTOCOL, client_index=0, spec_json=json.dumps(spec.to_dict()),
            model_bytes=spec.nbytes, chunk_bytes=self.opt.chunk_bytes, digest=self.opt.digest,
        )  # fmt: skip

    async def _heartbeat(self, raw: bytes, context: Any) -> pb.HeartbeatReply:
        """A client at work says it is alive: if its task stream is down (a proxy that cuts
        idle streams, a reconnect in progress), its tasks do not count as dropped yet."""
        req = self._parse(pb.HeartbeatRequest, raw)
        loop = asyncio.get_running_loop()
        if self._is_edge(req.auth):
            name = self._auth_edge("Heartbeat", req.auth, body(tasks=sorted(req.tasks)))
            es = self.edge_sessions[name]
            if es.drop is not None:
                es.drop.cancel()
                es.drop = loop.call_later(self.opt.client_timeout, self._drop_edge, name)
            return pb.HeartbeatReply(server_time_ms=int(time.time() * 1000))
        client = self._auth("Heartbeat", req.auth, body(tasks=sorted(req.tasks)))
        s = self.sessions[client]
        if s.drop is not None:
            s.drop.cancel()
            s.drop = loop.call_later(self.opt.client_timeout, self._drop, client)
        return pb.HeartbeatReply(server_time_ms=int(time.time() * 1000))

    async def _tasks(self, stream: AsyncIterator[bytes], context: Any) -> AsyncIterator[bytes]:
        edge: str | None = None
        try:
            with self._unauthenticated(context, "Tasks"):
                raw = await self._first(stream.__aiter__())
                self._sized(raw)
                req = self._parse(pb.TasksRequest, raw)
                if self._is_edge(req.auth):
                    edge = self._auth_edge("Tasks", req.auth, body())
                else:
                    client = self._auth("Tasks", req.auth, body())
                    self._check_direct(client)
        except _Abort as e:
            self.stats.refused += 1
            await context.abort(e.code, e.message)
            return
        if edge is not None:
            async for out in self._edge_tasks(edge):
                yield out
            return
        async for out in self._stream_tasks(
            self.sessions[client], {client}, lambda: self._drop(client)
        ):
            yield out

    async def _edge_tasks(self, edge: str) -> AsyncIterator[bytes]:
        """An edge aggregator's task stream: the tasks of every client of its subtree."""
        mine = {c for c, e in self.route.items() if e == edge}
        for c in mine:
            cs = self.sessions[c]
            cs.connected = True
            if cs.drop is not None:
                cs.drop.cancel()
                cs.drop = None
        async for out in self._stream_tasks(
            self.edge_sessions[edge], mine, lambda: self._drop_edge(edge)
        ):
            yield out

    async def _stream_tasks(
        self, s: _Session, clients: set[int], drop: Callable[[], None]
    ) -> AsyncIterator[bytes]:
        """A task stream (a client's, or an edge's for its subtree): the open tasks of
        ``clients``, then new ones as they come, heartbeats when idle. When it ends, ``drop``
        runs after ``client_timeout`` unless the stream is back by then."""
        loop = asyncio.get_running_loop()
        if s.queue is not None:  # a second stream replaces the first
            s.queue.put_nowait(None)
        queue: asyncio.Queue[pb.Task | None] = asyncio.Queue()
        s.queue, s.connected = queue, True
        if s.drop is not None:
            s.drop.cancel()
            s.drop = None
        for t in await loop.run_in_executor(self._ex, self._open_tasks_of, clients):
            queue.put_nowait(self._task_msg(t))
        queue.put_nowait(pb.Task(heartbeat=True))  # marks the end of the open tasks
        if self.fed.finished:
            queue.put_nowait(pb.Task(finished=True))
        self._maybe_start()
        try:
            while True:
                try:
                    msg = await asyncio.wait_for(queue.get(), self.opt.heartbeat)
                except TimeoutError:
                    msg = pb.Task(heartbeat=True)
                if msg is None:
                    return
                yield msg.SerializeToString()
                if msg.finished:
                    return
        finally:
            if s.queue is queue:
                s.queue, s.connected = None, False
                if s.drop is None and not self.fed.finished:
                    s.drop = loop.call_later(self.opt.client_timeout, drop)

    def _open_tasks_of(self, clients: set[int]) -> list[TaskInfo]:
        return sorted((t for t in self.fed.tasks.values() if t.client in clients),
                      key=lambda t: t.job)  # fmt: skip

    async def _pull(self, stream: AsyncIterator[bytes], context: Any) -> None:
        try:
            with self._unauthenticated(context, "Pull"):
                raw = await self._first(stream.__aiter__())
                self._sized(raw)
                req = self._parse(pb.PullRequest, raw)
                edge = None
                if self._is_edge(req.auth):
                    edge = self._auth_edge("Pull", req.auth, body(task=req.task))
                else:
                    client = self._auth("Pull", req.auth, body(task=req.task))
            task = self.fed.tasks.get(req.task)
            if task is None:
                self._unknown_task(req.task)
            assert task is not None
            if edge is not None:
                self._routed(edge, task.client)
            elif task.client != client:
                raise _Abort(grpc.StatusCode.PERMISSION_DENIED, f"task {req.task} is not yours")
            model = self.fed.model(task.version)
            if model is None:
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"model version {task.version} is no longer kept",
                )
            view = model.data.cast("B")
            total = len(view)
            step = self.opt.chunk_bytes
            assert self._pulls is not None
            # at most client_uploads downloads per client until each RPC is over (gRPC may
            # buffer a whole model for a peer that stops reading: one client cannot make it
            # buffer more than a few), max_uploads being written at once (more wait); a write
            # that stalls for idle_timeout, or the stream below min_rate, is cut off
            release = self._take(self._pull_slots, f"client:{task.client}", "model downloads")
            context.add_done_callback(lambda _: release())
            if context.done():
                release()
            async with self._pulls:
                until = time.monotonic() + self.opt.idle_timeout + total / self.opt.min_rate
                for off in range(0, max(total, 1), step):
                    msg = encode_chunk({1: task.version, 2: off, 4: total},
                                       view[off : off + step])  # fmt: skip
                    await _paced(context.write(msg), self.opt.idle_timeout, until, "download")
        except _Abort as e:
            self.stats.refused += 1
            await context.abort(e.code, e.message)

    async def _push(self, stream: AsyncIterator[bytes], context: Any) -> bytes:
        try:
            with self._unauthenticated(context, "Push") as authenticated:
                reply = await self._push_one(stream, authenticated)
            return bytes(reply.SerializeToString())
        except _Abort as e:
            self.stats.refused += 1
            await context.abort(e.code, e.message)
        raise AssertionError("unreachable")

    def _take(self, counts: dict[str, int], owner: str, what: str) -> Callable[[], None]:
        """One of the ``client_uploads`` slots ``owner`` may hold in ``counts``, refused
        beyond (RESOURCE_EXHAUSTED: clients retry later) so that one client cannot take a
        pool; returns its release (idempotent)."""
        if counts.get(owner, 0) >= self.opt.client_uploads:
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self.opt.client_uploads} {what} of yours are in progress: retry later",
            )
        return _hold(counts, owner)

    @contextlib.contextmanager
    def _owned(self, counts: dict[str, int], owner: str, what: str) -> Iterator[None]:
        release = self._take(counts, owner, what)
        try:
            yield
        finally:
            release()

    @contextlib.asynccontextmanager
    async def _slot(
        self, owner: str, it: AsyncIterator[bytes], nbytes: int
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """An upload slot for an authenticated upload (``owner``: its client or edge), taken
        after its header is checked: at most ``client_uploads`` per owner, refused beyond
        (RESOURCE_EXHAUSTED, retried by clients), so one client cannot take the pool;
        then one of the ``max_uploads`` slots, waited for (the stream waits unread, held back
        by gRPC's flow control, so memory does not grow with the clients pushing). Yields the
        rest of the stream, cut off (DEADLINE_EXCEEDED) when idle for ``idle_timeout`` or
        slower than ``min_rate``; the slot is released however the upload ends."""
        assert self._uploads is not None
        with self._owned(self._slots, owner, "uploads"):
            async with self._uploads:
                until = time.monotonic() + self.opt.idle_timeout + nbytes / self.opt.min_rate
                yield _Paced(it, self.opt.idle_timeout, until)

    @contextlib.asynccontextmanager
    async def _one_upload(self, client: int, task: int) -> AsyncIterator[None]:
        """At most one upload per task is received at a time: another (a retry racing the
        first, after a lost connection) is refused until the first ends (RESOURCE_EXHAUSTED:
        the client retries, and then finds it accepted or gone)."""
        key = (client, task)
        if key in self._inflight:
            raise _Abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"an upload of task {task} is already being received: retry later",
            )
        self._inflight.add(key)
        try:
            yield
        finally:
            self._inflight.discard(key)

    async def _push_one(
        self, stream: AsyncIterator[bytes], authenticated: Callable[[], None]
    ) -> pb.PushReply:
        it = stream.__aiter__()
        # the header: checked before anything is committed
        raw = await self._first(it, "upload header")
        try:
            first = decode_chunk(raw, UPLOAD_CHUNK)
        except WireError as e:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed chunk: {e}") from None
        if first.header is None:
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message needs a header")
        self._sized(first.header)
        head = self._parse(pb.UploadHeader, bytes(first.header))
        metrics = _check_metrics(head.metrics)
        content = upload_body(head.task, head.version, head.weight, head.nbytes, metrics)
        keyring = self.keys
        origin: Any = None  # a relayed update's client signatures
        origin_sha = b""
        if self._is_edge(head.auth):
            assert self.edges is not None
            edge = self._auth_edge("Push", head.auth, edge_upload_body(content, head))
            authenticated()
            keyring = self.edges
            if not head.relay:
                async with self._slot(f"edge:{edge}", it, head.nbytes) as paced:
                    return await self._push_partial(edge, first, paced, head)
            client = int(head.on_behalf)
            self._routed(edge, client)
            self._verify_origin(client, head.origin, head.task, head.version, head.weight,
                                head.nbytes, metrics)  # fmt: skip
            origin = pb.Origin(auth=head.origin.auth, sha256=head.origin.sha256, metrics=metrics,
                               trailer_signature=head.origin.trailer_signature)  # fmt: skip
            origin_sha = bytes(origin.sha256)
        else:
            client = self._auth("Push", head.auth, content)
            authenticated()
            if head.relay or head.partial.jobs or head.partial.dropped:
                raise _Abort(
                    grpc.StatusCode.PERMISSION_DENIED, "only edge aggregators relay or merge"
                )
        spec = self.fed.spec
        if head.nbytes != spec.nbytes:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"update has {head.nbytes} bytes, the model {spec.nbytes} "
                f"({spec.size} x {spec.dtype})",
            )
        if not (math.isfinite(head.weight) and head.weight > 0):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "weight must be finite and > 0")
        duplicate = (client, head.task) in self._accepted
        problem = None if duplicate else self.fed.task_problem(client, head.task, head.version)
        if problem == "unknown":
            # maybe accepted before a restart pruned it: ask the log
            loop = asyncio.get_running_loop()
            dup = await loop.run_in_executor(self._ex, self.fed.store.has_upload, client, head.task)
            if not dup:
                self._unknown_task(head.task)
            duplicate = True
        elif problem == "denied":
            raise _Abort(
                grpc.StatusCode.PERMISSION_DENIED, f"task {head.task} was given to another client"
            )
        elif problem == "version":
            version = self.fed.tasks[head.task].version
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"task {head.task} trains from version {version}, not {head.version}",
            )
        async with (
            self._one_upload(client, head.task),
            self._slot(f"client:{client}", it, head.nbytes) as paced,
        ):
            # the slot is held until the upload is acknowledged (backpressure)
            if duplicate:  # a retry of an accepted upload (of this size): read it, acknowledge
                what = f"re-sent upload of accepted task {head.task}"
                await self._read_unspooled(first, paced, head, spec.dtype.itemsize, what)
                self.stats.duplicates += 1
                return pb.PushReply(task=head.task, duplicate=True)
            t0 = time.perf_counter()
            path, digest, check, tsig = await self._receive(
                client, first, paced, head, spec.dtype, keyring, origin_sha
            )
            self.stats.receive_s += time.perf_counter() - t0
            if origin is None:  # the client's own upload: its signatures are the origin
                origin = pb.Origin(auth=head.auth, sha256=digest, trailer_signature=tsig,
                                   metrics=metrics)  # fmt: skip
            self._keep_origin(client, head.task, origin)
            upload = UploadRow(
                client, head.task, str(path), float(head.weight), head.version, metrics,
                head.nbytes, digest, check,
            )  # fmt: skip
            assert self._queue is not None
            done: asyncio.Future[EventRow | None] = asyncio.get_running_loop().create_future()
            event = ("arrival", self.now(), client, head.task, None, upload)
            await self._queue.put(_Item(event, done))
            row = await done
            if row is None:  # a concurrent retry won the race
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                self.stats.duplicates += 1
                return pb.PushReply(task=head.task, duplicate=True)
            self.stats.uploads += 1
            return pb.PushReply(task=head.task, duplicate=False)

    async def _push_partial(
        self, edge: str, first: Any, it: AsyncIterator[bytes], head: Any
    ) -> pb.PushReply:
        """A partial aggregate from an edge aggregator: its jobs must be open tasks of its
        subtree, all of them, for one model version; taken whole, once (a re-sent partial whose
        jobs were all accepted is acknowledged as a duplicate)."""
        assert self.edges is not None
        p = head.partial
        loop = asyncio.get_running_loop()

        def report_dropouts() -> None:  # clients that dropped out at the edge
            for d in p.dropped:
                task = self.fed.tasks.get(d.task)
                if task is not None and task.client == d.client and (
                    self.route.get(d.client) == edge
                ):  # fmt: skip
                    self._enqueue_nowait("dropout", int(d.client), int(d.task))

        if not p.jobs:
            if head.nbytes:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "a payload without jobs")
            await self._read_unspooled(first, it, head, 1, "a dropout report")
            report_dropouts()
            return pb.PushReply(task=head.task, duplicate=False)
        keys = [(int(j.client), int(j.task)) for j in p.jobs]
        if len(set(k[1] for k in keys)) != len(keys):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "a partial lists a job twice")
        for c, _ in keys:
            self._routed(edge, c)
        if not all(math.isfinite(j.weight) and j.weight > 0 for j in p.jobs):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "weights must be finite and > 0")
        self._verify_jobs(head)
        fresh = [k for k in keys if k not in self._accepted]
        logged = await loop.run_in_executor(  # one trip to the engine thread, not one per job
            self._ex, lambda: {k for k in fresh if self.fed.store.has_upload(*k)}
        )
        seen = [k not in fresh or k in logged for k in keys]
        if all(seen):  # a re-sent partial: read it (no larger than the accepted one), acknowledge
            acc = {32: "float32", 64: "float64"}.get(int(p.accumulator_bits))
            spec = self.fed.spec
            if acc is None or head.nbytes != partial_nbytes(spec, acc):
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"re-sent partial of {head.nbytes} bytes, accumulator bits "
                    f"{p.accumulator_bits}: not the size of a partial of this model",
                )
            itemsize = partial_dtype(spec, acc).itemsize
            await self._read_unspooled(first, it, head, itemsize, "re-sent partial")
            self.stats.duplicates += 1
            return pb.PushReply(task=head.task, duplicate=True)
        if any(seen):
            raise _Abort(grpc.StatusCode.FAILED_PRECONDITION, "a partial overlaps accepted uploads")
        for c, j in keys:
            problem = self.fed.task_problem(c, j, head.version)
            if problem is not None:
                raise _Abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"job {j} of client {c} cannot be merged ({problem})",
                )
        acc = {32: "float32", 64: "float64"}.get(int(p.accumulator_bits))
        if acc is None or not (math.isfinite(p.weight) and p.weight > 0):
            raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "bad partial accumulator or weight")
        mine = self.fed.partial_accumulator()
        if mine is None:
            raise _Abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this server's aggregator is not a mean monoid: it cannot merge partials",
            )
        if acc != mine:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"a {acc} partial cannot merge into this server's {mine} accumulator: "
                "configure every tier alike",
            )
        spec = self.fed.spec
        if head.nbytes != partial_nbytes(spec, acc):
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"partial has {head.nbytes} bytes, expected {partial_nbytes(spec, acc)}",
            )
        path, digest, check, _ = await self._receive(
            keys[0][0], first, it, head, partial_dtype(spec, acc), self.edges
        )
        parts = tuple(
            UploadRow(
                int(j.client),
                int(j.task),
                str(path),
                float(j.weight),
                head.version,
                {"train_loss": float(j.train_loss)} if math.isfinite(j.train_loss) else {},
                head.nbytes,
                digest,
                check,
            )
            for j in sorted(p.jobs, key=lambda j: j.task)
        )
        info = {"weight": float(p.weight), "weight_comp": float(p.weight_comp),
                "accumulator": acc, "edge": edge}  # fmt: skip
        report_dropouts()
        self._keep_partial_origins(head)
        assert self._queue is not None
        done: asyncio.Future[EventRow | None] = loop.create_future()
        item = ("partial", self.now(), None, None, None, PartialRows(parts, info))
        await self._queue.put(_Item(item, done))
        row = await done
        if row is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            self.stats.duplicates += 1
            return pb.PushReply(task=head.task, duplicate=True)
        self.stats.uploads += len(parts)
        return pb.PushReply(task=head.task, duplicate=False)

    def _verify_jobs(self, head: Any) -> None:
        """Each job of a partial carries its client's signatures over what the job says (task,
        the partial's version, weight, the model's size, metrics as signed, whose
        ``train_loss`` must be the job's): an edge cannot invent a client's participation or
        change its weight. It can still mis-add the sum (the root holds no proof of it):
        relay mode, or a robust rule at the root, answers that."""
        nbytes = self.fed.spec.nbytes
        for j in head.partial.jobs:
            o = j.origin
            metrics = _check_metrics(o.metrics)
            loss = metrics.get("train_loss", math.nan)
            if not (loss == j.train_loss or (math.isnan(loss) and math.isnan(j.train_loss))):
                raise _Abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"job {j.task} of client {j.client}: train_loss {j.train_loss} is not the "
                    f"one its client signed",
                )
            self._verify_origin(int(j.client), o, int(j.task), int(head.version),
                                float(j.weight), nbytes, metrics)  # fmt: skip

    def _keep_partial_origins(self, head: Any) -> None:
        for j in head.partial.jobs:
            self._keep_origin(int(j.client), int(j.task), j.origin)

    async def _read_unspooled(
        self, first: Any, it: AsyncIterator[bytes], head: Any, itemsize: int, what: str
    ) -> None:
        """Read to its end an upload that is not spooled (a re-send of an accepted upload,
        which stands; a dropout report), checking its shape as far as it goes: ``head.nbytes``
        of data (the caller checked it is the accepted upload's size) in chunks in order, each
        within ``chunk_bytes``, every message after the first carrying data or the trailer,
        the trailer last. Reading stops at the first deviation, so such an upload costs at
        most its declared size and one more message, never an unbounded drain. (The bytes
        are not hashed: whatever they are, the accepted upload is the one that counts.)"""
        total = head.nbytes
        expect = 0
        chunk = first
        trailer = False
        count = self._chunk_counter(total)
        while True:
            n = len(chunk.data)
            if n:
                count()
                off = chunk.ints.get(2, 0)
                if off != expect or n > self.opt.chunk_bytes or n % itemsize or n > total - expect:
                    raise _Abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"{what} deviates from it: {n} bytes at offset {off} (expected offset "
                        f"{expect}, chunks of at most {self.opt.chunk_bytes}, {total} in all)",
                    )
                expect += n
            elif chunk.trailer is None and chunk is not first:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"{what}: an empty message")
            trailer = chunk.trailer is not None
            try:
                raw = await it.__anext__()
            except StopAsyncIteration:
                break
            if trailer:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"{what}: a message after the trailer"
                )
            try:
                chunk = decode_chunk(raw, UPLOAD_CHUNK)
            except WireError as e:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, f"malformed chunk: {e}") from None
            if chunk.header is not None:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "a second header")
        if expect != total or not trailer:
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"{what} ends after {expect} of {total} bytes"
                + ("" if trailer else ", without a trailer"),
            )

    def _chunk_counter(self, nbytes: int) -> Callable[[], None]:
        """Counts an upload's data chunks; refuses the one over :data:`MIN_CHUNK`'s bound."""
        limit = nbytes // min(MIN_CHUNK, self.opt.chunk_bytes) + 2 * len(self.fed.spec.names) + 8
        seen = 0

        def count() -> None:
            nonlocal seen
            seen += 1
            if seen > limit:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"too many chunks: more than {limit} for {nbytes} bytes (send chunks of up "
                    f"to {self.opt.chunk_bytes} bytes)",
                )

        return count

    def _open_spool(self, tmp: Path) -> int:
        """A file to spool an upload into (on the I/O thread: file creation can block)."""
        reuse = self.fed.take_free()
        if reuse is not None:  # overwrite a recycled file of the same size in place
            os.rename(reuse, tmp)
            return os.open(tmp, os.O_WRONLY)
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    async def _receive(
        self, client: int, first: Any, it: AsyncIterator[bytes], head: Any,
        dtype: np.dtype[Any], keyring: Keyring, origin_sha: bytes = b"",
    ) -> tuple[Path, bytes, bytes, bytes]:  # fmt: skip
        """Stream an upload's chunks into a spool file: checked (offsets, sizes, finiteness)
        and hashed chunk by chunk (sha256 if required, and always the xxh3-128 checksum that
        a read-back is checked against), straight from gRPC's buffers, on a worker thread while the
        next chunk is received; the signed trailer's digest is checked at the end, the file
        fsynced and renamed. On any error the file is removed and nothing else has changed.
        Returns the file, the bytes' sha256 (b'' if not required), their checksum and the
        trailer's signature.

        ``origin_sha``: a relayed update's digest as its client signed it: the bytes are
        hashed (whatever ``digest`` says) and must match it."""
        dtype = np.dtype(dtype)
        # one name per attempt: a concurrent retry never touches the accepted attempt's file
        spool = _SpoolFile(
            self._io,
            self.fed.spool / f"tmp-{uuid.uuid4().hex}",
            self.fed.spool / f"{head.task:012d}-{client}-{uuid.uuid4().hex[:12]}.upd",
        )
        sha = hashlib.sha256() if self.opt.digest or origin_sha else None
        xx = new_checksum()
        expect = 0
        total = head.nbytes
        pending: asyncio.Future[str | None] | None = None
        trailer = None
        count = self._chunk_counter(total)
        try:
            await spool.open(self._open_spool)
            chunk = first
            while True:
                data = chunk.data
                n = len(data)
                if n:
                    count()
                    if trailer is not None:
                        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "data after the trailer")
                    off = chunk.ints.get(2, 0)
                    if off != expect:
                        raise _Abort(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"chunk at offset {off}, expected {expect}",
                        )
                    if n > self.opt.chunk_bytes or n % dtype.itemsize or expect + n > total:
                        raise _Abort(
                            grpc.StatusCode.INVALID_ARGUMENT,
                            f"bad chunk size {n} at offset {off} (limit {self.opt.chunk_bytes},"
                            f" multiple of {dtype.itemsize}, total {total})",
                        )
                    if pending is not None:
                        _raise_bad(await pending)
                    pending = spool.start(_spool_chunk, sha, xx, data, dtype, off)
                    expect += n
                    self.stats.bytes_in += n
                    if expect < total:
                        crash_point("upload")
                elif chunk.trailer is None and chunk is not first:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "an empty message")
                if chunk.trailer is not None:
                    trailer = self._parse(pb.UploadTrailer, bytes(chunk.trailer))
                try:
                    raw = await it.__anext__()
                except StopAsyncIteration:
                    break
                try:
                    chunk = decode_chunk(raw, UPLOAD_CHUNK)
                except WireError as e:
                    raise _Abort(
                        grpc.StatusCode.INVALID_ARGUMENT, f"malformed chunk: {e}"
                    ) from None
                if chunk.header is not None:
                    raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "a second header")
            if pending is not None:
                _raise_bad(await pending)
                pending = None
            if expect != total:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"truncated upload: {expect} of {total} bytes",
                )
            if trailer is None:
                raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, "the upload has no trailer")
            digest = sha.digest() if sha is not None else b""
            sent = digest if self.opt.digest else b""  # what the sender was asked to sign
            if trailer.sha256 != sent:
                raise _Abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "the upload's bytes do not match its trailer's sha256",
                )
            try:
                keyring.verify("PushTrailer", head.auth, head.auth.signature + sent,
                                 trailer.signature)  # fmt: skip
            except AuthError as e:
                raise _Abort(grpc.StatusCode.UNAUTHENTICATED, f"trailer: {e.reason}") from None
            if origin_sha and digest != origin_sha:
                log.info("relayed job %d of client %d: bytes differ from its client's digest",
                         head.task, client)  # fmt: skip
                raise _Abort(
                    grpc.StatusCode.UNAUTHENTICATED,
                    f"relayed job {head.task}: the bytes are not those its client signed",
                )
            if self.opt.fsync:
                await spool.start(os.fsync)
            await spool.commit()
            crash_point("spooled")
            return spool.final, digest, xx.digest(), bytes(trailer.signature)
        except BaseException:
            if pending is not None:  # its outcome no longer matters
                pending.add_done_callback(_ignore_outcome)
            await spool.discard()
            raise


class _SpoolFile:
    """An upload's spool file, written by jobs on the I/O pool one at a time (each job gets
    the descriptor first). :meth:`discard` removes the file however the upload ended: if the
    receiving task was cancelled while a job ran (the peer went away, a timeout), the job
    cannot be stopped, so the file is closed and removed after it, never under a write, and
    neither a descriptor nor a ``tmp-`` file is left behind."""

    def __init__(self, pool: ThreadPoolExecutor, tmp: Path, final: Path) -> None:
        self.pool, self.tmp, self.final = pool, tmp, final
        self.fd = -1
        self.renamed = False
        self.job: concurrent.futures.Future[Any] | None = None

    def start(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        def job() -> T:
            return fn(self.fd, *args)

        self.job = self.pool.submit(job)
        return asyncio.wrap_future(self.job)

    async def open(self, opener: Callable[[Path], int]) -> None:
        def job() -> None:
            self.fd = opener(self.tmp)

        self.job = self.pool.submit(job)
        await asyncio.wrap_future(self.job)

    async def commit(self) -> None:
        """Close the file and move it to :attr:`final`."""

        def job(fd: int) -> None:
            self.fd = -1
            os.close(fd)
            os.replace(self.tmp, self.final)
            self.renamed = True

        await self.start(job)

    async def discard(self) -> None:
        job = self.job
        if job is not None and not job.done():  # wait for it unless cancelled again
            with contextlib.suppress(BaseException):
                await asyncio.shield(asyncio.wrap_future(job))
        if job is None or job.done():
            self._remove()
        else:
            job.add_done_callback(lambda _: self._remove())

    def _remove(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.final if self.renamed else self.tmp)


class _Paced:
    """The rest of an upload's stream, each message within ``idle`` seconds of the previous
    one and all of them by ``until`` (monotonic): a silent or slow peer is cut off."""

    def __init__(self, it: AsyncIterator[bytes], idle: float, until: float) -> None:
        self.it, self.idle, self.until = it, idle, until

    def __aiter__(self) -> _Paced:
        return self

    async def __anext__(self) -> bytes:
        return await _paced(self.it.__anext__(), self.idle, self.until, "upload")


async def _paced(step: Awaitable[T], idle: float, until: float, what: str) -> T:
    """``step`` (a stream's next message, in or out) within ``idle`` seconds and by ``until``
    (monotonic), or the RPC is cut off (DEADLINE_EXCEEDED)."""
    left = until - time.monotonic()
    try:  # a timeout scope, not wait_for: no task is created per message
        async with asyncio.timeout(max(0.0, min(idle, left))):
            return await step
    except TimeoutError:
        why = f"idle for {idle:g}s" if left > idle else "below the progress floor"
        raise _Abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"{what} cut off: {why}") from None


def _hold(counts: dict[str, int], *keys: str) -> Callable[[], None]:
    """Count one more under each of ``keys``; returns the (idempotent) release."""
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    held = True

    def release() -> None:
        nonlocal held
        if held:
            held = False
            for key in keys:
                counts[key] -= 1
                if not counts[key]:
                    del counts[key]

    return release


def _peer_host(peer: str) -> str:
    """A gRPC peer string's address without its port (``ipv4:1.2.3.4:567`` -> ``ipv4:1.2.3.4``,
    ``ipv6:[::1]:567`` -> ``ipv6:[::1]``)."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer


def _check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """An upload's metrics, within the limits (:data:`MAX_METRICS`): counted before they are
    read, names checked before values."""
    if len(metrics) > MAX_METRICS:
        raise _Abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"too many metrics: {len(metrics)} (at most {MAX_METRICS})",
        )
    out = dict(metrics)
    for name, value in out.items():
        if not _METRIC_NAME.fullmatch(name):
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"bad metric name {name[: MAX_METRIC_NAME + 1]!r}: 1 to {MAX_METRIC_NAME} "
                "characters of A-Z a-z 0-9 _ . : / -",
            )
        if not math.isfinite(value):
            raise _Abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"metrics must be finite: {name} is {value}"
            )
    return out


def _spool_chunk(
    fd: int, sha: Any, xx: Any, data: memoryview, dtype: np.dtype[Any], off: int
) -> str | None:
    """Check, hash and write one chunk (on a worker thread; numba, hashlib, xxhash and
    os.write release the GIL). Returns why the chunk is refused, or None."""
    arr = np.frombuffer(data, dtype=dtype)
    if not kernels.all_finite(arr, use_numba=True, parallel=False):
        return f"non-finite values (NaN or Inf) in the chunk at offset {off}"
    if sha is not None:
        sha.update(data)
    xx.update(data)
    _write_all(fd, data)
    return None


def _ignore_outcome(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _raise_bad(reason: str | None) -> None:
    if reason is not None:
        raise _Abort(grpc.StatusCode.INVALID_ARGUMENT, reason)


def _write_all(fd: int, data: memoryview) -> None:
    while len(data):
        n = os.write(fd, data)
        data = data[n:]
