"""Socket data planes for one host: the hand-off LIFL replaces, and sharded flows (baselines
of ``benchmarks/hierarchy.py``; the product uses the shared-memory plane, :mod:`fedagg.plane`).

* :class:`SocketAggregator` has :class:`~fedagg.plane.ShmAggregator`'s API, but the
  receiver hands each update to the workers over a Unix socket: each worker ``recv_into`` a
  buffer it preallocated (after it started) for its shards, then folds it. Every byte crosses
  the kernel twice (receiver -> socket buffer -> worker), which is the copy shared memory saves.
  The receiver checks each update before sending it, and the workers fold it with the shared-
  memory workers' fast fold (:meth:`~fedagg.core.aggregate.Mean.fold_trusted`), so the two
  planes differ only in the hand-off.
* :class:`ShardReceiver` and :class:`ShardSender` / :func:`send_sharded`: application-layer flow
  splitting. Worker ``i`` owns shard ``i`` and listens on its own TCP port on 127.0.0.1; a
  sender opens one connection per shard and sends byte range ``i`` of the flat update on
  connection ``i`` (``sendall`` of a memoryview slice, in parallel), and worker ``i`` folds its
  slice. A refused update must change no shard, so each worker first reports its slice's
  ``max |x|`` to the receiver, which applies Mean's rules to the whole update and tells every
  worker to fold or to drop it (a two-phase commit; one pipe round trip per update).

The weighted mean is element-wise: sharded results are bit-identical to an unsharded fold.
"""

from __future__ import annotations

import collections
import contextlib
import math
import multiprocessing.connection as mpc
import os
import secrets
import shutil
import socket
import struct
import tempfile
import traceback
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, cast

import numpy as np

from fedagg.core.spec import Delta, ParamSpec
from fedagg.core.tree import shard_bounds
from fedagg.core.update import Update
from fedagg.errors import ConfigError, InvalidWeight, SpecMismatch, StaleUpdate, UpdateError
from fedagg.plane import peak, set_threads
from fedagg.plane._service import Service
from fedagg.plane._shards import (
    Accumulator,
    AggregatorFailed,
    Arr,
    Backend,
    Shards,
    StartMethod,
    error_reply,
    handle_common,
)

__all__ = ["ShardReceiver", "ShardSender", "SocketAggregator", "send_sharded"]

#: Socket buffer size asked for on both ends (the kernel may cap it).
SOCK_BUF = 4 << 20
_HELLO = struct.Struct("<I")
#: Per-shard message header: magic, update id, weight, scale, base version (-1: none),
#: payload bytes, client-id length; then the client id (utf-8), then the payload.
_HEADER = struct.Struct("<4s16sddqQH")
_MAGIC = b"FAGS"


def recv_exact(sock: socket.socket, buf: memoryview) -> None:
    """Fill ``buf`` from ``sock`` (``recv_into``, no intermediate bytes); EOFError if closed."""
    got, n = 0, buf.nbytes
    while got < n:
        k = sock.recv_into(buf[got:], n - got)
        if k == 0:
            raise EOFError("connection closed")
        got += k


def _bytes_view(a: Arr) -> memoryview:
    return memoryview(cast(Any, a)).cast("B")


def _tune(sock: socket.socket) -> None:
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)


# --------------------------------------------------------------------------------------------
# Unix-socket hand-off
# --------------------------------------------------------------------------------------------


