"""The signed upload digest's algorithm (sha256 or BLAKE3) end to end, over the in-memory
transport (the real client and service), through an edge's relay; and the client's split of
an upload across parallel streams (``deploy/_push.py``)."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from blake3 import blake3

from fedagg import strategies
from fedagg.deploy import Client, ClientError, Federation, Result, Server, TaskContext
from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._auth import upload_body
from fedagg.deploy._digest import digest_of
from fedagg.deploy._memory import MemoryChannel, rpc_error
from fedagg.deploy._push import AUTO_STREAMS, PushPlan, push_update, shard_ranges, stream_count
from fedagg.deploy._service import FederationService
from fedagg.deploy._wire import decode_chunk
from fedagg.sim import SyncPolicy
from tests.deploy.test_memory_transport import (
    _GRPC_LEFTOVERS,
    EDGE,
    EDGES,
    KEYS,
    NAMES,
    RING,
    N,
    _fed,
    _memory_client,
    _opts,
)

ALGORITHMS = ("sha256", "blake3")


def test_digest_of_is_the_reference_hash() -> None:
    data = np.arange(1000, dtype=np.float32).tobytes()
    assert digest_of("sha256", data) == hashlib.sha256(data).digest()
    assert digest_of("", data) == hashlib.sha256(data).digest()
    assert digest_of("blake3", data) == blake3(data).digest()


async def _flat(d: Path, algorithm: str, client: type[Client] = Client) -> tuple[Federation, Any]:
    """A federation over memory with ``digest_algorithm``; returns it and the hello reply."""
    fed = _fed(d)
    service = FederationService(fed, RING, _opts(digest_algorithm=algorithm))
    await service.start()
    clients = [_memory_client(service, n) for n in NAMES]
    if client is not Client:
        clients[0].__class__ = client
    runs = [asyncio.create_task(c.run_async()) for c in clients]
    try:
        if client is not Client:  # its outcome is the test's
            await asyncio.wait_for(runs[0], 30)
        await asyncio.wait_for(service.wait(), 30)
        await asyncio.wait_for(asyncio.gather(*runs), 30)
    finally:
        for r in runs:
            r.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        await service.stop()
    return fed, (clients[1].digest_algorithm, clients[1].max_streams)


def test_either_algorithm_runs_a_federation_to_the_same_bits(tmp_path: Path) -> None:
    """The digest checks the bytes; it changes nothing they are folded into. The server's
    hello tells the clients the algorithm and its max_streams."""
    out = {a: asyncio.run(_flat(tmp_path / a, a)) for a in ALGORITHMS}
    (sha, said_sha), (b3, said_b3) = out["sha256"], out["blake3"]
    assert said_sha == ("sha256", 8) and said_b3 == ("blake3", 8)
    assert sha.server.version == b3.server.version == 3
    assert sha.server.params.tobytes() == b3.server.params.tobytes()
    assert np.any(sha.server.params != 0)


class _Tamper(Client):
    """Flips one low-order byte (a finite value stays finite) of the second data chunk of its
    first upload after the digest was taken: what an on-path attacker without TLS does."""

    tampered = False

    def _method(self, name: str, kind: str) -> Any:
        call = super()._method(name, kind)
        if name != "Push" or self.tampered:
            return call
        self.tampered = True
        return lambda it, **kw: call(_flip(it, shard=-1), **kw)


async def _flip(it: AsyncIterator[bytes], shard: int) -> AsyncIterator[bytes]:
    """The messages of ``it`` with the first byte of the second data chunk flipped, if the
    stream is of shard ``shard`` (-1: whatever its header says)."""
    k, mine = 0, shard == -1
    async for msg in it:
        c = decode_chunk(msg)
        if c.header is not None and shard >= 0:
            mine = pb.UploadHeader.FromString(bytes(c.header)).shard == shard
        if len(c.data) and k == 1 and mine:
            b = bytearray(msg)
            b[len(msg) - len(c.data)] ^= 0x01
            msg = bytes(b)
        k += bool(len(c.data))
        yield msg


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_tampered_byte_is_refused_under_either_algorithm(tmp_path: Path, algorithm: str) -> None:
    with pytest.raises(ClientError) as e:
        asyncio.run(_flat(tmp_path, algorithm, _Tamper))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "do not match its trailer" in e.value.message


class _WrongAlgorithm(Client):
    """Signs its uploads' bytes with the other algorithm than the server asked for."""

    def upload_options(self, reply: pb.HelloReply) -> None:
        super().upload_options(reply)
        self.digest_algorithm = "sha256" if self.digest_algorithm == "blake3" else "blake3"


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_digest_of_the_other_algorithm_is_refused(tmp_path: Path, algorithm: str) -> None:
    with pytest.raises(ClientError) as e:
        asyncio.run(_flat(tmp_path, algorithm, _WrongAlgorithm))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "do not match its trailer" in e.value.message


