"""The ChaCha20 mask PRG: RFC 8439 vectors, seekability, wrap-around add/subtract."""

from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedagg.errors import SecAggError
from fedagg.secagg import CHUNK_WORDS, add_mask, mask

# RFC 8439 appendix A.1, ChaCha20 block function, key 0 and nonce 0:
# test vector #1 (block counter 0) and #2 (block counter 1), serialized keystream bytes.
A1_TV1 = bytes.fromhex(
    "76b8e0ada0f13d90405d6ae55386bd28bdd219b8a08ded1aa836efcc8b770dc7"
    "da41597c5157488d7724e03fb8d84a376a43b8f41518a11cc387b669b2ee6586"
)
A1_TV2 = bytes.fromhex(
    "9f07e7be5551387a98ba977c732d080dcb0f29a048e3656912c6533e32ee7aed"
    "29b721769ce64e43d57133b074d839d531ed1f28510afb45ace10a1f4b794d6f"
)
# RFC 8439 section 2.3.2: key 00..1f, nonce 000000090000004a00000000, counter 1.
S232 = bytes.fromhex(
    "10f1e7e4d13b5915500fdd1fa32071c4c7d1f4c733c068030422aa9ac3d46c4e"
    "d2826446079faa0914c2d705d98b02a2b5129cd1de164eb9cbd083e8a2503c4e"
)


QUARTER_ROUNDS = [(0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15),
                  (0, 5, 10, 15), (1, 6, 11, 12), (2, 7, 8, 13), (3, 4, 9, 14)]  # fmt: skip


def _rotl(v: int, c: int) -> int:
    return ((v << c) & 0xFFFFFFFF) | (v >> (32 - c))


def reference_block(key: bytes, counter: int, nonce: bytes) -> list[int]:
    """RFC 8439 section 2.3's block function, written out in Python (an independent check)."""
    state = [0x61707865, 0x3320646E, 0x79622D32, 0x6B206574]
    state += [*struct.unpack("<8I", key), counter, *struct.unpack("<3I", nonce)]
    w = state[:]
    for _ in range(10):
        for a, b, c, d in QUARTER_ROUNDS:
            w[a] = (w[a] + w[b]) & 0xFFFFFFFF
            w[d] = _rotl(w[d] ^ w[a], 16)
            w[c] = (w[c] + w[d]) & 0xFFFFFFFF
            w[b] = _rotl(w[b] ^ w[c], 12)
            w[a] = (w[a] + w[b]) & 0xFFFFFFFF
            w[d] = _rotl(w[d] ^ w[a], 8)
            w[c] = (w[c] + w[d]) & 0xFFFFFFFF
            w[b] = _rotl(w[b] ^ w[c], 7)
    return [(x + y) & 0xFFFFFFFF for x, y in zip(w, state, strict=True)]


def test_rfc8439_a1_keystream_vectors() -> None:
    words = mask(bytes(32), 0, 32)
    assert words.dtype == np.uint32
    assert words[:16].astype("<u4").tobytes() == A1_TV1
    assert words[16:].astype("<u4").tobytes() == A1_TV2
    assert mask(bytes(32), 16, 16).astype("<u4").tobytes() == A1_TV2  # seek to block 1
    assert mask(bytes(32), 5, 3).tolist() == list(struct.unpack("<16I", A1_TV1))[5:8]


def test_reference_block_function_matches_rfc_section_2_3_2() -> None:
    block = reference_block(bytes(range(32)), 1, bytes.fromhex("000000090000004a00000000"))
    assert struct.pack("<16I", *block) == S232


@settings(max_examples=20, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32), block=st.integers(0, 2**32 - 1))
def test_any_block_matches_the_reference(seed: bytes, block: int) -> None:
    assert mask(seed, 16 * block, 16).tolist() == reference_block(seed, block, bytes(12))


@settings(max_examples=40, deadline=None)
@given(
    seed=st.binary(min_size=32, max_size=32),
    offset=st.integers(0, 100),
    cuts=st.lists(st.integers(0, 300), max_size=6),
)
def test_chunkwise_masks_equal_the_whole_mask(seed: bytes, offset: int, cuts: list[int]) -> None:
    whole = mask(seed, offset, 300)
    bounds = [0, *sorted(cuts), 300]
    parts = [mask(seed, offset + a, b - a) for a, b in itertools.pairwise(bounds)]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    acc = np.zeros(300, np.uint32)
    for a, b in itertools.pairwise(bounds):
        chunk = acc[a:b]
        add_mask(chunk, seed, offset + a, +1)
    np.testing.assert_array_equal(acc, whole)


def test_add_then_subtract_restores_and_wraps() -> None:
    rng = np.random.default_rng(0)
    n = 2 * CHUNK_WORDS + 37  # several internal chunks, and a ragged end
    x = rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32)
    acc = x.copy()
    add_mask(acc, b"k" * 32, 7, +1)
    expect = ((x.astype(np.uint64) + mask(b"k" * 32, 7, n)) % 2**32).astype(np.uint32)
    np.testing.assert_array_equal(acc, expect)
    add_mask(acc, b"j" * 32, 3, +1)
    add_mask(acc, b"k" * 32, 7, -1)
    add_mask(acc, b"j" * 32, 3, -1)
    np.testing.assert_array_equal(acc, x)


def test_masks_differ_by_seed_and_offset() -> None:
    a, b = mask(bytes(32), 0, 64), mask(b"\x01" + bytes(31), 0, 64)
    assert (a != b).mean() > 0.9
    assert mask(bytes(32), 0, 0).shape == (0,)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(SecAggError, match="32 bytes"):
        mask(bytes(16), 0, 4)
    with pytest.raises(SecAggError, match="offset must be an integer >= 0"):
        mask(bytes(32), -1, 4)
    with pytest.raises(SecAggError, match="count must be"):
        mask(bytes(32), 0, -4)
    with pytest.raises(SecAggError, match="exceed"):
        mask(bytes(32), 16 << 32, 1)
    with pytest.raises(SecAggError, match="1-D uint32"):
        add_mask(np.zeros(4, np.int64), bytes(32), 0, 1)
    with pytest.raises(SecAggError, match="sign must be"):
        add_mask(np.zeros(4, np.uint32), bytes(32), 0, 2)
    with pytest.raises(SecAggError, match="C-contiguous"):
        add_mask(np.zeros(8, np.uint32)[::2], bytes(32), 0, 1)
