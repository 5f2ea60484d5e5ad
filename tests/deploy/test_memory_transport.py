"""The federation service over the in-memory transport (:mod:`fedagg.deploy._memory`): the real
client, the real service, no network. The same federation gives the same bits over memory as
over gRPC, a refusal has the same status and message, and a service stopped mid-federation and
re-opened over its state directory resumes exactly."""

from __future__ import annotations

import asyncio
import gc
import math
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedagg import strategies
from fedagg.deploy import (
    Client,
    ClientError,
    ClientKey,
    Federation,
    Keyring,
    Result,
    Server,
    ServerOptions,
    TaskContext,
    canonical_strategy,
)
from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._auth import body
from fedagg.deploy._memory import MemoryChannel
from fedagg.deploy._service import FederationService
from fedagg.sim import SyncPolicy, fedbuff

N = 4  # clients
D = 3000  # parameters
NAMES = [f"c{i}" for i in range(N)]
KEYS = {n: ClientKey(n, Ed25519PrivateKey.generate()) for n in NAMES}
RING = Keyring({n: KEYS[n].private.public_key() for n in NAMES})


def _fed(d: Path, rounds: int = 3, kind: str = "sync") -> Federation:
    strategy = canonical_strategy(strategies.fedadam(lr=0.1))
    policy: Any = SyncPolicy(strategy=strategy, rounds=rounds, clients_per_round=3)
    if kind == "fedbuff":
        policy = fedbuff(strategy, rounds=rounds, buffer=3, concurrency=N)
    server = strategy.init([np.zeros(D, np.float32)])
    return Federation(policy, server, num_clients=N, seed=7, directory=d,
                      identity={"test": "memory"})  # fmt: skip


def _opts(**kw: Any) -> ServerOptions:
    base: dict[str, Any] = dict(listen="127.0.0.1:0", insecure=True, fsync=False, chunk_bytes=4096)
    return ServerOptions(**{**base, **kw})


def _train(model: Any, task: TaskContext) -> Result:
    rng = task.rng()
    delta = (rng.standard_normal(D) * 0.01).astype(np.float32)
    return Result(delta, 10 + task.job % 3, {"loss": float(rng.random())})


def _nan_train(model: Any, task: TaskContext) -> Result:
    delta = np.zeros(D, np.float32)
    delta[D - 1] = math.nan
    return Result(delta, 1, {})


def _memory_client(service: FederationService, name: str, train: Any = _train,
                   key: ClientKey | None = None) -> Client:  # fmt: skip
    channel = MemoryChannel(service, max_message=service.opt.chunk_bytes + 64 * 1024)
    return Client("memory", key or KEYS[name], train, insecure=True, retry_for=5.0,
                  heartbeat=1.0, channel=channel)  # fmt: skip


async def _run_memory(
    d: Path, rounds: int = 3, stop_after: int | None = None, kind: str = "sync"
) -> Federation:
    """A federation on the memory transport; with ``stop_after``, the service is stopped
    (and the clients with it) once that many rounds are done."""
    fed = _fed(d, rounds, kind)
    done = asyncio.Event()
    seen: list[int] = []

    def on_round(r: Any) -> None:
        seen.append(r.round)
        if stop_after is not None and len(seen) >= stop_after:
            done.set()

    service = FederationService(fed, RING, _opts(), on_round=on_round)
    await service.start()
    clients = [asyncio.create_task(_memory_client(service, n).run_async()) for n in NAMES]
    try:
        if stop_after is None:
            await service.wait()
            await asyncio.wait_for(asyncio.gather(*clients), 30)
        else:
            await asyncio.wait_for(done.wait(), 30)
    finally:
        for c in clients:
            c.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        await service.stop()
    return fed


async def _run_grpc(d: Path) -> Federation:
    fed = _fed(d)
    server = Server(fed, RING, _opts())
    await server.start()
    try:
        address = f"127.0.0.1:{server.port}"
        clients = [Client(address, KEYS[n], _train, insecure=True, retry_for=5.0, heartbeat=1.0)
                   for n in NAMES]  # fmt: skip
        await asyncio.wait_for(asyncio.gather(server.wait(), *[c.run_async() for c in clients]), 60)
    finally:
        await server.stop(0.1)
    return fed


# grpc.aio's own receivers may be finalized late (after the loop closed): collected here
_GRPC_LEFTOVERS = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@_GRPC_LEFTOVERS
def test_a_federation_over_memory_gives_the_bits_of_grpc(tmp_path: Path) -> None:
    t0 = time.monotonic()
    mem = asyncio.run(_run_memory(tmp_path / "memory"))
    took = time.monotonic() - t0
    net = asyncio.run(_run_grpc(tmp_path / "grpc"))
    gc.collect()
    a, b = mem.server.params, net.server.params
    assert mem.server.version == net.server.version == 3
    assert a.tobytes() == b.tobytes()
    assert np.any(a != 0)
    assert took < 30


async def _refusals(connect: Any) -> list[tuple[grpc.StatusCode, str]]:
    """Refused requests, each answered with (code, message): a client with a key the server
    does not know, a pull of a task that is not open, an update with a NaN."""
    out = []
    stranger = ClientKey("c0", Ed25519PrivateKey.generate())  # c0's name, another key
    for name, train, key in (("c0", _train, stranger), ("c1", _nan_train, None)):
        try:
            await connect(name, train, key).run_async()
            out.append((grpc.StatusCode.OK, ""))
        except ClientError as e:
            out.append((e.code, e.message))
    c = connect("c2", _train, None)
    req = pb.PullRequest(auth=c._auth("Pull", body(task=999)), task=999)
    try:
        async for _ in c._method("Pull", "unary_stream")(req.SerializeToString()):
            pass
        out.append((grpc.StatusCode.OK, ""))
    except grpc.aio.AioRpcError as e:
        out.append((e.code(), e.details() or ""))
    await c.channel.close()
    return out


