"""The data port (``deploy/_stream.py``) against bad input: garbage, wrong magic or version,
oversized lengths, truncated messages, silent connections, a flood of them, other methods,
and a client that disconnects mid-upload (nothing changes, its retry succeeds)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedagg.deploy import Client, Server
from fedagg.deploy._calls import call_token
from fedagg.deploy._memory import rpc_error
from fedagg.deploy._stream import END, FULL, LENGTH, MAGIC, MAX_CREDENTIALS, PREAMBLE, REPLY
from fedagg.deploy._transport import Status
from tests.deploy.test_memory_transport import (
    _GRPC_LEFTOVERS,
    KEYS,
    NAMES,
    RING,
    _fed,
    _opts,
    _train,
)

FIRST = 0.5  # first_timeout


def _preamble(method: int = 4, creds: bytes | None = None, magic: bytes = MAGIC,
              version: int = 1) -> bytes:  # fmt: skip
    creds = call_token(KEYS["c0"], "Push") if creds is None else creds
    return PREAMBLE.pack(magic, version, method, len(creds)) + creds


def _exchange(port: int, data: bytes, close: bool = False) -> tuple[bytes, float]:
    """Send ``data`` (then close, if ``close``); what the server sends until it closes, and
    how long that took."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), 5) as s:
        s.settimeout(10)
        if data:
            s.sendall(data)
        if close:
            return b"", 0.0
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
    return got, time.monotonic() - t0


def _reply(raw: bytes) -> tuple[Status, str]:
    status, n = REPLY.unpack(raw[: REPLY.size])
    assert len(raw) == REPLY.size + n
    return Status(status), raw[REPLY.size :].decode()


async def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def _with_server(d: Path, fn: Callable[[Server], Awaitable[None]], **opts: Any) -> None:
    server = Server(_fed(d), RING, _opts(first_timeout=FIRST, **opts))
    await server.start()
    try:
        await fn(server)
    finally:
        await server.stop(0.1)
    gc.collect()


def _idle(server: Server) -> bool:
    """Nothing held: no call opening or receiving, no connection waiting."""
    svc = server.service
    assert server.data is not None
    return not (svc.admit.opening_counts or svc.up.slots or svc.up.inflight
                or server.data.counts or server.data.conns)  # fmt: skip


@_GRPC_LEFTOVERS
def test_malformed_preambles_get_a_typed_error_and_change_nothing(tmp_path: Path) -> None:
    async def go(server: Server) -> None:
        port = server.data_port
        cases = {
            "garbage": (b"\x00GARBAGE\xff" * 3, Status.INVALID_ARGUMENT, "bad magic"),
            "magic": (_preamble(magic=b"HTTP"), Status.INVALID_ARGUMENT, "bad magic"),
            "version": (_preamble(version=9), Status.FAILED_PRECONDITION, "protocol 9"),
            "credentials": (
                PREAMBLE.pack(MAGIC, 1, 4, MAX_CREDENTIALS + 1),
                Status.INVALID_ARGUMENT,
                "at most 8192",
            ),
            "hello": (_preamble(1), Status.UNIMPLEMENTED, "serves Push only"),
            "unknown": (_preamble(99), Status.UNIMPLEMENTED, "serves Push only"),
            "unsigned": (_preamble(creds=b""), Status.UNAUTHENTICATED, "call credentials"),
            "forged": (_preamble(creds=b"\x0a\x02c0\x22\x03sig"), Status.UNAUTHENTICATED, ""),
        }
        for name, (data, status, words) in cases.items():
            raw, _ = await asyncio.to_thread(_exchange, server.data_port, data)
            got, message = _reply(raw)
            assert (got, words in message) == (status, True), (name, got, message)
        await _until(lambda: _idle(server))
        assert server.data_port == port and server.fed.store.accepted_keys() == set()

    asyncio.run(_with_server(tmp_path, go))


