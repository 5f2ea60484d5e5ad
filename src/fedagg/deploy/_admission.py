"""Admission: what a call must pass before the service does anything for it.

A call opens with call credentials (``fedagg-call-bin`` metadata, see
:mod:`fedagg.deploy._calls`), verified before any of its messages is read; it is counted as
opening until its first message is read (within ``first_timeout``), size-capped
(:data:`~fedagg.deploy._options.MAX_REQUEST`) and authenticated, at most ``preauth`` at once,
``preauth_per_peer`` per peer address and
:data:`~fedagg.deploy._options.OPENING_PER_CALLER` per caller. Each request is signed by the
caller the credentials named, fresh, never replayed (:class:`~fedagg.deploy._auth.NonceCache`)
and within the caller's rate limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Callable, Collection, Iterator, Mapping
from typing import Any

from google.protobuf.message import DecodeError

from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._auth import (
    AUTH_FAILED,
    AuthError,
    Keyring,
    NonceCache,
    RateLimited,
    RateLimiter,
)
from fedagg.deploy._calls import CALL_METADATA, VerifiedCalls, call_method
from fedagg.deploy._options import EDGE_PER_CLIENT, MAX_REQUEST, OPENING_PER_CALLER, ServerOptions
from fedagg.deploy._transport import Call, CallError, Status
from fedagg.deploy._wire import leading_name

__all__ = ["CALLER", "Admission", "hold", "parse", "peer_host", "verify_request"]

log = logging.getLogger("fedagg.server")
#: the caller of the call being handled (each call runs in its own task, with its own context)
CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("fedagg_caller", default="")


class Admission:
    """The checks a call passes before it is served (see the module's docstring); ``keys``
    and ``edges`` are the keyrings of the clients and of the edge aggregators below."""

    def __init__(
        self, opt: ServerOptions, keys: Keyring, edges: Keyring | None,
        edge_clients: Mapping[str, Collection[int]],
    ) -> None:  # fmt: skip
        self.opt, self.keys, self.edges = opt, keys, edges
        self.edge_clients = {n: frozenset(cs) for n, cs in edge_clients.items()}
        # per client: what the rate limit lets through in a skew window, and some room
        per_client = 10_000
        if opt.rate > 0:
            per_client = max(1_000, int(opt.burst + opt.rate * opt.skew) + 64)
        self.nonces = NonceCache(opt.skew, per_client)
        self.calls = VerifiedCalls(opt.skew)  # call credentials recently verified
        self.rate = RateLimiter(opt.rate, opt.burst)
        #: calls opening (first message not yet read and authenticated): in all ("*"), by
        #: peer address ("peer:..."), by caller ("caller:...")
        self.opening_counts: dict[str, int] = {}

    def verify(self, keyring: Keyring, method: str, auth: Any, content: bytes) -> int:
        """``auth`` signs ``content`` for ``method``, by the caller the call's credentials
        named (see :meth:`caller`): the index of its key in ``keyring``."""
        return verify_request(self.nonces, self.rate, keyring, method, auth, content)

    def caller(self, call: Call) -> str:
        """The name a call's credentials (``fedagg-call-bin`` metadata, see
        :mod:`fedagg.deploy._calls`) are signed by, verified as the call opens, before any of
        its messages is read (UNAUTHENTICATED if missing, stale, replayed or forged)."""
        token = call.credentials
        signs = call_method(call.method)
        if isinstance(token, bytes) and (known := self.calls.caller(token, signs)) is not None:
            return known  # a reused token, verified earlier in its window
        try:
            if not isinstance(token, bytes):
                raise AuthError(
                    f"missing call credentials ({CALL_METADATA} metadata): every call must "
                    "be signed (update the client)"
                )
            try:
                auth = pb.Auth.FromString(token)
            except (DecodeError, ValueError):
                raise AuthError("malformed call credentials") from None
            edge = self.edges is not None and auth.client in self.edges.index
            keyring = self.edges if edge and self.edges is not None else self.keys
            if not auth.client or not auth.signature:
                raise AuthError("missing call credentials: every call must be signed")
            self.nonces.check_time(auth)  # the window only: a call credential is reused
            keyring.verify(signs, auth, b"")
        except AuthError as e:
            raise CallError(Status.UNAUTHENTICATED, e.reason) from None
        self.calls.add(token, signs, str(auth.client), int(auth.timestamp_ms))
        return str(auth.client)

    @contextlib.contextmanager
    def opening(self, call: Call) -> Iterator[Callable[[], None]]:
        """An RPC opening: its call credentials verified (:meth:`caller`) before anything is
        read, then counted as opening until the returned function is called (its first
        message read and authenticated) or it ends. At most ``preauth`` RPCs open at once,
        ``preauth_per_peer`` per peer address and :data:`OPENING_PER_CALLER` per caller;
        beyond, refused at once (RESOURCE_EXHAUSTED: retry later)."""
        opening = self.opening_counts
        peer = "peer:" + peer_host(call.peer)
        if (
            opening.get("*", 0) >= self.opt.preauth
            or opening.get(peer, 0) >= self.opt.preauth_per_peer
        ):
            raise CallError(
                Status.RESOURCE_EXHAUSTED,
                "too many requests are being opened at once: retry later",
            )
        caller = self.caller(call)
        if opening.get("caller:" + caller, 0) >= OPENING_PER_CALLER:
            raise CallError(
                Status.RESOURCE_EXHAUSTED,
                f"{OPENING_PER_CALLER} calls of yours are being opened: retry later",
            )
        CALLER.set(caller)
        authenticated = hold(opening, "*", peer, "caller:" + caller)
        try:
            yield authenticated
        finally:
            authenticated()

    async def first(self, call: Call, what: str = "request") -> bytes:
        """An RPC's first message (``what``), within ``first_timeout``."""
        try:
            async with asyncio.timeout(self.opt.first_timeout):
                raw = await call.read()
        except TimeoutError:
            raise CallError(
                Status.DEADLINE_EXCEEDED,
                f"no {what} within {self.opt.first_timeout:g}s",
            ) from None
        if raw is None:
            raise CallError(Status.INVALID_ARGUMENT, f"empty {what}")
        return raw

    def sized(self, raw: bytes | memoryview) -> None:
        """Refuse a request (an upload's header) larger than :data:`MAX_REQUEST`, plus
        :data:`EDGE_PER_CLIENT` per client of its scope if it names an edge: checked on its
        length, before it is parsed."""
        cap = MAX_REQUEST
        if self.edges is not None:
            name = leading_name(raw)
            if name in self.edges.index:
                cap += EDGE_PER_CLIENT * len(self.edge_clients.get(name, ()))
        if len(raw) > cap:
            raise CallError(
                Status.INVALID_ARGUMENT,
                f"request of {len(raw)} bytes: at most {cap} (data goes in upload chunks)",
            )


