"""The mask PRG: ChaCha20 (RFC 8439) keystream as little-endian uint32 words, seekable.

``mask(seed, offset, count)`` is words ``[offset, offset + count)`` of the ChaCha20 keystream
keyed by the 32-byte ``seed`` with nonce 0. ``cryptography``'s ChaCha20 takes a 16-byte nonce
whose first 4 bytes are the little-endian initial block counter, so a mask starts at block
``offset // 16`` (16 words of 64 bytes per block) and drops the first ``offset % 16`` words.
Any chunking of a range therefore gives exactly the words of the whole range, and a server can
stream masks chunk by chunk in O(chunk) memory. The counter is 32 bits: a seed covers at most
``2**32`` blocks (:data:`MAX_WORDS`, 2**36 words).

``add_mask(acc, seed, offset, sign)`` adds (``+1``) or subtracts (``-1``) the mask in place,
modulo 2**32, generating the keystream in blocks of :data:`CHUNK_WORDS` (cache-sized).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from fedagg.errors import SecAggError

__all__ = ["CHUNK_WORDS", "MAX_WORDS", "add_mask", "mask"]

#: Words per ChaCha20 block.
_BLOCK_WORDS = 16
#: Keystream words one seed covers (a 32-bit block counter).
MAX_WORDS = _BLOCK_WORDS << 32
#: Words generated at a time by :func:`add_mask` (256 KiB).
CHUNK_WORDS = 1 << 16


def _check(seed: bytes, offset: int, count: int) -> None:
    if not isinstance(seed, bytes | bytearray) or len(seed) != 32:
        raise SecAggError("a mask seed must be 32 bytes")
    for name, v in (("offset", offset), ("count", count)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 0:
            raise SecAggError(f"mask {name} must be an integer >= 0, got {v!r}")
    if offset + count > MAX_WORDS:
        raise SecAggError(f"mask words [{offset}, {offset + count}) exceed {MAX_WORDS}")


def _encryptor(seed: bytes, offset: int) -> Any:
    nonce = (offset // _BLOCK_WORDS).to_bytes(4, "little") + bytes(12)
    return Cipher(algorithms.ChaCha20(bytes(seed), nonce), mode=None).encryptor()


_ZEROS = memoryview(bytes(4 * CHUNK_WORDS))


def _fill(enc: Any, out: np.ndarray) -> None:
    """Write the next ``out.size`` keystream words into ``out`` (uint32, contiguous), a chunk
    at a time (the keystream is ChaCha20 applied to zeros)."""
    view = out.data.cast("B")
    for start in range(0, view.nbytes, _ZEROS.nbytes):
        part = view[start : start + _ZEROS.nbytes]
        enc.update_into(_ZEROS[: part.nbytes], part)


def mask(seed: bytes, offset: int, count: int) -> np.ndarray:
    """Keystream words ``[offset, offset + count)`` of ChaCha20(seed, nonce 0) as uint32."""
    _check(seed, offset, count)
    offset, count = int(offset), int(count)
    skip = offset % _BLOCK_WORDS
    out = np.empty(skip + count, dtype="<u4")
    if out.size:
        _fill(_encryptor(seed, offset), out)
    return out[skip:].astype(np.uint32, copy=False)


def add_mask(acc: np.ndarray, seed: bytes, offset: int, sign: int) -> None:
    """``acc += sign * mask(seed, offset, acc.size)`` in place, modulo 2**32.

    ``acc`` must be a writable, C-contiguous 1-D uint32 array; ``sign`` is ``+1`` or ``-1``.
    """
    if not isinstance(acc, np.ndarray) or acc.dtype != np.uint32 or acc.ndim != 1:
        raise SecAggError("the accumulator must be a 1-D uint32 array")
    if not (acc.flags.c_contiguous and acc.flags.writeable):
        raise SecAggError("the accumulator must be writable and C-contiguous")
    if sign not in (1, -1) or isinstance(sign, bool):
        raise SecAggError(f"sign must be +1 or -1, got {sign!r}")
    _check(seed, offset, acc.size)
    offset = int(offset)
    skip = offset % _BLOCK_WORDS
    enc = _encryptor(seed, offset)
    op = np.add if sign == 1 else np.subtract
    buf = np.empty(min(CHUNK_WORDS, skip + acc.size), dtype="<u4")
    if skip:
        _fill(enc, buf[:skip])
    for start in range(0, acc.size, CHUNK_WORDS):
        part = acc[start : start + CHUNK_WORDS]
        words = buf[: part.size]
        _fill(enc, words)
        op(part, words, out=part)
