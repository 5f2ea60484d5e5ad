"""Fold on receive (``ingest = "fold"``, :mod:`fedagg.deploy._ingest`), over the in-memory
transport, with client 0..2 played by hand so that the order of the uploads is fixed:

* the same uploads through ``ingest = "fold"`` and ``"spool"`` leave bit-identical
  accumulators after every upload, and the same model (float32 and float64 accumulators, a
  plain mean and one bounded in arrival order);
* an upload that fails after some of its chunks were folded (a NaN chunk, a truncation, a
  bad trailer signature or digest, a cancelled call, an idle stream) leaves the state exactly
  as it was, bit for bit, and the spool as it was;
* an upload whose sum overflows float32 is refused as the spool path refuses it;
* a lease is revoked (rolled back) before a round closes on its timer and before a
  checkpoint;
* replay of the log over a copy of the state directory (a crash, without the process)
  reproduces the live state bit for bit.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedagg import strategies
from fedagg._checkpoint import dumps
from fedagg.aggregators import mean
from fedagg.deploy import ClientKey, Federation, Keyring, ServerOptions
from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._bounds import Bounds, bounded_strategy
from fedagg.deploy._ingest import Lease
from fedagg.deploy._service import FederationService
from fedagg.policy import SyncPolicy
from tests.deploy.test_bad_input import Upload, chunks
from tests.deploy.test_memory_scenarios import MemPeer, TaskStream

D = 4810  # 5 chunks of 4 KiB
CHUNK = 4096
NAMES = ["c0", "c1", "c2"]
KEYS = {n: ClientKey(n, Ed25519PrivateKey.generate()) for n in NAMES}
OTHER = ClientKey("c0", Ed25519PrivateKey.generate())
RING = Keyring({n: k.private.public_key() for n, k in KEYS.items()})


def _fed(d: Path, acc: str = "float32", bounded: bool = False, rounds: int = 2,
         deadline: float = float("inf"), checkpoint_updates: int = 0, size: int = D,
         ) -> Federation:  # fmt: skip
    strategy = strategies.fedavg(aggregator=mean(acc))  # type: ignore[arg-type]
    if bounded:  # warm after the first round (one client's claim in the window)
        strategy = bounded_strategy(strategy, Bounds(warmup=1), canonical=False)
    policy = SyncPolicy(strategy=strategy, rounds=rounds, clients_per_round=3,
                        deadline=deadline)  # fmt: skip
    server = strategy.init([np.zeros(size, np.float32)])
    return Federation(policy, server, num_clients=3, seed=5, directory=d,
                      checkpoint_updates=checkpoint_updates,
                      identity={"test": "fold-ingest"})  # fmt: skip


def _opts(ingest: str, **kw: Any) -> ServerOptions:
    kw = {"chunk_bytes": CHUNK, **kw}
    return ServerOptions(listen="127.0.0.1:0", insecure=True, fsync=False, ingest=ingest, **kw)


def _delta(job: int, scale: float = 0.01, size: int = D) -> np.ndarray[Any, Any]:
    return (np.random.default_rng(job).standard_normal(size) * scale).astype(np.float32)


def _weight(job: int) -> float:
    return float(3 + job % 4)


def _snap(fed: Federation) -> tuple[Any, ...]:
    """The aggregate's sums and counts now (engine thread)."""
    ms = fed.state.agg
    ms = getattr(ms, "inner", ms)
    if ms is None:
        return ()
    comp = b"" if ms.comp is None else ms.comp.tobytes()
    return ms.acc.tobytes(), comp, ms.weight, ms.weight_comp, ms.count


async def held(msgs: list[bytes], go: asyncio.Event, first: int = 3) -> AsyncIterator[bytes]:
    """An upload's messages, the first ``first`` at once, the rest once ``go`` is set."""
    for m in msgs[:first]:
        yield m
    await go.wait()
    for m in msgs[first:]:
        yield m


async def folding(fed: Federation, ranges: int, job: int) -> Lease:
    """The active lease of ``job``'s upload, once it folded ``ranges`` chunks (not an earlier
    upload's lease, complete and waiting for its arrival's step on a busy machine)."""
    lease = None
    for _ in range(2000):
        lease = fed.ingest.lease
        if lease is not None and lease.key[1] == job and len(lease.ranges) >= ranges:
            break
        await asyncio.sleep(0.005)
    assert lease is not None and lease.key[1] == job
    assert lease.live and len(lease.ranges) >= ranges
    return lease