def verify_request(
    nonces: NonceCache, rate: RateLimiter, keyring: Keyring, method: str, auth: Any,
    content: bytes,
) -> int:  # fmt: skip
    """``auth`` signs ``content`` for ``method``, by the caller the call's credentials
    named (:data:`CALLER`): the index of its key in ``keyring``."""
    try:
        if not auth.client or not auth.signature:
            raise AuthError("missing credentials: every request must be signed")
        if auth.client != CALLER.get():
            log.info("%s refused: signed by %r in a call by %r", method, auth.client,
                     CALLER.get())  # fmt: skip
            raise AuthError(AUTH_FAILED)
        nonces.check_time(auth)
        index = keyring.verify(method, auth, content)
        nonces.check(auth, rate=rate)  # rate-limited: no nonce recorded
    except RateLimited as e:
        raise CallError(Status.RESOURCE_EXHAUSTED, e.reason) from None
    except AuthError as e:
        raise CallError(Status.UNAUTHENTICATED, e.reason) from None
    return index


def parse(cls: Any, raw: bytes) -> Any:
    """A request message of type ``cls`` (INVALID_ARGUMENT if malformed)."""
    try:
        return cls.FromString(raw)
    except (DecodeError, ValueError) as e:
        raise CallError(Status.INVALID_ARGUMENT, f"malformed request: {e}") from None


def hold(counts: dict[str, int], *keys: str) -> Callable[[], None]:
    """Count one more under each of ``keys``; returns the (idempotent) release."""
    for key in keys:
        counts[key] = counts.get(key, 0) + 1
    held = True

    def release() -> None:
        nonlocal held
        if held:
            held = False
            for key in keys:
                counts[key] -= 1
                if not counts[key]:
                    del counts[key]

    return release


def peer_host(peer: str) -> str:
    """A gRPC peer string's address without its port (``ipv4:1.2.3.4:567`` -> ``ipv4:1.2.3.4``,
    ``ipv6:[::1]:567`` -> ``ipv6:[::1]``)."""
    host, sep, port = peer.rpartition(":")
    return host if sep and port.isdigit() else peer
