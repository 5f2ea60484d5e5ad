"""The stream transport: uploads (``Push``) over a plain framed TCP connection (TLS with the
gRPC port's certificate when ``tls`` is set), next to gRPC, for speed.

Python gRPC costs about a CPU-second per GiB on each side; this costs a ``recv_into`` into a
buffer the server owns (no HTTP/2 framing, no per-message protobuf copies) and, on the
client, a ``sendall`` of the update's own memory. Every call is handed to the same
:class:`~fedagg.deploy._transport.Service` as a :class:`~fedagg.deploy._transport.Call`, so
the call credentials, the unauthenticated caps, the signed header, slots, pacing, the digest,
fold, shards and durability are exactly the ones gRPC calls go through. The port is
advertised in ``HelloReply.data_port`` (0: none); the client side is
:mod:`fedagg.deploy._stream_client`.

The wire (integers big-endian), one call per connection:

* **preamble** (client): ``b"FDGS"``, version ``1`` (u8), the method (u8: 1 Hello, 2 Tasks,
  3 Pull, 4 Push, 5 Heartbeat, 6 Report, 7 Secure; only Push is served, the others are
  refused with UNIMPLEMENTED), the length of the call credentials (u16, at most
  :data:`MAX_CREDENTIALS`), the call credentials (the serialized ``Auth`` gRPC carries in
  ``fedagg-call-bin``, :mod:`fedagg.deploy._calls`);
* **messages** (client): each a u32 length, at most ``chunk_bytes`` + 64 KiB (gRPC's
  limit, checked before anything is allocated), then that many bytes (an ``UploadChunk``);
  the length :data:`END` (``0xFFFFFFFF``) ends the requests;
* **reply** (server): the status (u8, gRPC's code), a u32 length (at most
  :data:`MAX_REPLY`), then the reply (a ``PushReply``) or, for an error, its message
  (UTF-8). Then the server closes the connection. The client may close its side (a TCP
  half-close, a TLS close_notify) after the end marker, not before: while a call waits (for
  its slot, say) its socket is checked every :data:`WATCH` seconds, and a reset or a FIN
  there is the client gone (the call is cancelled). Clients of this package do not
  half-close; a cancelled call closes with a reset.

Before its preamble a connection costs a few bytes and a timer (with TLS, the TLS session;
its reads go through one buffer the transport shares, one record at a time before the call
is authenticated): at most ``preauth`` wait for theirs (``preauth_per_peer`` per address;
more are told :data:`FULL` and closed at once), each closed after ``first_timeout`` (TLS
handshake included). A connection lingering after an error reply is counted the same way,
and the port holds at most :func:`max_connections` connections in all.
Messages are read only when the service asks for one (a pull: no read-ahead, the socket's
buffer is the window), so a call waiting for its slot holds nothing but the kernel's buffer
(with TLS, up to one 1 MiB read of records more, copied into its session's buffer). TLS is
decrypted here (``ssl.MemoryBIO``) from reads of up to 1 MiB: asyncio's own TLS (256 KiB
reads, record by record) was measured several times slower on a busy machine. Anything
malformed (magic, version, lengths) gets a typed error reply and the connection is closed.
A peer that disconnects mid-call cancels its handler (as gRPC does: the upload path rolls
back on cancellation); after an error reply the server reads and discards for at most
:data:`LINGER` seconds so that the client, still sending, reads the reply instead of a
reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
from collections.abc import Callable
from typing import Any, cast

from fedagg.deploy._admission import hold, peer_host
from fedagg.deploy._options import ServerOptions, data_address
from fedagg.deploy._stream_net import gone, keepalive, max_connections, peer_name, server_context
from fedagg.deploy._transport import CallError, Ends, Service, Status
from fedagg.errors import ConfigError

__all__ = [
    "END",
    "LENGTH",
    "MAGIC",
    "MAX_CREDENTIALS",
    "MAX_REPLY",
    "METHOD_CODES",
    "PREAMBLE",
    "REPLY",
    "VERSION",
    "StreamCall",
    "StreamTransport",
]

log = logging.getLogger("fedagg.server")

MAGIC = b"FDGS"
VERSION = 1
METHOD_CODES = {"Hello": 1, "Tasks": 2, "Pull": 3, "Push": 4, "Heartbeat": 5, "Report": 6,
                "Secure": 7}  # fmt: skip
_METHODS = {code: name for name, code in METHOD_CODES.items()}
#: magic, version, method, credentials length
PREAMBLE = struct.Struct(">4sBBH")
#: call credentials are at most this long (gRPC caps a call's headers at 8 KiB)
MAX_CREDENTIALS = 8 * 1024
LENGTH = struct.Struct(">I")
END = 0xFFFFFFFF
#: status, length
REPLY = struct.Struct(">BI")
MAX_REPLY = 1 << 20
#: seconds the server keeps reading (and discarding) after an error reply to an unfinished call
LINGER = 2.0
_RAW_READ = 1 << 20  # TLS: bytes read from the socket at once (after authentication)
_SMALL_READ = 16 * 1024 + 512  # TLS, before authentication: one record at a time
_DISCARD = 64 * 1024  # the shared buffer bytes read after an error reply are dropped into
#: the reply (status, message) to a connection over the data port's caps: the client takes it
#: as "the data port cannot be used now" and uploads over gRPC (nothing was received)
FULL = "the data port is full"
_MAX_ERROR = 4096
_FIRST_BUFFER = 64 * 1024  # the first message's buffer to begin with (see _Conn._complete)

#: seconds between two checks that the peer of a call is still there while its reading is
#: paused (waiting for its slot, a lease, the engine): a paused socket is not polled, so a
#: FIN or RST would otherwise be seen only at the next read
WATCH = 1.0
_PRE, _CRED, _IDLE, _LEN, _BODY, _ENDED, _BROKEN, _DRAIN = range(8)


class StreamCall(Ends):
    """One call on the data port, as the service sees it."""

    def __init__(self, conn: _Conn, method: str, peer: str, credentials: bytes | None) -> None:
        self.conn = conn
        self.method = method
        self.peer = peer
        self.credentials = credentials
        Ends.__init__(self)

    async def read(self) -> bytes | None:
        return await self.conn.read()

    async def write(self, data: bytes) -> None:
        raise CallError(Status.UNIMPLEMENTED, "the data port streams no replies")


class _Conn(asyncio.BufferedProtocol):
    """One connection: the preamble, then messages read into buffers of their own as the
    service asks for them (see the module's docstring)."""

    def __init__(self, owner: StreamTransport) -> None:
        self.owner = owner
        self.loop = asyncio.get_running_loop()
        self.transport: Any = None
        self.state = _PRE
        self.buf = bytearray(PREAMBLE.size)
        self.view = memoryview(self.buf)
        self.got = 0
        self.method = 0
        self.peer = ""
        self.counted: Callable[[], None] | None = None  # waiting for its preamble
        self.timer: asyncio.TimerHandle | None = None
        self.waiting: asyncio.Future[bytes | None] | None = None
        self.call: StreamCall | None = None
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self.replied = False
        self.drained = 0
        self.need = PREAMBLE.size  # the current target's length (see _target)
        self.messages = 0  # messages whose length was read
        #: TLS (see :meth:`_pump`): decrypted here from MiB reads (asyncio's own TLS reads
        #: 256 KiB at a time and was measured several times slower)
        self.tls: ssl.SSLObject | None = None
        self.handshaking = False
        self.paused = False
        self.authed = False  # TLS: the call's first message arrived (bigger reads from then)
        self.watch: asyncio.TimerHandle | None = None  # see _watch

    # -- asyncio's side ------------------------------------------------------------------------
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.peer = peer_name(transport.get_extra_info("peername"))
        if len(self.owner.conns) >= self.owner.max_conns:  # the backstop (see StreamTransport)
            self.owner.refused += 1
            self.counted = None
        else:  # at accept, before TLS
            self.counted = self.owner.opening(peer_host(self.peer))
        if self.counted is None:  # too many connections: closed at once (see FULL)
            self.closed = True
            if self.owner.ssl is None:
                transport.write(
                    REPLY.pack(Status.RESOURCE_EXHAUSTED.value, len(FULL)) + FULL.encode()
                )
                transport.close()  # the reply fits the kernel's buffer: closes at once
            else:  # nothing readable to say before the handshake: the client falls back
                transport.abort()
            return
        keepalive(transport)
        self.owner.conns.add(self)
        self.timer = self.loop.call_later(self.owner.opt.first_timeout, self._expire)
        if self.owner.ssl is not None:
            self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
            self.tls = self.owner.ssl.wrap_bio(self.inc, self.out, server_side=True)
            self.handshaking = True

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.tls is not None:  # the transport's shared buffer: copied out at once
            return self.owner.raw[: _RAW_READ if self.authed else _SMALL_READ]
        if self.state == _DRAIN:
            return self.owner.discard
        return self.view[self.got :]

    def buffer_updated(self, nbytes: int) -> None:
        if self.tls is not None:
            self.inc.write(self.owner.raw[:nbytes])
            self._pump()
        else:
            self._take(nbytes)

    def _pump(self) -> None:
        """TLS: the handshake, then decrypt into the current target while it wants bytes
        (not paused); what is not wanted yet stays in the incoming buffer (at most one read:
        the socket is paused with it)."""
        assert self.tls is not None
        try:
            if self.handshaking:
                try:
                    self.tls.do_handshake()
                except ssl.SSLWantReadError:
                    return
                finally:
                    self._flush()
                self.handshaking = False
            while not self.closed and not self.paused and self.state not in (_IDLE, _BROKEN):
                view = self.view[self.got :] if self.state != _DRAIN else self.owner.discard
                try:
                    n = cast(int, self.tls.read(len(view), view))  # into a buffer: a count
                except ssl.SSLWantReadError:
                    break
                if not n:
                    raise ssl.SSLZeroReturnError
                self._take(n)
            self._flush()  # records the session answers with (a TLS 1.3 key update)
        except ssl.SSLZeroReturnError:  # the peer's close_notify
            if self.state != _ENDED or self.replied:  # after the end marker: the reply's
                self.transport.close()
        except (ssl.SSLError, OSError):  # a bad handshake or record: nothing to answer
            self.owner.refused += self.call is None
            self.transport.abort()

    def _flush(self) -> None:
        data = self.out.read()
        if data and not self.closed and not self.transport.is_closing():
            self.transport.write(data)

    def _write(self, data: bytes) -> None:
        if self.tls is None:
            self.transport.write(data)
            return
        try:
            self.tls.write(data)
        except (ssl.SSLError, OSError):
            self.transport.abort()
            return
        self._flush()

    def _pause(self) -> None:
        self.paused = True
        self.transport.pause_reading()
        if self.watch is None:
            self.watch = self.loop.call_later(WATCH, self._watch)

    def _watch(self) -> None:
        """While paused with a call running: is the peer still there (every WATCH s)?"""
        self.watch = None
        if self.closed or self.replied or not self.paused:
            return
        if self.task is not None and gone(self.transport):
            self.transport.abort()  # connection_lost cancels the handler
            return
        self.watch = self.loop.call_later(WATCH, self._watch)

    def _resume(self) -> None:
        self.paused = False
        self.transport.resume_reading()
        if self.tls is not None:  # what the last read brought beyond the last message, in
            self._pump()  # the incoming buffer or already decrypted inside the TLS session

    def _take(self, nbytes: int) -> None:
        if self.state == _DRAIN:
            self.drained += nbytes
            if self.drained > 2 * self.owner.limit:
                self.transport.abort()
            return
        self.got += nbytes
        if self.got == len(self.buf):
            if self.got < self.need:  # the first message, grown as its bytes arrive
                self.buf = bytearray(min(2 * self.got, self.need))
                self.buf[: self.got] = self.view
                self.view = memoryview(self.buf)
                return
            self._complete()

    def eof_received(self) -> bool | None:
        # after the end marker, a half-close: keep the connection to send the reply
        return self.state == _ENDED and not self.replied

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.watch is not None:
            self.watch.cancel()
            self.watch = None
        self.owner.conns.discard(self)
        self._uncount()
        if self.call is not None:
            self.call.finish()
        if self.task is not None and not self.task.done() and not self.replied:
            if self.call is not None:
                self.owner.cut += 1
            self.task.cancel()  # the peer went away mid-call: as gRPC, cancel its handler

    # -- the wire ------------------------------------------------------------------------------
    def _target(self, n: int, state: int, start: int | None = None) -> None:
        """Read ``n`` bytes next, into a buffer of ``start`` bytes (default ``n``) that
        doubles as they arrive."""
        self.need = n
        self.buf = bytearray(n if start is None else min(n, start))
        self.view = memoryview(self.buf)
        self.got = 0
        self.state = state

    def _complete(self) -> None:
        if self.state == _PRE:
            magic, version, method, n = PREAMBLE.unpack(self.buf)
            if magic != MAGIC:
                self._refuse(Status.INVALID_ARGUMENT, "not a fedagg stream (bad magic)")
            elif version != VERSION:
                self._refuse(Status.FAILED_PRECONDITION,
                             f"stream protocol {version} not supported (this server speaks "
                             f"{VERSION})")  # fmt: skip
            elif n > MAX_CREDENTIALS:
                self._refuse(
                    Status.INVALID_ARGUMENT,
                    f"call credentials of {n} bytes: at most {MAX_CREDENTIALS}",
                )
            else:
                self.method = method
                self._target(n, _CRED)
                if n == 0:
                    self._complete()
        elif self.state == _CRED:
            self._uncount()
            name = _METHODS.get(self.method)
            if name != "Push":
                what = name or f"method {self.method}"
                self._refuse(Status.UNIMPLEMENTED,
                             f"the data port serves Push only: call {what} over gRPC")  # fmt: skip
                return
            if self.owner.stopping:
                self._refuse(Status.UNAVAILABLE, "the server is stopping")
                return
            self._pause()  # until the service asks for a message
            self.state = _IDLE
            self.call = StreamCall(self, name, self.peer, bytes(self.buf) or None)
            self.task = self.loop.create_task(self.owner.serve(self, self.call))
        elif self.state == _LEN:
            (n,) = LENGTH.unpack(self.buf)
            if n == END:
                self._target(1, _ENDED)  # any byte after the end is a violation
                self._resolve(None)
            elif n > self.owner.limit:
                self.state = _BROKEN
                self._pause()
                self._fail(CallError(Status.RESOURCE_EXHAUSTED,
                                     f"Received message larger than max ({n} vs. "
                                     f"{self.owner.limit})"))  # fmt: skip
            else:
                # the first message (the header, not yet checked) gets memory as its bytes
                # arrive, not at its length: 4 bytes cannot reserve chunk_bytes
                self._target(n, _BODY, None if self.messages else _FIRST_BUFFER)
                self.messages += 1
                if n == 0:
                    self._complete()
        elif self.state == _BODY:
            self.state = _IDLE
            self._pause()
            # the message's own buffer, handed over (never reused): a bytearray, which every
            # reader of Push messages takes as bytes (decode_chunk views it)
            self._resolve(cast(bytes, self.buf))
        elif self.state == _ENDED:  # data after the end of the requests
            self.state = _BROKEN
            self.transport.abort()

    def _resolve(self, value: bytes | None) -> None:
        if self.waiting is not None and not self.waiting.done():
            self.waiting.set_result(value)

    def _fail(self, error: BaseException) -> None:
        if self.waiting is not None and not self.waiting.done():
            self.waiting.set_exception(error)

    async def read(self) -> bytes | None:
        """The next message (None after the end marker), read as it is asked for."""
        if self.state == _ENDED:
            return None
        if self.closed:
            raise CallError(Status.CANCELLED, "the connection is closed")
        if self.state != _IDLE:
            raise CallError(Status.INVALID_ARGUMENT, "the stream is broken")
        self.authed = True  # the service checked the call credentials before reading
        self.waiting = self.loop.create_future()
        self._target(LENGTH.size, _LEN)
        self._resume()
        try:
            return await self.waiting
        except asyncio.CancelledError:
            if self.state in (_LEN, _BODY):  # a timeout mid-message: the stream is unusable
                self.state = _BROKEN
                if not self.closed:
                    self._pause()
            raise
        finally:
            self.waiting = None

    def reply(self, status: Status, body: bytes) -> None:
        """Send the call's reply (or error) and close: at once if the requests ended, else
        after the client stopped sending (at most :data:`LINGER` seconds)."""
        if self.replied:
            return
        self.replied = True
        if self.call is not None:
            self.call.finish()
        if self.closed:
            return
        self._write(REPLY.pack(status.value, len(body)) + body)
        if self.state == _ENDED:
            self.transport.close()
            self.loop.call_later(LINGER, self.transport.abort)
            return
        # the client may still be sending: read (into the transport's discard buffer) and drop
        # for at most LINGER seconds, the connection counted under the preauth caps meanwhile
        # (over them: closed at once)
        if self.counted is None:
            self.counted = self.owner.opening(peer_host(self.peer), refusal=False)
        if self.counted is None:
            self.transport.close()
            self.loop.call_later(LINGER, self.transport.abort)
            return
        self._target(0, _DRAIN)
        self._resume()
        self.loop.call_later(LINGER, self.transport.abort)

    def _refuse(self, status: Status, message: str) -> None:
        """A violation before the call started: a typed error, then close."""
        self._uncount()
        self.state = _BROKEN
        self.owner.refused += 1
        log.info("data port: %s refused: %s", self.peer, message)
        self.reply(status, message.encode()[:_MAX_ERROR])

    def _expire(self) -> None:
        self.timer = None
        if self.counted is not None and not self.closed:  # no preamble within first_timeout
            self._uncount()
            self.owner.refused += 1
            self.transport.abort()

    def _uncount(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.counted is not None:
            self.counted()
            self.counted = None


class StreamTransport:
    """The data port (see the module's docstring): a :class:`~fedagg.deploy._transport.
    Transport` serving ``Push`` calls to ``service`` at ``options.data_listen``."""

    def __init__(self, service: Service, options: ServerOptions) -> None:
        self.service = service
        self.opt = options
        self.port = 0
        self.limit = options.chunk_bytes + 64 * 1024  # gRPC's message limit
        self.ssl = server_context(*options.tls) if options.tls is not None else None
        self.conns: set[_Conn] = set()
        #: connections waiting for their preamble or lingering after an error reply
        self.counts: dict[str, int] = {}
        self.max_conns = max_connections(options)
        self.discard = memoryview(bytearray(_DISCARD))  # see _Conn.reply
        #: TLS: every connection's socket reads, copied at once into its session's buffer
        self.raw = memoryview(bytearray(_RAW_READ if self.ssl is not None else 0))
        self.refused = 0  # connections closed for a violation or a timeout (tests, metrics)
        self.cut = 0  # calls whose peer went away before the reply (their handler cancelled)
        self._server: asyncio.Server | None = None
        self.stopping = False

    def opening(self, host: str, refusal: bool = True) -> Callable[[], None] | None:
        """Count a connection waiting for its preamble, or lingering after an error reply
        (None: over the caps)."""
        if (self.counts.get("*", 0) >= self.opt.preauth
                or self.counts.get(host, 0) >= self.opt.preauth_per_peer):  # fmt: skip
            self.refused += refusal
            return None
        return hold(self.counts, "*", host)

    async def start(self) -> None:
        where = data_address(self.opt.data_listen, self.opt.listen, self.ssl is not None)
        if where is None:
            return
        loop = asyncio.get_running_loop()
        host, port = where
        try:
            for _ in range(5):
                server = await loop.create_server(
                    lambda: _Conn(self), host, port, backlog=1024, reuse_address=True
                )
                ports = {int(s.getsockname()[1]) for s in server.sockets}
                if len(ports) == 1:
                    break
                # a name of several addresses ("localhost": ::1 and 127.0.0.1), each given
                # its own free port: again, all on the first one's
                port = int(server.sockets[0].getsockname()[1])
                server.close()
                await server.wait_closed()
            else:
                raise OSError(f"no one free port for all the addresses of {host}")
        except OSError as e:
            raise ConfigError(f"cannot listen on {self.opt.data_listen} (data port): {e}") from e
        self._server = server
        self.port = ports.pop()

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is None:
            return
        self._server.close()
        self.stopping = True  # calls completing their preamble now are refused
        tasks = [c.task for c in self.conns if c.task is not None and not c.task.done()]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        conns = list(self.conns)
        for c in conns:
            if c.transport is not None:
                c.transport.abort()
        tasks = [c.task for c in conns if c.task is not None and not c.task.done()]
        for t in tasks:
            t.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._server.wait_closed()
        self._server = None

    async def serve(self, conn: _Conn, call: StreamCall) -> None:
        """Run ``call`` through the service and send its outcome."""
        try:
            reply = await self.service.handle(call)
            status, body = Status.OK, bytes(reply or b"")
        except CallError as e:
            status, body = e.status, e.message.encode()[:_MAX_ERROR]
        except asyncio.CancelledError:
            if conn.closed:  # the peer went away: the handler was cancelled, as gRPC does
                return
            raise
        except Exception as e:  # a handler's bug: what gRPC answers
            log.exception("data port: %s failed", call.method)
            status, body = Status.UNKNOWN, f"Unexpected {type(e)}: {e}".encode()[:_MAX_ERROR]
        conn.reply(status, body)