def _unix_worker(conn: mpc.Connection, cfg: dict[str, Any]) -> None:
    """A worker of :class:`SocketAggregator`: receives its shards of each update, then folds."""
    set_threads(cfg["threads"])
    spec = ParamSpec.from_dict(cfg["spec"])
    shards = Shards(spec, cfg["bounds"], cfg["accumulator"], cfg["version"], cfg["backend"])
    acc_dtype = shards.states[0].acc.dtype
    try:
        bufs = [np.zeros(hi - lo, spec.dtype) for lo, hi in shards.bounds]  # after the start
        views = [_bytes_view(b) for b in bufs]
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        _tune(sock)
        sock.connect(cfg["path"])
        sock.sendall(_HELLO.pack(cfg["index"]))
        shards.warm_up(bufs)
    except BaseException as e:
        conn.send(("failed", "".join(traceback.format_exception(e))))
        return
    conn.send(("ready", os.getpid()))
    try:
        while True:
            msg = conn.recv()
            op, seq = msg[0], msg[1]
            if op == "stop":
                conn.send(("ok", seq, -1, None))
                return
            try:
                if op == "fold":
                    _, _, _, w, s, cid, sync = msg
                    for v in views:
                        recv_exact(sock, v)
                    if sync:  # could overflow float32: the checked fold, with a snapshot
                        shards.run(True, partial(shards.fold, bufs, w, s, cid))
                    else:  # the receiver checked these bytes: the same fast fold as shm's
                        shards.fold_validated([(bufs, w, s)])
                    reply: tuple[Any, ...] = ("ok", seq, -1, None)
                else:
                    common = handle_common(shards, spec, msg, acc_dtype)
                    if common is None:
                        raise AggregatorFailed(f"unknown operation {op!r}")
                    reply = common
            except (EOFError, ConnectionError):
                return
            except BaseException as e:
                reply = error_reply(seq, e)
            conn.send(reply)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return
    finally:
        sock.close()


class SocketAggregator(Service):
    """:class:`~fedagg.plane.ShmAggregator`'s API and results, but each update is
    handed to the workers over Unix sockets (the baseline the shared-memory plane replaces).

    Each worker receives only the byte ranges of the shards it owns, so every update byte
    crosses one socket once. Backpressure comes from the sockets' buffers. Partial states
    (``merge``) are not supported here.
    """

    _worker_target = staticmethod(_unix_worker)

    def __init__(
        self,
        spec: ParamSpec,
        *,
        shards: int = 1,
        workers: int | None = None,
        accumulator: Accumulator = "float32",
        version: int | None = None,
        timeout: float = 60.0,
        start_method: StartMethod = "forkserver",
        worker_threads: int = 1,
        backend: Backend = "auto",
    ) -> None:
        super().__init__(
            spec,
            shards=shards,
            workers=workers,
            accumulator=accumulator,
            version=version,
            timeout=timeout,
            start_method=start_method,
            worker_threads=worker_threads,
            backend=backend,
        )
        self._dir = tempfile.mkdtemp(prefix="fedagg_sock_")
        path = os.path.join(self._dir, "data.sock")
        self._socks: list[socket.socket] = []
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
            listener.listen(self.n_workers)
            cfgs = [
                {
                    "spec": spec.to_dict(),
                    "bounds": [self.bounds[k] for k in owned],
                    "accumulator": accumulator,
                    "version": version,
                    "backend": backend,
                    "threads": worker_threads,
                    "path": path,
                    "index": i,
                }
                for i, owned in enumerate(self.owned)
            ]
            self._start(cfgs, startup_timeout=max(120.0, self.timeout))
            by_index: dict[int, socket.socket] = {}
            listener.settimeout(self.timeout)
            while len(by_index) < self.n_workers:
                s, _ = listener.accept()
                s.settimeout(None)
                _tune(s)
                hello = bytearray(_HELLO.size)
                recv_exact(s, memoryview(hello))
                by_index[_HELLO.unpack(hello)[0]] = s
            self._socks = [by_index[i] for i in range(self.n_workers)]
        except BaseException:
            self.close()
            raise
        finally:
            listener.close()

    def __enter__(self) -> SocketAggregator:
        return self

    def close(self) -> None:
        super().close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()
        self._socks = []
        shutil.rmtree(self._dir, ignore_errors=True)

    def _send_data(self, flat_bytes: memoryview, i: int) -> None:
        isz = self.spec.dtype.itemsize
        try:
            for k in self.owned[i]:
                lo, hi = self.bounds[k]
                self._socks[i].sendall(flat_bytes[lo * isz : hi * isz])
        except OSError as e:
            raise self._fail(f"worker {i}'s socket failed: {e}") from e

    def submit(
        self,
        update: Update | Delta,
        weight: float = 1.0,
        *,
        scale: float = 1.0,
        client_id: str = "",
        base_version: int | None = None,
    ) -> None:
        """Validate an update and send each worker its shards over its Unix socket."""
        self._check_usable()
        self._poll()
        u = self._as_update(update, weight, scale, client_id, base_version)
        flat = self.spec.as_flat(u.delta)
        sync, bound = self._admit_fold(u, peak(flat, use_numba=self._numba))
        mv = _bytes_view(np.ascontiguousarray(flat))
        w, s, cid = float(u.weight), float(u.scale), u.client_id
        after = partial(self._send_data, mv)
        if sync:
            self._run_sync(lambda i, seq: ("fold", seq, -1, w, s, cid, True), -1, after)
        else:
            self._issue(lambda i, seq: ("fold", seq, -1, w, s, cid, False), -1, False, after)
        self._folded(u, bound)


