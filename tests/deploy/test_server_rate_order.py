"""The server's request authentication rate-limits before recording a nonce, and each
client has its own replay table (issue 14, finding 13; goes with finding13_server.patch)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._admission import CALLER, verify_request
from fedagg.deploy._auth import ClientKey, Keyring, NonceCache, RateLimiter, body
from fedagg.deploy._transport import CallError, Status


def _server(max_entries: int, rate: float, burst: float) -> tuple[Any, dict[str, ClientKey]]:
    keys = {n: ClientKey(n, Ed25519PrivateKey.generate()) for n in ("alice", "flood")}
    ring = Keyring({n: k.private.public_key() for n, k in keys.items()})
    srv = SimpleNamespace(
        nonces=NonceCache(60.0, max_entries), keys=ring, rate=RateLimiter(rate, burst)
    )
    return srv, keys


def _call(srv: Any, key: ClientKey) -> pb.Auth:
    content = body(task=0)
    auth = pb.Auth(**key.sign("Poll", content))
    token = CALLER.set(key.name)  # the call's credentials named this client
    try:
        verify_request(srv.nonces, srv.rate, srv.keys, "Poll", auth, content)
    finally:
        CALLER.reset(token)
    return auth


def test_rate_limited_requests_record_no_nonce_and_spare_other_clients() -> None:
    srv, keys = _server(max_entries=4, rate=1e-9, burst=2.0)
    for _ in range(2):
        _call(srv, keys["flood"])
    for _ in range(20):  # a flood over the limit: refused as such, nothing recorded
        with pytest.raises(CallError) as e:
            _call(srv, keys["flood"])
        assert e.value.status == Status.RESOURCE_EXHAUSTED, e.value.message
    assert srv.nonces.entries("flood") == 2
    for _ in range(2):  # another client: its own bucket and its own table
        _call(srv, keys["alice"])
    assert srv.nonces.entries("alice") == 2


def test_a_request_must_be_signed_by_the_caller() -> None:
    """A call's credentials name its caller; a request in it signed with another registered
    key (even a valid signature) gets the same answer as a forged one, and records no nonce."""
    from fedagg.deploy._auth import AUTH_FAILED

    srv, keys = _server(max_entries=4, rate=0.0, burst=1.0)
    content = body(task=0)
    auth = pb.Auth(**keys["alice"].sign("Poll", content))
    token = CALLER.set("flood")
    try:
        with pytest.raises(CallError) as e:
            verify_request(srv.nonces, srv.rate, srv.keys, "Poll", auth, content)
    finally:
        CALLER.reset(token)
    assert (e.value.status, e.value.message) == (Status.UNAUTHENTICATED, AUTH_FAILED)
    assert srv.nonces.entries("alice") == 0