async def _refusals_memory(d: Path) -> list[tuple[grpc.StatusCode, str]]:
    service = FederationService(_fed(d), RING, _opts(wait_for=1))
    await service.start()
    try:
        return await _refusals(lambda n, t, k: _memory_client(service, n, t, k))
    finally:
        await service.stop()


async def _refusals_grpc(d: Path) -> list[tuple[grpc.StatusCode, str]]:
    server = Server(_fed(d), RING, _opts(wait_for=1))
    await server.start()
    address = f"127.0.0.1:{server.port}"
    try:
        return await _refusals(
            lambda n, t, k: Client(address, k or KEYS[n], t, insecure=True, retry_for=5.0)
        )
    finally:
        await server.stop(0.1)


@_GRPC_LEFTOVERS
def test_bad_input_is_refused_alike_over_memory_and_grpc(tmp_path: Path) -> None:
    mem = asyncio.run(_refusals_memory(tmp_path / "memory"))
    net = asyncio.run(_refusals_grpc(tmp_path / "grpc"))
    gc.collect()
    assert mem == net
    (sig, why), (nan, what), (pull, msg) = mem
    assert sig == grpc.StatusCode.UNAUTHENTICATED, why
    assert nan == grpc.StatusCode.INVALID_ARGUMENT and "non-finite" in what, what
    assert (pull, msg) == (grpc.StatusCode.FAILED_PRECONDITION, "task 999 is not open")


def test_a_service_stopped_and_reopened_resumes_exactly(tmp_path: Path) -> None:
    whole = asyncio.run(_run_memory(tmp_path / "whole"))
    part = asyncio.run(_run_memory(tmp_path / "split", stop_after=1))
    assert 1 <= part.server.version < 3  # stopped mid-federation
    again = asyncio.run(_run_memory(tmp_path / "split"))
    assert again.server.version == whole.server.version == 3
    assert again.server.params.tobytes() == whole.server.params.tobytes()


@pytest.mark.parametrize("method", ["Hello", "Tasks", "Pull", "Push", "Heartbeat"])
def test_a_call_without_credentials_is_refused_before_it_is_read(
    tmp_path: Path, method: str
) -> None:
    async def go() -> tuple[grpc.StatusCode, str]:
        service = FederationService(_fed(tmp_path), RING, _opts())
        await service.start()
        channel = MemoryChannel(service)
        read: list[int] = []

        async def requests() -> Any:
            read.append(1)
            yield b"x"

        try:
            kind = {"Tasks": "stream_stream", "Pull": "stream_stream"}.get(method)
            path = f"/fedagg.v1.Federation/{method}"
            if kind is None:
                await channel.stream_unary(path)(requests())
            else:
                async for _ in channel.unary_stream(path)(b"x"):
                    pass
            raise AssertionError("not refused")
        except grpc.aio.AioRpcError as e:
            assert not read
            return e.code(), e.details() or ""
        finally:
            await service.stop()

    code, details = asyncio.run(go())
    assert code == grpc.StatusCode.UNAUTHENTICATED
    assert "missing call credentials" in details


EDGE = ClientKey("e0", Ed25519PrivateKey.generate())
EDGES = Keyring({"e0": EDGE.private.public_key()})


async def _run_tree(d: Path) -> Federation:
    """Root <- edge (relay mode) <- the clients, every hop over memory."""
    from fedagg.deploy import EdgeEngine, EdgeServer, ParentLink
    from fedagg.deploy._memory import MemoryTransport

    fed = _fed(d / "root")
    root = FederationService(fed, RING, _opts(), edges=EDGES, edge_clients={"e0": range(N)})
    await root.start()
    engine = EdgeEngine(fed.policy.strategy.aggregator, fed.spec, num_clients=N,
                        directory=d / "edge", mode="relay")  # fmt: skip
    link = ParentLink("memory", EDGE, range(N), insecure=True, retry_for=5.0,
                      channel=MemoryChannel(root))  # fmt: skip
    edge = EdgeServer(engine, RING, _opts(), link, serves=set(range(N)), transport=MemoryTransport)
    clients: list[asyncio.Task[Any]] = []
    try:
        starting = asyncio.create_task(edge.start())  # links up once its subtree is connected
        clients = [asyncio.create_task(_memory_client(edge.service, n).run_async()) for n in NAMES]
        await asyncio.wait_for(starting, 30)
        await asyncio.wait_for(root.wait(), 30)
        await asyncio.wait_for(asyncio.gather(*clients), 30)
    finally:
        for c in clients:
            c.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        await edge.stop()
        await root.stop()
    return fed


def test_a_tree_over_memory_gives_the_bits_of_the_flat_federation(tmp_path: Path) -> None:
    """An edge aggregator (an EdgeServer over its EdgeEngine, relaying) between the clients
    and the root, all in-process: the root ends with the bits of the flat federation."""
    flat = asyncio.run(_run_memory(tmp_path / "flat"))
    tree = asyncio.run(_run_tree(tmp_path / "tree"))
    assert tree.server.version == flat.server.version == 3
    assert tree.server.params.tobytes() == flat.server.params.tobytes()


def test_an_async_policy_runs_over_memory(tmp_path: Path) -> None:
    """FedBuff (buffered asynchronous rounds) to its end, in-process."""
    fed = asyncio.run(_run_memory(tmp_path, rounds=4, kind="fedbuff"))
    assert fed.finished and fed.server.version == 4
    assert np.any(fed.server.params != 0)