# --------------------------------------------------------------------------------------------
# Sharded TCP flows: one connection per shard
# --------------------------------------------------------------------------------------------


def _tcp_worker(conn: mpc.Connection, cfg: dict[str, Any]) -> None:
    """A worker of :class:`ShardReceiver`: serves one sender connection at a time."""
    set_threads(cfg["threads"])
    spec = ParamSpec.from_dict(cfg["spec"])
    shards = Shards(spec, cfg["bounds"], cfg["accumulator"], cfg["version"], cfg["backend"])
    acc_dtype = shards.states[0].acc.dtype
    (lo, hi), isz = shards.bounds[0], spec.dtype.itemsize
    try:
        buf = np.zeros(hi - lo, spec.dtype)  # allocated after the start
        view = _bytes_view(buf)
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        _tune(listener)
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        shards.warm_up([buf])
    except BaseException as e:
        conn.send(("failed", "".join(traceback.format_exception(e))))
        return
    conn.send(("ready", listener.getsockname()[1]))
    data: socket.socket | None = None
    head = bytearray(_HEADER.size)

    def control(msg: tuple[Any, ...]) -> bool:
        """Handle a control message; False to stop."""
        op, seq = msg[0], msg[1]
        if op == "stop":
            conn.send(("ok", seq, -1, None))
            return False
        try:
            common = handle_common(shards, spec, msg, acc_dtype)
            if common is None:
                raise AggregatorFailed(f"unexpected operation {op!r}")
            conn.send(common)
        except BaseException as e:
            conn.send(error_reply(seq, e))
        return True

    def receive(sock: socket.socket) -> bool:
        """Receive one shard message and settle it with the receiver; False on EOF."""
        try:
            recv_exact(sock, memoryview(head))
        except (EOFError, ConnectionError):
            return False
        magic, uid, w, s, ver, nbytes, clen = _HEADER.unpack(head)
        cid, why = "", None
        if magic != _MAGIC:
            why = "not a shard message"
        elif nbytes != (hi - lo) * isz:
            why = f"shard of {nbytes} bytes, expected {(hi - lo) * isz}"
        try:
            cid_b = bytearray(clen)
            recv_exact(sock, memoryview(cid_b))
            cid = cid_b.decode("utf-8", "replace")
            if why is None:
                recv_exact(sock, view)
        except (EOFError, ConnectionError):
            why = why or "the connection closed in the middle of the update"
        # on any problem the stream cannot be resynchronised: drop the connection afterwards
        top = math.nan if why is not None else peak(buf, use_numba=cfg["backend"] != "numpy")
        conn.send(("recv", bytes(uid), cid, w, s, ver, top, why))
        ok = why is None
        while True:  # wait for the receiver's decision on this update
            msg = conn.recv()
            if msg[0] != "decide":
                if not control(msg):
                    raise SystemExit(0)
                continue
            _, seq, _uid, do_fold, sync = msg
            try:
                if do_fold and sync:
                    shards.run(True, partial(shards.fold, [buf], w, s, cid))
                elif do_fold:  # admitted on this slice's own max|x|: the fast fold
                    shards.fold_validated([([buf], w, s)])
                conn.send(("ok", seq, -1, None))
            except BaseException as e:
                conn.send(error_reply(seq, e))
            return ok

    try:
        while True:
            ready = mpc.wait([conn, data if data is not None else listener])
            if conn in ready:
                if not control(conn.recv()):
                    return
                continue
            if data is None:
                data, _ = listener.accept()
                _tune(data)
                data.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                continue
            if not receive(data):
                data.close()
                data = None
    except (EOFError, BrokenPipeError, KeyboardInterrupt, SystemExit):
        return
    finally:
        if data is not None:
            data.close()
        listener.close()


