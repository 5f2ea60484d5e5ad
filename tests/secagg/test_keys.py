"""Key agreement, share encryption and signatures of SecAgg+ (fedagg.secagg._keys)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st

from fedagg.errors import SecAggError
from fedagg.secagg._keys import (
    KEY_BYTES,
    NONCE_BYTES,
    agree,
    decrypt,
    encrypt,
    fields,
    id_set,
    new_key_pair,
    public_bytes,
    sign,
    verify,
)


def test_both_ends_derive_the_same_key_bound_to_purpose_round_and_pair() -> None:
    a, b, c = new_key_pair(), new_key_pair(), new_key_pair()
    k_ab = agree(a, public_bytes(b), purpose=b"share", round_id=3, a=1, b=2)
    assert len(k_ab) == KEY_BYTES
    assert k_ab == agree(b, public_bytes(a), purpose=b"share", round_id=3, a=2, b=1)
    others = {
        agree(a, public_bytes(b), purpose=b"mask", round_id=3, a=1, b=2),
        agree(a, public_bytes(b), purpose=b"share", round_id=4, a=1, b=2),
        agree(a, public_bytes(b), purpose=b"share", round_id=3, a=1, b=5),
        agree(a, public_bytes(c), purpose=b"share", round_id=3, a=1, b=2),
    }
    assert k_ab not in others and len(others) == 4


def test_bad_public_keys_and_self_agreement_raise() -> None:
    a = new_key_pair()
    with pytest.raises(SecAggError, match="bad X25519 public key"):
        agree(a, b"\x00" * 32, purpose=b"mask", round_id=0, a=1, b=2)  # low-order point
    with pytest.raises(SecAggError, match="bad X25519 public key"):
        agree(a, b"\x01" * 31, purpose=b"mask", round_id=0, a=1, b=2)
    with pytest.raises(SecAggError, match="with itself"):
        agree(a, public_bytes(new_key_pair()), purpose=b"mask", round_id=0, a=1, b=1)


def test_encryption_round_trips_and_binds_sender_receiver_round() -> None:
    key = bytes(range(32))
    ct = encrypt(key, b"shares", sender=1, receiver=2, round_id=9)
    assert len(ct) == NONCE_BYTES + len(b"shares") + 16
    assert decrypt(key, ct, sender=1, receiver=2, round_id=9) == b"shares"
    assert encrypt(key, b"shares", sender=1, receiver=2, round_id=9) != ct  # fresh nonce
    for kw in (
        {"sender": 3, "receiver": 2, "round_id": 9},
        {"sender": 2, "receiver": 1, "round_id": 9},
        {"sender": 1, "receiver": 2, "round_id": 10},
    ):
        with pytest.raises(SecAggError, match="fails authentication"):
            decrypt(key, ct, **kw)
    with pytest.raises(SecAggError, match="fails authentication"):
        decrypt(bytes(32), ct, sender=1, receiver=2, round_id=9)
    with pytest.raises(SecAggError, match="truncated"):
        decrypt(key, ct[:27], sender=1, receiver=2, round_id=9)


@given(st.binary(max_size=64), st.integers(0, 1000), st.integers(1, 255))
def test_any_flipped_bit_is_refused(msg: bytes, pos: int, flip: int) -> None:
    key = b"k" * 32
    ct = bytearray(encrypt(key, msg, sender=1, receiver=2, round_id=0))
    ct[pos % len(ct)] ^= flip
    with pytest.raises(SecAggError):
        decrypt(key, bytes(ct), sender=1, receiver=2, round_id=0)


def test_signatures_verify_and_bind_every_part() -> None:
    ident = Ed25519PrivateKey.generate()
    pk = ident.public_key()
    sig = sign(ident, b"keys", 3, 1, b"c" * 32, b"s" * 32)
    verify(pk, sig, b"keys", 3, 1, b"c" * 32, b"s" * 32)
    with pytest.raises(SecAggError, match="bad Ed25519 signature on client 1's keys"):
        verify(pk, sig, b"keys", 3, 1, b"c" * 32, b"S" * 32, who="client 1's keys")
    with pytest.raises(SecAggError, match="bad Ed25519 signature"):
        verify(pk, sig, b"keys", 4, 1, b"c" * 32, b"s" * 32)
    with pytest.raises(SecAggError, match="bad Ed25519 signature"):
        verify(Ed25519PrivateKey.generate().public_key(), sig, b"keys", 3, 1, b"c" * 32, b"s" * 32)
    assert len(public_bytes(pk)) == 32


@given(
    st.lists(
        st.one_of(st.integers(-(2**70), 2**70), st.binary(max_size=8), st.text(max_size=4)),
        max_size=4,
    ),
    st.lists(
        st.one_of(st.integers(-(2**70), 2**70), st.binary(max_size=8), st.text(max_size=4)),
        max_size=4,
    ),
)
def test_fields_is_injective(a: list[int | bytes | str], b: list[int | bytes | str]) -> None:
    same = [(type(x), x) for x in a] == [(type(y), y) for y in b]
    assert (fields(*a) == fields(*b)) == same


def test_fields_known_answer_and_id_sets_ignore_order() -> None:
    assert fields(1, b"ab", "c") == b"i\x00\x00\x00\x01\x01b\x00\x00\x00\x02abs\x00\x00\x00\x01c"
    assert fields(b"\x01\x02") != fields(b"\x01", b"\x02")
    assert id_set({3, 1, 2}) == id_set([1, 2, 3]) != id_set([1, 2])
    with pytest.raises(TypeError):
        fields(True)
