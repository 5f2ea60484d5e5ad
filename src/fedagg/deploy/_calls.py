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
gRPC's flow-control window. The messages keep their own ``Auth``, which binds their content,
and must be signed by the same name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._auth import ClientKey

__all__ = ["CALL_METADATA", "call_method", "call_token", "signed_channel"]

CALL_METADATA = "fedagg-call-bin"


def call_method(method: str) -> str:
    """What a call credential for ``method`` (``Push``, or ``/fedagg.v1.Federation/Push``)
    signs in place of a method name."""
    return "Call/" + method.rsplit("/", 1)[-1]


def call_token(key: ClientKey, method: str) -> bytes:
    """A fresh call credential for one call of ``method``: a serialized ``Auth``."""
    auth = pb.Auth(**key.sign(call_method(method), b""))
    return bytes(auth.SerializeToString())


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
