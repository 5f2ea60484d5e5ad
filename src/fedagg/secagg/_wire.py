"""The byte encodings of every SecAgg+ message (no pickle), for a transport to carry.

``encode_message(msg)`` writes one of the 10 message kinds (a request and a reply per stage;
see the table) as ``b"FSA" | version 1 | kind | body``, every integer big-endian and every
mapping or set in increasing id order, so a message has exactly one encoding (a client
compares a re-sent request to the one it answered byte for byte). ``decode_message(stage,
raw)`` reads it back and checks everything a parser can: the magic, version and kind (one of
``stage``'s), each length (keys 32 bytes, signatures 64, sealed share bundles
:data:`CIPHERTEXT_BYTES`, shares 66 and below the Shamir prime), counts against the bytes
that remain (before anything is allocated), ids strictly increasing, no trailing bytes. Any
fault raises :class:`~fedagg.errors.SecAggError`; what the protocol checks (signatures,
thresholds, the graph) stays with :class:`~fedagg.secagg.ClientSession` and
:class:`~fedagg.secagg.ServerSession`.

=====  ================================  ====================================
stage  request (server -> client)        reply (client -> server)
=====  ================================  ====================================
0      :class:`RoundParams`              :class:`AdvertiseKeys`
1      :class:`KeyDirectory`             :class:`ShareKeys`
2      :class:`ForwardedShares`          :class:`MaskedInput` (uint32, 4 B/word)
3      :class:`ConsistencyRequest`       :class:`ConsistencySignature`
4      :class:`UnmaskRequest`            :class:`UnmaskResponse`
=====  ================================  ====================================
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from fedagg.errors import SecAggError
from fedagg.secagg._keys import KEY_BYTES, NONCE_BYTES
from fedagg.secagg._messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    ForwardedShares,
    KeyDirectory,
    MaskedInput,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedagg.secagg._params import MAX_CLIENTS, RoundParams
from fedagg.secagg._prg import MAX_WORDS
from fedagg.secagg._shamir import PRIME, SHARE_BYTES

__all__ = [
    "CIPHERTEXT_BYTES",
    "MESSAGE_TYPES",
    "WIRE_VERSION",
    "decode_message",
    "decode_reply",
    "decode_request",
    "encode_message",
    "message_stage",
]

#: The wire format's version (the 4th byte of every message).
WIRE_VERSION = 1
_MAGIC = b"FSA"
#: A sealed share bundle: nonce, (sender, receiver, round, b share, s share), Poly1305 tag.
CIPHERTEXT_BYTES = NONCE_BYTES + 24 + 2 * SHARE_BYTES + 16
_SIG = 64

#: kind byte -> (stage, is a request, type)
MESSAGE_TYPES: dict[int, tuple[int, bool, type[Any]]] = {
    1: (0, True, RoundParams),
    2: (0, False, AdvertiseKeys),
    3: (1, True, KeyDirectory),
    4: (1, False, ShareKeys),
    5: (2, True, ForwardedShares),
    6: (2, False, MaskedInput),
    7: (3, True, ConsistencyRequest),
    8: (3, False, ConsistencySignature),
    9: (4, True, UnmaskRequest),
    10: (4, False, UnmaskResponse),
}
_KIND = {t: k for k, (_, _, t) in MESSAGE_TYPES.items()}


def message_stage(msg: Any) -> tuple[int, bool]:
    """``(stage, is_request)`` of a message object."""
    k = _KIND.get(type(msg))
    if k is None:
        raise SecAggError(f"not a secure aggregation message: {type(msg).__name__}")
    stage, req, _ = MESSAGE_TYPES[k]
    return stage, req


# -- writing ----------------------------------------------------------------------------------
def _u32(v: int) -> bytes:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_CLIENTS:
        raise SecAggError(f"{v!r} does not fit an unsigned 32-bit field")
    return v.to_bytes(4, "big")


def _u64(v: int) -> bytes:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << 64:
        raise SecAggError(f"{v!r} does not fit an unsigned 64-bit field")
    return v.to_bytes(8, "big")


def _fixed(b: bytes, n: int, what: str) -> bytes:
    if not isinstance(b, bytes) or len(b) != n:
        raise SecAggError(f"{what} must be {n} bytes")
    return b


def _ids(ids: Iterable[int]) -> bytes:
    s = sorted(ids)
    if s and (any(type(i) is not int for i in s) or s[0] < 0 or s[-1] > MAX_CLIENTS):
        raise SecAggError("client ids must be integers that fit an unsigned 32-bit field")
    return _u32(len(s)) + np.array(s, dtype=">u4").tobytes()


def _entries(m: Mapping[int, Any], body: Callable[[Any], bytes]) -> bytes:
    return _u32(len(m)) + b"".join(_u32(k) + body(m[k]) for k in sorted(m))


def _share(y: int) -> bytes:
    if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y < PRIME:
        raise SecAggError("a share must be an integer below the Shamir prime")
    return y.to_bytes(SHARE_BYTES, "big")


def _adv_body(a: AdvertiseKeys) -> bytes:
    return (
        _fixed(a.c_pk, KEY_BYTES, "a public key")
        + _fixed(a.s_pk, KEY_BYTES, "a public key")
        + _fixed(a.signature, _SIG, "a signature")
    )


def _ct(c: bytes) -> bytes:
    return _fixed(c, CIPHERTEXT_BYTES, "a sealed share bundle")


def encode_message(msg: Any) -> bytes:
    """The bytes of a stage request or reply (module docs)."""
    k = _KIND.get(type(msg))
    if k is None:
        raise SecAggError(f"not a secure aggregation message: {type(msg).__name__}")
    head = _MAGIC + bytes((WIRE_VERSION, k))
    if isinstance(msg, RoundParams):
        body = msg.to_bytes()
    elif isinstance(msg, AdvertiseKeys):
        body = _u32(msg.sender) + _adv_body(msg)
    elif isinstance(msg, KeyDirectory):
        for v, a in msg.keys.items():
            if a.sender != v:
                raise SecAggError(f"key directory entry {v} holds client {a.sender}'s keys")
        body = _u64(msg.round_id) + _entries(msg.keys, _adv_body)
    elif isinstance(msg, ShareKeys):
        body = _u32(msg.sender) + _entries(msg.ciphertexts, _ct)
    elif isinstance(msg, ForwardedShares):
        body = _u64(msg.round_id) + _entries(msg.ciphertexts, _ct)
    elif isinstance(msg, MaskedInput):
        arr = np.asarray(msg.values)
        if arr.dtype != np.uint32 or arr.ndim != 1:
            raise SecAggError("a masked input must be a 1-D uint32 array")
        body = _u32(msg.sender) + _u64(arr.size) + arr.astype("<u4", copy=False).tobytes()
    elif isinstance(msg, ConsistencyRequest):
        body = _u64(msg.round_id) + _ids(msg.survivors)
    elif isinstance(msg, ConsistencySignature):
        body = _u32(msg.sender) + _fixed(msg.signature, _SIG, "a signature")
    elif isinstance(msg, UnmaskRequest):
        sigs = _entries(msg.signatures, lambda s: _fixed(s, _SIG, "a signature"))
        body = _u64(msg.round_id) + _ids(msg.survivors) + _ids(msg.dropped) + sigs
    else:
        assert isinstance(msg, UnmaskResponse)
        body = _u32(msg.sender) + _entries(msg.b_shares, _share) + _entries(msg.s_shares, _share)
    return head + body


# -- reading ----------------------------------------------------------------------------------
class _Reader:
    def __init__(self, raw: bytes, what: str) -> None:
        self.raw = raw
        self.o = 0
        self.what = what

    def left(self) -> int:
        return len(self.raw) - self.o

    def take(self, n: int) -> bytes:
        if n > self.left():
            raise SecAggError(f"{self.what} is truncated")
        b = self.raw[self.o : self.o + n]
        self.o += n
        return b

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def u64(self) -> int:
        return int.from_bytes(self.take(8), "big")

    def count(self, each: int) -> int:
        n = self.u32()
        if n * each > self.left():
            raise SecAggError(f"{self.what}: {n} entries do not fit the {self.left()} bytes left")
        return n

    def ids(self) -> frozenset[int]:
        n = self.count(4)
        out = np.frombuffer(self.take(4 * n), dtype=">u4").tolist()
        self._increasing(out)
        return frozenset(out)

    def entries(self, each: int, body: Callable[[], Any]) -> dict[int, Any]:
        n = self.count(4 + each)
        keys: list[int] = []
        out: dict[int, Any] = {}
        for _ in range(n):
            k = self.u32()
            keys.append(k)
            out[k] = body()
        self._increasing(keys)
        return out

    def _increasing(self, ids: list[int]) -> None:
        if any(a >= b for a, b in itertools.pairwise(ids)) or (ids and ids[0] < 1):
            raise SecAggError(f"{self.what}: client ids must be >= 1 and strictly increasing")

    def share(self) -> int:
        y = int.from_bytes(self.take(SHARE_BYTES), "big")
        if y >= PRIME:
            raise SecAggError(f"{self.what} holds a share outside the field")
        return y

    def done(self) -> None:
        if self.left():
            raise SecAggError(f"{self.what} has {self.left()} trailing bytes")


_ADV = 2 * KEY_BYTES + _SIG


def decode_message(stage: int, raw: bytes) -> Any:
    """The request or reply of ``stage`` that ``raw`` encodes; anything else (another stage's,
    truncated, trailing or malformed bytes) raises :class:`SecAggError`."""
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise SecAggError("a secure aggregation message must be bytes")
    raw = bytes(raw)
    if len(raw) < 5 or raw[:3] != _MAGIC:
        raise SecAggError("not a secure aggregation message (bad magic)")
    if raw[3] != WIRE_VERSION:
        raise SecAggError(f"secure aggregation wire version {raw[3]}, expected {WIRE_VERSION}")
    kind = MESSAGE_TYPES.get(raw[4])
    if kind is None:
        raise SecAggError(f"unknown secure aggregation message kind {raw[4]}")
    st, _, typ = kind
    if st != stage:
        raise SecAggError(f"a stage-{st} {typ.__name__} where stage {stage} was expected")
    r = _Reader(raw[5:], typ.__name__)
    msg: Any
    if typ is RoundParams:
        return RoundParams.from_bytes(raw[5:])
    if typ is AdvertiseKeys:
        sender = r.u32()
        msg = AdvertiseKeys(sender, r.take(KEY_BYTES), r.take(KEY_BYTES), r.take(_SIG))
    elif typ is KeyDirectory:
        rid = r.u64()
        keys = r.entries(_ADV, lambda: (r.take(KEY_BYTES), r.take(KEY_BYTES), r.take(_SIG)))
        msg = KeyDirectory(rid, {v: AdvertiseKeys(v, *p) for v, p in keys.items()})
    elif typ is ShareKeys:
        sender = r.u32()
        msg = ShareKeys(sender, r.entries(CIPHERTEXT_BYTES, lambda: r.take(CIPHERTEXT_BYTES)))
    elif typ is ForwardedShares:
        rid = r.u64()
        msg = ForwardedShares(rid, r.entries(CIPHERTEXT_BYTES, lambda: r.take(CIPHERTEXT_BYTES)))
    elif typ is MaskedInput:
        sender = r.u32()
        n = r.u64()
        if n > MAX_WORDS or 4 * n != r.left():
            raise SecAggError(f"MaskedInput: {n} words do not match the {r.left()} bytes left")
        values = np.frombuffer(r.take(4 * n), dtype="<u4").astype(np.uint32)
        msg = MaskedInput(sender, values)
    elif typ is ConsistencyRequest:
        rid = r.u64()
        msg = ConsistencyRequest(rid, r.ids())
    elif typ is ConsistencySignature:
        msg = ConsistencySignature(r.u32(), r.take(_SIG))
    elif typ is UnmaskRequest:
        rid = r.u64()
        survivors, dropped = r.ids(), r.ids()
        msg = UnmaskRequest(rid, survivors, dropped, r.entries(_SIG, lambda: r.take(_SIG)))
    else:
        sender = r.u32()
        b = r.entries(SHARE_BYTES, r.share)
        msg = UnmaskResponse(sender, b, r.entries(SHARE_BYTES, r.share))
    r.done()
    return msg


def decode_request(stage: int, raw: bytes) -> Any:
    """:func:`decode_message`, refusing a reply."""
    msg = decode_message(stage, raw)
    if not message_stage(msg)[1]:
        raise SecAggError(f"a stage-{stage} reply where a request was expected")
    return msg


def decode_reply(stage: int, raw: bytes) -> Any:
    """:func:`decode_message`, refusing a request."""
    msg = decode_message(stage, raw)
    if message_stage(msg)[1]:
        raise SecAggError(f"a stage-{stage} request where a reply was expected")
    return msg
