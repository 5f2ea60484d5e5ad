"""The messages of a SecAgg+ round (:mod:`fedagg.secagg._protocol`) and its public
parameters, with the byte layouts that are signed or sealed."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedagg.errors import ConfigError, SecAggError
from fedagg.secagg._graph import default_degree, default_threshold, neighbours
from fedagg.secagg._keys import id_set
from fedagg.secagg._shamir import PRIME, SHARE_BYTES

__all__ = [
    "MAX_DEGREE",
    "MAX_ROUND_CLIENTS",
    "AdvertiseKeys",
    "ConsistencyRequest",
    "ConsistencySignature",
    "ForwardedShares",
    "KeyDirectory",
    "MaskedInput",
    "RoundConfig",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskResponse",
    "bundle",
    "key_parts",
    "sign_of",
    "survivor_digest",
    "survivor_parts",
    "unbundle",
]


#: The most clients in one secure round, and the largest degree k (the default k is 48 at
#: 65,536 clients): a round's graph costs O(n k) to build, on the server and on every client,
#: so what a (possibly malicious) server may ask for is bounded.
MAX_ROUND_CLIENTS = 1 << 16
MAX_DEGREE = 128


# -- the round's public parameters --------------------------------------------------------------
@dataclass(frozen=True)
class RoundConfig:
    """What every party of one round agrees on (public). ``clients`` are ints >= 1 (they double
    as Shamir abscissae); ``degree`` (``k``) and ``threshold`` (``t``) default to
    :func:`default_degree` and :func:`default_threshold`; ``graph_seed`` is the server's public
    round seed; ``chunk`` is how many words the server unmasks at a time."""

    round_id: int
    clients: tuple[int, ...]
    dim: int
    graph_seed: bytes
    degree: int = 0
    threshold: int = 0
    chunk: int = 1 << 16
    graph: Mapping[int, frozenset[int]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ids = tuple(sorted(self.clients))
        if len(ids) < 2 or len(set(ids)) != len(ids) or ids[0] < 1:
            raise ConfigError(f"clients must be >= 2 distinct ints >= 1, got {self.clients!r}")
        if self.dim < 1:
            raise ConfigError(f"dim must be >= 1, got {self.dim}")
        if self.chunk < 1:
            raise ConfigError(f"chunk must be >= 1, got {self.chunk}")
        if len(ids) > MAX_ROUND_CLIENTS:
            raise ConfigError(
                f"a secure round holds at most {MAX_ROUND_CLIENTS} clients, got {len(ids)}"
            )
        k = self.degree or default_degree(len(ids))
        if min(k, len(ids) - 1) > MAX_DEGREE:  # checked before the graph is built: O(n k)
            raise ConfigError(f"degree must be at most {MAX_DEGREE}, got {k}")
        g = neighbours(ids, k, self.graph_seed)
        k = min(len(vs) for vs in g.values())
        t = self.threshold or default_threshold(k)
        if not k // 2 < t <= k:
            raise ConfigError(
                f"threshold must be in ({k // 2}, {k}] for degree {k} (a strict majority of the "
                f"neighbours, so no peer's two secrets can both be rebuilt), got {t}"
            )
        object.__setattr__(self, "clients", ids)
        object.__setattr__(self, "degree", k)
        object.__setattr__(self, "threshold", t)
        object.__setattr__(self, "graph", g)


# -- messages ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AdvertiseKeys:
    """Stage 0, client -> server (and forwarded to its neighbours)."""

    sender: int
    c_pk: bytes
    s_pk: bytes
    signature: bytes


@dataclass(frozen=True)
class KeyDirectory:
    """Stage 0, server -> client: its neighbours' signed keys."""

    round_id: int
    keys: Mapping[int, AdvertiseKeys]


@dataclass(frozen=True)
class ShareKeys:
    """Stage 1, client -> server: one sealed share bundle per neighbour (keyed by receiver)."""

    sender: int
    ciphertexts: Mapping[int, bytes]


@dataclass(frozen=True)
class ForwardedShares:
    """Stage 1, server -> client: the bundles addressed to it (keyed by sender)."""

    round_id: int
    ciphertexts: Mapping[int, bytes]


@dataclass(frozen=True)
class MaskedInput:
    """Stage 2, client -> server: ``y_u`` (uint32)."""

    sender: int
    values: np.ndarray[Any, np.dtype[np.uint32]]


@dataclass(frozen=True)
class ConsistencyRequest:
    """Stage 3, server -> client: the survivor set (those whose masked input is folded)."""

    round_id: int
    survivors: frozenset[int]


@dataclass(frozen=True)
class ConsistencySignature:
    """Stage 3, client -> server: its signature over (round, survivors)."""

    sender: int
    signature: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 4, server -> client."""

    round_id: int
    survivors: frozenset[int]
    dropped: frozenset[int]
    signatures: Mapping[int, bytes]


@dataclass(frozen=True)
class UnmaskResponse:
    """Stage 4, client -> server: ``b`` shares of survivors, ``s`` shares of dropped peers."""

    sender: int
    b_shares: Mapping[int, int]
    s_shares: Mapping[int, int]


def key_parts(round_id: int, sender: int, c_pk: bytes, s_pk: bytes) -> tuple[Any, ...]:
    return (b"keys", round_id, sender, c_pk, s_pk)


def survivor_digest(survivors: frozenset[int]) -> bytes:
    """SHA-256 of the survivor set's canonical encoding (computed once per set: O(n))."""
    return hashlib.sha256(id_set(survivors)).digest()


def survivor_parts(round_id: int, digest: bytes, c_pk: bytes, s_pk: bytes) -> tuple[Any, ...]:
    """What a client signs in the consistency round: the round, the survivor set (its
    :func:`survivor_digest`) and the signer's OWN ephemeral public keys of this session, so a
    signature from another session (even one a server ran under the same round id) never
    verifies against the keys a peer advertised in this one."""
    return (b"survivors-v2", round_id, digest, c_pk, s_pk)


def bundle(sender: int, receiver: int, round_id: int, b: int, s: int) -> bytes:
    head = b"".join(i.to_bytes(8, "big") for i in (sender, receiver, round_id))
    return head + b.to_bytes(SHARE_BYTES, "big") + s.to_bytes(SHARE_BYTES, "big")


def unbundle(raw: bytes, sender: int, receiver: int, round_id: int) -> tuple[int, int]:
    if len(raw) != 24 + 2 * SHARE_BYTES:
        raise SecAggError(f"share bundle from client {sender} has the wrong length")
    head = tuple(int.from_bytes(raw[i : i + 8], "big") for i in (0, 8, 16))
    if head != (sender, receiver, round_id):
        raise SecAggError(f"share bundle from client {sender} names {head}, not itself")
    b = int.from_bytes(raw[24 : 24 + SHARE_BYTES], "big")
    s = int.from_bytes(raw[24 + SHARE_BYTES :], "big")
    if b >= PRIME or s >= PRIME:
        raise SecAggError(f"share bundle from client {sender} holds an out-of-field share")
    return b, s


def sign_of(u: int, v: int) -> int:
    """The sign with which ``u`` adds the pair mask ``PRG(s_uv)``: + below, - above."""
    return 1 if u < v else -1
