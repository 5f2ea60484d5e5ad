"""Uploads split across parallel streams (``UploadHeader.shard`` / ``shards``), the server's
side (:mod:`fedagg.deploy._shards`), over the in-memory transport with the shards' streams
sent by hand, at once:

* an upload in S shards gives the bits of the same upload on one stream, folded on receive
  (one lease for all the shards) or spooled; its logged checksum (the sharded definition)
  verifies on read-back: a replay over the state directory reaches the live state, and a
  corrupted file is refused;
* any shard failing (a NaN, a bad digest or signature, a header that disagrees, a stream
  cancelled, a shard that never comes) fails every shard's call and changes no state, to the
  bit; a retry then goes through;
* the bounds: at most ``max_streams`` shards, each index below the count, one stream per
  shard at a time; a re-sent shard of an accepted upload is acknowledged as a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fedagg._checkpoint import dumps
from fedagg.deploy import Federation
from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._auth import upload_body
from fedagg.deploy._service import FederationService
from fedagg.deploy._shardsum import is_sharded, shard_range
from fedagg.deploy._spoolcheck import verify_file
from fedagg.deploy._store import UploadRow
from fedagg.deploy._wire import encode_chunk
from fedagg.errors import StateError
from tests.deploy.test_fold_ingest import OTHER, Hand, _delta, _fed, _session, _weight

SERVICE = "/fedagg.v1.Federation/"


def _shard_msgs(
    hand: Hand, i: int, t: pb.Task, shard: int, shards: int, data: bytes, *,
    weight: float | None = None, digest_of: bytes | None = None, signer: Any = None,
) -> list[bytes]:  # fmt: skip
    """Shard ``shard`` of ``shards`` of ``data``: its header, chunks at their absolute
    offsets, its trailer (the digest of ``digest_of``, default its own bytes)."""
    peer = hand.peers[i]
    w = _weight(t.task) if weight is None else weight
    nbytes = len(data)
    content = upload_body(t.task, t.version, w, nbytes, {}, shard, shards)
    head = pb.UploadHeader(auth=peer.auth("Push", content), task=t.task, version=t.version,
                           weight=w, nbytes=nbytes, shard=shard, shards=shards)  # fmt: skip
    start, length = shard_range(shard, shards, nbytes, 4)
    part = data[start : start + length]
    trailer = peer.trailer(head, part if digest_of is None else digest_of, signer=signer)
    step = hand.step
    out = [encode_chunk({2: start}, part[:step], head.SerializeToString())]
    out += [encode_chunk({2: start + o}, part[o : o + step]) for o in range(step, len(part), step)]
    out.append(encode_chunk({}, b"", None, trailer))
    return out


async def _push_all(hand: Hand, i: int, streams: list[list[bytes]]) -> list[Any]:
    """Every shard's stream at once; each one's reply or error."""
    return list(await asyncio.gather(*(hand.push(i, m) for m in streams), return_exceptions=True))


async def _sharded(hand: Hand, i: int, shards: int) -> list[Any]:
    t = await hand.task(i)
    data = _delta(t.task, size=hand.size).tobytes()
    out = await _push_all(hand, i, [_shard_msgs(hand, i, t, s, shards, data)
                                    for s in range(shards)])  # fmt: skip
    hand.tasks[i] = None
    return out


@pytest.mark.parametrize("ingest", ["fold", "spool"])
@pytest.mark.parametrize("shards", [2, 3])
@pytest.mark.parametrize("acc", ["float32", "float64"])
def test_a_sharded_upload_gives_the_bits_of_one_stream(
    tmp_path: Path, ingest: str, shards: int, acc: str
) -> None:
    seen: list[Any] = []

    async def sharded(hand: Hand, service: FederationService) -> None:
        fed: Federation = service.engine  # type: ignore[assignment]
        for _ in range(2):
            for i in range(3):
                replies = await _sharded(hand, i, shards)
                assert all(isinstance(r, pb.PushReply) and not r.duplicate for r in replies), (
                    replies
                )
                live = await service.in_engine(lambda: dumps(fed.state))
                seen.append(await service.in_engine(_replayed, fed, acc, live))
        await asyncio.wait_for(service.wait(), 10)

    async def one(hand: Hand, service: FederationService) -> None:
        for _ in range(2):
            for i in range(3):
                await hand.good(i)
        await asyncio.wait_for(service.wait(), 10)

    opts = {"chunk_bytes": 4096}
    fed = asyncio.run(_session(tmp_path / "s", ingest, sharded, acc=acc, size=20_000, opts=opts))
    ref = asyncio.run(_session(tmp_path / "r", "spool", one, acc=acc, size=20_000, opts=opts))
    assert fed.server.params.tobytes() == ref.server.params.tobytes()
    assert fed.ingest.commits == (6 if ingest == "fold" else 0)
    assert all(seen)
    with contextlib.closing(sqlite3.connect(fed.dir / "state.db")) as db:
        checks = [bytes(r[0]) for r in db.execute("SELECT checksum FROM uploads")]
    assert len(checks) == 6 and all(is_sharded(c) and c[1] == shards for c in checks)


def _replayed(fed: Federation, acc: str, live: bytes) -> bool:
    """A federation opened over the same directory (a restart) replays to ``live``."""
    again = _fed(fed.dir, acc=acc, size=fed.spec.size)
    again.open()
    try:
        return dumps(again.state) == live
    finally:
        again.close()


def test_a_sharded_spool_file_is_verified_on_read_back(tmp_path: Path) -> None:
    rows: list[UploadRow] = []

    async def script(hand: Hand, service: FederationService) -> None:
        fed: Federation = service.engine  # type: ignore[assignment]
        await _sharded(hand, 0, 3)
        rows.extend(await service.in_engine(lambda: [r.upload for r in fed.store.events_after(0)
                                                      if r.upload is not None]))  # fmt: skip
        u = rows[0]
        verify_file(u, "test")  # the file as received: its checksum holds
        with open(u.path, "r+b") as f:  # one bit flipped in the last shard
            f.seek(u.nbytes - 9)
            b = f.read(1)
            f.seek(u.nbytes - 9)
            f.write(bytes([b[0] ^ 1]))
        with pytest.raises(StateError, match="checksum differs"):
            verify_file(u, "test")

    asyncio.run(_session(tmp_path / "s", "fold", script, size=20_000))
    assert len(rows) == 1 and is_sharded(rows[0].checksum)


# -- failures ------------------------------------------------------------------------------------
def _state(fed: Federation) -> tuple[bytes, list[str], int]:
    files = sorted(p.name for p in (fed.dir / "spool").iterdir() if not p.name.startswith("free-"))
    with contextlib.closing(sqlite3.connect(fed.dir / "state.db")) as db:
        n = int(db.execute("SELECT count(*) FROM events").fetchone()[0])
    return dumps(fed.state), files, n


SHARD_FAILURES = ["nan", "bad_digest", "bad_signature", "disagrees", "cancel", "missing"]


@pytest.mark.parametrize("kind", SHARD_FAILURES)
@pytest.mark.parametrize("ingest", ["fold", "spool"])
def test_a_failing_shard_fails_the_upload_and_changes_no_state(
    tmp_path: Path, kind: str, ingest: str
) -> None:
    async def script(hand: Hand, service: FederationService) -> None:
        fed: Federation = service.engine  # type: ignore[assignment]
        await hand.good(1)
        before = await service.in_engine(_state, fed)
        t = await hand.task(0)
        data = _delta(t.task, size=hand.size).tobytes()
        msgs = [_shard_msgs(hand, 0, t, s, 3, data) for s in range(3)]
        if kind == "nan":
            x = np.frombuffer(data, np.float32).copy()
            start, _ = shard_range(2, 3, len(data), 4)
            x[start // 4 + 3000] = np.nan
            msgs[2] = _shard_msgs(hand, 0, t, 2, 3, x.tobytes())
        elif kind == "bad_digest":
            msgs[1] = _shard_msgs(hand, 0, t, 1, 3, data, digest_of=b"other")
        elif kind == "bad_signature":
            msgs[1] = _shard_msgs(hand, 0, t, 1, 3, data, signer=OTHER.private)
        elif kind == "disagrees":
            msgs[2] = _shard_msgs(hand, 0, t, 2, 3, data, weight=99.0)
        if kind in ("cancel", "missing"):
            hold = asyncio.Event()

            async def held(m: list[bytes]) -> AsyncIterator[bytes]:
                for x in m[:3]:
                    yield x
                await hold.wait()

            calls = [asyncio.create_task(hand.push(0, msgs[0])),
                     asyncio.create_task(hand.push(0, msgs[1]))]  # fmt: skip
            if kind == "cancel":
                third = asyncio.create_task(hand.push(0, held(msgs[2])))
                for _ in range(1000):  # shards 0 and 1 in, shard 2 mid-way
                    asm = next(iter(service.shards.live.values()), None)
                    if asm is not None and len(asm.done) == 2 and 2 in asm.streams:
                        break
                    await asyncio.sleep(0.005)
                await asyncio.sleep(0.05)
                lease = fed.ingest.lease
                assert ingest == "spool" or (lease is not None and len(lease.ranges) >= 5)
                third.cancel()
            results = await asyncio.gather(*calls, return_exceptions=True)
        else:
            results = await _push_all(hand, 0, msgs)
        assert all(isinstance(r, grpc.aio.AioRpcError) for r in results), results
        for _ in range(400):  # the assembly's cleanup ends on its own time
            if not service.shards.live and service.up.slots.get("client:0", 0) == 0:
                break
            await asyncio.sleep(0.005)
        assert await service.in_engine(_state, fed) == before
        # the client sends it again, whole: accepted, folded
        replies = await _push_all(hand, 0, [_shard_msgs(hand, 0, t, s, 3, data)
                                            for s in range(3)])  # fmt: skip
        assert all(isinstance(r, pb.PushReply) and not r.duplicate for r in replies), replies
        hand.tasks[0] = None
        await hand.good(2)
        for i in range(3):
            await hand.good(i)
        await asyncio.wait_for(service.wait(), 10)

    opts: dict[str, Any] = {"idle_timeout": 1.0} if kind == "missing" else {}
    fed = asyncio.run(_session(tmp_path / "f", ingest, script, size=20_000, opts=opts))
    assert fed.finished


def test_the_shard_bounds(tmp_path: Path) -> None:
    async def script(hand: Hand, service: FederationService) -> None:
        fed: Federation = service.engine  # type: ignore[assignment]
        t = await hand.task(0)
        data = _delta(t.task, size=hand.size).tobytes()
        before = await service.in_engine(_state, fed)
        for shard, shards in ((0, 5), (3, 3)):  # over max_streams (4); an index past the count
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await hand.push(0, _shard_msgs(hand, 0, t, shard, shards, data))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "shards" in (e.value.details() or "")
        # one stream per shard at a time: a second stream for shard 0 while the first runs
        hold = asyncio.Event()
        m0 = _shard_msgs(hand, 0, t, 0, 2, data)

        async def held() -> AsyncIterator[bytes]:
            yield m0[0]
            await hold.wait()
            for x in m0[1:]:
                yield x

        first = asyncio.create_task(hand.push(0, held()))
        for _ in range(400):
            if service.shards.live:
                break
            await asyncio.sleep(0.005)
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await hand.push(0, _shard_msgs(hand, 0, t, 0, 2, data))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        hold.set()
        second = await hand.push(0, _shard_msgs(hand, 0, t, 1, 2, data))
        assert not second.duplicate and not (await first).duplicate
        # re-sent, shard by shard: duplicates
        again = await _push_all(hand, 0, [_shard_msgs(hand, 0, t, s, 2, data) for s in range(2)])
        assert all(r.duplicate for r in again), again
        assert (await service.in_engine(_state, fed))[2] == before[2] + 1

    asyncio.run(_session(tmp_path / "b", "fold", script, size=20_000,
                         opts={"max_streams": 4}))  # fmt: skip


def test_hello_says_how_many_streams(tmp_path: Path) -> None:
    async def script(hand: Hand, service: FederationService) -> None:
        raw = await hand.peers[0].aunary("Hello", hand.peers[0].hello())
        assert pb.HelloReply.FromString(raw).max_streams == 3

    asyncio.run(_session(tmp_path / "h", "fold", script, opts={"max_streams": 3}))
