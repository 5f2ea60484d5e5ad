"""The signed upload digest: sha256 (hashlib) or BLAKE3 (the ``blake3`` package), both
32 bytes, both updated chunk by chunk as the bytes stream (each releases the GIL on large
buffers, so the hashing overlaps the network)."""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

from fedagg.errors import ConfigError

__all__ = ["ALGORITHMS", "Hasher", "digest_of", "new_digest"]

#: The digest algorithms an upload may be signed with.
ALGORITHMS = ("sha256", "blake3")


class Hasher(Protocol):
    def update(self, data: Any, /) -> Any: ...

    def digest(self) -> bytes: ...


def new_digest(algorithm: str) -> Hasher:
    """A fresh hasher for ``algorithm`` (``""`` means sha256: a peer of before the choice)."""
    if algorithm in ("", "sha256"):
        return hashlib.sha256()
    if algorithm == "blake3":
        try:
            from blake3 import blake3
        except ImportError:  # pragma: no cover - the deploy extra installs it
            raise ConfigError(
                "digest_algorithm = 'blake3' needs the blake3 package "
                "(pip install 'fedagg[deploy]')"
            ) from None
        h: Hasher = blake3()
        return h
    raise ConfigError(f"unknown digest algorithm {algorithm!r} (one of {', '.join(ALGORITHMS)})")


def digest_of(algorithm: str, data: Any) -> bytes:
    """The digest of ``data`` (a bytes-like object) under ``algorithm``."""
    h = new_digest(algorithm)
    h.update(data)
    return h.digest()
