"""Call credentials are reused: a client signs one per method per ``REUSE_S`` seconds, and the
server recognises a token it verified until its timestamp leaves the skew window."""

from __future__ import annotations

import time

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._auth import ClientKey
from fedagg.deploy._calls import CallTokens, VerifiedCalls, call_method


def _key(name: str = "c0") -> ClientKey:
    return ClientKey(name, Ed25519PrivateKey.generate())


def test_a_client_reuses_its_token_per_method_then_signs_a_new_one() -> None:
    tokens = CallTokens(_key(), reuse_s=0.2)
    a, b = tokens("Pull"), tokens("Push")
    assert a != b  # one per method: each signs its own method
    assert tokens("Pull") == a and tokens("Push") == b
    auth = pb.Auth.FromString(a)
    assert auth.client == "c0" and len(auth.nonce) == 16
    time.sleep(0.25)
    assert tokens("Pull") != a  # renewed once older than reuse_s


def test_the_server_knows_a_verified_token_until_its_window_ends() -> None:
    calls = VerifiedCalls(skew_s=60.0)
    token = CallTokens(_key())("Pull")
    ts = pb.Auth.FromString(token).timestamp_ms
    assert calls.caller(token, call_method("Pull")) is None  # never verified
    calls.add(token, call_method("Pull"), "c0", ts)
    assert calls.caller(token, call_method("Pull")) == "c0"
    # the same bytes presented for another method: not this token's method
    assert calls.caller(token, call_method("Push")) is None
    # once the timestamp is out of the window, it is forgotten (verified again, and refused)
    assert calls.caller(token, call_method("Pull"), now=ts / 1000 + 61) is None
    assert len(calls) == 0


def test_an_altered_token_is_not_recognised() -> None:
    calls = VerifiedCalls(skew_s=60.0)
    token = CallTokens(_key())("Pull")
    calls.add(token, call_method("Pull"), "c0", pb.Auth.FromString(token).timestamp_ms)
    other = pb.Auth.FromString(token)
    other.client = "c1"  # another name, same signature: other bytes
    assert calls.caller(other.SerializeToString(), call_method("Pull")) is None


@pytest.mark.parametrize("cap", [1, 3])
def test_the_table_is_bounded_and_drops_the_oldest(cap: int) -> None:
    calls = VerifiedCalls(skew_s=60.0, max_entries=cap)
    toks = [CallTokens(_key(f"c{i}"))("Pull") for i in range(cap + 2)]
    for i, t in enumerate(toks):
        calls.add(t, call_method("Pull"), f"c{i}", pb.Auth.FromString(t).timestamp_ms)
    assert len(calls) == cap
    assert calls.caller(toks[0], call_method("Pull")) is None
    assert calls.caller(toks[-1], call_method("Pull")) == f"c{cap + 1}"
