"""Replay tables are per client, and rate limiting comes before a nonce is recorded
(issue 14, finding 13)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from fedagg.deploy._auth import AuthError, NonceCache, RateLimiter

NOW = 1_000_000.0


def _auth(client: str, nonce: bytes | None = None, at: float = NOW) -> SimpleNamespace:
    return SimpleNamespace(
        client=client, timestamp_ms=int(at * 1000), nonce=nonce or secrets.token_bytes(16)
    )


def test_a_full_replay_table_refuses_only_its_own_client() -> None:
    cache = NonceCache(skew_s=60.0, max_entries=5)
    for _ in range(5):
        cache.check(_auth("flood"), NOW)
    with pytest.raises(AuthError, match="too many requests"):
        cache.check(_auth("flood"), NOW)
    for name in ("alice", "bob"):  # the others are unaffected
        for _ in range(5):
            cache.check(_auth(name), NOW)
    assert cache.entries("flood") == cache.entries("alice") == 5
    # the window moves on: the flooding client's table empties as its nonces expire
    cache.check(_auth("flood", at=NOW + 61), NOW + 61)
    assert cache.entries("flood") == 1


def test_a_rate_limited_request_records_no_nonce() -> None:
    cache = NonceCache(skew_s=60.0, max_entries=3)
    rate = RateLimiter(rate=1.0, burst=2.0)
    t = 0.0
    limited = []
    for _ in range(10):  # a burst far over the limit
        a = _auth("flood")
        try:
            cache.check(a, NOW, rate=_at(rate, t))
        except AuthError as e:  # RateLimited
            assert e.reason == "rate limit exceeded", e.reason
            limited.append(a)
    assert len(limited) == 8
    assert cache.entries("flood") == 2  # only the admitted requests' nonces
    # so the rate-limited requests never filled the client's table, and a retry of one
    # (same nonce) once the bucket refills is accepted, not taken for a replay
    cache.check(limited[0], NOW, rate=_at(rate, t + 1.0))
    assert cache.entries("flood") == 3
    # another client is not limited by the first one's flood
    cache.check(_auth("alice"), NOW, rate=_at(rate, t + 1.0))


def test_a_replay_is_refused_without_using_a_token() -> None:
    cache = NonceCache(skew_s=60.0)
    rate = RateLimiter(rate=1e-9, burst=1.0)
    a = _auth("alice")
    cache.check(a, NOW, rate=_at(rate, 0.0))
    for _ in range(3):  # replays of a captured request: refused as replays
        with pytest.raises(AuthError, match="replayed"):
            cache.check(a, NOW, rate=_at(rate, 0.0))
    assert cache.entries("alice") == 1


@dataclass
class _At(RateLimiter):
    """A rate limiter at a fixed monotonic time (deterministic tests)."""

    at: float = 0.0

    def allow(self, name: str, now: float | None = None) -> bool:
        return super().allow(name, self.at)


def _at(rate: RateLimiter, now: float) -> RateLimiter:
    """``rate``'s buckets, at monotonic time ``now``."""
    return _At(rate.rate, rate.burst, rate._buckets, at=now)