class Hand:
    """The three clients, by hand, over memory: each with its task stream."""

    def __init__(self, service: FederationService) -> None:
        self.service = service
        self.size = service.engine.spec.size
        self.step = service.opt.chunk_bytes
        self.peers = [MemPeer(service, KEYS[n]) for n in NAMES]
        self.streams: list[TaskStream] = []
        self.tasks: list[pb.Task | None] = [None] * len(NAMES)

    async def start(self) -> None:
        self.streams = [TaskStream(p) for p in self.peers]

    async def task(self, i: int) -> pb.Task:
        t = self.tasks[i]
        if t is None:
            t = self.tasks[i] = await self.streams[i].next()
        return t

    def upload(self, i: int, t: pb.Task, data: bytes | None = None) -> Upload:
        raw = _delta(t.task, size=self.size).tobytes() if data is None else data
        return Upload(t.task, t.version, raw, _weight(t.task))

    async def push(self, i: int, messages: list[bytes] | AsyncIterator[bytes]) -> Any:
        peer = self.peers[i]
        if isinstance(messages, list):
            return await peer.apush(messages)
        raw = await peer.mem.stream_unary("/fedagg.v1.Federation/Push")(
            messages, metadata=peer.md("Push"), timeout=30
        )
        return pb.PushReply.FromString(raw)

    async def good(self, i: int) -> pb.PushReply:
        t = await self.task(i)
        u = self.upload(i, t)
        head = self.peers[i].header(u)
        msgs = chunks(head, u.data, self.step, self.peers[i].trailer(head, u.data))
        reply = await self.push(i, msgs)
        self.tasks[i] = None
        return reply

    async def close(self) -> None:
        for s in self.streams:
            await s.close()


async def _session(
    d: Path, ingest: str, script: Callable[[Hand, FederationService], Any], **kw: Any
) -> Federation:
    opts = kw.pop("opts", {})
    fed = _fed(d, **kw)
    service = FederationService(fed, RING, _opts(ingest, **opts))
    await service.start()
    hand = Hand(service)
    await hand.start()
    try:
        await script(hand, service)
    finally:
        await hand.close()
        await service.stop()
    return fed


async def _in_order(hand: Hand, service: FederationService, rounds: int = 2) -> list[Any]:
    """Every client's upload, in client order, round after round; the sums after each."""
    snaps = []
    for _ in range(rounds):
        for i in range(3):
            reply = await hand.good(i)
            assert not reply.duplicate
            snaps.append(await service.in_engine(_snap, service.engine))
    await asyncio.wait_for(service.wait(), 10)
    return snaps


@pytest.mark.parametrize(("acc", "bounded"), [("float32", False), ("float64", False),
                                              ("float32", True), ("float64", True)])  # fmt: skip
@pytest.mark.parametrize(("size", "chunk"), [(D, CHUNK), (150_000, CHUNK), (300_000, 1 << 20)])
def test_fold_and_spool_give_the_same_bits(
    tmp_path: Path, acc: str, bounded: bool, size: int, chunk: int
) -> None:
    """Small models and chunks (numpy kernels), large ones (the compiled kernels: the spool
    path's streaming fold of the whole update, the chunks' trusted fold)."""
    rounds = 3 if bounded else 2
    out: dict[str, list[Any]] = {}
    feds: dict[str, Federation] = {}
    for ingest in ("fold", "spool"):

        async def script(hand: Hand, service: FederationService, ingest: str = ingest) -> None:
            out[ingest] = await _in_order(hand, service, rounds)

        feds[ingest] = asyncio.run(
            _session(tmp_path / ingest, ingest, script, acc=acc, bounded=bounded, rounds=rounds,
                     size=size, opts={"chunk_bytes": chunk})
        )  # fmt: skip
    assert out["fold"] == out["spool"]
    fold, spool = feds["fold"], feds["spool"]
    assert fold.finished and spool.finished
    assert np.array_equal(fold.server.params, spool.server.params)
    assert fold.server.params.tobytes() == spool.server.params.tobytes()
    # every upload of a round that folds on arrival was folded on receive
    assert fold.ingest.commits == 3 * (rounds - 1 if bounded else rounds)
    assert spool.ingest.commits == 0


