"""Client authentication: Ed25519 keys, signed requests, replay protection, rate limits.

Each client holds an Ed25519 private key; the server holds the registered public keys (an
``authorized_keys`` file: one ``name base64-public-key`` per line). Every request carries an
``Auth``: the client's name, a timestamp, a 16-byte nonce and a signature over::

    b"fedagg/v1" 0 method 0 name 0 timestamp(8 bytes, big-endian) nonce sha256(body)

where ``body`` is the request's content in a canonical form (:func:`body`). The server
refuses a signature that does not verify, a name it does not know, a timestamp outside its
skew window, and a nonce it has seen inside that window: a captured request cannot be
replayed, and no request can be altered or forged without the private key.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedagg.deploy._files import write_private
from fedagg.errors import ConfigError

__all__ = [
    "AuthError",
    "ClientKey",
    "Keyring",
    "NonceCache",
    "RateLimited",
    "RateLimiter",
    "body",
    "edge_upload_body",
    "make_keys",
    "signing_bytes",
    "upload_body",
]

PREFIX = b"fedagg/v1"

#: What the peer is told when its name is not registered or its signature does not verify: the
#: same words for both, so that a peer cannot learn which names are registered (the server's log
#: says which it was).
AUTH_FAILED = "authentication failed (unknown name or bad signature)"

log = logging.getLogger("fedagg.auth")


class AuthError(Exception):
    """A request that fails authentication; ``reason`` is safe to send back."""

    def __init__(self, reason: str, *, denied: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.denied = denied  # authenticated, but not allowed (PERMISSION_DENIED)


def body(**fields: Any) -> bytes:
    """The canonical bytes of a request's content (what the signature covers)."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def upload_body(
    task: int, version: int, weight: float, nbytes: int, metrics: dict[str, float],
    shard: int = 0, shards: int = 0,
) -> bytes:  # fmt: skip
    """What an upload's header signature covers (client and server build it here, alike);
    a shard of an upload split across parallel streams (``shards`` > 1) also signs which."""

    def num(x: float) -> float | str:  # JSON has no NaN/Inf; the server refuses them later
        return x if math.isfinite(x) else repr(x)

    fields: dict[str, Any] = {}
    if shards > 1:
        fields = {"shard": shard, "shards": shards}
    return body(
        task=task, version=version, weight=num(weight), nbytes=nbytes,
        metrics={k: num(v) for k, v in metrics.items()}, **fields,
    )  # fmt: skip


def edge_upload_body(base: bytes, head: Any) -> bytes:
    """What an edge aggregator's upload header signature covers: the upload body and the
    relay or partial-aggregate fields (jobs in a canonical order)."""

    def jobs(items: Any) -> list[list[Any]]:
        return sorted(
            [int(j.task), int(j.client), repr(float(j.weight)), repr(float(j.train_loss))]
            for j in items
        )

    p = head.partial
    return body(
        base=base.decode(), relay=bool(head.relay), on_behalf=int(head.on_behalf),
        jobs=jobs(p.jobs), dropped=jobs(p.dropped), weight=repr(float(p.weight)),
        weight_comp=repr(float(p.weight_comp)), bits=int(p.accumulator_bits),
    )  # fmt: skip


def signing_bytes(method: str, name: str, timestamp_ms: int, nonce: bytes, content: bytes) -> bytes:
    return b"\0".join(
        [
            PREFIX,
            method.encode(),
            name.encode(),
            timestamp_ms.to_bytes(8, "big") + nonce + hashlib.sha256(content).digest(),
        ]
    )


@dataclass(frozen=True)
class ClientKey:
    """A client's name and private key: signs its requests."""

    name: str
    private: Ed25519PrivateKey

    @classmethod
    def load(cls, path: str | os.PathLike[str], name: str | None = None) -> ClientKey:
        p = Path(path)
        try:
            key = serialization.load_pem_private_key(p.read_bytes(), password=None)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read the client key {p}: {e}") from e
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"{p} is not an Ed25519 private key")
        return cls(name or p.stem, key)

    def sign(self, method: str, content: bytes) -> dict[str, Any]:
        """The ``Auth`` fields of one request."""
        ts = int(time.time() * 1000)
        nonce = secrets.token_bytes(16)
        sig = self.private.sign(signing_bytes(method, self.name, ts, nonce, content))
        return {"client": self.name, "timestamp_ms": ts, "nonce": nonce, "signature": sig}

    def sign_bytes(self, method: str, ts: int, nonce: bytes, content: bytes) -> bytes:
        """A signature tied to an earlier request's timestamp and nonce (an upload's
        trailer, signed with its header's)."""
        return self.private.sign(signing_bytes(method, self.name, ts, nonce, content))

    def public_b64(self) -> str:
        raw = self.private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return base64.b64encode(raw).decode()