class ShardReceiver(Service):
    """Shard workers that each listen on their own TCP port of 127.0.0.1 (see :attr:`addrs`).

    A sender (:class:`ShardSender`, :func:`send_sharded`; another thread or process) sends
    byte range ``i`` of each flat update to ``addrs[i]``; the caller runs :meth:`wait` to
    admit or refuse updates as their slices arrive. Results (:meth:`finalize`,
    :meth:`state`, ...) are those of :class:`~fedagg.plane.ShmAggregator`.
    One sender at a time: a worker serves one connection until it closes.
    """

    _worker_target = staticmethod(_tcp_worker)

    def __init__(
        self,
        spec: ParamSpec,
        *,
        shards: int = 1,
        accumulator: Accumulator = "float32",
        version: int | None = None,
        timeout: float = 60.0,
        start_method: StartMethod = "forkserver",
        worker_threads: int = 1,
        backend: Backend = "auto",
    ) -> None:
        super().__init__(
            spec,
            shards=shards,
            workers=shards,
            accumulator=accumulator,
            version=version,
            timeout=timeout,
            start_method=start_method,
            worker_threads=worker_threads,
            backend=backend,
        )
        self._pending: dict[bytes, dict[int, tuple[Any, ...]]] = {}
        self._complete: collections.deque[bytes] = collections.deque()
        cfgs = [
            {
                "spec": spec.to_dict(),
                "bounds": [self.bounds[i]],
                "accumulator": accumulator,
                "version": version,
                "backend": backend,
                "threads": worker_threads,
            }
            for i in range(shards)
        ]
        self._start(cfgs, startup_timeout=max(120.0, self.timeout))
        #: ``(host, port)`` of each shard's worker, in shard order.
        self.addrs: list[tuple[str, int]] = [("127.0.0.1", int(p)) for p in self.worker_info]

    def __enter__(self) -> ShardReceiver:
        return self

    def _on_other(self, i: int, msg: tuple[Any, ...]) -> None:
        if msg[0] != "recv":
            super()._on_other(i, msg)
            return
        uid = msg[1]
        parts = self._pending.setdefault(uid, {})
        parts[i] = msg
        if len(parts) == len(self._conns):
            self._complete.append(uid)

    def _decide(self, uid: bytes) -> tuple[str, UpdateError | None]:
        parts = self._pending.pop(uid)
        first = parts[0]
        cid, w, s, ver = first[2], first[3], first[4], first[5]
        error: UpdateError | None = None
        sync, bound = False, self._bound
        u = Update(delta=b"", weight=w, scale=s, client_id=cid)
        problems = [p[7] for p in parts.values() if p[7] is not None]
        try:
            if problems:
                raise SpecMismatch(cid, problems[0])
            if any(p[2:6] != first[2:6] for p in parts.values()):
                raise SpecMismatch(cid, "the shards disagree on client id, weight or version")
            if not u.is_weight_valid():
                raise InvalidWeight(cid, f"weight must be finite and > 0, got {w!r}")
            if not u.is_scale_valid() or not math.isfinite(w * s):
                raise InvalidWeight(cid, "invalid scale, or weight * scale overflows")
            version = None if ver < 0 else int(ver)
            if self.version is not None and version is not None and version != self.version:
                raise StaleUpdate(
                    cid, f"trained from model version {version}, aggregating version {self.version}"
                )
            if not math.isfinite(self._weight + w):
                raise InvalidWeight(cid, "the sum of weights overflows")
            top = max((p[6] for p in parts.values()), key=lambda x: math.inf if x != x else x)
            sync, bound = self._admit_fold(u, top)
        except UpdateError as e:
            error = e
        if error is not None:
            self._issue(lambda i, seq: ("decide", seq, uid, False, False), -1, False)
            return cid, error
        if sync:
            try:
                self._run_sync(lambda i, seq: ("decide", seq, uid, True, True), -1)
            except UpdateError as e:
                return cid, e
        else:
            self._issue(lambda i, seq: ("decide", seq, uid, True, False), -1, False)
        self._folded(u, bound)
        return cid, None

    def wait(
        self, count: int, timeout: float | None = None
    ) -> list[tuple[str, UpdateError | None]]:
        """Admit (or refuse) the next ``count`` updates whose shards arrive, in arrival order.

        Returns ``(client_id, None)`` for a folded update and ``(client_id, error)`` for a
        refused one (no shard changed). Raises AggregatorFailed when nothing arrives within
        ``timeout`` seconds (default: the aggregator's) or a worker dies.
        """
        import time

        self._check_usable()
        out: list[tuple[str, UpdateError | None]] = []
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while len(out) < count:
            while self._complete and len(out) < count:
                out.append(self._decide(self._complete.popleft()))
            if len(out) >= count:
                break
            for i, msg in self._wait(deadline, "waiting for shards"):
                self._on_message(i, msg)
                deadline = time.monotonic() + limit
        self.flush()
        return out