# -- failures mid-upload -------------------------------------------------------------------------
def _messages(hand: Hand, i: int, t: pb.Task, kind: str) -> list[bytes]:
    peer = hand.peers[i]
    u = hand.upload(i, t)
    head = peer.header(u)
    good = chunks(head, u.data, CHUNK, peer.trailer(head, u.data))
    if kind == "nan":
        x = _delta(t.task)
        x[3 * 1024 + 5] = np.nan  # in the fourth chunk
        bad = x.tobytes()
        return chunks(head, bad, CHUNK, peer.trailer(head, bad))
    if kind == "truncated":
        return good[:4]
    if kind == "no_trailer":
        return good[:-1]
    if kind == "bad_signature":
        forged = peer.trailer(head, u.data, signer=OTHER.private)
        return [*good[:-1], *chunks(None, b"", CHUNK, forged)[1:]]
    if kind == "bad_digest":
        return [*good[:-1], *chunks(None, b"", CHUNK, peer.trailer(head, b"other"))[1:]]
    raise ValueError(kind)


FAILURES = ["nan", "truncated", "no_trailer", "bad_signature", "bad_digest", "cancel", "idle"]


async def _fail(hand: Hand, service: FederationService, kind: str) -> Lease:
    """Client 0 starts its upload and fails in ``kind``'s way after chunks were folded."""
    fed: Federation = service.engine  # type: ignore[assignment]
    t = await hand.task(0)
    if kind in ("cancel", "idle"):
        msgs = _messages(hand, 0, t, "truncated")
        push = asyncio.create_task(hand.push(0, held(msgs, asyncio.Event(), len(msgs))))
        lease = await folding(fed, 3, t.task)
        if kind == "cancel":
            push.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await push
        else:
            with pytest.raises(Exception, match="idle"):
                await push
        for _ in range(2000):  # the server's side of a cancelled call ends on its own time
            if not lease.live:
                break
            await asyncio.sleep(0.005)
        return lease
    seen: list[Lease] = []
    grant = fed.ingest.grant

    def spy(*a: Any) -> Lease | None:
        lease = grant(*a)
        if lease is not None:
            seen.append(lease)
        return lease

    fed.ingest.grant = spy  # type: ignore[method-assign]
    try:
        with pytest.raises(Exception) as e:
            await hand.push(0, _messages(hand, 0, t, kind))
    finally:
        del fed.ingest.grant
    assert "upload" in str(e.value) or "trailer" in str(e.value) or "non-finite" in str(e.value)
    assert len(seen) == 1
    return seen[0]


def _files(d: Path) -> list[str]:
    return sorted(p.name for p in (d / "spool").iterdir() if not p.name.startswith("free-"))


async def _files_settle(d: Path, want: list[str]) -> list[str]:
    """The spool's files once a cancelled upload's file is gone: its write job, which a
    cancel cannot stop, removes it when it ends (up to 10 s on a busy machine)."""
    end = time.monotonic() + 10
    while _files(d) != want and time.monotonic() < end:
        await asyncio.sleep(0.02)
    return _files(d)


def _rows(d: Path) -> int:
    with contextlib.closing(sqlite3.connect(d / "state.db")) as db:
        return int(db.execute("SELECT count(*) FROM events").fetchone()[0])


@pytest.mark.parametrize("kind", FAILURES)
@pytest.mark.parametrize("acc", ["float32", "float64"])
def test_an_upload_failing_mid_way_changes_no_state(tmp_path: Path, kind: str, acc: str) -> None:
    result: dict[str, Any] = {}

    async def script(hand: Hand, service: FederationService) -> None:
        fed: Federation = service.engine  # type: ignore[assignment]
        await hand.good(1)  # a fold in the sums already
        before = await service.in_engine(lambda: dumps(fed.state))
        files, rows = _files(fed.dir), _rows(fed.dir)
        lease = await _fail(hand, service, kind)
        assert lease.rolled_back and not lease.live
        assert await service.in_engine(lambda: dumps(fed.state)) == before  # to the bit
        assert await _files_settle(fed.dir, files) == files and _rows(fed.dir) == rows
        assert fed.ingest.lease is None or not fed.ingest.lease.live
        # the same client then uploads its update: folded on receive, as if nothing happened
        await hand.good(0)
        await hand.good(2)
        result["commits"] = await service.in_engine(lambda: fed.ingest.commits)
        await hand.good(0), await hand.good(1), await hand.good(2)
        await asyncio.wait_for(service.wait(), 10)

    opts = {"idle_timeout": 0.5} if kind == "idle" else {}
    fed = asyncio.run(_session(tmp_path / "fold", "fold", script, acc=acc, opts=opts))
    assert result["commits"] == 3
    assert fed.finished

    async def clean(hand: Hand, service: FederationService) -> None:
        for i in (1, 0, 2, 0, 1, 2):  # the order accepted above
            await hand.good(i)
        await asyncio.wait_for(service.wait(), 10)

    ref = asyncio.run(_session(tmp_path / "ref", "spool", clean, acc=acc))
    assert fed.server.params.tobytes() == ref.server.params.tobytes()


