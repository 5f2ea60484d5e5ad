"""The server's side of an upload split across parallel streams (``UploadHeader.shard`` /
``shards``, see ``fedagg.proto``): its shards assembled into one upload.

Shard ``i`` of ``S`` carries the elements ``[i*n//S, (i+1)*n//S)`` of the flat update (of
``n`` elements) at their absolute byte offsets, on its own ``Push`` stream, with its own
signed header (the whole upload's task, version, weight, size and metrics, and its shard's
index and count) and trailer (the digest of its shard's bytes). The streams of one upload
meet in an :class:`Assembly`, keyed by (client, task):

* every shard's header must agree with the first one's (else the upload fails), each shard
  index once at a time (a second stream for it is refused, RESOURCE_EXHAUSTED, until the
  first ends; so is any stream once every shard is in, or the upload failed: it cannot
  undo the upload's outcome); at most ``max_streams`` shards;
* the assembly's runner (a task of its own, not any one stream's) holds the upload's slot
  (one of the owner's ``client_uploads``: at most ``client_uploads x S`` streams per
  client), one of the ``max_uploads`` slots *per stream* (S of them, taken together, one
  split upload at a time gathering them, so that several waiting cannot each hold part of
  the pool: at most ``max_uploads`` streams receive at once; a server advertises
  ``min(max_streams, max_uploads)`` streams, :meth:`Shards.most`) and its one-at-a-time
  key, opens one spool file and takes one fold lease
  (:mod:`fedagg.deploy._ingest`) for all the shards; each stream writes its shard at its
  offsets and folds its range (disjoint ranges: at once, on the I/O threads), its chunks,
  digest and trailer signature checked as a whole upload's are
  (:meth:`~fedagg.deploy._upload.Uploads.stream`); a stream waits unread (flow control)
  until then, for ``idle_timeout`` at most (then the upload fails, RESOURCE_EXHAUSTED: the
  client retries);
* once every shard is in: the file fsynced and renamed, the arrival logged as a whole
  upload's, and every shard's stream answered with that outcome. Any shard failing (a bad
  chunk, a bad trailer, a stream cut off or cancelled), a shard that never comes within
  ``idle_timeout``, or the whole upload past its progress floor (``idle_timeout + nbytes /
  min_rate``) fails the upload: every other shard's stream is stopped and answered with the
  failure, the folds are rolled back, the file removed.

**The checksum** (the at-rest xxh3-128 a read-back is checked against) of a sharded upload
is ``0xFF, S, itemsize`` followed by the xxh3-128 of the shards' own xxh3-128 digests in
shard order (19 bytes; a whole upload's is the 16 bytes of xxh3-128; see
:mod:`fedagg.deploy._shardsum`).
Each stream computes its shard's as its bytes arrive; :mod:`fedagg.deploy._spoolcheck`
recomputes it from the file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._arrivals import acknowledge, log_arrival
from fedagg.deploy._faults import crash_point
from fedagg.deploy._ingest import Lease, rollback
from fedagg.deploy._shardsum import combined, shard_range
from fedagg.deploy._transport import CallError, Status
from fedagg.deploy._upload import Paced, SpoolFile

__all__ = ["Assembly", "Shards"]

log = logging.getLogger("fedagg.server")


@contextlib.asynccontextmanager
async def _owned(up: Any, owner: str) -> AsyncIterator[None]:
    """One of the ``client_uploads`` slots of ``owner`` (refused beyond, RESOURCE_EXHAUSTED)."""
    with up.owned(up.slots, owner, "uploads"):
        yield


def _fields(head: Any) -> tuple[Any, ...]:
    return (int(head.task), int(head.version), float(head.weight), int(head.nbytes),
            sorted(head.metrics.items()), int(head.shards))  # fmt: skip


class Assembly:
    """The shards of one upload, as they arrive (see the module docstring)."""

    def __init__(self, key: tuple[int, int], head: Any) -> None:
        self.key = key
        self.head = head
        self.fields = _fields(head)
        self.shards = int(head.shards)
        self.streams: set[int] = set()  # shard indices whose stream arrived
        self.done: dict[int, tuple[bytes, bytes, bytes]] = {}  # digest, checksum, signature
        self.children: set[asyncio.Task[Any]] = set()  # the shards' receiving tasks
        self.started = asyncio.Event()  # the slot is held, the file open, the lease taken
        self.all_in = asyncio.Event()  # every shard in, or the upload failed
        self.outcome: asyncio.Future[pb.PushReply] = asyncio.get_running_loop().create_future()
        self.spool: SpoolFile | None = None
        self.lease: Lease | None = None
        self.rest0: AsyncIterator[bytes] | None = None  # the first stream, paced by the slot
        self.runner: asyncio.Task[None] | None = None
        self.waiting = False  # the runner is waiting for its slots

    def fail(self, e: BaseException) -> CallError:
        """The upload fails (the first failure is its outcome): every shard stops."""
        err = e if isinstance(e, CallError) else CallError(
            Status.ABORTED, f"upload of task {self.key[1]} failed: a shard's stream ended"
        )  # fmt: skip
        if not self.outcome.done():
            self.outcome.set_exception(err)
            self.outcome.exception()  # retrieved: no "never retrieved" warning
        self.all_in.set()
        for t in list(self.children):
            t.cancel()
        if self.runner is not None and self.waiting:
            self.runner.cancel()  # still waiting for its slots: it stops waiting
        failure = self.outcome.exception()
        return failure if isinstance(failure, CallError) else err

    async def ready(self, timeout: float) -> None:
        """Wait until the assembly started (``timeout`` seconds at most: then it fails,
        RESOURCE_EXHAUSTED), or raise its failure."""
        if not self.started.is_set():
            wait: asyncio.Future[Any] = asyncio.ensure_future(self.started.wait())
            try:
                aws: list[asyncio.Future[Any]] = [wait, self.outcome]
                await asyncio.wait(aws, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                wait.cancel()
            if not self.started.is_set() and not self.outcome.done():
                raise self.fail(CallError(
                    Status.RESOURCE_EXHAUSTED,
                    f"upload of task {self.key[1]}: no upload slots for its {self.shards} "
                    f"streams within {timeout:g}s (the server is busy): retry later",
                ))  # fmt: skip
        if self.outcome.done() and self.outcome.exception() is not None:
            raise self.fail(CallError(Status.ABORTED, "failed"))


class Shards:
    """The assemblies of a service (event loop only). ``svc``: the
    :class:`~fedagg.deploy._service.FederationService` (its uploads, fold leases, log)."""

    def __init__(self, svc: Any) -> None:
        self.svc = svc
        self.live: dict[tuple[int, int], Assembly] = {}
        self.gather = asyncio.Lock()  # held by the one split upload gathering its slots

    def most(self) -> int:
        """The most streams an upload may be split across here (``HelloReply.max_streams``):
        ``max_streams``, at most ``max_uploads`` (each stream takes one of those slots)."""
        return int(min(self.svc.opt.max_streams, self.svc.opt.max_uploads))

    @contextlib.asynccontextmanager
    async def slots(self, asm: Assembly) -> AsyncIterator[None]:
        """One of the ``max_uploads`` slots per stream of ``asm``, taken together: one split
        upload at a time gathers its slots (the others wait for the lock), so waiting
        uploads never each hold part of the pool (no deadlock); an upload on one stream
        takes its one slot meanwhile. Released however it ends; a failure of the upload
        meanwhile stops the wait (:meth:`Assembly.fail`)."""
        pool: asyncio.Semaphore = self.svc.up.uploads
        held = 0
        asm.waiting = True
        try:
            async with self.gather:
                for _ in range(asm.shards):
                    await pool.acquire()
                    held += 1
            asm.waiting = False
            yield
        finally:
            asm.waiting = False
            for _ in range(held):
                pool.release()

    def check(self, head: Any, masked: bool) -> None:
        """A shard header's own bounds (before anything is taken for it)."""
        most = self.most()
        if not 1 < head.shards <= most or head.shard >= head.shards:
            raise CallError(
                Status.INVALID_ARGUMENT,
                f"shard {head.shard} of {head.shards}: at most {most} shards "
                "(HelloReply.max_streams), each index below their count",
            )
        if masked or getattr(self.svc.engine, "ingest", None) is None:
            raise CallError(
                Status.FAILED_PRECONDITION,
                "this upload cannot be split across streams here (a masked upload, or an "
                "edge aggregator): send it on one stream",
            )

    async def push(
        self, client: int, first: Any, it: AsyncIterator[bytes], head: Any,
        dtype: np.dtype[Any], keyring: Any, duplicate: bool,
    ) -> pb.PushReply:  # fmt: skip
        svc = self.svc
        start, length = shard_range(head.shard, head.shards, head.nbytes, dtype.itemsize)
        if duplicate:  # a re-sent shard of an accepted upload: read it, acknowledge
            owner = f"client:{client}/shard:{head.shard}"
            async with svc.up.slot(owner, it, length) as paced:
                what = f"re-sent shard {head.shard} of accepted task {head.task}"
                await svc.up.read_unspooled(first, paced, head, dtype.itemsize, what,
                                            start=start, length=length)  # fmt: skip
            svc.stats.duplicates += 1
            ack: pb.PushReply = svc.ack(head.task, True, svc.retained)
            return ack
        key = (client, int(head.task))
        asm = self.live.get(key)
        if asm is None:
            asm = self.live[key] = Assembly(key, head)
            asm.runner = asyncio.create_task(self._run(asm, client, head, it, dtype))
        elif asm.all_in.is_set():  # committing (or failed, cleaning up): it stands as it is
            raise CallError(
                Status.RESOURCE_EXHAUSTED,
                f"shard {head.shard} of task {head.task}: the upload's shards are all in "
                "(or it failed): retry later",
            )
        elif _fields(head) != asm.fields:
            raise asm.fail(CallError(
                Status.INVALID_ARGUMENT,
                f"shard {head.shard} of task {head.task}: its header disagrees with the "
                "upload's other shards (task, version, weight, size, metrics, shard count)",
            ))  # fmt: skip
        if head.shard in asm.streams:
            raise CallError(
                Status.RESOURCE_EXHAUSTED,
                f"shard {head.shard} of task {head.task} is already being received: retry later",
            )
        asm.streams.add(head.shard)
        try:
            await asm.ready(svc.opt.idle_timeout)
        except BaseException as e:
            err = asm.fail(e)
            task = asyncio.current_task()
            if isinstance(e, asyncio.CancelledError) and task and task.cancelling():
                raise  # this call was cancelled (its client went away): it ends so
            raise err from None
        if head.shard == asm.head.shard and asm.rest0 is not None and asm.head is head:
            rest: AsyncIterator[bytes] = asm.rest0
        else:
            opt = svc.opt
            until = time.monotonic() + opt.idle_timeout + length / opt.min_rate
            rest = Paced(it, opt.idle_timeout, until)
        await self._receive(asm, first, rest, head, dtype, keyring, start, length)
        return await asyncio.shield(asm.outcome)

    async def _receive(
        self, asm: Assembly, first: Any, rest: AsyncIterator[bytes], head: Any,
        dtype: np.dtype[Any], keyring: Any, start: int, length: int,
    ) -> None:  # fmt: skip
        """Receive one shard into the assembly, as a task of its own (stopped if another
        shard fails)."""
        assert asm.spool is not None
        child = asyncio.create_task(
            self.svc.up.stream(
                asm.spool,
                first,
                rest,
                head,
                dtype,
                keyring,
                lease=asm.lease,
                start=start,
                length=length,
            )
        )
        asm.children.add(child)
        try:
            asm.done[head.shard] = await child
        except BaseException as e:
            err = asm.fail(e)
            task = asyncio.current_task()
            if isinstance(e, asyncio.CancelledError) and not (task and task.cancelling()):
                raise err from None  # stopped by another shard's failure: that is the answer
            raise
        finally:
            asm.children.discard(child)
        if len(asm.done) == asm.shards:
            asm.all_in.set()

    async def _run(
        self, asm: Assembly, client: int, head: Any, it: AsyncIterator[bytes],
        dtype: np.dtype[Any],
    ) -> None:  # fmt: skip
        """The upload's lifetime: its slot, file and lease; its commit once every shard is
        in, or its cleanup."""
        svc = self.svc
        opt = svc.opt
        lease: Lease | None = None
        queued = False
        watch: asyncio.TimerHandle | None = None
        try:
            async with (
                svc.up.one_upload(client, head.task),
                _owned(svc.up, f"client:{client}"),  # one of its client_uploads
                self.slots(asm),  # one of the max_uploads per stream
            ):
                until = time.monotonic() + opt.idle_timeout + head.nbytes / opt.min_rate
                rest = Paced(it, opt.idle_timeout, until)
                asm.spool = spool = svc.up.new_spool(head.task, client)
                await spool.open(svc.up.open_spool)
                lease = asm.lease = await svc.turns.take(client, head, False)
                asm.rest0 = rest
                asm.started.set()
                watch = asyncio.get_running_loop().call_later(opt.idle_timeout, self._late, asm)
                try:
                    async with asyncio.timeout(max(0.0, until - time.monotonic())):
                        await asm.all_in.wait()
                except TimeoutError:
                    asm.fail(CallError(Status.DEADLINE_EXCEEDED,
                                       "upload cut off: below the progress floor"))  # fmt: skip
                if asm.outcome.done():
                    raise asm.fail(CallError(Status.ABORTED, "failed"))
                if opt.fsync and not svc.up.defer_sync:  # retained: the committer syncs it
                    await spool.start(os.fsync)
                await spool.commit()
                crash_point("spooled")
                if lease is not None:
                    lease.complete, lease.path = True, str(spool.final)
                parts = [asm.done[i] for i in range(asm.shards)]
                digest = b"".join(p[0] for p in parts)
                check = combined([p[1] for p in parts], dtype.itemsize)
                metrics = dict(head.metrics)
                try:
                    item = await log_arrival(svc, client, head, spool.final, digest, check,
                                                 metrics, None, lease, svc.retained)  # fmt: skip
                    queued = True
                finally:
                    await svc.turns.end(lease, queued)
                    lease = None
                reply = await acknowledge(svc, client, head, spool.final, item, asm.lease)
                if not asm.outcome.done():
                    asm.outcome.set_result(reply)
        except BaseException as e:
            asm.fail(e)
            await self._clean(asm, lease, queued)
            if not isinstance(e, CallError | asyncio.CancelledError):
                log.exception("sharded upload of task %d failed", asm.key[1])
        finally:
            if watch is not None:
                watch.cancel()
            if self.live.get(asm.key) is asm:
                del self.live[asm.key]

    async def _clean(self, asm: Assembly, lease: Lease | None, queued: bool) -> None:
        """After a failure: the shards' tasks end, the folds are undone, the file goes."""
        if asm.children:
            await asyncio.gather(*list(asm.children), return_exceptions=True)
        if lease is not None:
            await self.svc.turns.end(lease, queued)
        elif asm.lease is not None and not queued:
            await rollback(self.svc.io, asm.lease)
        if asm.spool is not None and not queued:
            await asm.spool.discard()

    def _late(self, asm: Assembly) -> None:
        missing = sorted(set(range(asm.shards)) - asm.streams)
        if missing and not asm.outcome.done():
            asm.fail(CallError(
                Status.DEADLINE_EXCEEDED,
                f"upload of task {asm.key[1]}: shard(s) {missing} did not come within "
                f"{self.svc.opt.idle_timeout:g}s",
            ))  # fmt: skip
