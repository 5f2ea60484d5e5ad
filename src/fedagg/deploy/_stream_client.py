"""The client side of the stream transport (:mod:`fedagg.deploy._stream`): a ``Push`` call
over the server's data port, for :func:`fedagg.deploy._push.push_update`.

:class:`StreamPush` is called like gRPC's stream-unary multi-callable (``await
push(messages)`` -> the reply's bytes) and fails like it (``grpc.aio.AioRpcError`` with the
server's status and message, UNAVAILABLE when the connection fails), so the client's retries
treat both alike. Its messages are chunk parts (:func:`chunk_parts`: the few framing bytes
and a view of the update), sent on a non-blocking socket by the event loop
(``loop.sock_sendall``): no thread waits on a server that does not read (a call waiting for
its slot), so any number of calls run at once in one process; the update's bytes are never
joined or copied in Python (under TLS, encrypted in memory on a worker thread and written in
MiB pieces: :class:`_Tls`). Between messages it checks whether the server already answered
(an error, while the client is still sending), and then stops and reads the answer. A
server over its connection caps answers :data:`~fedagg.deploy._stream.FULL` at once:
:class:`StreamFull`, this upload goes over gRPC. A cancelled call closes with a reset, which
the server notices even while it is not reading.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from fedagg.deploy._memory import rpc_error
from fedagg.deploy._stream import END, FULL, LENGTH, MAGIC, MAX_REPLY, METHOD_CODES, PREAMBLE, REPLY
from fedagg.deploy._stream import VERSION as _VERSION
from fedagg.deploy._wire import Parts, chunk_parts

__all__ = ["Parts", "StreamFull", "StreamPush", "StreamUnreachable", "chunk_parts"]

#: a message as parts: framing bytes, a view of the data, trailing bytes
_pool: ThreadPoolExecutor | None = None
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close with a reset
_FULL_STATUS = 8  # RESOURCE_EXHAUSTED, with the message FULL


def _workers() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:  # one per process: TLS encryption only (no thread waits on a socket)
        _pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fedagg-stream")
    return _pool


class _Plain:
    """A connected non-blocking socket driven by the event loop: waiting on the peer's flow
    control (a server that does not read while the call waits for its slot) holds no
    thread."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()

    async def sendall(self, data: Any) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def recv_into(self, buf: memoryview) -> int:
        return await self.loop.sock_recv_into(self.sock, buf)

    def answered(self) -> bool:
        """Whether the server sent something (its reply: it sends nothing else) or closed."""
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True  # a reset: reading the reply tells
        return True  # a byte, or the end of the connection

    def close(self, reset: bool = False) -> None:
        if reset:  # the call was cancelled: a reset, which the server notices at once
            with contextlib.suppress(OSError):
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        self.sock.close()


