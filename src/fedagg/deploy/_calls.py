"""Call credentials: every RPC is authenticated from its metadata, before any message is read.

gRPC reads a call's first message into memory as soon as the server asks for it, the whole
of it (up to the message limit, ``chunk_bytes`` + 64 KiB), however slowly it arrives. A
server that authenticates from the message itself must ask first: then any peer, key or no
key, can make it hold megabytes per connection by starting a large message and stalling.
So each call also carries, in its ``fedagg-call-bin`` metadata (HTTP/2 headers, which gRPC
caps at 8 KiB), an ``Auth`` whose signature covers ``"Call/" + method`` with the caller's
name, a timestamp and a fresh nonce (``signing_bytes(method, name, ts, nonce, b"")``). The
server verifies it as the call opens, before it reads anything; a call without valid
credentials is refused (UNAUTHENTICATED) having cost one signature check and never more than
gRPC's flow-control window. The messages keep their own ``Auth``, which binds their content
and has its own nonce (a replayed request is refused), and must be signed by the same name.

A call credential only opens the door: it is a bearer token, reused. A client signs one per
method every :data:`REUSE_S` seconds (:class:`CallTokens`), and the server remembers the tokens
it verified (:class:`VerifiedCalls`) until their timestamp leaves the skew window, so most
calls cost a dictionary lookup instead of an Ed25519 verification (~0.1 ms each, on the event
loop). Under TLS nobody else sees a token. Without TLS, someone who reads the traffic could
replay one for the rest of its window: that lets them open calls as that client, which count
against that client's caps (opening calls, upload slots) and whose messages still need a valid
signature of their own; nothing more.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import grpc

from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._auth import ClientKey

__all__ = [
    "CALL_METADATA",
    "REUSE_S",
    "CallTokens",
    "VerifiedCalls",
    "call_method",
    "call_token",
    "signed_channel",
]

CALL_METADATA = "fedagg-call-bin"
#: how long a client reuses a call credential (well inside the server's skew window, 60 s)
REUSE_S = 20.0


def call_method(method: str) -> str:
    """What a call credential for ``method`` (``Push``, or ``/fedagg.v1.Federation/Push``)
    signs in place of a method name."""
    return "Call/" + method.rsplit("/", 1)[-1]


def call_token(key: ClientKey, method: str) -> bytes:
    """A fresh call credential for one call of ``method``: a serialized ``Auth``."""
    auth = pb.Auth(**key.sign(call_method(method), b""))
    return bytes(auth.SerializeToString())


class CallTokens:
    """A key's call credentials, one per method, each reused for ``reuse_s`` seconds."""

    def __init__(self, key: ClientKey, reuse_s: float = REUSE_S) -> None:
        self.key, self.reuse_s = key, reuse_s
        self._tokens: dict[str, tuple[float, bytes]] = {}

    def __call__(self, method: str) -> bytes:
        now = time.monotonic()
        hit = self._tokens.get(method)
        if hit is None or now - hit[0] > self.reuse_s:
            hit = (now, call_token(self.key, method))
            self._tokens[method] = hit
        return hit[1]


class VerifiedCalls:
    """The call credentials a server verified, until their timestamp leaves the skew window:
    a reused token is recognised by its bytes (which include its signature). At most
    ``max_entries`` (the least recently verified go first, and are verified again if they
    come back); only verified tokens are added, so an outsider cannot fill it."""

    def __init__(self, skew_s: float, max_entries: int = 8192) -> None:
        self.skew_s, self.max_entries = skew_s, max_entries
        self._ok: OrderedDict[bytes, tuple[str, str, float]] = OrderedDict()

    def caller(self, token: bytes, signs: str, now: float | None = None) -> str | None:
        """The caller of a known, still timely ``token`` signed over ``signs``, or None."""
        hit = self._ok.get(token)
        if hit is None:
            return None
        name, method, until = hit
        if (time.time() if now is None else now) > until:
            del self._ok[token]
            return None
        return name if method == signs else None

    def add(self, token: bytes, signs: str, name: str, timestamp_ms: int) -> None:
        self._ok[token] = (name, signs, timestamp_ms / 1000.0 + self.skew_s)
        while len(self._ok) > self.max_entries:
            self._ok.popitem(last=False)

    def __len__(self) -> int:
        return len(self._ok)


def _with_token(key: ClientKey, details: Any) -> Any:
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    metadata = [*(details.metadata or ()), (CALL_METADATA, call_token(key, method))]
    return details._replace(metadata=metadata)


class _SyncSigner(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    def __init__(self, key: ClientKey) -> None:
        self.key = key

    def _go(self, continuation: Callable[[Any, Any], Any], details: Any, request: Any) -> Any:
        return continuation(_with_token(self.key, details), request)

    intercept_unary_unary = _go
    intercept_unary_stream = _go
    intercept_stream_unary = _go
    intercept_stream_stream = _go


def signed_channel(channel: grpc.Channel, key: ClientKey) -> grpc.Channel:
    """A (synchronous) channel whose every call carries ``key``'s call credential."""
    return grpc.intercept_channel(channel, _SyncSigner(key))
