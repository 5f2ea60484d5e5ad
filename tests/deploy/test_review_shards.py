"""Split uploads and the upload slots (review M1), over the in-memory transport with the
shards' streams sent by hand:

* every stream of a split upload takes one of the ``max_uploads`` slots (the upload's S
  taken together): with several clients sending split uploads at once, no more streams
  receive at once than ``max_uploads``, and every upload goes through;
* a stream parked waiting for its upload's slots gives up after ``idle_timeout``
  (RESOURCE_EXHAUSTED, retried by clients), its siblings with it, holding nothing; sent
  again once slots are free, the upload goes through;
* a server advertises, and accepts, at most ``max_uploads`` streams per upload.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._service import FederationService
from tests.deploy.test_fold_ingest import Hand, _delta, _session
from tests.deploy.test_shards import _shard_msgs


async def _until(cond: Any, what: str) -> None:
    for _ in range(2000):
        if cond():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never: {what}")


class Receiving:
    """Counts the shard streams receiving at once (wraps ``Uploads.stream``)."""

    def __init__(self, service: FederationService) -> None:
        self.now = self.peak = 0
        inner = service.up.stream

        async def stream(*a: Any, **kw: Any) -> Any:
            self.now += 1
            self.peak = max(self.peak, self.now)
            try:
                return await inner(*a, **kw)
            finally:
                self.now -= 1

        service.up.stream = stream  # type: ignore[method-assign]


async def _held(msgs: list[bytes], go: asyncio.Event) -> AsyncIterator[bytes]:
    """A shard's header and first chunk, the rest once ``go`` is set."""
    for m in msgs[:2]:
        yield m
    await go.wait()
    for m in msgs[2:]:
        yield m


@pytest.mark.parametrize("ingest", ["fold", "spool"])
def test_split_uploads_receive_at_most_max_uploads_streams(tmp_path: Any, ingest: str) -> None:
    async def script(hand: Hand, service: FederationService) -> None:
        seen = Receiving(service)
        go = asyncio.Event()
        calls = []
        for i in range(3):  # three clients, an upload in 3 shards each, all at once
            t = await hand.task(i)
            data = _delta(t.task, size=hand.size).tobytes()
            calls += [
                asyncio.create_task(hand.push(i, _held(_shard_msgs(hand, i, t, s, 3, data), go)))
                for s in range(3)
            ]
        live = service.shards.live

        def settled() -> bool:  # every stream in; nothing more can start before one ends
            asms = list(live.values())
            if len(asms) < 3 or any(len(a.streams) < 3 for a in asms):
                return False
            started = sum(a.started.is_set() for a in asms)
            return seen.now == 9 or (seen.now == 3 * started and service.up.uploads.locked())

        await _until(settled, "every stream in, the pool taken")
        assert seen.peak <= 4, seen.peak  # max_uploads: one upload's 3 streams, not 9
        go.set()
        replies = await asyncio.wait_for(asyncio.gather(*calls), 30)
        assert all(isinstance(r, pb.PushReply) and not r.duplicate for r in replies), replies
        assert seen.peak <= 4, seen.peak
        hand.tasks = [None] * 3
        assert service.up.slots.get("client:0", 0) == 0 and not service.up.uploads.locked()
        await asyncio.wait_for(service.wait(), 30)

    fed = asyncio.run(_session(tmp_path / "s", ingest, script, size=20_000, rounds=1,
                               opts={"max_uploads": 4, "chunk_bytes": 4096}))  # fmt: skip
    assert fed.finished


def test_a_parked_shard_stream_gives_up_after_idle_timeout(tmp_path: Any) -> None:
    async def script(hand: Hand, service: FederationService) -> None:
        pool = service.up.uploads
        for _ in range(2):  # the pool is taken (two uploads on one stream each, say)
            await pool.acquire()
        t = await hand.task(0)
        data = _delta(t.task, size=hand.size).tobytes()
        msgs = [_shard_msgs(hand, 0, t, s, 2, data) for s in range(2)]
        parked = [asyncio.create_task(hand.push(0, m)) for m in msgs[:1]]  # a sibling never comes
        results = await asyncio.wait_for(asyncio.gather(*parked, return_exceptions=True), 10)
        assert all(
            isinstance(r, grpc.aio.AioRpcError)
            and r.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            and "no upload slots" in (r.details() or "")
            for r in results
        ), results
        await _until(lambda: not service.shards.live, "the assembly gone")
        assert service.up.slots.get("client:0", 0) == 0 and not service.shards.gather.locked()
        for _ in range(2):
            pool.release()
        # both shards (new requests: new nonces), slots free: through
        msgs = [_shard_msgs(hand, 0, t, s, 2, data) for s in range(2)]
        replies = await asyncio.gather(*(hand.push(0, m) for m in msgs))
        assert all(not r.duplicate for r in replies), replies
        assert not pool.locked() and pool._value == 2

    asyncio.run(_session(tmp_path / "p", "fold", script, size=20_000,
                         opts={"max_uploads": 2, "idle_timeout": 0.5}))  # fmt: skip


def test_at_most_max_uploads_streams_per_upload(tmp_path: Any) -> None:
    async def script(hand: Hand, service: FederationService) -> None:
        raw = await hand.peers[0].aunary("Hello", hand.peers[0].hello())
        assert pb.HelloReply.FromString(raw).max_streams == 3
        t = await hand.task(0)
        data = _delta(t.task, size=hand.size).tobytes()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await hand.push(0, _shard_msgs(hand, 0, t, 0, 4, data))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(_session(tmp_path / "h", "fold", script, size=20_000,
                         opts={"max_uploads": 3, "max_streams": 8}))  # fmt: skip


def test_a_late_stream_cannot_fail_an_upload_whose_shards_are_all_in(tmp_path: Any) -> None:
    """Review L4: once every shard is in (the upload committing: here its arrival waits for
    the engine thread), a stream with a disagreeing header is refused (RESOURCE_EXHAUSTED)
    and the upload's own streams are acknowledged."""

    async def script(hand: Hand, service: FederationService) -> None:
        t = await hand.task(0)
        data = _delta(t.task, size=hand.size).tobytes()
        go = asyncio.Event()
        calls = [asyncio.create_task(hand.push(0, _held(_shard_msgs(hand, 0, t, s, 2, data), go)))
                 for s in range(2)]  # fmt: skip
        live = service.shards.live
        await _until(lambda: any(a.started.is_set() for a in live.values()), "started")
        started, release = threading.Event(), threading.Event()

        def step() -> None:  # the engine thread busy: the arrival waits to be logged
            started.set()
            release.wait(20)

        busy = asyncio.create_task(service.in_engine(step))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
        go.set()
        await _until(lambda: all(a.all_in.is_set() for a in live.values()), "all in")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await hand.push(0, _shard_msgs(hand, 0, t, 0, 2, data, weight=99.0))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        release.set()
        await busy
        replies = await asyncio.wait_for(asyncio.gather(*calls), 20)
        assert all(isinstance(r, pb.PushReply) and not r.duplicate for r in replies), replies

    asyncio.run(_session(tmp_path / "l", "fold", script, size=20_000))