def test_a_failed_upload_gives_the_model_of_the_same_order_without_it(tmp_path: Path) -> None:
    """The bits after failures equal the spool path's for the same accepted order."""

    async def failing(hand: Hand, service: FederationService) -> None:
        for i in range(3):
            for kind in ("nan", "bad_digest"):
                t = await hand.task(i)
                with pytest.raises(grpc.aio.AioRpcError):
                    await hand.push(i, _messages(hand, i, t, kind))
            await hand.good(i)
        for i in range(3):
            await hand.good(i)
        await asyncio.wait_for(service.wait(), 10)

    async def clean(hand: Hand, service: FederationService) -> None:
        await _in_order(hand, service)

    fold = asyncio.run(_session(tmp_path / "fold", "fold", failing))
    spool = asyncio.run(_session(tmp_path / "spool", "spool", clean))
    assert fold.ingest.commits == 6
    assert fold.server.params.tobytes() == spool.server.params.tobytes()


def test_an_overflowing_upload_is_refused_as_the_spool_path_refuses_it(tmp_path: Path) -> None:
    """float32: a sum that overflows rolls the lease back; the spool path then refuses it."""
    out: dict[str, Any] = {}
    for ingest in ("fold", "spool"):

        async def script(hand: Hand, service: FederationService, ingest: str = ingest) -> None:
            t = await hand.task(0)
            big = np.full(D, 3e38, np.float32).tobytes()
            reply = await hand.push(0, hand.peers[0].upload(Upload(t.task, t.version, big, 10.0)))
            hand.tasks[0] = None
            assert not reply.duplicate  # accepted, then refused by the fold
            await hand.good(1), await hand.good(2)
            out[ingest] = await service.in_engine(_snap, service.engine)
            for i in range(3):
                await hand.good(i)
            await asyncio.wait_for(service.wait(), 10)

        fed = asyncio.run(_session(tmp_path / ingest, ingest, script))
        out[ingest + "-params"] = fed.server.params.tobytes()
        out[ingest + "-commits"] = fed.ingest.commits
        with contextlib.closing(sqlite3.connect(fed.dir / "state.db")) as db:
            out[ingest + "-folded"] = db.execute("SELECT folded FROM rounds").fetchall()
    assert out["fold"] == out["spool"]
    assert out["fold-params"] == out["spool-params"]
    assert out["fold-folded"] == out["spool-folded"] == [(2,), (3,)]
    assert out["fold-commits"] == 5


# -- revocation ----------------------------------------------------------------------------------
def test_a_round_closing_on_its_timer_revokes_the_lease(tmp_path: Path) -> None:
    """Client 2's upload is mid-way, folding, when the round's deadline closes it: its folds
    are rolled back first, and the round's mean is that of clients 0 and 1 (the spool path's
    bits); the upload then ends, late, and is not counted."""
    out: dict[str, Any] = {}
    for ingest in ("fold", "spool"):

        async def script(hand: Hand, service: FederationService, ingest: str = ingest) -> None:
            fed: Federation = service.engine  # type: ignore[assignment]
            await hand.good(0), await hand.good(1)
            t = await hand.task(2)
            msgs = hand.peers[2].upload(hand.upload(2, t))
            go = asyncio.Event()
            push = asyncio.create_task(hand.push(2, held(msgs, go)))
            lease = await folding(fed, 2, t.task) if ingest == "fold" else None
            for _ in range(2000):  # the deadline (2 s) closes round 0
                if fed.server.version == 1:
                    break
                await asyncio.sleep(0.01)
            assert fed.server.version == 1
            out[ingest] = fed.server.params.tobytes()
            if lease is not None:
                assert lease.rolled_back
            go.set()
            reply = await push  # accepted (logged), late: its round is closed
            assert not reply.duplicate
            hand.tasks[2] = None

        asyncio.run(_session(tmp_path / ingest, ingest, script, deadline=2.0))
    assert out["fold"] == out["spool"]