class _Tls(_Plain):
    """TLS over a :class:`_Plain` socket, encrypted in memory (``SSLObject``, on a worker
    thread for large pieces: it releases the GIL; the thread never waits on the socket) and
    written in MiB pieces: an ``SSLSocket`` writes (and reads) one 16 KiB record per system
    call, and on a busy machine each of those waits to be scheduled (measured: ~0.1 GiB/s on
    loopback, the same data in MiB writes goes at the wire's speed)."""

    STEP = 1 << 20  # plaintext encrypted per write

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, hostname: str) -> None:
        super().__init__(sock)
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname=hostname)

    async def handshake(self) -> None:
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    raise ConnectionError("the server closed the connection") from None
        await self._flush()

    async def _flush(self) -> None:
        data = self.out.read()
        if data:
            await self.loop.sock_sendall(self.sock, data)

    async def _fill(self) -> bool:
        data = await self.loop.sock_recv(self.sock, 256 * 1024)
        if data:
            self.inc.write(data)
        return bool(data)

    async def sendall(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        for lo in range(0, len(view), self.STEP):
            piece = view[lo : lo + self.STEP]
            if len(piece) >= 64 * 1024:
                await self.loop.run_in_executor(_workers(), self.obj.write, piece)
            else:
                self.obj.write(piece)
            await self._flush()

    async def recv_into(self, buf: memoryview) -> int:
        while True:
            try:
                return int(self.obj.read(len(buf), buf))
            except ssl.SSLWantReadError:
                if not await self._fill():
                    return 0
            except ssl.SSLZeroReturnError:
                return 0

    def answered(self) -> bool:
        return bool(self.obj.pending() or self.inc.pending) or super().answered()


class StreamUnreachable(Exception):
    """The data port cannot be reached (connect or TLS handshake failed): nothing was sent."""


class StreamFull(StreamUnreachable):
    """The data port is over its connection caps (it said :data:`~fedagg.deploy._stream.FULL`
    before receiving anything): this upload goes over gRPC, the next tries the port again."""


def _status(code: int) -> grpc.StatusCode:
    for c in grpc.StatusCode:
        if c.value[0] == code:
            return c
    return grpc.StatusCode.UNKNOWN


async def _recv_exact(sock: _Plain, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = await sock.recv_into(view[got:])
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

    async def _connect(self) -> socket.socket:
        loop = asyncio.get_running_loop()
        error: OSError = OSError(f"no address for {self.host}")
        for family, kind, proto, _, addr in await loop.getaddrinfo(
            self.host, self.port, type=socket.SOCK_STREAM
        ):
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, addr)
                return sock
            except OSError as e:
                sock.close()
                error = e
            except BaseException:
                sock.close()
                raise
        raise error

    async def _open(self) -> _Plain:
        """Connect, handshake, send the preamble, within ``connect_timeout``."""
        try:
            raw = await asyncio.wait_for(self._connect(), self.connect_timeout)
        except (TimeoutError, OSError) as e:
            raise StreamUnreachable(f"{self.host}:{self.port}: {e}") from None
        sock = _Plain(raw) if self.ssl is None else _Tls(raw, self.ssl, self.server_name)
        try:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
                if hasattr(socket, opt):  # a dead server is noticed, as gRPC's keep-alives do
                    raw.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
            if isinstance(sock, _Tls):
                try:
                    await asyncio.wait_for(sock.handshake(), self.connect_timeout)
                except (TimeoutError, OSError, ssl.SSLError) as e:
                    raise StreamUnreachable(f"TLS to {self.host}:{self.port}: {e}") from None
            creds = self.token("Push")
            await sock.sendall(
                PREAMBLE.pack(MAGIC, _VERSION, METHOD_CODES["Push"], len(creds)) + creds
            )
            return sock
        except BaseException:
            sock.close()
            raise

    @staticmethod
    async def _send(sock: _Plain, msg: Any) -> bool:
        """Send one message (parts or bytes); False if the server answered first."""
        if sock.answered():
            return False
        if isinstance(msg, tuple):
            pre, mid, post = msg
            await sock.sendall(LENGTH.pack(len(pre) + len(mid) + len(post)) + pre)
            if len(mid):
                await sock.sendall(mid)
            if post:
                await sock.sendall(post)
        else:
            await sock.sendall(LENGTH.pack(len(msg)))
            await sock.sendall(msg)
        return True

    @staticmethod
    async def _reply(sock: _Plain, end: bool) -> tuple[int, bytes]:
        if end:
            await sock.sendall(LENGTH.pack(END))
        status, n = REPLY.unpack(await _recv_exact(sock, REPLY.size))
        if n > MAX_REPLY:  # not an OSError: the stream is not read again
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"data port: a reply of {n} bytes")
        return status, await _recv_exact(sock, n)

    async def __call__(self, messages: AsyncIterator[Any], **_: Any) -> bytes:
        sock = await self._open()
        reset = True
        try:
            try:
                sent = True
                async for msg in messages:
                    sent = await self._send(sock, msg)
                    if not sent:
                        break
                status, body = await self._reply(sock, sent)
            except OSError as e:  # the connection failed: maybe after the server answered
                try:
                    status, body = await self._reply(sock, False)
                except OSError:
                    raise rpc_error(grpc.StatusCode.UNAVAILABLE, f"data port: {e}") from None
            reset = False
        finally:
            sock.close(reset)
        if status == _FULL_STATUS and body == FULL.encode():  # nothing was received
            raise StreamFull(f"{self.host}:{self.port}: {FULL}")
        if status != 0:
            raise rpc_error(_status(status), body.decode("utf-8", "replace"))
        return body
