"""The client side of the stream transport (:mod:`fedagg.deploy._stream`): a ``Push`` call
over the server's data port, for :func:`fedagg.deploy._push.push_update`.

:class:`StreamPush` is called like gRPC's stream-unary multi-callable (``await
push(messages)`` -> the reply's bytes) and fails like it (``grpc.aio.AioRpcError`` with the
server's status and message, UNAVAILABLE when the connection fails), so the client's retries
treat both alike. Its messages are chunk parts (:func:`chunk_parts`: the few framing bytes
and a view of the update), sent with blocking ``sendall`` on a worker thread (which releases
the GIL, and encrypts there under TLS): the update's bytes are never joined or copied in
Python (under TLS, encrypted in memory and written in MiB pieces: :class:`_Tls`). Between
messages it checks whether the server already answered (an error, while the
client is still sending), and then stops and reads the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import grpc

from fedagg.deploy._memory import rpc_error
from fedagg.deploy._stream import END, LENGTH, MAGIC, MAX_REPLY, METHOD_CODES, PREAMBLE, REPLY
from fedagg.deploy._stream import VERSION as _VERSION
from fedagg.deploy._wire import encode_varint

__all__ = ["Parts", "StreamPush", "StreamUnreachable", "chunk_parts"]

T = TypeVar("T")
#: a message as parts: framing bytes, a view of the data, trailing bytes
Parts = tuple[bytes, "memoryview | bytes", bytes]
_MAX_FIELD = (1 << 29) - 1
_pool: ThreadPoolExecutor | None = None


def _workers() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:  # one per process: each running call's sends and its reply
        _pool = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fedagg-stream")
    return _pool


class _Tls:
    """A blocking TLS connection over ``raw`` that encrypts into memory and writes large
    buffers: an ``SSLSocket`` writes (and reads) one 16 KiB record per system call, and on a
    busy machine each of those waits to be scheduled (measured: ~0.1 GiB/s on loopback, the
    same data in MiB writes goes at the wire's speed). ``SSLObject.write`` encrypts with the
    GIL released."""

    STEP = 1 << 20  # plaintext encrypted per write

    def __init__(self, raw: socket.socket, ctx: ssl.SSLContext, hostname: str) -> None:
        self.raw = raw
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname=hostname)
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._fill()
        self._flush()

    def _flush(self) -> None:
        data = self.out.read()
        if data:
            self.raw.sendall(data)

    def _fill(self) -> None:
        data = self.raw.recv(256 * 1024)
        if not data:
            raise ConnectionError("the server closed the connection")
        self.inc.write(data)

    def sendall(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        for lo in range(0, len(view), self.STEP):
            self.obj.write(view[lo : lo + self.STEP])
            self._flush()

    def recv_into(self, buf: Any) -> int:
        while True:
            try:
                return int(self.obj.read(len(buf), buf))
            except ssl.SSLWantReadError:
                self._fill()
            except ssl.SSLZeroReturnError:
                return 0

    def pending(self) -> int:
        return int(self.obj.pending()) + int(self.inc.pending)

    def fileno(self) -> int:
        return self.raw.fileno()

    def shutdown(self, how: int) -> None:
        self.raw.shutdown(how)

    def settimeout(self, value: float | None) -> None:
        self.raw.settimeout(value)

    def close(self) -> None:
        self.raw.close()


class StreamUnreachable(Exception):
    """The data port cannot be reached (connect or TLS handshake failed): nothing was sent."""


def chunk_parts(
    ints: dict[int, int], data: memoryview | bytes, header: bytes | None = None,
    trailer: bytes | None = None,
) -> Parts:  # fmt: skip
    """:func:`fedagg.deploy._wire.encode_chunk`'s message as three parts whose concatenation
    is its bytes: everything before the data, the data itself (not copied), the trailer."""
    pre: list[bytes] = []
    if header is not None:
        pre += [b"\x0a", encode_varint(len(header)), header]
    for field in sorted(ints):
        if field == 3 or not 1 <= field <= _MAX_FIELD:
            raise ValueError(f"bad varint field number {field}")
        if ints[field]:
            pre += [encode_varint(field << 3), encode_varint(ints[field])]
    mid: memoryview | bytes = b""
    if len(data):
        pre += [b"\x1a", encode_varint(len(data))]
        mid = data
    post = b"" if trailer is None else b"\x22" + encode_varint(len(trailer)) + trailer
    return b"".join(pre), mid, post


def _status(code: int) -> grpc.StatusCode:
    for c in grpc.StatusCode:
        if c.value[0] == code:
            return c
    return grpc.StatusCode.UNKNOWN


def _recv_exact(sock: Any, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if not k:
            raise ConnectionError("the server closed the connection")
        got += k
    return bytes(buf)


class StreamPush:
    """``Push`` calls to ``host:port`` (the server's ``data_port``), TLS-verified with ``ca``
    (None: plain TCP) for ``server_name`` (default ``host``); ``token(method)`` gives the
    call credentials (:class:`~fedagg.deploy._calls.CallTokens`)."""

    #: push_update hands this call chunk parts instead of joined messages
    parts = True

    def __init__(
        self, host: str, port: int, ca: bytes | None, token: Callable[[str], bytes], *,
        server_name: str | None = None, connect_timeout: float = 10.0,
    ) -> None:  # fmt: skip
        self.host, self.port, self.token = host, port, token
        self.connect_timeout = connect_timeout
        self.server_name = server_name or host
        self.ssl: ssl.SSLContext | None = None
        if ca is not None:
            self.ssl = ssl.create_default_context(cadata=ca.decode())
            self.ssl.minimum_version = ssl.TLSVersion.TLSv1_2

    def _open(self) -> Any:
        """Connect, handshake, send the preamble (blocking, on a worker thread)."""
        try:
            raw = socket.create_connection((self.host, self.port), self.connect_timeout)
        except OSError as e:
            raise StreamUnreachable(f"{self.host}:{self.port}: {e}") from None
        sock: Any = raw
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
                if hasattr(socket, opt):  # a dead server is noticed, as gRPC's keep-alives do
                    raw.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
            if self.ssl is not None:
                try:
                    sock = _Tls(raw, self.ssl, self.server_name)
                except (OSError, ssl.SSLError) as e:
                    raise StreamUnreachable(f"TLS to {self.host}:{self.port}: {e}") from None
            sock.settimeout(None)
            creds = self.token("Push")
            sock.sendall(PREAMBLE.pack(MAGIC, _VERSION, METHOD_CODES["Push"], len(creds)) + creds)
            return sock
        except BaseException:
            sock.close()
            raw.close()
            raise

    @staticmethod
    def _answered(sock: Any) -> bool:
        """Whether the server sent something (its reply: it sends nothing else)."""
        if isinstance(sock, _Tls) and sock.pending():
            return True
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable)

    @staticmethod
    def _send(sock: Any, msg: Any) -> bool:
        """Send one message (parts or bytes); False if the server answered first."""
        if StreamPush._answered(sock):
            return False
        if isinstance(msg, tuple):
            pre, mid, post = msg
            sock.sendall(LENGTH.pack(len(pre) + len(mid) + len(post)) + pre)
            if len(mid):
                sock.sendall(mid)
            if post:
                sock.sendall(post)
        else:
            sock.sendall(LENGTH.pack(len(msg)))
            sock.sendall(msg)
        return True

    @staticmethod
    def _reply(sock: Any, end: bool) -> tuple[int, bytes]:
        if end:
            sock.sendall(LENGTH.pack(END))
        status, n = REPLY.unpack(_recv_exact(sock, REPLY.size))
        if n > MAX_REPLY:
            raise ConnectionError(f"a reply of {n} bytes")
        return status, _recv_exact(sock, n)

    async def __call__(self, messages: AsyncIterator[Any], **_: Any) -> bytes:
        loop = asyncio.get_running_loop()
        pool = _workers()
        sock = await loop.run_in_executor(pool, self._open)
        running: asyncio.Future[Any] | None = None

        async def step(fn: Callable[..., T], *args: Any) -> T:
            nonlocal running
            running = loop.run_in_executor(pool, fn, *args)
            out: T = await asyncio.shield(running)
            return out

        try:
            try:
                sent = True
                async for msg in messages:
                    sent = await step(self._send, sock, msg)
                    if not sent:
                        break
                status, body = await step(self._reply, sock, sent)
            except OSError as e:  # the connection failed: maybe after the server answered
                try:
                    status, body = await step(self._reply, sock, False)
                except OSError:
                    raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"data port: {e}") from None
        except asyncio.CancelledError:
            with contextlib.suppress(OSError):  # wakes a thread blocked on the socket
                sock.shutdown(socket.SHUT_RDWR)
            raise
        finally:
            if running is not None and not running.done():
                with contextlib.suppress(BaseException):
                    await asyncio.wait([running])
            sock.close()
        if status != 0:
            raise rpc_error(_status(status), body.decode("utf-8", "replace"))
        return body