def test_a_checkpoint_revokes_an_active_lease(tmp_path: Path) -> None:
    """Engine level: a lease with folded chunks, then a mid-round checkpoint: the checkpoint
    holds the sums without them (the lease rolled back first)."""

    async def script(hand: Hand, service: FederationService) -> None:
        fed: Federation = service.engine  # type: ignore[assignment]
        await hand.good(0)
        t = await hand.task(1)
        before = await service.in_engine(lambda: dumps(fed.state))
        lease = await service.in_engine(fed.ingest.grant, 1, t.task, t.version, 4.0)
        assert lease is not None
        x = _delta(t.task)
        lease.fold(0, x[:1024])
        lease.fold(1024, x[1024:3000])
        assert await service.in_engine(lambda: dumps(fed.state)) != before
        await service.in_engine(fed._checkpoint)
        assert lease.rolled_back and fed.ingest.lease is None
        assert await service.in_engine(lambda: dumps(fed.state)) == before
        await hand.good(1), await hand.good(2)
        for i in range(3):
            await hand.good(i)
        await asyncio.wait_for(service.wait(), 10)

    asyncio.run(_session(tmp_path / "fold", "fold", script))


@pytest.mark.parametrize("acc", ["float32", "float64"])
def test_leases_reuse_one_pre_image_buffer_and_still_roll_back_exactly(
    tmp_path: Path, acc: str
) -> None:
    """Engine level: every lease of a federation saves its pre-images into the same buffers
    (no model-sized allocation per upload), across rounds; a lease rolled back after an earlier
    one left its pre-images there restores the sums to the bit; and no lease is granted while
    the previous one is still rolling back (it reads the shared buffers)."""

    async def script(hand: Hand, service: FederationService) -> None:
        fed: Federation = service.engine  # type: ignore[assignment]
        ing = fed.ingest
        await hand.good(0)
        for _ in range(2000):  # its arrival stepped (a busy engine may still be at it)
            if ing.commits:
                break
            await asyncio.sleep(0.005)
        assert ing.commits == 1
        buffers = (ing.scratch.acc, ing.scratch.comp)
        assert buffers[0] is not None and (buffers[1] is not None) == (acc == "float64")
        t = await hand.task(1)
        before = await service.in_engine(lambda: dumps(fed.state))
        for k in range(2):  # two leases of the same upload, each rolled back
            lease = await service.in_engine(ing.grant, 1, t.task, t.version, 4.0 + k)
            assert lease is not None
            x = _delta(t.task, scale=1.0 + k)
            lease.fold(1024, x[1024:3000])
            lease.fold(0, x[:1024])
            assert lease.undo_acc is buffers[0] and lease.undo_comp is buffers[1]
            assert await service.in_engine(lambda: dumps(fed.state)) != before
            with lease.cond:  # mid-rollback (it holds its lock): no other lease meanwhile
                lease.live = False
                assert await service.in_engine(ing.grant, 1, t.task, t.version, 4.0) is None
                lease.live = True
            await service.in_engine(ing.revoke, lease)
            assert lease.rolled_back and lease.settled
            assert await service.in_engine(lambda: dumps(fed.state)) == before
        for i in (1, 2):
            await hand.good(i)
        for i in range(3):  # round 1
            await hand.good(i)
        await asyncio.wait_for(service.wait(), 10)
        assert ing.scratch.acc is buffers[0] and ing.scratch.comp is buffers[1]  # kept

    asyncio.run(_session(tmp_path / "fold", "fold", script, acc=acc))


# -- replay ----------------------------------------------------------------------------------
@pytest.mark.parametrize("acc", ["float32", "float64"])
def test_replay_after_a_crash_equals_the_live_state(tmp_path: Path, acc: str) -> None:
    """After each upload folded on receive (mid-round, and after mid-round checkpoints), a
    second federation opened over the same state directory (what a restart after a SIGKILL
    does: load the last checkpoint, replay the log after it from the spool files) reaches the
    live state bit for bit."""
    seen: list[int] = []

    def replayed(fed: Federation) -> bytes:
        again = _fed(fed.dir, acc=acc, checkpoint_updates=2)
        again.open()
        try:
            seen.append(again.replayed)
            return dumps(again.state)
        finally:
            again.close()

    async def script(hand: Hand, service: FederationService) -> None:
        fed: Federation = service.engine  # type: ignore[assignment]
        for _ in range(2):
            for i in range(3):
                await hand.good(i)
                live = await service.in_engine(lambda: dumps(fed.state))
                assert await service.in_engine(replayed, fed) == live
        assert await service.in_engine(lambda: fed.ingest.commits) == 6

    asyncio.run(_session(tmp_path / "fold", "fold", script, acc=acc, checkpoint_updates=2))
    assert any(seen)  # some states came from a replay of uploads folded on receive