async def _tree(d: Path, edge_algorithm: str, root_algorithm: str) -> Federation:
    """Root <- edge (relay) <- clients over memory; the edge asks its clients for
    ``edge_algorithm``, the root asks the edge for ``root_algorithm``."""
    from fedagg.deploy import EdgeEngine, EdgeServer, ParentLink
    from fedagg.deploy._memory import MemoryTransport

    fed = _fed(d / "root")
    root = FederationService(fed, RING, _opts(digest_algorithm=root_algorithm), edges=EDGES,
                             edge_clients={"e0": range(N)})  # fmt: skip
    await root.start()
    engine = EdgeEngine(fed.policy.strategy.aggregator, fed.spec, num_clients=N,
                        directory=d / "edge", mode="relay")  # fmt: skip
    link = ParentLink("memory", EDGE, range(N), insecure=True, retry_for=5.0,
                      channel=MemoryChannel(root))  # fmt: skip
    edge = EdgeServer(engine, RING, _opts(digest_algorithm=edge_algorithm), link,
                      serves=set(range(N)), transport=MemoryTransport)  # fmt: skip
    clients: list[asyncio.Task[Any]] = []
    try:
        starting = asyncio.create_task(edge.start())
        made = [_memory_client(edge.service, n) for n in NAMES]
        clients = [asyncio.create_task(c.run_async()) for c in made]
        await asyncio.wait_for(starting, 30)
        await asyncio.wait_for(root.wait(), 30)
        await asyncio.wait_for(asyncio.gather(*clients), 30)
        assert {c.max_streams for c in made} == {1}  # an edge takes whole uploads
    finally:
        for c in clients:
            c.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        await edge.stop()
        await root.stop()
    return fed


@pytest.mark.parametrize(("edge", "root"), [("blake3", "blake3"), ("blake3", "sha256"),
                                            ("sha256", "blake3")])  # fmt: skip
def test_relayed_updates_are_checked_with_their_clients_algorithm(
    tmp_path: Path, edge: str, root: str
) -> None:
    """The root re-hashes a relayed update with the algorithm its client signed it with
    (``Origin.digest_algorithm``), whatever the root asks its own clients for."""
    fed = asyncio.run(_tree(tmp_path, edge, root))
    flat, _ = asyncio.run(_flat(tmp_path / "flat", "sha256"))
    assert fed.server.version == 3
    assert fed.server.params.tobytes() == flat.server.params.tobytes()


# -- parallel streams: the client's side ---------------------------------------------------------