class ShardSender:
    """One TCP connection per shard to a :class:`ShardReceiver`'s :attr:`~ShardReceiver.addrs`;
    :meth:`send` sends byte range ``i`` of a flat update on connection ``i``, all in parallel."""

    def __init__(self, addrs: Sequence[tuple[str, int]], spec: ParamSpec) -> None:
        if not addrs:
            raise ConfigError("addrs must name at least one shard worker")
        self.spec = spec
        self.bounds = shard_bounds(spec.size, len(addrs))
        self._token = secrets.token_bytes(8)
        self._n = 0
        self._socks: list[socket.socket] = []
        try:
            for host, port in addrs:
                s = socket.create_connection((host, port))
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                _tune(s)
                self._socks.append(s)
        except BaseException:
            self.close()
            raise
        self._pool = ThreadPoolExecutor(max_workers=len(addrs), thread_name_prefix="shard-send")

    def __enter__(self) -> ShardSender:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()
        self._socks = []
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.shutdown(wait=True)

    def send(
        self,
        update: Update | Delta,
        weight: float = 1.0,
        *,
        scale: float = 1.0,
        client_id: str = "",
        base_version: int | None = None,
    ) -> None:
        """Send one update, shard ``i`` on connection ``i``; returns when all are sent."""
        if isinstance(update, Update):
            weight, scale, client_id = update.weight, update.scale, update.client_id
            base_version, update = update.base_version, update.delta
        problem = self.spec.mismatch(update)
        if problem is not None:
            raise SpecMismatch(client_id, problem)
        flat = np.ascontiguousarray(self.spec.as_flat(update))
        self._n += 1
        uid = self._token + self._n.to_bytes(8, "little")
        self.send_raw(uid, _bytes_view(flat), float(weight), float(scale), client_id, base_version)

    def send_raw(
        self,
        uid: bytes,
        data: memoryview,
        weight: float,
        scale: float,
        client_id: str,
        base_version: int | None,
        sizes: Sequence[int] | None = None,
    ) -> None:
        """Send ``data`` split at the shard bounds (or into ``sizes`` bytes per shard)."""
        isz = self.spec.dtype.itemsize
        cuts = (
            [(lo * isz, hi * isz) for lo, hi in self.bounds]
            if sizes is None
            else [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]
        )
        cid = client_id.encode()
        ver = -1 if base_version is None else int(base_version)

        def one(i: int) -> None:
            a, b = cuts[i]
            head = _HEADER.pack(_MAGIC, uid, weight, scale, ver, b - a, len(cid)) + cid
            self._socks[i].sendall(head)
            self._socks[i].sendall(data[a:b])

        list(self._pool.map(one, range(len(self._socks))))


def send_sharded(
    update: Update | Delta,
    addrs: Sequence[tuple[str, int]],
    spec: ParamSpec,
    weight: float = 1.0,
    *,
    scale: float = 1.0,
    client_id: str = "",
    base_version: int | None = None,
) -> None:
    """Send one update to a :class:`ShardReceiver`: shard ``i`` on its own connection."""
    with ShardSender(addrs, spec) as sender:
        sender.send(update, weight, scale=scale, client_id=client_id, base_version=base_version)
