"""The wire's hand-written chunk codec, fuzzed against protobuf, and client authentication.

No processes, no network: :func:`fedagg.deploy._wire.decode_chunk` is checked against the
generated protobuf classes (and a "raw view" of the same messages that keeps every occurrence
of a length-delimited field), and :mod:`fedagg.deploy._auth` / :mod:`fedagg.deploy._certs`
against ``cryptography``.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import stat
import struct
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, unknown_fields
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedagg.deploy import ClientKey, Keyring, make_certs, make_keys
from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._auth import (
    AUTH_FAILED,
    AuthError,
    NonceCache,
    RateLimiter,
    body,
    signing_bytes,
)
from fedagg.deploy._wire import (
    MODEL_CHUNK,
    UPLOAD_CHUNK,
    WireError,
    decode_chunk,
    encode_chunk,
    encode_varint,
)
from fedagg.errors import ConfigError

FUZZ = settings(
    max_examples=200, derandomize=True, database=None, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip
U64 = st.integers(0, 2**64 - 1)
MAX_FIELD = 2**29 - 1


# -- protobuf's view of the same bytes -----------------------------------------------------------
def _raw_upload_class() -> Any:
    """UploadChunk with its header and trailer as ``repeated bytes``: wire-compatible, but it
    keeps every occurrence of fields 1 and 4, unparsed (``decode_chunk`` returns the last
    one, unparsed)."""
    f = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(
        name="fedagg_test_raw.proto", package="fedagg_test", syntax="proto3"
    )
    m = fdp.message_type.add(name="RawUploadChunk")
    m.field.add(name="header", number=1, type=f.TYPE_BYTES, label=f.LABEL_REPEATED)
    m.field.add(name="offset", number=2, type=f.TYPE_UINT64, label=f.LABEL_OPTIONAL)
    m.field.add(name="data", number=3, type=f.TYPE_BYTES, label=f.LABEL_OPTIONAL)
    m.field.add(name="trailer", number=4, type=f.TYPE_BYTES, label=f.LABEL_REPEATED)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("fedagg_test.RawUploadChunk"))


RawUploadChunk = _raw_upload_class()
KNOWN = {id(MODEL_CHUNK): {1, 2, 3, 4}, id(UPLOAD_CHUNK): {1, 2, 3, 4}}
#: UploadChunk's submessages: field number -> (name, message class)
SUBS = {1: ("header", pb.UploadHeader), 4: ("trailer", pb.UploadTrailer)}
SCHEMAS = pytest.mark.parametrize("schema", [MODEL_CHUNK, UPLOAD_CHUNK], ids=["model", "upload"])


def _key(field: int, wire: int, pad: int = 0) -> bytes:
    return _padded(encode_varint(field << 3 | wire), pad)


def _padded(varint: bytes, pad: int) -> bytes:
    """The same varint in ``pad`` more bytes (non-minimal, as protobuf allows)."""
    if not pad:
        return varint
    return varint[:-1] + bytes([varint[-1] | 0x80]) + b"\x80" * (pad - 1) + b"\x00"


def _field(field: int, wire: int, payload: Any, key_pad: int = 0, val_pad: int = 0) -> bytes:
    """One raw protobuf field: ``payload`` is an int (varint, fixed64, fixed32) or bytes."""
    k = _key(field, wire, key_pad)
    if wire == 0:
        return k + _padded(encode_varint(payload), val_pad)
    if wire == 1:
        return k + struct.pack("<Q", payload % 2**64)
    if wire == 5:
        return k + struct.pack("<I", payload % 2**32)
    return k + _padded(encode_varint(len(payload)), val_pad) + payload


def check_against_protobuf(raw: bytes, schema: Any) -> str:
    """``decode_chunk(raw)`` must agree with protobuf's parse of ``raw``: refuse (WireError,
    nothing else) what protobuf refuses, and decode what it accepts to the same values; it may
    be stricter only where protobuf keeps oddities as unknown fields (groups, a known field
    with another wire type) or silently truncates a 10-byte varint. Returns what happened."""
    upload = schema is UPLOAD_CHUNK
    try:
        ref = (RawUploadChunk if upload else pb.ModelChunk).FromString(raw)
    except DecodeError:
        ref = None
    try:
        got = decode_chunk(raw, schema)
    except WireError as e:
        if ref is None:
            return "both refuse"
        odd = [(u.field_number, u.wire_type) for u in unknown_fields.UnknownFieldSet(ref)]
        groups = any(w == 3 for _, w in odd)
        retyped = any(f in KNOWN[id(schema)] for f, _ in odd)
        assert groups or retyped or "overflows 64 bits" in str(e), (raw.hex(), str(e), odd)
        return "stricter"
    assert ref is not None, f"protobuf refuses {raw.hex()}, decode_chunk accepted it: {got}"
    assert bytes(got.data) == ref.data
    if not upload:
        assert got.subs == {} and got.header is None
        assert set(got.ints) <= {1, 2, 4}
        assert [got.ints.get(f, 0) for f in (1, 2, 4)] == [ref.version, ref.offset, ref.total]
        return "both decode"
    assert set(got.ints) <= {2}
    assert got.ints.get(2, 0) == ref.offset
    assert set(got.subs) <= set(SUBS)
    assert got.header is got.subs.get(1) and got.trailer is got.subs.get(4)
    result = "both decode"
    for field, (name, cls) in SUBS.items():
        occurrences = list(getattr(ref, name))
        view = got.subs.get(field)
        if not occurrences:
            assert view is None
            continue
        assert view is not None
        assert bytes(view) == occurrences[-1]  # the last occurrence (only one is ever sent)
        if len(occurrences) == 1:  # then the server's parse of it agrees with protobuf's
            try:
                sub = cls.FromString(occurrences[0])
            except DecodeError:
                with pytest.raises(DecodeError):
                    pb.UploadChunk.FromString(raw)
                result = f"{name} refused"
                continue
            assert cls.FromString(bytes(view)) == sub
    if result == "both decode" and all(len(getattr(ref, n)) <= 1 for n, _ in SUBS.values()):
        full = pb.UploadChunk.FromString(raw)  # every submessage parses: so does the whole
        for field, (name, _) in SUBS.items():
            if field in got.subs:
                assert full.HasField(name)
                assert getattr(full, name) == SUBS[field][1].FromString(bytes(got.subs[field]))
            else:
                assert not full.HasField(name)
    return result


# -- strategies --------------------------------------------------------------------------------
finite = st.floats(allow_nan=False)
headers = st.builds(
    pb.UploadHeader,
    auth=st.builds(
        pb.Auth, client=st.text(max_size=12), timestamp_ms=U64,
        nonce=st.binary(min_size=16, max_size=16), signature=st.binary(max_size=64),
    ),
    task=U64, version=U64, weight=finite, nbytes=U64,
    metrics=st.dictionaries(st.text(max_size=8), finite, max_size=3),
)  # fmt: skip
trailers = st.builds(
    pb.UploadTrailer, sha256=st.binary(max_size=32), signature=st.binary(max_size=64)
)
model_chunks = st.builds(
    pb.ModelChunk, version=U64, offset=U64, data=st.binary(max_size=600), total=U64
)


def _upload_chunk(header: Any, offset: int, data: bytes, trailer: Any) -> Any:
    msg = pb.UploadChunk(offset=offset, data=data)
    if header is not None:
        msg.header.CopyFrom(header)
    if trailer is not None:
        msg.trailer.CopyFrom(trailer)
    return msg


upload_chunks = st.builds(
    _upload_chunk, st.none() | headers, U64, st.binary(max_size=600), st.none() | trailers
)


@st.composite
def unknown_fields_of(draw: st.DrawFn, schema: Any) -> bytes:
    """Fields the schema does not know, raw-encoded (as a newer peer might send)."""
    known = KNOWN[id(schema)]
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        field = draw(
            st.sampled_from([5, 6, 7, 15, 16, 2047, MAX_FIELD]) | st.integers(5, MAX_FIELD)
        )
        assert field not in known
        wire = draw(st.sampled_from([0, 1, 2, 5]))
        payload = draw(st.binary(max_size=40) if wire == 2 else U64)
        out += _field(field, wire, payload)
    return out


@st.composite
def raw_messages(draw: st.DrawFn, schema: Any) -> bytes:
    """Any sequence of well-formed fields, known or not, repeated, with any wire type, with
    non-minimal varints (tags in at most 5 bytes, as protobuf reads them)."""
    varints, lens = schema
    out = b""
    for _ in range(draw(st.integers(0, 6))):
        field = draw(st.sampled_from(sorted(varints | lens)) | st.sampled_from([5, 9, MAX_FIELD]))
        right = 2 if field in lens else 0  # mostly the field's own wire type
        wire = draw(st.sampled_from([right] * 4 + [0, 1, 2, 5]))
        payload = draw(st.binary(max_size=30) if wire == 2 else U64)
        if wire == 2 and field in SUBS and schema is UPLOAD_CHUNK and draw(st.booleans()):
            payload = draw(headers if field == 1 else trailers).SerializeToString()
        key_pad = draw(st.integers(0, 5 - len(encode_varint(field << 3 | wire))))
        out += _field(field, wire, payload, key_pad, draw(st.integers(0, 3)))
    return out


@st.composite
def valid_bytes(draw: st.DrawFn, schema: Any) -> bytes:
    msg = draw(model_chunks if schema is MODEL_CHUNK else upload_chunks)
    return bytes(msg.SerializeToString()) + draw(unknown_fields_of(schema))


@st.composite
def mangled(draw: st.DrawFn, schema: Any) -> bytes:
    """A valid message, truncated, with bits flipped, or with bytes inserted."""
    raw = bytearray(draw(valid_bytes(schema) | raw_messages(schema)))
    kind = draw(st.sampled_from(["truncate", "flip", "insert"]))
    if kind == "truncate" or not raw:
        return bytes(raw[: draw(st.integers(0, max(0, len(raw) - 1)))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 4))):
            i = draw(st.integers(0, len(raw) - 1))
            raw[i] ^= 1 << draw(st.integers(0, 7))
        return bytes(raw)
    i = draw(st.integers(0, len(raw)))
    return bytes(raw[:i] + draw(st.binary(min_size=1, max_size=12)) + raw[i:])


# -- (a) protobuf's bytes decode to the values that were encoded --------------------------------
@FUZZ
@given(
    msg=model_chunks, before=unknown_fields_of(MODEL_CHUNK), after=unknown_fields_of(MODEL_CHUNK)
)
def test_a_model_chunk_from_protobuf_decodes_to_its_values(
    msg: Any, before: bytes, after: bytes
) -> None:
    c = decode_chunk(before + msg.SerializeToString() + after, MODEL_CHUNK)
    assert bytes(c.data) == msg.data
    assert [c.ints.get(f, 0) for f in (1, 2, 4)] == [msg.version, msg.offset, msg.total]
    assert set(c.ints) <= {1, 2, 4}
    assert c.header is None


@FUZZ
@given(
    msg=upload_chunks, before=unknown_fields_of(UPLOAD_CHUNK), after=unknown_fields_of(UPLOAD_CHUNK)
)
def test_an_upload_chunk_from_protobuf_decodes_to_its_values(
    msg: Any, before: bytes, after: bytes
) -> None:
    c = decode_chunk(before + msg.SerializeToString() + after, UPLOAD_CHUNK)
    assert bytes(c.data) == msg.data
    assert c.ints.get(2, 0) == msg.offset
    assert set(c.ints) <= {2}
    for view, name, cls in ((c.header, "header", pb.UploadHeader),
                            (c.trailer, "trailer", pb.UploadTrailer)):  # fmt: skip
        if msg.HasField(name):
            assert view is not None
            assert cls.FromString(bytes(view)) == getattr(msg, name)
        else:
            assert view is None


# -- (b) any bytes: refused with WireError, or decoded as protobuf decodes them -----------------
@SCHEMAS
@FUZZ
@given(data=st.data())
def test_arbitrary_bytes_decode_as_protobuf_does_or_raise_wire_error(
    schema: Any, data: st.DataObject
) -> None:
    raw = data.draw(st.binary(max_size=4096) | mangled(schema) | raw_messages(schema))
    check_against_protobuf(raw, schema)


def test_the_fuzzing_reaches_both_outcomes() -> None:
    """The strategies above are not vacuous: they produce refused and accepted inputs."""
    seen: set[str] = set()

    @settings(max_examples=100, derandomize=True, database=None, deadline=None)
    @given(raw=mangled(UPLOAD_CHUNK) | raw_messages(UPLOAD_CHUNK))
    def run(raw: bytes) -> None:
        seen.add(check_against_protobuf(raw, UPLOAD_CHUNK))

    run()
    assert {"both refuse", "both decode"} <= seen, seen


@SCHEMAS
@pytest.mark.parametrize(
    "raw",
    [
        b"\x1a\x05ab",  # data runs past the end
        b"\x1a",  # a key, no length
        b"\x08",  # a key, no value
        b"\x08\xff",  # truncated varint
        b"\x08" + b"\xff" * 10 + b"\x01",  # an 11-byte varint
        b"\x00\x00",  # field 0
        b"\x07",  # field 0, wire type 7
        b"\x0e",  # wire type 6
        b"\x2c",  # an end-group without a start
        b"\x29\x00\x00\x00",  # truncated fixed64
        b"\x2d\x00",  # truncated fixed32
        b"\x80\x80\x80\x80\x10\x00",  # field number 2**29 (past the largest)
        b"\x1a\x80\x80\x80\x80\x10" + b"\x00" * 8,  # a length of 4 GiB
    ],
)
def test_malformed_bytes_raise_wire_error(schema: Any, raw: bytes) -> None:
    with pytest.raises(DecodeError):
        (pb.ModelChunk if schema is MODEL_CHUNK else pb.UploadChunk).FromString(raw)
    with pytest.raises(WireError):
        decode_chunk(raw, schema)
    assert check_against_protobuf(raw, schema) == "both refuse"


def test_the_last_occurrence_of_a_field_wins() -> None:
    raw = _field(2, 0, 7) + _field(3, 2, b"first") + _field(2, 0, 9) + _field(3, 2, b"last")
    c = decode_chunk(raw, UPLOAD_CHUNK)
    ref = pb.UploadChunk.FromString(raw)
    assert (c.ints[2], bytes(c.data)) == (ref.offset, ref.data) == (9, b"last")
    # a header sent twice: protobuf merges the two, decode_chunk keeps the last (documented:
    # a client sends one)
    h1, h2 = pb.UploadHeader(task=1, weight=2.0), pb.UploadHeader(task=3)
    c = decode_chunk(_field(1, 2, h1.SerializeToString()) + _field(1, 2, h2.SerializeToString()))
    assert c.header is not None and pb.UploadHeader.FromString(bytes(c.header)) == h2


@SCHEMAS
@pytest.mark.parametrize("tag_bytes", [6, 8, 10])
def test_a_key_longer_than_5_bytes_is_refused(schema: Any, tag_bytes: int) -> None:
    raw = _key(3, 2, tag_bytes - 1) + b"\x02ab"
    assert len(raw) == tag_bytes + 3
    try:
        (pb.ModelChunk if schema is MODEL_CHUNK else pb.UploadChunk).FromString(raw)
    except DecodeError:
        pass
    else:
        raise AssertionError("protobuf accepts it")
    with pytest.raises(WireError):
        decode_chunk(raw, schema)


@SCHEMAS
def test_a_key_of_up_to_5_bytes_is_read_as_protobuf_reads_it(schema: Any) -> None:
    for pad in range(5):
        raw = _key(3, 2, pad) + b"\x02ab"
        assert check_against_protobuf(raw, schema) == "both decode"
        assert bytes(decode_chunk(raw, schema).data) == b"ab"


# -- (c) encode_chunk / decode_chunk ------------------------------------------------------------
@FUZZ
@given(
    version=U64,
    offset=U64,
    total=U64,
    data=st.binary(max_size=1000),
)
def test_a_model_chunk_round_trips_and_protobuf_reads_it(
    version: int, offset: int, total: int, data: bytes
) -> None:
    raw = encode_chunk({1: version, 2: offset, 4: total}, memoryview(data))
    c = decode_chunk(raw, MODEL_CHUNK)
    assert [c.ints.get(f, 0) for f in (1, 2, 4)] == [version, offset, total]
    assert bytes(c.data) == data
    assert c.header is None
    ref = pb.ModelChunk.FromString(raw)
    assert (ref.version, ref.offset, ref.total, ref.data) == (version, offset, total, data)


@FUZZ
@given(
    offset=U64, data=st.binary(max_size=1000), header=st.none() | headers,
    trailer=st.none() | trailers,
)  # fmt: skip
def test_an_upload_chunk_round_trips_and_protobuf_reads_it(
    offset: int, data: bytes, header: Any, trailer: Any
) -> None:
    head = None if header is None else header.SerializeToString()
    tail = None if trailer is None else trailer.SerializeToString()
    raw = encode_chunk({2: offset}, data, head, tail)
    c = decode_chunk(raw, UPLOAD_CHUNK)
    assert (c.ints.get(2, 0), bytes(c.data)) == (offset, data)
    ref = pb.UploadChunk.FromString(raw)
    assert (ref.offset, ref.data) == (offset, data)
    for view, sent, msg, name in ((c.header, head, header, "header"),
                                  (c.trailer, tail, trailer, "trailer")):  # fmt: skip
        if msg is None:
            assert view is None and not ref.HasField(name)
        else:
            assert view is not None and bytes(view) == sent
            assert getattr(ref, name) == msg


@FUZZ
@given(value=U64)
def test_varints_round_trip(value: int) -> None:
    raw = encode_varint(value)
    assert len(raw) == max(1, -(-value.bit_length() // 7))
    assert decode_chunk(b"\x10" + raw).ints == {2: value}


def test_encode_chunk_refuses_what_it_cannot_encode() -> None:
    for field in (0, 3, MAX_FIELD + 1):
        with pytest.raises(ValueError, match="bad varint field number"):
            encode_chunk({field: 1}, b"")
    with pytest.raises(ValueError, match="unsigned"):
        encode_varint(-1)
    assert encode_chunk({2: 0, 4: 0}, b"") == b""  # zeros omitted, as protobuf does


def test_decode_chunk_returns_views_into_the_buffer_not_copies() -> None:
    header = pb.UploadHeader(task=5).SerializeToString()
    buf = bytearray(encode_chunk({2: 8}, b"\x01\x02\x03\x04", header))
    c = decode_chunk(buf, UPLOAD_CHUNK)
    assert c.data.obj is buf and c.header is not None and c.header.obj is buf
    buf[-1] = 0x7F  # the last byte of the data
    assert bytes(c.data) == b"\x01\x02\x03\x7f"
    assert c.trailer is None


def test_decode_chunk_reads_a_view_of_any_item_size() -> None:
    raw = encode_chunk({1: 3, 2: 4096, 4: 8192}, bytes(range(8)))
    raw += _field(9, 2, b"\0" * (-(len(raw) + 2) % 4))  # pad to whole uint32s
    assert len(raw) % 4 == 0
    words = np.frombuffer(raw, dtype=np.uint32)
    c = decode_chunk(memoryview(words), MODEL_CHUNK)
    assert (c.ints, bytes(c.data)) == ({1: 3, 2: 4096, 4: 8192}, bytes(range(8)))


# -- signing ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def keys() -> dict[str, ClientKey]:
    return {n: ClientKey(n, Ed25519PrivateKey.generate()) for n in ("carol", "alice", "bob")}


@pytest.fixture(scope="module")
def ring(keys: dict[str, ClientKey]) -> Keyring:
    return Keyring({n: k.private.public_key() for n, k in keys.items()})


def _auth(fields: dict[str, Any], **over: Any) -> Any:
    return pb.Auth(**{**fields, **over})


def test_a_signed_request_verifies_to_the_clients_index(
    keys: dict[str, ClientKey], ring: Keyring
) -> None:
    assert ring.names == ["alice", "bob", "carol"]  # indices follow sorted names
    for i, name in enumerate(ring.names):
        content = body(task=i, weight=1.5, metrics={"loss": 0.25})
        auth = _auth(keys[name].sign("Push", content))
        assert len(auth.nonce) == 16 and auth.client == name
        assert ring.verify("Push", auth, content) == i


@pytest.mark.parametrize(
    "tamper, reason",
    [
        # one answer for all: an unknown name is not told from a bad signature (finding 11)
        ("content", AUTH_FAILED),
        ("method", AUTH_FAILED),
        ("name", AUTH_FAILED),
        ("unknown", AUTH_FAILED),
        ("timestamp", AUTH_FAILED),
        ("nonce", AUTH_FAILED),
        ("signature", AUTH_FAILED),
        ("no signature", AUTH_FAILED),
        ("other key", AUTH_FAILED),
    ],
)
def test_a_tampered_request_fails(
    keys: dict[str, ClientKey], ring: Keyring, tamper: str, reason: str
) -> None:
    content = body(task=7, version=2)
    fields = keys["alice"].sign("Pull", content)
    ring.verify("Pull", _auth(fields), content)  # untouched, it verifies
    method = "Pull"
    if tamper == "content":
        content = body(task=8, version=2)
    elif tamper == "method":
        method = "Hello"
    elif tamper == "name":
        fields["client"] = "bob"
    elif tamper == "unknown":
        fields["client"] = "mallory"
    elif tamper == "timestamp":
        fields["timestamp_ms"] += 1
    elif tamper == "nonce":
        fields["nonce"] = bytes([fields["nonce"][0] ^ 1]) + fields["nonce"][1:]
    elif tamper == "signature":
        fields["signature"] = fields["signature"][:-1] + bytes([fields["signature"][-1] ^ 1])
    elif tamper == "no signature":
        fields["signature"] = b""
    else:
        fields = ClientKey("alice", keys["bob"].private).sign("Pull", content)
    with pytest.raises(AuthError) as e:
        ring.verify(method, _auth(fields), content)
    assert e.value.reason == reason
    assert not e.value.denied


def test_a_trailer_signature_is_bound_to_its_header_and_digest(
    keys: dict[str, ClientKey], ring: Keyring
) -> None:
    content = body(task=1, nbytes=4)
    auth = _auth(keys["alice"].sign("Push", content))
    digest = hashlib.sha256(b"data").digest()
    signed = auth.signature + digest
    sig = keys["alice"].sign_bytes("PushTrailer", auth.timestamp_ms, auth.nonce, signed)
    assert ring.verify("PushTrailer", auth, signed, sig) == 0
    other = hashlib.sha256(b"datb").digest()
    flipped = sig[:-1] + bytes([sig[-1] ^ 1])
    bad = [
        ("PushTrailer", auth.signature + other, sig),  # another payload
        ("PushTrailer", bytes(64) + digest, sig),  # another header
        ("Push", signed, sig),  # another method
        ("PushTrailer", signed, flipped),
        ("Push", content, sig),  # not the header's signature
    ]
    for method, what, signature in bad:
        with pytest.raises(AuthError, match="bad signature"):
            ring.verify(method, auth, what, signature)
    with pytest.raises(AuthError, match="bad signature"):  # nor another timestamp's
        ring.verify("PushTrailer", _auth({**_fields(auth), "timestamp_ms": 1}), signed, sig)


def _fields(auth: Any) -> dict[str, Any]:
    return {f: getattr(auth, f) for f in ("client", "timestamp_ms", "nonce", "signature")}


def test_the_signed_bytes_separate_their_parts() -> None:
    content = body(task=1)
    a = signing_bytes("Pull", "ab", 1, bytes(16), content)
    assert a.startswith(b"fedagg/v1\0Pull\0ab\0")
    assert a.endswith((1).to_bytes(8, "big") + bytes(16) + hashlib.sha256(content).digest())
    assert a != signing_bytes("Pul", "lab", 1, bytes(16), content)


def test_the_canonical_body_ignores_argument_order_and_refuses_nan() -> None:
    assert body(b=1, a={"y": 2.0, "x": [1]}) == body(a={"x": [1], "y": 2.0}, b=1)
    assert body(a=1) == b'{"a":1}'
    with pytest.raises(ValueError):
        body(weight=float("nan"))


# -- replay protection ------------------------------------------------------------------------
def _stamp(t: float, nonce: bytes, client: str = "alice") -> Any:
    return SimpleNamespace(client=client, timestamp_ms=int(t * 1000), nonce=nonce)


def test_the_nonce_cache_refuses_a_replay() -> None:
    cache = NonceCache(skew_s=60.0)
    now = 1_800_000_000.0
    a = _stamp(now, b"a" * 16)
    cache.check(a, now=now)
    with pytest.raises(AuthError, match="replayed request"):
        cache.check(a, now=now + 1)
    cache.check(_stamp(now, b"b" * 16), now=now + 1)  # another nonce
    cache.check(_stamp(now, b"a" * 16, client="bob"), now=now + 1)  # another client's


@pytest.mark.parametrize("offset", [-60.001, 60.001, -3600.0, 1e9])
def test_the_nonce_cache_refuses_stale_and_future_timestamps(offset: float) -> None:
    now = 1_800_000_000.0
    with pytest.raises(AuthError, match="clock skew"):
        NonceCache(skew_s=60.0).check(_stamp(now + offset, b"n" * 16), now=now)


@pytest.mark.parametrize("offset", [-59.9, 0.0, 59.9])
def test_the_nonce_cache_accepts_timestamps_within_the_skew(offset: float) -> None:
    now = 1_800_000_000.0
    NonceCache(skew_s=60.0).check(_stamp(now + offset, b"n" * 16), now=now)


@pytest.mark.parametrize("n", [0, 15, 17])
def test_the_nonce_cache_refuses_a_nonce_of_the_wrong_size(n: int) -> None:
    now = 1_800_000_000.0
    with pytest.raises(AuthError, match="16 bytes"):
        NonceCache().check(_stamp(now, b"n" * n), now=now)


def test_the_nonce_cache_forgets_nonces_after_the_window() -> None:
    now = 1_800_000_000.0
    cache = NonceCache(skew_s=10.0, max_entries=2)
    cache.check(_stamp(now, b"1" * 16), now=now)
    cache.check(_stamp(now, b"2" * 16), now=now)
    with pytest.raises(AuthError, match="too many requests"):
        cache.check(_stamp(now, b"3" * 16), now=now + 5)  # full, within the window
    later = now + 10.5  # both entries are older than the window: forgotten
    cache.check(_stamp(later, b"3" * 16), now=later)
    cache.check(_stamp(later, b"1" * 16), now=later)  # a nonce is not remembered forever
    with pytest.raises(AuthError, match="replayed"):
        cache.check(_stamp(later, b"1" * 16), now=later)


# -- rate limits ------------------------------------------------------------------------------
def test_the_rate_limiter_allows_the_burst_then_refuses() -> None:
    r = RateLimiter(rate=10.0, burst=5.0)
    t = 100.0
    assert [r.allow("alice", now=t) for _ in range(7)] == [True] * 5 + [False] * 2
    assert r.allow("bob", now=t)  # buckets are per client


def test_the_rate_limiter_refills_at_its_rate() -> None:
    r = RateLimiter(rate=10.0, burst=5.0)
    t = 100.0
    while r.allow("alice", now=t):
        pass
    assert not r.allow("alice", now=t + 0.05)  # half a token
    assert r.allow("alice", now=t + 0.11)  # one token after 1/rate
    assert not r.allow("alice", now=t + 0.11)
    assert [r.allow("alice", now=t + 0.4) for _ in range(4)] == [True, True, True, False]
    # refills up to the burst, not beyond
    assert [r.allow("alice", now=t + 100) for _ in range(6)] == [True] * 5 + [False]


def test_a_zero_rate_disables_the_limit() -> None:
    r = RateLimiter(rate=0.0, burst=1.0)
    assert all(r.allow("alice", now=1.0) for _ in range(1000))


# -- key files ------------------------------------------------------------------------------------
def _pub(key: Ed25519PrivateKey) -> str:
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    "line",
    [
        "alice",  # no key
        "alice AAAA extra",  # three fields
        "alice not*base64",  # not base64
        "alice " + base64.b64encode(b"\x01" * 31).decode(),  # not 32 bytes
    ],
)
def test_a_malformed_authorized_keys_line_is_reported_with_file_and_line(
    tmp_path: Path, line: str
) -> None:
    p = tmp_path / "authorized_keys"
    good = f"bob {_pub(Ed25519PrivateKey.generate())}"
    p.write_text(f"# registered clients\n{good}\n\n{line}\n")
    with pytest.raises(ConfigError, match=rf"{p}:4: expected 'name base64-ed25519-key'"):
        Keyring.load(p)


@pytest.mark.parametrize("text", ["", "\n\n", "# nobody yet\n"])
def test_an_empty_authorized_keys_file_is_refused(tmp_path: Path, text: str) -> None:
    p = tmp_path / "authorized_keys"
    p.write_text(text)
    with pytest.raises(ConfigError, match="no client keys are registered"):
        Keyring.load(p)


def test_a_missing_authorized_keys_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read authorized keys"):
        Keyring.load(tmp_path / "nope")


def test_make_keys_writes_private_keys_0600_that_the_keyring_verifies(tmp_path: Path) -> None:
    auth = make_keys(tmp_path / "keys", ["client-b", "client-a"])
    assert auth == tmp_path / "keys" / "authorized_keys"
    ring = Keyring.load(auth)
    assert ring.names == ["client-a", "client-b"]
    for i, name in enumerate(ring.names):
        path = tmp_path / "keys" / f"{name}.key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        key = ClientKey.load(path)
        assert key.name == name
        content = body(protocol=1)
        assert ring.verify("Hello", pb.Auth(**key.sign("Hello", content)), content) == i
    # appended to, not overwritten
    make_keys(tmp_path / "keys", ["client-c"])
    assert Keyring.load(auth).names == ["client-a", "client-b", "client-c"]
    # another directory's key of the same name is not this keyring's
    make_keys(tmp_path / "other", ["client-a"])
    stranger = ClientKey.load(tmp_path / "other" / "client-a.key")
    with pytest.raises(AuthError, match="bad signature"):
        ring.verify("Hello", pb.Auth(**stranger.sign("Hello", b"{}")), b"{}")


@pytest.mark.parametrize("name", ["", "a b", "a/b", "tab\there"])
def test_make_keys_refuses_a_bad_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ConfigError, match="invalid client name"):
        make_keys(tmp_path, [name])


# -- certificates ---------------------------------------------------------------------------------
def _verify(issuer: x509.Certificate, cert: x509.Certificate) -> None:
    pub = issuer.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert cert.signature_hash_algorithm is not None
    pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))


def test_make_certs_makes_a_ca_that_signs_the_server_certificate(tmp_path: Path) -> None:
    paths = make_certs(tmp_path / "certs")
    ca = x509.load_pem_x509_certificate(paths["ca"].read_bytes())
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    _verify(ca, cert)
    _verify(ca, ca)  # self-signed
    assert cert.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    # the private keys: owner-only, and the server's matches its certificate
    for k in ("ca_key", "key"):
        assert stat.S_IMODE(paths[k].stat().st_mode) == 0o600
    # the CA's key is not in the directory the server reads (issue 14, finding 14)
    assert paths["ca_key"] == tmp_path / "certs-ca" / "ca.key"
    assert not (tmp_path / "certs" / "ca.key").exists()
    key = serialization.load_pem_private_key(paths["key"].read_bytes(), password=None)
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    assert key.public_key().public_bytes(enc, pub) == cert.public_key().public_bytes(enc, pub)
    # another CA did not sign it
    other = x509.load_pem_x509_certificate(make_certs(tmp_path / "other")["ca"].read_bytes())
    with pytest.raises(InvalidSignature):
        _verify(other, cert)


def test_make_certs_puts_the_given_hosts_in_the_certificate(tmp_path: Path) -> None:
    paths = make_certs(tmp_path / "certs", hosts=("fed.example", "10.1.2.3", "::1"))
    cert = x509.load_pem_x509_certificate(paths["cert"].read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fed.example"]
    assert set(san.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("::1"),
    }  # fmt: skip
