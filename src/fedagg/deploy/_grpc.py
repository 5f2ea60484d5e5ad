"""The gRPC transport: a ``grpc.aio`` server (options, TLS) whose every call is handed to a
:class:`~fedagg.deploy._transport.Service` as a :class:`~fedagg.deploy._transport.Call`, and
whose refusals (:class:`~fedagg.deploy._transport.CallError`) become gRPC statuses here.

Every method is served as a stream (the wire is the same for a unary call): the handler runs
as soon as a call opens, so its first message is awaited under ``first_timeout`` and counted
against the unauthenticated caps, never held by gRPC, unbounded, before the service runs.
Raw bytes in and out: the service parses (and reports malformed input) itself.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from fedagg.deploy._calls import CALL_METADATA
from fedagg.deploy._options import ServerOptions
from fedagg.deploy._transport import METHODS, SERVICE, CallError, Service, Status
from fedagg.errors import ConfigError

__all__ = ["GrpcCall", "GrpcTransport", "grpc_code"]


_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}
_CODES = {s: _BY_NUMBER[s.value] for s in Status}


def grpc_code(status: Status) -> grpc.StatusCode:
    """gRPC's code for ``status``."""
    return _CODES[status]


class GrpcCall:
    """A gRPC call as a :class:`~fedagg.deploy._transport.Call`."""

    def __init__(
        self,
        method: str,
        requests: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        self.method = method
        self._requests = requests.__aiter__()
        self._context = context
        self.peer = str(context.peer() or "")
        token = None
        for key, value in context.invocation_metadata() or ():
            if key == CALL_METADATA:
                token = value
        self.credentials = token if isinstance(token, bytes) else None

    async def read(self) -> bytes | None:
        try:
            return await self._requests.__anext__()
        except StopAsyncIteration:
            return None

    async def write(self, data: bytes) -> None:
        await self._context.write(data)

    def done(self) -> bool:
        return bool(self._context.done())

    def on_done(self, callback: Callable[[], None]) -> None:
        self._context.add_done_callback(lambda _: callback())


class GrpcTransport:
    """Serve ``service`` over gRPC as ``options`` say (``listen``, ``tls``, message sizes,
    keep-alives, handshake and idle timeouts, flow-control window)."""

    def __init__(self, service: Service, options: ServerOptions) -> None:
        self.service = service
        self.opt = options
        self.port = 0
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
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

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)

    def _handlers(self) -> grpc.GenericRpcHandler:
        ident = None
        handlers = {}
        for method, streams in METHODS.items():
            if streams:
                handlers[method] = grpc.stream_stream_rpc_method_handler(
                    self._streaming(method), ident, ident
                )
            else:
                handlers[method] = grpc.stream_unary_rpc_method_handler(
                    self._unary(method), ident, ident
                )
        return grpc.method_handlers_generic_handler(SERVICE, handlers)

    def _unary(self, method: str) -> Callable[[AsyncIterator[bytes], Any], Any]:
        async def handler(requests: AsyncIterator[bytes], context: Any) -> bytes:
            try:
                reply = await self.service.handle(GrpcCall(method, requests, context))
            except CallError as e:
                await context.abort(grpc_code(e.status), e.message)
                raise AssertionError("unreachable") from None
            assert reply is not None
            return reply

        return handler

    def _streaming(self, method: str) -> Callable[[AsyncIterator[bytes], Any], Any]:
        async def handler(requests: AsyncIterator[bytes], context: Any) -> None:
            try:
                await self.service.handle(GrpcCall(method, requests, context))
            except CallError as e:
                await context.abort(grpc_code(e.status), e.message)

        return handler
