"""The transport seam: what the federation service (:mod:`fedagg.deploy._service`) sees of a
call, whatever carries it (gRPC in :mod:`fedagg.deploy._grpc`, in-process calls in
:mod:`fedagg.deploy._memory`).

A call is a method name, a peer, the call credentials it opened with, a stream of request
messages (read one at a time, so nothing is buffered before the service asks for it) and,
for the methods that stream replies, writes. The service answers a call with its reply bytes
(or by writing, for a streaming method), or refuses it with a :class:`CallError`: a
:class:`Status` and a message, which the transport puts on the wire as it is.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Protocol

__all__ = [
    "METHODS",
    "SERVICE",
    "Call",
    "CallError",
    "Ends",
    "Messages",
    "Service",
    "Status",
    "Transport",
]

#: the service's name on the wire (the gRPC path is ``/SERVICE/Method``)
SERVICE = "fedagg.v1.Federation"
#: its methods, each with whether its replies are a stream (written with :meth:`Call.write`)
#: rather than one message (returned by :meth:`Service.handle`)
METHODS: dict[str, bool] = {
    "Hello": False,
    "Tasks": True,
    "Pull": True,
    "Push": False,
    "Heartbeat": False,
    "Report": False,
    "Secure": False,
}


class Status(enum.Enum):
    """How a call ended (gRPC's status codes, by name and number)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class CallError(Exception):
    """A call refused: its status and the message the caller is told."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Call(Protocol):
    """One call, as the service sees it."""

    @property
    def method(self) -> str:
        """The method called (a key of :data:`METHODS`)."""
        ...

    @property
    def peer(self) -> str:
        """The caller's address (``ipv4:1.2.3.4:567``, ``ipv6:[::1]:567``, ...)."""
        ...

    @property
    def credentials(self) -> bytes | None:
        """The call credentials (``fedagg-call-bin`` metadata, see
        :mod:`fedagg.deploy._calls`), None if the call has none."""
        ...

    async def read(self) -> bytes | None:
        """The next request message, or None at the end of the requests."""
        ...

    async def write(self, data: bytes) -> None:
        """Send a reply message (methods that stream their replies)."""
        ...

    def done(self) -> bool:
        """Whether the call is over (answered, refused, cancelled or cut off)."""
        ...

    def on_done(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the call is over."""
        ...


class Ends:
    """A call's end for transports that track it themselves: :meth:`finish` runs the
    :meth:`on_done` callbacks once (one registered after the end runs at once)."""

    def __init__(self) -> None:
        self._done = False
        self._callbacks: list[Callable[[], None]] = []

    def done(self) -> bool:
        return self._done

    def on_done(self, callback: Callable[[], None]) -> None:
        if self._done:
            callback()
        else:
            self._callbacks.append(callback)

    def finish(self) -> None:
        if not self._done:
            self._done = True
            callbacks, self._callbacks = self._callbacks, []
            for cb in callbacks:
                cb()


class Service(Protocol):
    """What a transport serves: one entry point for every call."""

    async def handle(self, call: Call) -> bytes | None:
        """Answer ``call``: the reply (None for a streaming method, whose replies were
        written), or :class:`CallError`."""
        ...


class Transport(Protocol):
    """What carries calls to a service: started before the service is served, stopped after."""

    @property
    def port(self) -> int:
        """The port it listens on (0 if it does not listen)."""
        ...

    async def start(self) -> None: ...

    async def stop(self, grace: float) -> None:
        """Stop taking calls; calls in progress get ``grace`` seconds to end."""
        ...


class Messages:
    """A call's request messages as an async iterator."""

    def __init__(self, call: Call) -> None:
        self.call = call

    def __aiter__(self) -> Messages:
        return self

    async def __anext__(self) -> bytes:
        raw = await self.call.read()
        if raw is None:
            raise StopAsyncIteration
        return raw