class Keyring:
    """The registered clients: name -> public key, and each client's index (sorted names)."""

    def __init__(self, keys: dict[str, Ed25519PublicKey]) -> None:
        if not keys:
            raise ConfigError("no client keys are registered")
        self.keys = dict(sorted(keys.items()))
        self.index = {name: i for i, name in enumerate(self.keys)}
        self.names = list(self.keys)
        #: verifies an unknown name's signature too (it fails): both refusals cost the same
        self._nobody = Ed25519PrivateKey.generate().public_key()

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Keyring:
        keys: dict[str, Ed25519PublicKey] = {}
        p = Path(path)
        try:
            lines = p.read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"cannot read authorized keys {p}: {e}") from e
        for n, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                name, b64 = line.split()
                keys[name] = Ed25519PublicKey.from_public_bytes(
                    base64.b64decode(b64, validate=True)
                )
            except ValueError as e:
                raise ConfigError(f"{p}:{n}: expected 'name base64-ed25519-key' ({e})") from e
        return cls(keys)

    def verify(self, method: str, auth: Any, content: bytes, signature: bytes | None = None) -> int:
        """The client's index if ``auth`` (an ``Auth`` message) signs ``content`` (or if
        ``signature`` does, made with ``auth``'s name, timestamp and nonce)."""
        name = auth.client
        key = self.keys.get(name)
        try:
            (key if key is not None else self._nobody).verify(
                auth.signature if signature is None else signature,
                signing_bytes(method, name, auth.timestamp_ms, auth.nonce, content),
            )
        except InvalidSignature:
            pass
        else:
            if key is not None:
                return self.index[name]
        what = "unknown name" if key is None else "bad signature for"
        log.info("%s refused: %s %r", method, what, name)
        raise AuthError(AUTH_FAILED)


class RateLimited(AuthError):
    """An authenticated request over its client's rate limit (RESOURCE_EXHAUSTED)."""

    def __init__(self) -> None:
        super().__init__("rate limit exceeded")


@dataclass
class NonceCache:
    """Refuses stale timestamps and nonces seen within the skew window.

    Each client has its own table of the nonces it used in the window, of at most
    ``max_entries``: a client that sends too much fills only its own (and is refused), never
    another's. Only authenticated requests reach a table (see :meth:`check_time`), so the
    tables are bounded by the number of registered clients times ``max_entries``; with the
    rate limiter's default (50/s, bursts of 200) a client uses at most 3,200 of them in the
    default 60 s window.
    """

    skew_s: float = 60.0
    #: nonces remembered per client (not shared: one client cannot lock out the others)
    max_entries: int = 10_000
    _seen: dict[str, OrderedDict[bytes, float]] = field(default_factory=dict)

    def check_time(self, auth: Any, now: float | None = None) -> None:
        """The stateless part: timestamp within the window, nonce well-formed. Run it before
        verifying the signature, and :meth:`check` after (so that forged requests can neither
        fill the cache nor use up a genuine request's nonce)."""
        now = time.time() if now is None else now
        ts = auth.timestamp_ms / 1000.0
        if not math.isfinite(ts) or abs(now - ts) > self.skew_s:
            raise AuthError("timestamp outside the allowed clock skew (replayed or clock wrong)")
        if len(auth.nonce) != 16:
            raise AuthError("nonce must be 16 bytes")

    def check(self, auth: Any, now: float | None = None, rate: RateLimiter | None = None) -> None:
        """Refuse a nonce seen in the window, else remember it (after authentication).

        With ``rate``, the client's rate limit is applied after the replay check and before
        the nonce is recorded: a replay costs its client no token, and a rate-limited request
        (:class:`RateLimited`) leaves no nonce behind."""
        now = time.time() if now is None else now
        self.check_time(auth, now)
        seen = self._seen.get(auth.client)
        if seen is None:
            seen = self._seen[auth.client] = OrderedDict()
        while seen and next(iter(seen.values())) < now - self.skew_s:
            seen.popitem(last=False)
        nonce = bytes(auth.nonce)
        if nonce in seen:
            raise AuthError("replayed request (nonce already used)")
        if rate is not None and not rate.allow(auth.client):
            raise RateLimited()
        if len(seen) >= self.max_entries:
            raise AuthError("too many requests in the skew window")
        seen[nonce] = now

    def entries(self, client: str) -> int:
        """How many nonces ``client`` has in its table."""
        return len(self._seen.get(client, ()))


@dataclass
class RateLimiter:
    """A token bucket per client: ``rate`` requests per second, bursts up to ``burst``."""

    rate: float = 50.0
    burst: float = 200.0
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def allow(self, name: str, now: float | None = None) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic() if now is None else now
        tokens, last = self._buckets.get(name, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[name] = (tokens, now)
            return False
        self._buckets[name] = (tokens - 1, now)
        return True


def make_keys(directory: str | os.PathLike[str], names: list[str]) -> Path:
    """Write ``NAME.key`` (PEM, private) for each name and an ``authorized_keys`` file with
    their public keys (appended to, if it exists); returns the authorized_keys path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    lines = []
    for name in names:
        if not name or any(c.isspace() for c in name) or "/" in name:
            raise ConfigError(f"invalid client name {name!r}")
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private(d / f"{name}.key", pem)  # 0600, also over an existing file
        lines.append(f"{name} {ClientKey(name, key).public_b64()}\n")
    auth = d / "authorized_keys"
    with auth.open("a") as f:
        f.writelines(lines)
    return auth
