"""The hot path of the wire: ModelChunk and UploadChunk, encoded and decoded by hand.

Both messages are flat protobuf messages (``fedagg.proto``): varints and length-delimited
fields. Decoding them with the generated classes would copy every chunk's payload into a new
``bytes``; :func:`decode_chunk` instead returns a ``memoryview`` into the buffer gRPC handed
us, so a chunk is validated and written to its spool straight from that buffer. Encoding joins
a few header bytes with the payload view (one copy, the one gRPC needs to own its message).

The decoder follows protobuf's rules (unknown fields skipped, the last occurrence of a field
wins, wire types checked) and raises :class:`WireError` on anything malformed; it never reads
out of bounds. It is fuzzed against the generated parser in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "MODEL_CHUNK",
    "UPLOAD_CHUNK",
    "Chunk",
    "Parts",
    "WireError",
    "chunk_parts",
    "decode_chunk",
    "encode_chunk",
    "encode_varint",
    "leading_name",
]

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5
_MAX_FIELD = (1 << 29) - 1


class WireError(ValueError):
    """Bytes that are not a well-formed chunk message."""


@dataclass(frozen=True, slots=True)
class Chunk:
    """A decoded ModelChunk or UploadChunk: ``ints`` by field number, ``data`` a view
    (field 3 of both), ``subs`` the raw bytes of the other length-delimited fields
    (UploadChunk's header, field 1, and trailer, field 4)."""

    ints: dict[int, int]
    data: memoryview
    subs: dict[int, memoryview]

    @property
    def header(self) -> memoryview | None:
        return self.subs.get(1)

    @property
    def trailer(self) -> memoryview | None:
        return self.subs.get(4)


def encode_varint(value: int) -> bytes:
    if value < 0:
        raise ValueError("varints here are unsigned")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        if shift == 63 and byte > 1:
            raise WireError("varint overflows 64 bits")
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise WireError("varint longer than 10 bytes")


#: A chunk message as three parts whose concatenation is its bytes (:func:`chunk_parts`).
Parts = tuple[bytes, "memoryview | bytes", bytes]


def chunk_parts(
    ints: dict[int, int],
    data: memoryview | bytes,
    header: bytes | None = None,
    trailer: bytes | None = None,
) -> Parts:
    """A chunk message (see :func:`encode_chunk`) as three parts whose concatenation is its
    bytes: everything before the data, the data itself (not copied), the trailer."""
    pre: list[bytes] = []
    if header is not None:
        pre += [b"\x0a", encode_varint(len(header)), header]
    for field in sorted(ints):
        if field == 3 or not 1 <= field <= _MAX_FIELD:
            raise ValueError(f"bad varint field number {field}")
        if ints[field]:
            pre += [encode_varint(field << 3 | _VARINT), encode_varint(ints[field])]
    mid: memoryview | bytes = b""
    if len(data):
        pre += [b"\x1a", encode_varint(len(data))]
        mid = data
    post = b"" if trailer is None else b"\x22" + encode_varint(len(trailer)) + trailer
    return b"".join(pre), mid, post


def encode_chunk(
    ints: dict[int, int],
    data: memoryview | bytes,
    header: bytes | None = None,
    trailer: bytes | None = None,
) -> bytes:
    """A chunk message: ``header`` as field 1 (UploadChunk), each ``ints`` entry as a varint
    field, ``data`` as field 3, ``trailer`` as field 4 (UploadChunk). Fields equal to zero
    are omitted, as protobuf does."""
    return b"".join(chunk_parts(ints, data, header, trailer))


#: Field numbers by wire type, per message (``fedagg.proto``).
MODEL_CHUNK = (frozenset({1, 2, 4}), frozenset({3}))
UPLOAD_CHUNK = (frozenset({2}), frozenset({1, 3, 4}))


def decode_chunk(
    raw: bytes | memoryview, schema: tuple[frozenset[int], frozenset[int]] = UPLOAD_CHUNK
) -> Chunk:
    """Decode a ModelChunk or UploadChunk (``schema``) without copying its payload."""
    buf = raw if isinstance(raw, memoryview) else memoryview(raw)
    if buf.ndim != 1 or buf.itemsize != 1:
        buf = buf.cast("B")
    varints, lens = schema
    end = len(buf)
    pos = 0
    ints: dict[int, int] = {}
    data = buf[0:0]
    subs: dict[int, memoryview] = {}
    while pos < end:
        start = pos
        key, pos = _read_varint(buf, pos, end)
        if pos - start > 5 or key >> 32:
            raise WireError("field key longer than 5 bytes")
        field, wire = key >> 3, key & 7
        if field == 0 or field > _MAX_FIELD:
            raise WireError(f"invalid field number {field}")
        known = field in varints or field in lens
        if known and (wire == _VARINT) != (field in varints):
            raise WireError(f"field {field} has the wrong wire type {wire}")
        if wire == _VARINT:
            value, pos = _read_varint(buf, pos, end)
            if known:
                ints[field] = value
        elif wire == _LEN:
            n, pos = _read_varint(buf, pos, end)
            if n > end - pos:
                raise WireError("length-delimited field runs past the message")
            view = buf[pos : pos + n]
            pos += n
            if field == 3:
                data = view
            elif known:
                subs[field] = view  # protobuf merges repeated submessages; only one is sent
        elif wire == _I64:
            if end - pos < 8:
                raise WireError("truncated fixed64")
            pos += 8
        elif wire == _I32:
            if end - pos < 4:
                raise WireError("truncated fixed32")
            pos += 4
        else:
            raise WireError(f"unsupported wire type {wire}")
    return Chunk(ints, data, subs)


def leading_name(raw: bytes | memoryview) -> str:
    """The signer's name in a request, read without parsing the rest: the ``Auth.client`` of
    a message whose first serialized field is its ``Auth`` (field 1 of every request, and of
    ``UploadHeader``), as protobuf serializers write it. ``""`` when the message does not
    start that way. It only chooses the size cap a request is held to before it is parsed
    and authenticated: a wrong answer costs a refusal, never a bypass."""
    buf = raw if isinstance(raw, memoryview) else memoryview(raw)
    try:
        for _ in range(2):  # the message's field 1 (Auth), then the Auth's field 1 (client)
            if len(buf) < 2 or buf[0] != 0x0A:
                return ""
            n, pos = _read_varint(buf, 1, min(len(buf), 6))
            buf = buf[pos : pos + n]
        return bytes(buf).decode("utf-8", "replace")
    except WireError:
        return ""
