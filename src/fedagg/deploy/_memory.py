"""The in-memory transport: a federation service's calls made in-process, no network.

:class:`MemoryChannel` offers the multi-callables of a ``grpc.aio`` channel that the client
side uses (``unary_unary``, ``unary_stream``, ``stream_unary``, each called with
``metadata=`` and, for unary calls, ``timeout=``), so the real
:class:`~fedagg.deploy._client.Client` runs over it unchanged
(``Client(..., channel=MemoryChannel(service))``). Each call runs the service's handler in
its own task, as gRPC does; a refusal reaches the caller as the ``grpc.aio.AioRpcError``
gRPC would raise (same code, same message). Requests are read one at a time, when the
service asks for them; streamed replies wait for the caller to take them (a few buffered).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from typing import Any, TypeVar

import grpc

from fedagg.deploy._calls import CALL_METADATA
from fedagg.deploy._grpc import grpc_code
from fedagg.deploy._options import ServerOptions
from fedagg.deploy._transport import METHODS, SERVICE, CallError, Ends, Service

__all__ = ["MemoryCall", "MemoryChannel", "MemoryTransport"]

Metadata = Iterable[tuple[str, Any]] | None
T = TypeVar("T")


def rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The error gRPC's client raises for a call that ended with ``code``."""
    empty = grpc.aio.Metadata()
    return grpc.aio.AioRpcError(code, empty, empty, details=details)


class _TooLarge(Exception):
    pass


class _End:
    pass


_END = _End()


class MemoryCall(Ends):
    """One in-process call, as the service sees it (a :class:`~fedagg.deploy._transport.Call`)."""

    def __init__(
        self, method: str, peer: str, metadata: Metadata, requests: AsyncIterator[Any],
        max_message: int | None,
    ) -> None:  # fmt: skip
        self.method = method
        self.peer = peer
        token = None
        for key, value in metadata or ():
            if key == CALL_METADATA:
                token = value
        self.credentials = token if isinstance(token, bytes) else None
        self._requests = requests
        self._max = max_message
        self.out: asyncio.Queue[bytes | _End | grpc.aio.AioRpcError] = asyncio.Queue(4)
        Ends.__init__(self)

    async def read(self) -> bytes | None:
        try:
            raw = bytes(await self._requests.__anext__())
        except StopAsyncIteration:
            return None
        if self._max is not None and len(raw) > self._max:
            raise _TooLarge(f"Received message larger than max ({len(raw)} vs. {self._max})")
        return raw

    async def write(self, data: bytes) -> None:
        await self.out.put(bytes(data))


async def _one(request: bytes) -> AsyncIterator[bytes]:
    yield request


class _StreamCall:
    """A call whose replies are a stream: iterate it (``cancel()`` ends it)."""

    def __init__(self, call: MemoryCall, task: asyncio.Task[None]) -> None:
        self.call, self.task = call, task

    def cancel(self) -> bool:
        return self.task.cancel()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._replies()

    async def _replies(self) -> AsyncIterator[bytes]:
        try:
            while True:
                item = await self.call.out.get()
                if isinstance(item, grpc.aio.AioRpcError):
                    raise item
                if isinstance(item, _End):
                    return
                yield item
        finally:
            self.task.cancel()


class MemoryChannel:
    """A channel to ``service`` in this process (see the module's docstring). ``peer``: the
    address the service sees; ``max_message``: the largest request message (gRPC's
    ``max_receive_message_length`` at the server; None: no limit)."""

    def __init__(
        self, service: Service, *, peer: str = "ipv4:127.0.0.1:1", max_message: int | None = None
    ) -> None:
        self.service = service
        self.peer = peer
        self.max_message = max_message
        self._tasks: set[asyncio.Task[Any]] = set()

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def _method(self, path: str) -> str:
        service, _, method = path.strip("/").partition("/")
        if service != SERVICE or method not in METHODS:
            raise ValueError(f"no method {path!r}")
        return method

    def _open(self, method: str, metadata: Metadata, requests: AsyncIterator[Any]) -> MemoryCall:
        return MemoryCall(method, self.peer, metadata, requests, self.max_message)

    async def _serve(self, call: MemoryCall) -> bytes | None:
        try:
            return await self.service.handle(call)
        except CallError as e:
            raise rpc_error(grpc_code(e.status), e.message) from None
        except _TooLarge as e:
            raise rpc_error(grpc.StatusCode.RESOURCE_EXHAUSTED, str(e)) from None
        except Exception as e:  # what gRPC answers for a handler's bug
            raise rpc_error(grpc.StatusCode.UNKNOWN, f"Unexpected {type(e)}: {e}") from None
        finally:
            call.finish()

    async def _serve_stream(self, call: MemoryCall) -> None:
        end: _End | grpc.aio.AioRpcError = _END
        try:
            await self._serve(call)
        except grpc.aio.AioRpcError as e:
            end = e
        await call.out.put(end)

    def _task(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _unary(self, call: MemoryCall, timeout: float | None) -> bytes:
        task = self._task(self._serve(call))
        try:
            async with asyncio.timeout(timeout):
                reply = await asyncio.shield(task)
        except TimeoutError:
            task.cancel()
            raise rpc_error(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded") from None
        except asyncio.CancelledError:
            task.cancel()
            raise
        assert reply is not None
        return reply

    def unary_unary(self, path: str, *args: Any, **kw: Any) -> Callable[..., Any]:
        method = self._method(path)

        def call(request: bytes, *, metadata: Metadata = None, timeout: float | None = None,
                 **_: Any) -> Any:  # fmt: skip
            return self._unary(self._open(method, metadata, _one(request)), timeout)

        return call

    def stream_unary(self, path: str, *args: Any, **kw: Any) -> Callable[..., Any]:
        method = self._method(path)

        def call(requests: Any, *, metadata: Metadata = None, timeout: float | None = None,
                 **_: Any) -> Any:  # fmt: skip
            return self._unary(self._open(method, metadata, requests.__aiter__()), timeout)

        return call

    def unary_stream(self, path: str, *args: Any, **kw: Any) -> Callable[..., Any]:
        method = self._method(path)

        def call(request: bytes, *, metadata: Metadata = None, **_: Any) -> _StreamCall:
            c = self._open(method, metadata, _one(request))
            return _StreamCall(c, self._task(self._serve_stream(c)))

        return call


class MemoryTransport:
    """A :class:`~fedagg.deploy._transport.Transport` that listens nowhere: callers reach the
    service through :class:`MemoryChannel` (``Server(..., transport=MemoryTransport)``,
    then ``MemoryChannel(server.service)``)."""

    port = 0

    def __init__(self, service: Service, options: ServerOptions | None = None) -> None:
        self.service = service

    async def start(self) -> None:
        pass

    async def stop(self, grace: float = 1.0) -> None:
        pass