@_GRPC_LEFTOVERS
def test_lengths_are_checked_before_anything_is_read(tmp_path: Path) -> None:
    """A message longer than gRPC's limit (chunk_bytes + 64 KiB) is refused on its length;
    a truncated one (the peer hangs up) cancels the call; an empty stream is malformed."""

    async def go(server: Server) -> None:
        assert server.data is not None
        limit = server.opt.chunk_bytes + 64 * 1024
        raw, _ = await asyncio.to_thread(
            _exchange, server.data_port, _preamble() + LENGTH.pack(limit + 1)
        )
        too_long = f"Received message larger than max ({limit + 1} vs. {limit})"
        assert _reply(raw) == (Status.RESOURCE_EXHAUSTED, too_long)
        raw, _ = await asyncio.to_thread(
            _exchange, server.data_port, _preamble() + LENGTH.pack(END)
        )
        assert _reply(raw) == (Status.INVALID_ARGUMENT, "empty upload header")
        cut = server.data.cut
        await asyncio.to_thread(_exchange, server.data_port,
                                _preamble() + LENGTH.pack(1000) + b"x" * 10, True)  # fmt: skip
        await _until(lambda: server.data is not None and server.data.cut == cut + 1)
        await _until(lambda: _idle(server))

    asyncio.run(_with_server(tmp_path, go))


@_GRPC_LEFTOVERS
def test_a_silent_connection_is_closed_after_first_timeout(tmp_path: Path) -> None:
    async def go(server: Server) -> None:
        raw, took = await asyncio.to_thread(_exchange, server.data_port, b"")
        assert raw == b"" and FIRST * 0.8 <= took < FIRST + 3
        raw, took = await asyncio.to_thread(_exchange, server.data_port, _preamble()[:5])
        assert raw == b"" and FIRST * 0.8 <= took < FIRST + 3
        await _until(lambda: _idle(server))

    asyncio.run(_with_server(tmp_path, go))


@_GRPC_LEFTOVERS
def test_a_flood_of_unauthenticated_connections_is_capped(tmp_path: Path) -> None:
    """At most ``preauth_per_peer`` connections wait for their preamble: the others are
    closed at once, and the server serves again once the flood is gone."""

    async def go(server: Server) -> None:
        assert server.data is not None
        socks = []
        try:
            for _ in range(12):
                s = socket.create_connection(("127.0.0.1", server.data_port), 5)
                socks.append(s)
            await _until(lambda: server.data is not None and server.data.refused >= 9)
            assert server.data.counts == {"*": 3, "ipv4:127.0.0.1": 3}
            t0 = time.monotonic()
            for s in socks[3:]:  # refused: told so and closed at once, before first_timeout
                s.settimeout(FIRST / 2)
                assert _reply(await asyncio.to_thread(_until_eof, s)) == (
                    Status.RESOURCE_EXHAUSTED, FULL)  # fmt: skip
            assert time.monotonic() - t0 < FIRST / 2
        finally:
            for s in socks:
                s.close()
        await _until(lambda: _idle(server))
        raw, _ = await asyncio.to_thread(_exchange, server.data_port, _preamble(1))
        assert _reply(raw)[0] == Status.UNIMPLEMENTED  # served again

    asyncio.run(_with_server(tmp_path, go, preauth=5, preauth_per_peer=3))


def _until_eof(s: socket.socket) -> bytes:
    """What ``s`` receives until the server closes (a reset, if it left bytes unread)."""
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            got += chunk
    return got


@_GRPC_LEFTOVERS
def test_refused_connections_kept_open_stay_under_the_preauth_caps(tmp_path: Path) -> None:
    """A refused connection lingers (reading and discarding, so its client reads the reply)
    only while counted under ``preauth_per_peer``; beyond, it is closed at once: a peer that
    keeps its refused connections open holds at most the cap."""

    async def go(server: Server) -> None:
        assert server.data is not None
        socks: list[socket.socket] = []
        try:
            for _ in range(10):
                s = socket.create_connection(("127.0.0.1", server.data_port), 5)
                socks.append(s)
                s.settimeout(5)
                s.sendall(b"XXXXXXXX")  # bad magic: refused
                await asyncio.to_thread(s.recv, REPLY.size)  # the reply: keep the socket
                assert len(server.data.conns) <= 3
            assert server.data.counts == {"*": 3, "ipv4:127.0.0.1": 3}
            t0 = time.monotonic()
            for s in socks[3:]:  # closed at once (not after the 2 s of lingering)
                await asyncio.to_thread(_until_eof, s)
            assert time.monotonic() - t0 < 1.0
        finally:
            for s in socks:
                s.close()
        await _until(lambda: _idle(server))

    asyncio.run(_with_server(tmp_path, go, preauth=5, preauth_per_peer=3))


