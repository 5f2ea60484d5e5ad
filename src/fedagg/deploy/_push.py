"""A client's upload: an update as Push streams, optionally split across parallel streams.

One upload is a header (signed: :func:`fedagg.deploy._auth.upload_body`), the data in chunks
of at most the server's ``chunk_bytes``, and a trailer: the digest of the stream's bytes
(sha256 or BLAKE3, :mod:`fedagg.deploy._digest`, computed as the chunks go out) signed with
the header's signature.

A large update may be split across ``S`` parallel streams (``UploadHeader.shard`` /
``shards``): shard ``i`` carries elements ``[i * n // S, (i + 1) * n // S)`` of the flat
update of ``n`` elements, at their absolute byte offsets, each shard its own ``Push`` call
with its own header (the whole update's task, version, weight, size and metrics, plus the
shard index, signed) and trailer (the digest of the shard's bytes). The server accepts the
upload when every shard is; if any shard's call fails the others are cancelled and the
caller retries the whole upload (uploads are idempotent).

Each chunk is hashed and framed on a worker thread (hashlib and blake3 release the GIL, and
so does joining a large buffer), so one stream's hashing overlaps the others' sending.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._auth import ClientKey, upload_body
from fedagg.deploy._digest import Hasher, new_digest
from fedagg.deploy._faults import crash_point
from fedagg.deploy._stream_client import chunk_parts
from fedagg.deploy._wire import encode_chunk

__all__ = ["AUTO_MIN_BYTES", "AUTO_STREAMS", "PushPlan", "push_update", "shard_ranges",
           "stream_count", "upload_chunks"]  # fmt: skip

#: ``streams = 0`` (auto): one stream below this size ...
AUTO_MIN_BYTES = 64 << 20
#: ... and up to this many above it (capped by the server's ``max_streams``): 2 measured best
#: for a 1 GiB upload on 2 cores shared by client and server (benchmarks/results/transport.md:
#: S = 4 cost the same CPU and no less time); more pays off on a server with idle cores.
AUTO_STREAMS = 2

_pool: ThreadPoolExecutor | None = None


def _workers() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:  # one small pool per process: hashing and framing chunks
        _pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fedagg-push")
    return _pool


def stream_count(nbytes: int, elements: int, streams: int, max_streams: int) -> int:
    """How many parallel streams an upload of ``nbytes`` (``elements`` values) uses:
    ``streams`` (0: auto, 1 below :data:`AUTO_MIN_BYTES`, else :data:`AUTO_STREAMS`),
    capped by the server's ``max_streams`` (0 or 1: one stream; a server of before the
    field says 0) and by the number of elements (no shard is empty)."""
    want = streams if streams > 0 else (1 if nbytes < AUTO_MIN_BYTES else AUTO_STREAMS)
    return max(1, min(want, max_streams, elements))


def shard_ranges(elements: int, shards: int) -> list[tuple[int, int]]:
    """Shard ``i``'s elements ``[i * n // S, (i + 1) * n // S)`` (``UploadHeader.shards``)."""
    return [(i * elements // shards, (i + 1) * elements // shards) for i in range(shards)]


@dataclass(frozen=True)
class PushPlan:
    """What an upload says about itself (the header's fields) and how it is sent."""

    task: int
    version: int
    weight: float
    metrics: dict[str, float]
    chunk: int  # the server's chunk_bytes
    digest: bool  # whether the trailer carries the digest (HelloReply.digest)
    algorithm: str = "sha256"  # HelloReply.digest_algorithm ("" = sha256)
    streams: int = 1  # parallel streams (already capped: see stream_count)


async def push_update(
    call: Callable[[AsyncIterator[bytes]], Any], key: ClientKey,
    sign: Callable[[str, bytes], Any], data: memoryview, itemsize: int, plan: PushPlan,
) -> pb.PushReply:  # fmt: skip
    """Upload ``data`` (the flat update's bytes, ``itemsize`` bytes per value) with ``call``
    (a ``Push`` stream-unary multi-callable taking the message iterator) as ``plan.streams``
    shards at once; ``sign(method, content)`` is the client's ``Auth`` over ``content``.
    Returns shard 0's reply (every shard's stream is answered with the upload's outcome);
    the first failure of any shard is raised after the others are cancelled."""
    nbytes = len(data)
    shards = plan.streams if plan.streams > 1 else 0
    parts = bool(getattr(call, "parts", False))  # the stream transport: messages as parts

    def stream(i: int, lo: int, hi: int) -> AsyncIterator[bytes]:
        content = upload_body(plan.task, plan.version, plan.weight, nbytes, plan.metrics, i,
                              shards)  # fmt: skip
        auth = sign("Push", content)
        head = pb.UploadHeader(
            auth=auth, task=plan.task, version=plan.version, weight=plan.weight, nbytes=nbytes,
            metrics=plan.metrics, shard=i, shards=shards,
        )  # fmt: skip
        return upload_chunks(head.SerializeToString(), [data[lo:hi]], plan.chunk, plan.digest,
                             key, auth, algorithm=plan.algorithm, offset=lo,
                             parts=parts)  # fmt: skip

    if shards == 0:
        reply: pb.PushReply = pb.PushReply.FromString(await call(stream(0, 0, nbytes)))
        return reply
    ranges = shard_ranges(nbytes // itemsize, shards)
    jobs = [
        asyncio.ensure_future(call(stream(i, lo * itemsize, hi * itemsize)))
        for i, (lo, hi) in enumerate(ranges)
    ]
    try:
        done, _ = await asyncio.wait(jobs, return_when=asyncio.FIRST_EXCEPTION)
        for j in jobs:  # the first failure, in shard order among those done
            e = j.exception() if j in done else None
            if e is not None:
                raise e
    finally:
        for j in jobs:
            if not j.done():
                j.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
    first: pb.PushReply = pb.PushReply.FromString(jobs[0].result())
    return first


def _frame(
    h: Hasher | None, piece: memoryview, ints: dict[int, int], head: bytes | None, parts: bool
) -> Any:
    if h is not None:
        h.update(piece)
    if parts:
        return chunk_parts(ints, piece, head)
    return encode_chunk(ints, piece, head)


async def upload_chunks(
    head: bytes, buffers: Sequence[memoryview], step: int, digest: bool, key: ClientKey,
    auth: Any, *, algorithm: str = "sha256", offset: int = 0, parts: bool = False,
) -> AsyncIterator[Any]:  # fmt: skip
    """An upload (or one shard of it) as Push messages: the header with the first data chunk,
    the data in chunks of ``step`` bytes taken from ``buffers`` in turn (no copy but the
    framing), at absolute byte offsets from ``offset``, then the trailer: the ``algorithm``
    digest of the stream's data bytes (empty unless ``digest``) signed with the header's
    signature. The next chunk is hashed and framed on a worker thread while this one is
    being sent."""
    h = new_digest(algorithm) if digest else None
    loop = asyncio.get_running_loop()
    pool = _workers()
    pieces = [(buf, lo) for buf in buffers for lo in range(0, len(buf), step)]
    off = offset
    jobs: list[tuple[int, memoryview]] = []
    for buf, lo in pieces:
        piece = buf[lo : lo + step]
        jobs.append((off, piece))
        off += len(piece)

    def start(k: int) -> asyncio.Future[bytes]:
        at, piece = jobs[k]
        first = k == 0
        return loop.run_in_executor(pool, _frame, h, piece, {2: at}, head if first else None,
                                    parts)  # fmt: skip

    encode = chunk_parts if parts else encode_chunk
    if not jobs:
        yield encode({2: offset}, b"", head)
    nxt = start(0) if jobs else None
    for k in range(len(jobs)):
        assert nxt is not None
        msg = await nxt
        nxt = start(k + 1) if k + 1 < len(jobs) else None  # hashed in order: one at a time
        if k:
            crash_point("client-upload")
        yield msg
    got = h.digest() if h is not None else b""
    sig = key.sign_bytes("PushTrailer", auth.timestamp_ms, auth.nonce, auth.signature + got)
    yield encode({}, b"", None, pb.UploadTrailer(sha256=got, signature=sig)
                 .SerializeToString())  # fmt: skip
