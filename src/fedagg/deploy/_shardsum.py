"""The ranges and the at-rest checksum of an upload split across parallel streams (see
:mod:`fedagg.deploy._shards`): the checksum is ``0xFF, S, itemsize`` followed by the
xxh3-128 of the shards' own xxh3-128 digests in shard order (19 bytes; a whole upload's is
the 16 bytes of its xxh3-128), so each stream computes its shard's as its bytes arrive, and a
read-back recomputes it from the file."""

from __future__ import annotations

from typing import Any, BinaryIO

from fedagg.deploy._store import checksum, new_checksum

__all__ = [
    "SHARDED", "combined", "is_sharded", "shard_range", "sharded_checksum",
    "sharded_file_checksum",
]  # fmt: skip

#: The first byte of a sharded upload's checksum.
SHARDED = 0xFF


def shard_range(shard: int, shards: int, nbytes: int, itemsize: int) -> tuple[int, int]:
    """Shard ``shard`` of ``shards`` of an upload of ``nbytes``: (byte offset, byte length)."""
    n = nbytes // itemsize
    lo, hi = shard * n // shards, (shard + 1) * n // shards
    return lo * itemsize, (hi - lo) * itemsize


def combined(checks: list[bytes], itemsize: int) -> bytes:
    """A sharded upload's checksum from its shards' xxh3-128 digests (in shard order)."""
    return bytes([SHARDED, len(checks), itemsize]) + checksum(b"".join(checks))


def is_sharded(check: bytes) -> bool:
    return len(check) == 19 and check[0] == SHARDED


def sharded_checksum(data: Any, stored: bytes) -> bytes:
    """:func:`combined` recomputed from an upload's bytes (any buffer), for the shard count
    and item size ``stored`` (a logged sharded checksum) names."""
    view = memoryview(data).cast("B")
    shards, itemsize = stored[1], stored[2]
    parts = []
    for i in range(shards):
        off, length = shard_range(i, shards, len(view), itemsize)
        parts.append(checksum(view[off : off + length]))
    return combined(parts, itemsize)


def sharded_file_checksum(f: BinaryIO, nbytes: int, stored: bytes) -> bytes:
    """:func:`sharded_checksum` of an open file of ``nbytes``, read in 4 MiB blocks."""
    shards, itemsize = stored[1], stored[2]
    parts = []
    for i in range(shards):
        off, length = shard_range(i, shards, nbytes, itemsize)
        f.seek(off)
        h = new_checksum()
        while length > 0:
            block = f.read(min(length, 1 << 22))
            if not block:
                break
            h.update(block)
            length -= len(block)
        parts.append(h.digest())
    return combined(parts, itemsize)