class _CutOnce(Client):
    """Its first upload over the data port hangs up after the header and one data chunk
    (the connection drops): the client sees UNAVAILABLE and retries the whole upload."""

    cut = False

    def upload_options(self, reply: Any) -> None:
        super().upload_options(reply)
        if self._data is not None and not isinstance(self._data, _Cut):
            self._data = _Cut(self._data, self)  # type: ignore[assignment]


class _Cut:
    parts = True

    def __init__(self, push: Any, client: _CutOnce) -> None:
        self.push, self.client = push, client

    async def __call__(self, messages: AsyncIterator[Any], **kw: Any) -> bytes:
        if type(self.client).cut:
            out: bytes = await self.push(messages, **kw)
            return out
        type(self.client).cut = True

        async def two() -> AsyncIterator[Any]:
            k = 0
            async for m in messages:
                yield m
                k += 1
                if k == 2:
                    raise rpc_error(grpc.StatusCode.UNAVAILABLE, "cut")

        return await self.push(two(), **kw)  # type: ignore[no-any-return]


async def _federation(d: Path, client: type[Client], ingest: str, transport: str) -> Any:
    server = Server(_fed(d), RING, _opts(ingest=ingest))
    await server.start()
    try:
        at = f"127.0.0.1:{server.port}"
        clients = [
            client(at, KEYS[n], _train, insecure=True, retry_for=5.0, heartbeat=1.0,
                   transport=transport)
            for n in NAMES
        ]  # fmt: skip
        await asyncio.wait_for(asyncio.gather(server.wait(), *[c.run_async() for c in clients]), 60)
        assert server.data is not None
        return server.fed, server.data.cut, sum(c.report.retries for c in clients)
    finally:
        await server.stop(0.1)


@_GRPC_LEFTOVERS
@pytest.mark.parametrize("ingest", ["spool", "fold"])
def test_a_disconnect_mid_upload_changes_nothing_and_the_retry_succeeds(
    tmp_path: Path, ingest: str
) -> None:
    _CutOnce.cut = False
    ref, _, _ = asyncio.run(_federation(tmp_path / "grpc", Client, ingest, "grpc"))
    fed, cut, retries = asyncio.run(_federation(tmp_path / "cut", _CutOnce, ingest, "auto"))
    gc.collect()
    assert _CutOnce.cut and cut == 1 and retries >= 1
    assert fed.server.version == ref.server.version == 3
    assert fed.server.params.tobytes() == ref.server.params.tobytes()
    assert not list(fed.spool.glob("tmp-*"))  # the cut upload's file is gone


def test_the_wire_constants() -> None:
    assert PREAMBLE.size == 8 and struct.calcsize(">I") == LENGTH.size


@_GRPC_LEFTOVERS
def test_a_tls_data_port_closes_plaintext_and_silent_handshakes(tmp_path: Path) -> None:
    """Under TLS, a preamble sent in the clear fails the handshake (closed, nothing served);
    a connection that never finishes its handshake is closed after first_timeout."""
    from fedagg.deploy import make_certs

    paths = make_certs(tmp_path / "certs")
    tls = (paths["cert"].read_bytes(), paths["key"].read_bytes())

    async def go(server: Server) -> None:
        assert server.data is not None
        raw, took = await asyncio.to_thread(_exchange, server.data_port, _preamble() * 40)
        assert raw == b"" or raw[:1] == b"\x15", raw[:20]  # closed (maybe after a TLS alert)
        assert took < FIRST * 0.8  # at once, not at the timeout
        raw, took = await asyncio.to_thread(_exchange, server.data_port, b"")
        assert raw == b"" and FIRST * 0.8 <= took < FIRST + 3
        await _until(lambda: _idle(server))
        assert server.data.refused >= 2

    asyncio.run(
        _with_server(tmp_path / "d", go, tls=tls, insecure=False, data_listen="127.0.0.1:0")
    )


