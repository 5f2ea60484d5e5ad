"""The upload receive path: upload slots, and an upload's chunks checked, hashed and spooled
to disk as they arrive (or, for a re-sent upload, read and checked without being kept).

An upload holds a slot from its checked header until it is acknowledged: at most
``client_uploads`` per client (or edge), refused beyond, and ``max_uploads`` in all, waited
for. Its stream is paced (:class:`Paced`): a peer idle for ``idle_timeout``, or slower than
``min_rate``, is cut off. Its file (:class:`SpoolFile`) is removed however it ends, unless it
was committed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from fedagg.core import kernels
from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._admission import hold, parse
from fedagg.deploy._auth import AuthError, Keyring
from fedagg.deploy._digest import new_digest
from fedagg.deploy._engine import Engine, ServerStats
from fedagg.deploy._faults import crash_point
from fedagg.deploy._ingest import Lease, chunk_peak, rollback
from fedagg.deploy._options import MAX_METRIC_NAME, MAX_METRICS, MIN_CHUNK, ServerOptions
from fedagg.deploy._store import new_checksum
from fedagg.deploy._transport import CallError, Status
from fedagg.deploy._wire import UPLOAD_CHUNK, WireError, decode_chunk

__all__ = ["Paced", "SpoolFile", "Uploads", "check_metrics", "paced"]

log = logging.getLogger("fedagg.server")
T = TypeVar("T")
_METRIC_NAME = re.compile(rf"[A-Za-z0-9_.:/\-]{{1,{MAX_METRIC_NAME}}}")


class Uploads:
    """Upload slots and the receiving of uploads (and the slots of model downloads) for a
    service over ``engine``, whose spool directory the uploads go to."""

    def __init__(
        self, opt: ServerOptions, engine: Engine, io: ThreadPoolExecutor, stats: ServerStats
    ) -> None:
        self.opt, self.engine, self.io, self.stats = opt, engine, io, stats
        self.uploads = asyncio.Semaphore(opt.max_uploads)  # uploads received at once
        self.pulls = asyncio.Semaphore(opt.max_uploads)  # models sent at once
        self.slots: dict[str, int] = {}  # upload slots held, by owner (client or edge)
        self.pull_slots: dict[str, int] = {}  # model streams in progress, by owner
        self.inflight: set[tuple[int, int]] = set()  # (client, task) uploads being received
        self.defer_sync = False  # durability = "retained": the committer syncs the spools

    def take(self, counts: dict[str, int], owner: str, what: str) -> Callable[[], None]:
        """One of the ``client_uploads`` slots ``owner`` may hold in ``counts``, refused
        beyond (RESOURCE_EXHAUSTED: clients retry later) so that one client cannot take a
        pool; returns its release (idempotent)."""
        if counts.get(owner, 0) >= self.opt.client_uploads:
            raise CallError(
                Status.RESOURCE_EXHAUSTED,
                f"{self.opt.client_uploads} {what} of yours are in progress: retry later",
            )
        return hold(counts, owner)

    @contextlib.contextmanager
    def owned(self, counts: dict[str, int], owner: str, what: str) -> Iterator[None]:
        release = self.take(counts, owner, what)
        try:
            yield
        finally:
            release()

    @contextlib.asynccontextmanager
    async def slot(
        self, owner: str, it: AsyncIterator[bytes], nbytes: int
    ) -> AsyncIterator[AsyncIterator[bytes]]:
        """An upload slot for an authenticated upload (``owner``: its client or edge), taken
        after its header is checked: at most ``client_uploads`` per owner, refused beyond
        (RESOURCE_EXHAUSTED, retried by clients), so one client cannot take the pool;
        then one of the ``max_uploads`` slots, waited for (the stream waits unread, held back
        by gRPC's flow control, so memory does not grow with the clients pushing). Yields the
        rest of the stream, cut off (DEADLINE_EXCEEDED) when idle for ``idle_timeout`` or
        slower than ``min_rate``; the slot is released however the upload ends."""
        assert self.uploads is not None
        with self.owned(self.slots, owner, "uploads"):
            async with self.uploads:
                until = time.monotonic() + self.opt.idle_timeout + nbytes / self.opt.min_rate
                yield Paced(it, self.opt.idle_timeout, until)

    @contextlib.asynccontextmanager
    async def one_upload(self, client: int, task: int) -> AsyncIterator[None]:
        """At most one upload per task is received at a time: another (a retry racing the
        first, after a lost connection) is refused until the first ends (RESOURCE_EXHAUSTED:
        the client retries, and then finds it accepted or gone)."""
        key = (client, task)
        if key in self.inflight:
            raise CallError(
                Status.RESOURCE_EXHAUSTED,
                f"an upload of task {task} is already being received: retry later",
            )
        self.inflight.add(key)
        try:
            yield
        finally:
            self.inflight.discard(key)

    async def read_unspooled(
        self, first: Any, it: AsyncIterator[bytes], head: Any, itemsize: int, what: str,
        *, start: int = 0, length: int | None = None,
    ) -> None:  # fmt: skip
        """Read to its end an upload that is not spooled (a re-send of an accepted upload,
        which stands; a dropout report), checking its shape as far as it goes: ``head.nbytes``
        of data (the caller checked it is the accepted upload's size) in chunks in order, each
        within ``chunk_bytes``, every message after the first carrying data or the trailer,
        the trailer last. Reading stops at the first deviation, so such an upload costs at
        most its declared size and one more message, never an unbounded drain. (The bytes
        are not hashed: whatever they are, the accepted upload is the one that counts.)
        A shard of a split upload: ``length`` bytes from byte ``start``."""
        total = head.nbytes if length is None else length
        expect = start
        end = start + total
        chunk = first
        trailer = False
        count = self.chunk_counter(total)
        while True:
            n = len(chunk.data)
            if n:
                count()
                off = chunk.ints.get(2, 0)
                if off != expect or n > self.opt.chunk_bytes or n % itemsize or n > end - expect:
                    raise CallError(
                        Status.INVALID_ARGUMENT,
                        f"{what} deviates from it: {n} bytes at offset {off} (expected offset "
                        f"{expect}, chunks of at most {self.opt.chunk_bytes}, {total} in all)",
                    )
                expect += n
            elif chunk.trailer is None and chunk is not first:
                raise CallError(Status.INVALID_ARGUMENT, f"{what}: an empty message")
            trailer = chunk.trailer is not None
            try:
                raw = await it.__anext__()
            except StopAsyncIteration:
                break
            if trailer:
                raise CallError(Status.INVALID_ARGUMENT, f"{what}: a message after the trailer")
            chunk = _later_chunk(raw)
        if expect != end or not trailer:
            raise CallError(
                Status.INVALID_ARGUMENT,
                f"{what} ends after {expect - start} of {total} bytes"
                + ("" if trailer else ", without a trailer"),
            )

    def chunk_counter(self, nbytes: int) -> Callable[[], None]:
        """Counts an upload's data chunks; refuses the one over :data:`MIN_CHUNK`'s bound."""
        limit = nbytes // min(MIN_CHUNK, self.opt.chunk_bytes) + 2 * len(self.engine.spec.names) + 8
        seen = 0

        def count() -> None:
            nonlocal seen
            seen += 1
            if seen > limit:
                raise CallError(
                    Status.INVALID_ARGUMENT,
                    f"too many chunks: more than {limit} for {nbytes} bytes (send chunks of up "
                    f"to {self.opt.chunk_bytes} bytes)",
                )

        return count

    def open_spool(self, tmp: Path) -> int:
        """A file to spool an upload into (on the I/O thread: file creation can block)."""
        reuse = self.engine.take_free()
        if reuse is not None:  # overwrite a recycled file of the same size in place
            os.rename(reuse, tmp)
            return os.open(tmp, os.O_WRONLY)
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    async def receive(
        self, client: int, first: Any, it: AsyncIterator[bytes], head: Any,
        dtype: np.dtype[Any], keyring: Keyring, origin_sha: bytes = b"", *, finite: bool = True,
        lease: Lease | None = None,
    ) -> tuple[Path, bytes, bytes, bytes]:  # fmt: skip
        """Stream an upload's chunks into a spool file: checked (offsets, sizes, finiteness)
        and hashed chunk by chunk (sha256 if required, and always the xxh3-128 checksum that
        a read-back is checked against), straight from gRPC's buffers, on a worker thread while the
        next chunk is received; the signed trailer's digest is checked at the end, the file
        fsynced and renamed. On any error the file is removed and nothing else has changed.
        Returns the file, the bytes' sha256 (b'' if not required), their checksum and the
        trailer's signature.

        ``origin_sha``: a relayed update's digest as its client signed it: the bytes are
        hashed (whatever ``digest`` says) and must match it. ``finite``: whether values must
        be finite (not for a secure round's masked upload: uint32 words, uniform noise).
        ``lease``: each chunk, once written, is also folded into the live accumulator
        (:mod:`fedagg.deploy._ingest`); on any error the folds are rolled back before this
        returns, on success the lease is complete (the engine commits it with the arrival)."""
        # one name per attempt: a concurrent retry never touches the accepted attempt's file
        spool = self.new_spool(head.task, client)
        try:
            await spool.open(self.open_spool)
            digest, check, tsig = await self.stream(
                spool, first, it, head, dtype, keyring, origin_sha, finite=finite, lease=lease
            )
            if self.opt.fsync and not self.defer_sync:
                await spool.start(os.fsync)
            await spool.commit()
            crash_point("spooled")
            if lease is not None:
                lease.complete, lease.path = True, str(spool.final)
            return spool.final, digest, check, tsig
        except BaseException:
            if lease is not None:  # after the running chunk's fold, if any: exact
                await rollback(self.io, lease)
            await spool.discard()
            raise

    def new_spool(self, task: int, client: int) -> SpoolFile:
        return SpoolFile(
            self.io,
            self.engine.spool / f"tmp-{uuid.uuid4().hex}",
            self.engine.spool / f"{task:012d}-{client}-{uuid.uuid4().hex[:12]}.upd",
        )

    async def stream(
        self, spool: SpoolFile, first: Any, it: AsyncIterator[bytes], head: Any,
        dtype: np.dtype[Any], keyring: Keyring, origin_sha: bytes = b"", *, finite: bool = True,
        lease: Lease | None = None, start: int = 0, length: int | None = None,
    ) -> tuple[bytes, bytes, bytes]:  # fmt: skip
        """Receive the chunks of ``length`` bytes at byte offset ``start`` (the whole upload,
        or a shard of one) into the open ``spool``, each checked, hashed, written at its
        offset and folded under ``lease``, then check the signed trailer. Returns the bytes'
        digest, their xxh3-128 checksum and the trailer's signature. On an error, a chunk job
        still running is left to end (the caller's :meth:`SpoolFile.discard` waits for it)."""
        dtype = np.dtype(dtype)
        total = head.nbytes if length is None else length
        # a relay is hashed with its client's algorithm (its header's Origin), else ours
        algorithm = head.origin.digest_algorithm if origin_sha else self.opt.digest_algorithm
        sha = new_digest(algorithm) if self.opt.digest or origin_sha else None
        xx = new_checksum()
        expect = start
        end = start + total
        pending: asyncio.Future[str | None] | None = None
        trailer = None
        count = self.chunk_counter(total)
        try:
            chunk = first
            while True:
                data = chunk.data
                n = len(data)
                if n:
                    count()
                    if trailer is not None:
                        raise CallError(Status.INVALID_ARGUMENT, "data after the trailer")
                    off = chunk.ints.get(2, 0)
                    if off != expect:
                        raise CallError(
                            Status.INVALID_ARGUMENT,
                            f"chunk at offset {off}, expected {expect}",
                        )
                    if n > self.opt.chunk_bytes or n % dtype.itemsize or expect + n > end:
                        raise CallError(
                            Status.INVALID_ARGUMENT,
                            f"bad chunk size {n} at offset {off} (limit {self.opt.chunk_bytes},"
                            f" multiple of {dtype.itemsize}, total {total})",
                        )
                    if pending is not None:
                        _raise_bad(await pending)
                    pending = spool.start(spool_chunk, sha, xx, data, dtype, off, finite, lease)
                    expect += n
                    self.stats.bytes_in += n
                    if expect < end:
                        crash_point("upload")
                elif chunk.trailer is None and chunk is not first:
                    raise CallError(Status.INVALID_ARGUMENT, "an empty message")
                if chunk.trailer is not None:
                    trailer = parse(pb.UploadTrailer, bytes(chunk.trailer))
                try:
                    raw = await it.__anext__()
                except StopAsyncIteration:
                    break
                chunk = _later_chunk(raw)
            if pending is not None:
                _raise_bad(await pending)
                pending = None
            if expect != end:
                raise CallError(
                    Status.INVALID_ARGUMENT,
                    f"truncated upload: {expect - start} of {total} bytes",
                )
            if trailer is None:
                raise CallError(Status.INVALID_ARGUMENT, "the upload has no trailer")
            digest = sha.digest() if sha is not None else b""
            sent = digest if self.opt.digest else b""  # what the sender was asked to sign
            if trailer.sha256 != sent:
                raise CallError(
                    Status.INVALID_ARGUMENT,
                    "the upload's bytes do not match its trailer's sha256",
                )
            try:
                keyring.verify("PushTrailer", head.auth, head.auth.signature + sent,
                                 trailer.signature)  # fmt: skip
            except AuthError as e:
                raise CallError(Status.UNAUTHENTICATED, f"trailer: {e.reason}") from None
            if origin_sha and digest != origin_sha:
                log.info("relayed job %d of client %d: bytes differ from its client's digest",
                         head.task, int(head.on_behalf))  # fmt: skip
                raise CallError(
                    Status.UNAUTHENTICATED,
                    f"relayed job {head.task}: the bytes are not those its client signed",
                )
            return digest, xx.digest(), bytes(trailer.signature)
        except BaseException:
            if pending is not None:  # its outcome no longer matters
                pending.add_done_callback(_ignore_outcome)
            raise


class SpoolFile:
    """An upload's spool file, written by jobs on the I/O pool (each job gets the
    descriptor first; the chunks of one stream one at a time, the shards of an upload split
    across parallel streams at once, each at its offsets). :meth:`discard` removes the file
    however the upload ended: if the receiving task was cancelled while jobs ran (the peer
    went away, a timeout), they cannot be stopped, so the file is closed and removed after
    them, never under a write, and neither a descriptor nor a ``tmp-`` file is left behind."""

    def __init__(self, pool: ThreadPoolExecutor, tmp: Path, final: Path) -> None:
        self.pool, self.tmp, self.final = pool, tmp, final
        self.fd = -1
        self.renamed = False
        self.jobs: set[concurrent.futures.Future[Any]] = set()

    def _submit(self, job: Callable[[], T]) -> concurrent.futures.Future[T]:
        fut = self.pool.submit(job)
        self.jobs.add(fut)
        fut.add_done_callback(self.jobs.discard)
        return fut

    def start(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        def job() -> T:
            return fn(self.fd, *args)

        return asyncio.wrap_future(self._submit(job))

    async def open(self, opener: Callable[[Path], int]) -> None:
        def job() -> None:
            self.fd = opener(self.tmp)

        await asyncio.wrap_future(self._submit(job))

    async def commit(self) -> None:
        """Close the file and move it to :attr:`final`."""

        def job(fd: int) -> None:
            self.fd = -1
            os.close(fd)
            os.replace(self.tmp, self.final)
            self.renamed = True

        await self.start(job)

    async def discard(self) -> None:
        jobs = [j for j in self.jobs if not j.done()]
        if jobs:  # wait for them unless cancelled again
            with contextlib.suppress(BaseException):
                await asyncio.shield(asyncio.gather(*(asyncio.wrap_future(j) for j in jobs)))
        left = [j for j in self.jobs if not j.done()]
        if not left:
            self._remove()
            return
        waiting = set(left)

        def done(j: concurrent.futures.Future[Any]) -> None:
            waiting.discard(j)
            if not waiting:
                self._remove()

        for j in left:
            j.add_done_callback(done)

    def _remove(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.final if self.renamed else self.tmp)


class Paced:
    """The rest of an upload's stream, each message within ``idle`` seconds of the previous
    one and all of them by ``until`` (monotonic): a silent or slow peer is cut off."""

    def __init__(self, it: AsyncIterator[bytes], idle: float, until: float) -> None:
        self.it, self.idle, self.until = it, idle, until

    def __aiter__(self) -> Paced:
        return self

    async def __anext__(self) -> bytes:
        return await paced(self.it.__anext__(), self.idle, self.until, "upload")


async def paced(step: Awaitable[T], idle: float, until: float, what: str) -> T:
    """``step`` (a stream's next message, in or out) within ``idle`` seconds and by ``until``
    (monotonic), or the RPC is cut off (DEADLINE_EXCEEDED)."""
    left = until - time.monotonic()
    try:  # a timeout scope, not wait_for: no task is created per message
        async with asyncio.timeout(max(0.0, min(idle, left))):
            return await step
    except TimeoutError:
        why = f"idle for {idle:g}s" if left > idle else "below the progress floor"
        raise CallError(Status.DEADLINE_EXCEEDED, f"{what} cut off: {why}") from None


def check_metrics(metrics: Mapping[str, float]) -> dict[str, float]:
    """An upload's metrics, within the limits (:data:`MAX_METRICS`): counted before they are
    read, names checked before values."""
    if len(metrics) > MAX_METRICS:
        raise CallError(
            Status.INVALID_ARGUMENT,
            f"too many metrics: {len(metrics)} (at most {MAX_METRICS})",
        )
    out = dict(metrics)
    for name, value in out.items():
        if not _METRIC_NAME.fullmatch(name):
            raise CallError(
                Status.INVALID_ARGUMENT,
                f"bad metric name {name[: MAX_METRIC_NAME + 1]!r}: 1 to {MAX_METRIC_NAME} "
                "characters of A-Z a-z 0-9 _ . : / -",
            )
        if not math.isfinite(value):
            raise CallError(Status.INVALID_ARGUMENT, f"metrics must be finite: {name} is {value}")
    return out


def spool_chunk(
    fd: int, sha: Any, xx: Any, data: memoryview, dtype: np.dtype[Any], off: int,
    finite: bool = True, lease: Lease | None = None,
) -> str | None:  # fmt: skip
    """Check, hash and write one chunk (on a worker thread; numba, hashlib, xxhash and
    os.write release the GIL), and fold it under ``lease``. Returns why the chunk is
    refused, or None."""
    arr = np.frombuffer(data, dtype=dtype)
    peak = 0.0
    if lease is not None and lease.live and lease.wants_peak:  # one pass: finite, max |x|
        peak = chunk_peak(arr)
        if not math.isfinite(peak):
            return f"non-finite values (NaN or Inf) in the chunk at offset {off}"
    elif finite and not kernels.all_finite(arr, use_numba=True, parallel=False):
        return f"non-finite values (NaN or Inf) in the chunk at offset {off}"
    if sha is not None:
        sha.update(data)
    xx.update(data)
    _write_all(fd, data, off)
    if lease is not None:
        lease.fold(off // dtype.itemsize, arr, peak)
    return None


def _ignore_outcome(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()


def _later_chunk(raw: bytes) -> Any:
    """An upload's message after its first, decoded; a malformed one, or one carrying a
    second header, is refused."""
    try:
        chunk = decode_chunk(raw, UPLOAD_CHUNK)
    except WireError as e:
        raise CallError(Status.INVALID_ARGUMENT, f"malformed chunk: {e}") from None
    if chunk.header is not None:
        raise CallError(Status.INVALID_ARGUMENT, "a second header")
    return chunk


def _raise_bad(reason: str | None) -> None:
    if reason is not None:
        raise CallError(Status.INVALID_ARGUMENT, reason)


def _write_all(fd: int, data: memoryview, off: int) -> None:
    """``data`` at byte ``off`` of the file (positional: shards are written at once)."""
    while len(data):
        n = os.pwrite(fd, data, off)
        data, off = data[n:], off + n
