"""The byte encodings of every SecAgg+ message: exact round trips, one encoding per message,
and truncated, trailing, garbage or non-canonical bytes refused with SecAggError only."""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedagg.errors import SecAggError
from fedagg.secagg import (
    CIPHERTEXT_BYTES,
    PRIME,
    ConsistencyRequest,
    MaskedInput,
    RoundParams,
    SecureClient,
    ServerSession,
    UnmaskResponse,
    decode_message,
    decode_reply,
    decode_request,
    encode_message,
    message_stage,
)


def round_messages(n: int = 5, d: int = 12, drop: int = 2) -> list[Any]:
    """Every message of one real round (client ``drop`` never uploads), in protocol order."""
    ids = tuple(range(1, n + 1))
    params = RoundParams.make(9, ids, d, b"graph", clip=3.0, rotation=7, max_weight=5.0)
    keys = {u: Ed25519PrivateKey.generate() for u in ids}
    pub = {u: k.public_key() for u, k in keys.items()}
    clients = {u: SecureClient(params, u, keys[u], pub) for u in ids}
    server = ServerSession(params.config(), pub)
    out: list[Any] = [params]
    for u in ids:
        adv = clients[u].handle(params)
        out.append(adv)
        server.receive_advertise(adv)
    for u, m in server.close_advertise().items():
        out.append(m)
        reply = clients[u].handle(m)
        out.append(reply)
        server.receive_shares(reply)
    rng = np.random.default_rng(0)
    for u, m in server.close_shares().items():
        out.append(m)
        clients[u].handle(m)
        if u != drop:
            y = clients[u].masked(rng.standard_normal(d), 2.0, rng)
            out.append(MaskedInput(u, y))
            server.receive_masked(MaskedInput(u, y))
    for u, m in server.close_masked().items():
        out.append(m)
        reply = clients[u].handle(m)
        out.append(reply)
        server.receive_signature(reply)
    for u, m in server.close_consistency().items():
        out.append(m)
        reply = clients[u].handle(m)
        out.append(reply)
        server.receive_unmask(reply)
    server.finish()
    return out


@pytest.fixture(scope="module")
def messages() -> list[Any]:
    return round_messages()


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, MaskedInput):
        return a.sender == b.sender and np.array_equal(a.values, b.values)
    return bool(a == b)


def test_every_kind_round_trips_to_the_same_bytes(messages: list[Any]) -> None:
    kinds = set()
    for msg in messages:
        stage, is_request = message_stage(msg)
        raw = encode_message(msg)
        back = decode_message(stage, raw)
        assert type(back) is type(msg) and _same(back, msg)
        assert encode_message(back) == raw
        (decode_request if is_request else decode_reply)(stage, raw)
        kinds.add(raw[4])
    assert kinds == set(range(1, 11))
    params = messages[0]
    assert RoundParams.from_bytes(params.to_bytes()) == params
    assert params.config() == RoundParams.from_bytes(params.to_bytes()).config()


def test_truncated_and_trailing_bytes_are_refused(messages: list[Any]) -> None:
    seen = set()
    for msg in messages:
        raw = encode_message(msg)
        if raw[4] in seen:
            continue
        seen.add(raw[4])
        stage = message_stage(msg)[0]
        for cut in range(len(raw)):
            with pytest.raises(SecAggError):
                decode_message(stage, raw[:cut])
        with pytest.raises(SecAggError):
            decode_message(stage, raw + b"\0")


def test_garbage_bytes_raise_only_secagg_errors(messages: list[Any]) -> None:
    rng = np.random.default_rng(1)
    for msg in messages[:12]:
        raw = bytearray(encode_message(msg))
        stage = message_stage(msg)[0]
        for _ in range(60):
            bad = bytearray(raw)
            for i in rng.integers(5, len(bad), size=3):
                bad[i] = int(rng.integers(256))
            # refused or parsed; anything else (a ValueError, an IndexError...) fails the test
            with contextlib.suppress(SecAggError):
                decode_message(stage, bytes(bad))
        for size in (0, 3, 5, 40, 300):
            junk = bytes(raw[:5]) + rng.bytes(size)
            with contextlib.suppress(SecAggError):
                decode_message(stage, junk)


def test_headers_stages_and_directions_are_checked(messages: list[Any]) -> None:
    params, adv = messages[0], messages[1]
    raw = encode_message(params)
    for bad in (b"", b"XSA\x01\x01" + raw[5:], raw[:3] + b"\x02" + raw[4:], raw[:4] + b"\x63"):
        with pytest.raises(SecAggError):
            decode_message(0, bad)
    with pytest.raises(SecAggError, match="stage 1 was expected"):
        decode_message(1, raw)
    with pytest.raises(SecAggError, match="reply where a request"):
        decode_request(0, encode_message(adv))
    with pytest.raises(SecAggError, match="request where a reply"):
        decode_reply(0, raw)
    with pytest.raises(SecAggError):
        encode_message("not a message")
    with pytest.raises(SecAggError):
        decode_message(0, "text")  # type: ignore[arg-type]


def test_non_canonical_or_out_of_range_fields_are_refused() -> None:
    req = encode_message(ConsistencyRequest(3, frozenset({1, 2})))
    swapped = req[:-8] + req[-4:] + req[-8:-4]  # ids 2, 1: not increasing
    with pytest.raises(SecAggError, match="strictly increasing"):
        decode_message(3, swapped)
    resp = encode_message(UnmaskResponse(4, {1: 5}, {}))
    body = bytearray(resp)
    at = 5 + 4 + 4 + 4  # sender, count, id: the share's first byte
    body[at : at + 66] = PRIME.to_bytes(66, "big")
    with pytest.raises(SecAggError, match="outside the field"):
        decode_message(4, bytes(body))
    huge = req[:13] + (2**32 - 1).to_bytes(4, "big")  # a count far beyond the bytes left
    with pytest.raises(SecAggError, match="do not fit"):
        decode_message(3, huge)
    with pytest.raises(SecAggError):
        encode_message(UnmaskResponse(4, {1: PRIME}, {}))
    with pytest.raises(SecAggError):
        encode_message(MaskedInput(1, np.zeros(3, np.int64)))
    assert CIPHERTEXT_BYTES == 12 + 24 + 2 * 66 + 16


def test_round_params_are_validated_on_decode() -> None:
    p = RoundParams.make(1, (1, 2, 3), 10, b"s", clip=2.0)
    raw = p.to_bytes()
    for field_, value in (("dim", p.dim + 1), ("threshold", 1), ("degree", 1)):
        head = bytearray(raw)
        if field_ == "dim":
            head[8:16] = value.to_bytes(8, "big")
        elif field_ == "degree":
            head[24:28] = value.to_bytes(4, "big")
        else:
            head[28:32] = value.to_bytes(4, "big")
        with pytest.raises(SecAggError, match="bad round parameters"):
            RoundParams.from_bytes(bytes(head))
    with pytest.raises(SecAggError):
        RoundParams.from_bytes(raw[:-2])