# -- another upload completing while a lease is active -------------------------------------------
def _order(d: Path) -> list[int]:
    with contextlib.closing(sqlite3.connect(d / "state.db")) as db:
        return [int(c) for (c,) in db.execute("SELECT client FROM uploads ORDER BY seq")]


@pytest.mark.parametrize("leaser_ends", [True, False])
def test_an_upload_completing_during_a_lease_waits_for_it_or_revokes_it(
    tmp_path: Path, leaser_ends: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Client 0's upload holds the lease, mid-way; client 1's completes meanwhile. If client
    0's ends within the grace, client 1's arrival is logged after it (log order = fold order,
    client 0's fold stands); else client 1's arrival revokes the lease and is logged first,
    client 0's upload then goes the spool path. Either way the bits are the spool path's for
    the logged order."""
    monkeypatch.setattr("fedagg.deploy._ingest.LEASE_GRACE", 30.0 if leaser_ends else 0.2)
    out: dict[str, Any] = {}

    async def script(hand: Hand, service: FederationService) -> None:
        fed: Federation = service.engine  # type: ignore[assignment]
        t0 = await hand.task(0)
        msgs = hand.peers[0].upload(hand.upload(0, t0))
        go = asyncio.Event()
        first = asyncio.create_task(hand.push(0, held(msgs, go)))
        lease = await folding(fed, 2, t0.task)
        second = asyncio.create_task(hand.good(1))
        if leaser_ends:
            for _ in range(200):  # client 1's upload is in, waiting for its turn
                await asyncio.sleep(0.005)
            assert not second.done() and lease.live
            go.set()
        else:
            await second  # after the grace: the lease revoked
            assert lease.rolled_back
            go.set()
        await first
        await second
        hand.tasks[0] = None
        await hand.good(2)
        out["commits"] = await service.in_engine(lambda: fed.ingest.commits)
        for i in range(3):
            await hand.good(i)
        await asyncio.wait_for(service.wait(), 10)

    fold = asyncio.run(_session(tmp_path / "fold", "fold", script))
    order = _order(fold.dir)
    assert order[:3] == ([0, 1, 2] if leaser_ends else [1, 0, 2])
    assert out["commits"] == (2 if leaser_ends else 1)  # client 0's fold stood, or not

    async def same(hand: Hand, service: FederationService) -> None:
        for i in order:
            await hand.good(i)
        await asyncio.wait_for(service.wait(), 10)

    spool = asyncio.run(_session(tmp_path / "spool", "spool", same))
    assert fold.server.params.tobytes() == spool.server.params.tobytes()


def test_a_dropout_closing_the_round_revokes_the_lease(tmp_path: Path) -> None:
    """Engine level: clients 0 and 1 folded; client 2's upload holds a lease with folded
    chunks when its task drops out (its client timed out, say): the dropout closes the round,
    so the lease is rolled back first, and the round's model is the mean of clients 0 and 1,
    the spool path's bits."""
    out: dict[str, bytes] = {}
    for ingest in ("fold", "spool"):

        async def script(hand: Hand, service: FederationService, ingest: str = ingest) -> None:
            fed: Federation = service.engine  # type: ignore[assignment]
            await hand.good(0), await hand.good(1)
            t = await hand.task(2)
            lease = None
            if ingest == "fold":
                lease = await service.in_engine(fed.ingest.grant, 2, t.task, t.version, 4.0)
                assert lease is not None
                x = _delta(t.task)
                lease.fold(0, x[:2048])
                lease.fold(2048, x[2048:4000])

            def drop() -> None:
                rows = fed.log([("dropout", fed.now + 1, 2, t.task, None, None)])
                fed.step([r for r in rows if r is not None])

            await service.in_engine(drop)
            assert fed.server.version == 1
            if lease is not None:
                assert lease.rolled_back and fed.ingest.lease is None
            out[ingest] = fed.server.params.tobytes()

        asyncio.run(_session(tmp_path / ingest, ingest, script))
    assert out["fold"] == out["spool"]