class _Waiting:
    """A service whose calls read nothing until ``go`` is set (as a call waiting for its
    slot), then read to the end and commit (0.3 s): its reply is the number of messages."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.started = 0
        self.cancelled = 0
        self.messages: list[bytes] = []

    async def handle(self, call: Any) -> bytes:
        self.started += 1
        try:
            await self.go.wait()
            n = 0
            while (msg := await call.read()) is not None:
                self.messages.append(bytes(msg))
                n += 1
            await asyncio.sleep(0.3)  # the upload's commit, while the client half-closes
            return str(n).encode()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise


async def _waiting_port(fn: Callable[[Any, _Waiting], Awaitable[None]]) -> None:
    from fedagg.deploy._stream import StreamTransport

    service = _Waiting()
    opts = _opts(first_timeout=FIRST, chunk_bytes=1 << 20)
    data = StreamTransport(service, opts)  # type: ignore[arg-type]
    await data.start()
    try:
        await fn(data, service)
    finally:
        await data.stop(0.1)


def test_a_client_gone_while_its_call_waits_is_noticed(tmp_path: Path) -> None:
    """A call that is not read (waiting for its slot): its client closes (a FIN, as a killed
    process does) or resets; the server notices within a few seconds (not at its next read)
    and cancels the call."""

    async def go(data: Any, service: _Waiting) -> None:
        for n, reset in ((1, False), (2, True)):
            s = socket.create_connection(("127.0.0.1", data.port), 5)
            s.sendall(_preamble() + LENGTH.pack(3) + b"abc")
            await _until(lambda n=n: service.started == n)  # type: ignore[misc]
            if reset:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            await _until(lambda n=n: service.cancelled == n, timeout=4.0)  # type: ignore[misc]
            assert data.cut == n and not data.conns

    asyncio.run(_waiting_port(go))


def test_a_half_close_after_the_end_marker_gets_the_reply(tmp_path: Path) -> None:
    """A client that shuts down its sending side after the end marker (as gRPC's half-close)
    still gets its reply: the call is not cancelled."""

    async def go(data: Any, service: _Waiting) -> None:
        service.go.set()
        msgs = LENGTH.pack(3) + b"abc" + LENGTH.pack(1) + b"d" + LENGTH.pack(END)

        def exchange() -> bytes:
            with socket.create_connection(("127.0.0.1", data.port), 5) as s:
                s.settimeout(5)
                s.sendall(_preamble() + msgs)
                s.shutdown(socket.SHUT_WR)
                return _until_eof(s)

        raw = await asyncio.to_thread(exchange)
        assert _reply(raw) == (Status.OK, "2") and data.cut == 0 and service.cancelled == 0

    asyncio.run(_waiting_port(go))


def test_the_first_message_gets_memory_as_its_bytes_arrive(tmp_path: Path) -> None:
    """The first message (its header not yet checked): its 4-byte length alone reserves no
    ``chunk_bytes``; its buffer doubles as bytes arrive, and the message is whole."""

    async def go(data: Any, service: _Waiting) -> None:
        service.go.set()
        body = bytes(range(256)) * (data.limit // 256)
        s = socket.create_connection(("127.0.0.1", data.port), 5)
        try:
            s.sendall(_preamble() + LENGTH.pack(len(body)) + body[:100_000])
            await _until(lambda: any(c.got >= 100_000 for c in data.conns))
            (conn,) = data.conns
            assert len(conn.buf) == 128 * 1024 < len(body)
            await asyncio.to_thread(s.sendall, body[100_000:] + LENGTH.pack(END))
            s.settimeout(5)
            assert _reply(await asyncio.to_thread(_until_eof, s)) == (Status.OK, "1")
        finally:
            s.close()
        assert service.messages == [body]

    asyncio.run(_waiting_port(go))