def test_stream_count() -> None:
    mib = 1 << 20
    assert stream_count(10 * mib, 10 * mib // 4, 0, 8) == 1  # auto: small -> one stream
    assert stream_count(64 * mib, 16 * mib, 0, 8) == AUTO_STREAMS == 2  # auto: large -> 2
    assert stream_count(64 * mib, 16 * mib, 0, 1) == 1  # ... capped by the server
    assert stream_count(64 * mib, 16 * mib, 0, 0) == 1  # a server of before max_streams
    assert stream_count(4000, 1000, 3, 8) == 3  # as asked, even small
    assert stream_count(4000, 1000, 16, 8) == 8
    assert stream_count(8, 2, 5, 8) == 2  # never an empty shard


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 1001])
@pytest.mark.parametrize("s", [1, 2, 3, 4])
def test_shard_ranges_cover_the_update_once(n: int, s: int) -> None:
    s = min(s, n)
    r = shard_ranges(n, s)
    assert r[0][0] == 0 and r[-1][1] == n
    assert all(a[1] == b[0] for a, b in itertools.pairwise(r))
    assert all(hi > lo for lo, hi in r)
    assert r == [(i * n // s, (i + 1) * n // s) for i in range(s)]


def _sign(method: str, content: bytes) -> pb.Auth:
    return pb.Auth(**KEYS["c0"].sign(method, content))


async def _capture(data: np.ndarray[Any, Any], plan: PushPlan, fail: int = -1) -> list[list[Any]]:
    """The messages of each shard's Push call (``fail``: that shard's call fails after its
    first message)."""
    streams: list[list[Any]] = []

    async def call(it: AsyncIterator[bytes]) -> bytes:
        msgs: list[Any] = []
        streams.append(msgs)
        async for raw in it:
            msgs.append(decode_chunk(bytes(raw)))
            if fail >= 0 and msgs[0].header is not None:
                head = pb.UploadHeader.FromString(bytes(msgs[0].header))
                if head.shard == fail:
                    raise RuntimeError(f"shard {fail} failed")
            await asyncio.sleep(0)
        return pb.PushReply(task=plan.task).SerializeToString()

    reply = await push_update(call, KEYS["c0"], _sign, data.data.cast("B"), data.itemsize, plan)
    assert reply.task == plan.task
    return streams


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("shards", [1, 3, 4])
def test_each_shard_is_a_signed_stream_of_its_range(algorithm: str, shards: int) -> None:
    """Shard i's stream: a header with the whole update's fields and (shard i, S), signed over
    them; its elements' bytes at their absolute offsets in chunks; a trailer with the digest
    of those bytes, signed over (header signature, digest)."""
    n = 10_001
    data = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    raw = data.tobytes()
    plan = PushPlan(5, 2, 3.0, {"loss": 0.5}, 4096, True, algorithm, shards)
    streams = asyncio.run(_capture(data, plan))
    assert len(streams) == shards
    seen = []
    for msgs in streams:
        head = pb.UploadHeader.FromString(bytes(msgs[0].header))
        i, s = head.shard, head.shards
        assert s == (shards if shards > 1 else 0)
        assert (head.task, head.version, head.weight, head.nbytes) == (5, 2, 3.0, n * 4)
        body = upload_body(5, 2, 3.0, n * 4, {"loss": 0.5}, i, s)
        assert RING.verify("Push", head.auth, body) == 0  # c0's index
        lo, hi = shard_ranges(n, max(s, 1))[i]
        got = b"".join(bytes(m.data) for m in msgs)
        offs = [m.ints.get(2, 0) for m in msgs if len(m.data)]
        assert offs[0] == lo * 4 and got == raw[lo * 4 : hi * 4]
        assert all(len(m.data) <= 4096 for m in msgs)
        trailer = pb.UploadTrailer.FromString(bytes(msgs[-1].trailer))
        assert trailer.sha256 == digest_of(algorithm, raw[lo * 4 : hi * 4])
        RING.verify("PushTrailer", head.auth, head.auth.signature + trailer.sha256,
                    trailer.signature)  # fmt: skip
        seen.append(i)
    assert sorted(seen) == list(range(shards))


def test_a_failing_shard_fails_the_whole_upload() -> None:
    """One shard's call failing cancels the others and raises: the caller retries the whole
    upload."""
    data = np.ones(100_000, np.float32)
    plan = PushPlan(1, 0, 1.0, {}, 4096, True, "blake3", 4)
    with pytest.raises(RuntimeError, match="shard 2 failed"):
        asyncio.run(_capture(data, plan, fail=2))


# -- parallel streams end to end: the real client, the real service ------------------------------

D2 = 20_000  # parameters: 80 KB, several 4 KiB chunks per shard


def _fedavg(d: Path) -> Federation:
    strategy = strategies.fedavg()
    policy = SyncPolicy(strategy=strategy, rounds=2, clients_per_round=N)
    server = strategy.init([np.zeros(D2, np.float32)])
    return Federation(policy, server, num_clients=N, seed=3, directory=d,
                      identity={"test": "streams"})  # fmt: skip


def _train2(model: Any, task: TaskContext) -> Result:
    """Dyadic updates and small integer weights: the weighted sums are exact in float32,
    so the model's bits do not depend on the order the uploads arrive in."""
    rng = task.rng()
    delta = rng.integers(-64, 64, D2).astype(np.float32) / np.float32(1024)
    return Result(delta, 1 + task.job % 4)


class _CutShard(Client):
    """The first time it splits an upload, shard 2's stream breaks after two messages
    (UNAVAILABLE, as a dropped connection): the client retries the whole upload."""

    cut = 0

    def _method(self, name: str, kind: str) -> Any:
        call = super()._method(name, kind)
        if name != "Push":
            return call

        def push(it: AsyncIterator[bytes], **kw: Any) -> Any:
            return self._maybe_cut(call, it, **kw)

        return push

    async def _maybe_cut(self, call: Any, it: AsyncIterator[bytes], **kw: Any) -> Any:
        first = await it.__anext__()
        head = pb.UploadHeader.FromString(bytes(decode_chunk(first).header))

        async def again() -> AsyncIterator[bytes]:
            yield first
            async for m in it:
                yield m

        if head.shards > 1 and head.shard == 2 and not self.cut:
            self.cut += 1
            await it.__anext__()
            raise rpc_error(grpc.StatusCode.UNAVAILABLE, "connection dropped (test)")
        return await call(again(), **kw)


async def _run_streams(
    d: Path, streams: int, ingest: str, algorithm: str, grpc_: bool = False,
    first: type[Client] = Client, data_listen: str = "auto",
) -> tuple[Federation, list[Client]]:  # fmt: skip
    """A federation of N clients uploading across ``streams`` parallel streams (the first of
    class ``first``: if not a plain Client, its outcome is the run's)."""
    fed = _fedavg(d)
    opts = _opts(ingest=ingest, digest_algorithm=algorithm, max_streams=4, data_listen=data_listen)
    server: Any = Server(fed, RING, opts) if grpc_ else FederationService(fed, RING, opts)
    await server.start()
    made = []
    for i, n in enumerate(NAMES):
        if grpc_:
            c = Client(f"127.0.0.1:{server.port}", KEYS[n], _train2, insecure=True,
                       retry_for=10.0, streams=streams)  # fmt: skip
        else:
            c = Client("memory", KEYS[n], _train2, insecure=True, retry_for=10.0,
                       channel=MemoryChannel(server, max_message=opts.chunk_bytes + 65536),
                       streams=streams)  # fmt: skip
        if i == 0:
            c.__class__ = first
        made.append(c)
    runs = [asyncio.create_task(c.run_async()) for c in made]
    try:
        if first not in (Client, _CutShard):
            await asyncio.wait_for(runs[0], 30)
        await asyncio.wait_for(server.wait(), 60)
        await asyncio.wait_for(asyncio.gather(*runs), 30)
    finally:
        for r in runs:
            r.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        await (server.stop(0.1) if grpc_ else server.stop())
    return fed, made


@pytest.mark.parametrize("ingest", ["fold", "spool"])
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_uploads_split_across_streams_give_the_bits_of_one_stream(
    tmp_path: Path, ingest: str, algorithm: str
) -> None:
    one, _ = asyncio.run(_run_streams(tmp_path / "one", 1, ingest, algorithm))
    for s in (2, 3, 4):
        split, made = asyncio.run(_run_streams(tmp_path / f"s{s}", s, ingest, algorithm))
        assert split.server.version == one.server.version == 2
        assert split.server.params.tobytes() == one.server.params.tobytes(), s
        assert all(c.max_streams == 4 and c.report.uploads == 2 for c in made)
    assert np.any(one.server.params != 0)


@_GRPC_LEFTOVERS
def test_four_streams_over_grpc_give_the_bits_of_one(tmp_path: Path) -> None:
    one, _ = asyncio.run(_run_streams(tmp_path / "one", 1, "fold", "blake3"))
    four, made = asyncio.run(  # over gRPC, not the data port
        _run_streams(tmp_path / "four", 4, "fold", "blake3", grpc_=True, data_listen="")
    )
    gc.collect()
    assert four.server.params.tobytes() == one.server.params.tobytes()
    assert sum(c.report.uploads for c in made) == 2 * N


@pytest.mark.parametrize("ingest", ["fold", "spool"])
def test_a_broken_shard_makes_the_client_retry_the_whole_upload(
    tmp_path: Path, ingest: str
) -> None:
    one, _ = asyncio.run(_run_streams(tmp_path / "one", 1, ingest, "blake3"))
    cut, made = asyncio.run(_run_streams(tmp_path / "cut", 4, ingest, "blake3", first=_CutShard))
    assert isinstance(made[0], _CutShard) and made[0].cut == 1
    assert made[0].report.retries >= 1 and made[0].report.uploads == 2
    assert cut.server.params.tobytes() == one.server.params.tobytes()  # counted once


class _TamperShard(Client):
    """Flips a byte of shard 1's second data chunk."""

    def _method(self, name: str, kind: str) -> Any:
        call = super()._method(name, kind)
        if name != "Push":
            return call
        return lambda it, **kw: call(_flip(it, shard=1), **kw)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_a_tampered_byte_in_one_shard_is_refused(tmp_path: Path, algorithm: str) -> None:
    with pytest.raises(ClientError) as e:
        asyncio.run(_run_streams(tmp_path, 4, "fold", algorithm, first=_TamperShard))
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "do not match its trailer" in e.value.message
