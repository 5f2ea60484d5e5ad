"""The deployment scenarios on the in-memory transport (:mod:`fedagg.deploy._memory`), as fast
tests: the real service and the real clients in one process, no network, no subprocesses.

* Bad input: the battery of :mod:`tests.deploy.test_bad_input` (which runs it against a real
  server process over gRPC, and keeps doing so), fired at the service by client 0 played by
  hand over a :class:`MemoryChannel`; each gets the status and message the gRPC test expects,
  and none changes the state: the spool and the log hold only accepted uploads, and the
  federation ends with the model of a clean run, bit for bit.
* Policies: sync (canonical and arrival fold order), FedBuff, FedAsync run to their end; with
  canonical order the bits do not depend on the order the updates arrived in.
* Crashes without processes: a service stopped after acknowledging some uploads, before their
  round closed, then re-opened over its state directory, folds each acknowledged upload exactly
  once (the bits of an uninterrupted run), and acknowledges its retry as a duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedagg import strategies
from fedagg.core.spec import ParamSpec
from fedagg.deploy import (
    Client,
    ClientKey,
    Federation,
    Keyring,
    Result,
    ServerOptions,
    TaskContext,
    canonical_strategy,
)
from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._auth import body, signing_bytes
from fedagg.deploy._calls import CALL_METADATA, call_method, call_token
from fedagg.deploy._memory import MemoryChannel
from fedagg.deploy._service import FederationService
from fedagg.deploy._wire import MODEL_CHUNK, decode_chunk
from fedagg.policy import SyncPolicy, fedasync, fedbuff
from tests.deploy.test_bad_input import (
    BAD_SIG,
    CHUNK,
    EXPECTED,
    RPC_TIMEOUT,
    SERVICE,
    STALE,
    UNAUTH,
    Peer,
    Upload,
    hello_cases,
    misc_cases,
    push_cases,
    train,
)

D = 4810  # parameters: test_bad_input's MLP (19,240 bytes, 5 chunks of 4 KiB)
NAMES = ["c0", "c1", "c2"]
KEYS = {n: ClientKey(n, Ed25519PrivateKey.generate()) for n in NAMES}
RING = Keyring({n: k.private.public_key() for n, k in KEYS.items()})
ROUNDS = 2
#: every accepted upload of a clean run, (client, job), in job order
ALL_UPLOADS = [(0, 0), (1, 1), (2, 2), (0, 3), (1, 4), (2, 5)]

#: cases of the gRPC battery not run here: the rate limit needs a pause to refill
NOT_HERE = {"heartbeat_rate_limited"}
#: call credentials (the ``fedagg-call-bin`` metadata) and requests that do not match them
EXTRA: dict[str, tuple[str, str]] = {
    "hello_no_call_credentials": (UNAUTH, "missing call credentials"),
    "hello_forged_call_credentials": (UNAUTH, BAD_SIG),
    "hello_stale_call_credentials": (UNAUTH, STALE),
    "hello_call_credentials_for_another_method": (UNAUTH, BAD_SIG),
    "hello_signed_by_another_client_than_the_call": (UNAUTH, BAD_SIG),
    "push_signed_by_another_client_than_the_call": (UNAUTH, BAD_SIG),
    "push_call_credentials_of_another_client": (UNAUTH, BAD_SIG),
    "push_no_call_credentials": (UNAUTH, "missing call credentials"),
}
CASES = {**{k: v for k, v in EXPECTED.items() if k not in NOT_HERE}, **EXTRA}


# -- the federation ----------------------------------------------------------------------------
def _fed(d: Path, kind: str = "sync", order: str = "canonical", rounds: int = ROUNDS
         ) -> Federation:  # fmt: skip
    base = strategies.fedavg() if kind == "fedasync" else strategies.fedadam(lr=0.1)
    strategy = canonical_strategy(base) if order == "canonical" else base
    policy: Any
    if kind == "sync":
        policy = SyncPolicy(strategy=strategy, rounds=rounds, clients_per_round=3)
    elif kind == "fedbuff":
        policy = fedbuff(strategy, rounds=rounds, buffer=2, concurrency=3)
    elif kind == "fedasync":
        policy = fedasync(strategy, rounds=rounds, alpha=0.5, concurrency=2)
    else:
        raise ValueError(kind)
    server = strategy.init([np.zeros(D, np.float32)])
    return Federation(policy, server, num_clients=len(NAMES), seed=11, directory=d,
                      identity={"test": "memory-scenarios"})  # fmt: skip


def _opts(**kw: Any) -> ServerOptions:
    base: dict[str, Any] = dict(listen="127.0.0.1:0", insecure=True, fsync=False,
                                chunk_bytes=CHUNK)  # fmt: skip
    return ServerOptions(**{**base, **kw})


def _train(model: Any, task: TaskContext) -> Result:
    rng = task.rng()
    delta = (rng.standard_normal(D) * 0.01).astype(np.float32)
    return Result(delta, 10 + task.job % 3, {"loss": float(rng.random())})


def _channel(service: FederationService) -> MemoryChannel:
    return MemoryChannel(service, max_message=service.opt.chunk_bytes + 64 * 1024)


def _client(service: FederationService, name: str, fn: Any = _train) -> Client:
    return Client("memory", KEYS[name], fn, insecure=True, retry_for=5.0, heartbeat=1.0,
                  channel=_channel(service))  # fmt: skip


def _rows(d: Path, sql: str) -> list[tuple[int, ...]]:
    with contextlib.closing(sqlite3.connect(d / "state.db")) as db:
        return [tuple(int(x) for x in r) for r in db.execute(sql).fetchall()]


def uploads(d: Path) -> list[tuple[int, int]]:
    """The log's accepted uploads, (client, job), in job order."""
    return [(c, j) for c, j in _rows(d, "SELECT client, job FROM uploads ORDER BY job")]


def arrivals(d: Path) -> list[int]:
    """The clients of the accepted uploads, in the order they were logged."""
    return [c for (c,) in _rows(d, "SELECT client FROM uploads ORDER BY seq")]


def folded(d: Path) -> list[tuple[int, int]]:
    return [(r, f) for r, f in _rows(d, "SELECT round, folded FROM rounds ORDER BY round")]


def spool(d: Path) -> list[str]:
    return sorted(p.name for p in (d / "spool").iterdir())


async def until(cond: Callable[[], bool], timeout: float, what: str,
                state: Callable[[], object] = str) -> None:  # fmt: skip
    """Wait for ``cond`` (checked every few ms); on timeout, fail with ``state()``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {state()}")
        await asyncio.sleep(0.005)


async def _finish(service: FederationService, clients: list[asyncio.Task[Any]]) -> None:
    await asyncio.wait_for(service.wait(), 30)
    await asyncio.wait_for(asyncio.gather(*clients), 30)


async def _cancel(clients: Iterable[asyncio.Task[Any]]) -> None:
    clients = list(clients)
    for c in clients:
        c.cancel()
    await asyncio.gather(*clients, return_exceptions=True)


async def _run(d: Path, trains: dict[str, Any] | None = None, **kw: Any) -> Federation:
    """A federation to its end, the clients over memory (``trains``: a client's own train)."""
    fed = _fed(d, **kw)
    await _serve(FederationService(fed, RING, _opts()), {n: _train for n in NAMES} | (trains or {}))
    return fed


async def _serve(service: FederationService, trains: dict[str, Any]) -> None:
    """Start ``service``, run every client (with its train function) to the end, stop."""
    await service.start()
    clients = [asyncio.create_task(_client(service, n, trains[n]).run_async()) for n in NAMES]
    try:
        await _finish(service, clients)
    finally:
        await _cancel(clients)
        await service.stop()


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray[Any, Any]:
    """The final model of a clean run (sync, canonical order, 2 rounds)."""
    d = tmp_path_factory.mktemp("clean")
    fed = asyncio.run(_run(d))
    assert fed.finished and fed.server.version == ROUNDS
    assert uploads(d) == ALL_UPLOADS
    params: np.ndarray[Any, Any] = np.array(fed.server.params, copy=True)
    assert np.any(params != 0)
    return params


# -- client 0 by hand, over memory ---------------------------------------------------------------
class MemPeer(Peer):
    """test_bad_input's hand-made client 0 over a :class:`MemoryChannel`: its ``async`` calls
    run on the service's loop; its plain ones (what test_bad_input's case batteries call) are
    for a worker thread, and hand each call to the loop."""

    def __init__(self, service: FederationService, key: ClientKey,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:  # fmt: skip
        self.key = key
        self.mem = _channel(service)
        self.loop = loop

    def md(self, method: str, token: bytes | None = None) -> tuple[tuple[str, bytes], ...]:
        """The call credentials of a call: the key's own, fresh, unless ``token``."""
        return ((CALL_METADATA, call_token(self.key, method) if token is None else token),)

    async def aunary(self, method: str, raw: bytes, metadata: Any = ...) -> bytes:
        md = self.md(method) if metadata is ... else metadata
        out: bytes = await self.mem.unary_unary(SERVICE + method)(
            raw, metadata=md, timeout=RPC_TIMEOUT
        )
        return out

    async def astream(self, method: str, raw: bytes) -> list[bytes]:
        call = self.mem.unary_stream(SERVICE + method)(raw, metadata=self.md(method))
        return [m async for m in call]

    async def apush(self, messages: Iterable[bytes], metadata: Any = ...) -> pb.PushReply:
        msgs = list(messages)

        async def requests() -> Any:
            for m in msgs:
                yield m

        md = self.md("Push") if metadata is ... else metadata
        raw = await self.mem.stream_unary(SERVICE + "Push")(
            requests(), metadata=md, timeout=RPC_TIMEOUT
        )
        return pb.PushReply.FromString(raw)

    def _sync(self, coro: Any) -> Any:
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(RPC_TIMEOUT + 10)

    def unary(self, method: str, raw: bytes) -> bytes:
        out: bytes = self._sync(self.aunary(method, raw))
        return out

    def stream(self, method: str, raw: bytes) -> list[bytes]:
        out: list[bytes] = self._sync(self.astream(method, raw))
        return out

    def push(self, messages: Iterable[bytes]) -> pb.PushReply:
        out: pb.PushReply = self._sync(self.apush(list(messages)))
        return out

    async def pull(self, task: pb.Task) -> np.ndarray[Any, Any]:
        raws = await self.astream("Pull", self.pull_req(task.task))
        data = b"".join(bytes(decode_chunk(r, MODEL_CHUNK).data) for r in raws)
        return np.frombuffer(data, np.float32).copy()


class TaskStream:
    """A hand-made client's task stream, read into a queue by a task."""

    def __init__(self, peer: MemPeer) -> None:
        req = pb.TasksRequest(auth=peer.auth("Tasks", body())).SerializeToString()
        self.call = peer.mem.unary_stream(SERVICE + "Tasks")(req, metadata=peer.md("Tasks"))
        self.q: asyncio.Queue[pb.Task | BaseException] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.call:
                await self.q.put(pb.Task.FromString(raw))
        except grpc.aio.AioRpcError as e:
            await self.q.put(e)

    async def next(self, timeout: float = 20) -> pb.Task:
        """The next task (or "finished"), skipping heartbeats."""
        async with asyncio.timeout(timeout):
            while True:
                item = await self.q.get()
                if isinstance(item, BaseException):
                    raise item
                if not item.heartbeat:
                    return item

    async def close(self) -> None:
        self.reader.cancel()
        self.call.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


async def outcome(coro: Any) -> tuple[str, str]:
    """("OK", repr of the reply) or (status code name, status message)."""
    try:
        return "OK", repr(await coro)
    except grpc.aio.AioRpcError as e:
        return e.code().name, e.details() or ""


def _auth_token(key: ClientKey, method: str, ts_ms: int | None = None) -> bytes:
    """Call credentials for ``method``, maybe with another timestamp."""
    ts = int(time.time() * 1000) if ts_ms is None else ts_ms
    nonce = secrets.token_bytes(16)
    sig = key.private.sign(signing_bytes(call_method(method), key.name, ts, nonce, b""))
    auth = pb.Auth(client=key.name, timestamp_ms=ts, nonce=nonce, signature=sig)
    return bytes(auth.SerializeToString())


async def credential_cases(peer: MemPeer, other: ClientKey) -> dict[str, tuple[str, str]]:
    """Calls whose call credentials are wrong, or name another client than the request."""
    forged = pb.Auth.FromString(call_token(peer.key, "Hello"))
    forged.signature = bytes([forged.signature[0] ^ 1]) + forged.signature[1:]
    token = forged.SerializeToString()
    stale = _auth_token(peer.key, "Hello", int(time.time() * 1000) - 300_000)
    return {
        "hello_no_call_credentials": await outcome(peer.aunary("Hello", peer.hello(), None)),
        "hello_forged_call_credentials": await outcome(
            peer.aunary("Hello", peer.hello(), peer.md("Hello", bytes(token)))
        ),
        "hello_stale_call_credentials": await outcome(
            peer.aunary("Hello", peer.hello(), peer.md("Hello", stale))
        ),
        "hello_call_credentials_for_another_method": await outcome(
            peer.aunary("Hello", peer.hello(), peer.md("Hello", call_token(peer.key, "Push")))
        ),
        # a valid request of client 1, in a call client 0's credentials opened
        "hello_signed_by_another_client_than_the_call": await outcome(
            peer.aunary("Hello", peer.hello(name=other.name, signer=other.private))
        ),
    }


async def push_credential_cases(peer: MemPeer, other: ClientKey, good: Upload
                                ) -> dict[str, tuple[str, str]]:  # fmt: skip
    return {
        "push_signed_by_another_client_than_the_call": await outcome(
            peer.apush(peer.upload(good, name=other.name, signer=other.private))
        ),
        "push_call_credentials_of_another_client": await outcome(
            peer.apush(peer.upload(good), peer.md("Push", call_token(other, "Push")))
        ),
        "push_no_call_credentials": await outcome(peer.apush(peer.upload(good), None)),
    }


# -- bad input -----------------------------------------------------------------------------------
@dataclass
class BadRun:
    outcomes: dict[str, tuple[str, str]]
    hello: pb.HelloReply
    owners: dict[int, int]
    after_bad: dict[str, Any]
    accepted: pb.PushReply
    retry: pb.PushReply
    version: int
    params: np.ndarray[Any, Any]
    uploads: list[tuple[int, int]]
    folded: list[tuple[int, int]]
    seconds: float


async def _bad_input(d: Path) -> BadRun:
    """Clients 1 and 2 are real (client 1's training held until the battery is over, so that
    its task 1 stays open); client 0 is played by hand, fires the battery, then uploads its
    correct update (twice) and hands over to a real client 0 for round 2."""
    t0 = time.monotonic()
    fed = _fed(d)
    service = FederationService(fed, RING, _opts())
    await service.start()
    hold = threading.Event()

    def held(model: Any, task: TaskContext) -> Result:
        hold.wait(30)
        return _train(model, task)

    loop = asyncio.get_running_loop()
    clients = [asyncio.create_task(_client(service, "c2").run_async()),
               asyncio.create_task(_client(service, "c1", held).run_async())]  # fmt: skip
    peer = MemPeer(service, KEYS["c0"], loop)
    stream: TaskStream | None = None
    try:
        valid_hello = peer.hello()
        hello = pb.HelloReply.FromString(await peer.aunary("Hello", valid_hello))
        spec = ParamSpec.from_dict(json.loads(hello.spec_json))
        out = await asyncio.to_thread(hello_cases, peer, valid_hello, KEYS["c1"].private)
        out.update(await credential_cases(peer, KEYS["c1"]))
        stream = TaskStream(peer)
        first = await stream.next()  # the round starts once all three are connected
        assert (first.task, first.version, first.finished) == (0, 0, False), first
        owners = await service.in_engine(
            lambda: {j: t.client for j, t in service.engine.tasks.items()}
        )
        out.update(await asyncio.to_thread(misc_cases, peer))
        good = train(_train, spec, await peer.pull(first), first, peer.key)
        out.update(await asyncio.to_thread(push_cases, peer, good))
        out.update(await push_credential_cases(peer, KEYS["c1"], good))
        await until(lambda: uploads(d) == [(2, 2)], 20, "client 2's upload",
                    lambda: uploads(d))  # fmt: skip
        after_bad = {"uploads": uploads(d), "spool": spool(d), "open": sorted(owners)}
        after_bad["task0_open"] = await outcome(peer.astream("Pull", peer.pull_req(0)))
        accepted = await peer.apush(peer.upload(good))
        retry = await peer.apush(peer.upload(good))
        # client 0's real client takes over (round 2), client 1 finishes its task
        await stream.close()
        stream = None
        clients.append(asyncio.create_task(_client(service, "c0").run_async()))
        hold.set()
        await _finish(service, clients)
    finally:
        hold.set()
        if stream is not None:
            await stream.close()
        await _cancel(clients)
        await service.stop()
    return BadRun(
        outcomes=out, hello=hello, owners=owners, after_bad=after_bad, accepted=accepted,
        retry=retry, version=fed.server.version, params=np.array(fed.server.params, copy=True),
        uploads=uploads(d), folded=folded(d), seconds=time.monotonic() - t0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> BadRun:
    return asyncio.run(_bad_input(tmp_path_factory.mktemp("bad-input")))


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_over_memory_gets_the_status_of_grpc(bad: BadRun, case: str) -> None:
    code, message = CASES[case]
    got = bad.outcomes[case]
    assert got[0] == code, got
    assert message in got[1], got


def test_every_bad_input_case_was_run(bad: BadRun) -> None:
    assert set(bad.outcomes) == set(CASES)
    assert bad.hello.client_index == 0 and bad.hello.model_bytes == 4 * D
    assert bad.owners == {0: 0, 1: 1, 2: 2}  # the cases' "task 1" is another client's


def test_bad_input_over_memory_changes_nothing(bad: BadRun) -> None:
    a = bad.after_bad
    assert a["uploads"] == [(2, 2)]  # client 2's; client 1 still training; client 0's refused
    assert len(a["spool"]) == 1 and a["spool"][0].startswith(f"{2:012d}-2-"), a["spool"]
    assert a["spool"][0].endswith(".upd"), a["spool"]
    assert a["task0_open"][0] == "OK", a["task0_open"]


def test_bad_input_over_memory_ends_with_the_clean_model(bad: BadRun, clean: Any) -> None:
    assert (bad.accepted.task, bad.accepted.duplicate) == (0, False)
    assert (bad.retry.task, bad.retry.duplicate) == (0, True)
    assert bad.uploads == ALL_UPLOADS
    assert bad.folded == [(0, 3), (1, 3)]
    assert bad.version == ROUNDS
    assert bad.params.tobytes() == clean.tobytes()
    assert bad.seconds < 20, bad.seconds


# -- policies ------------------------------------------------------------------------------------
def _in_order(service: list[FederationService], order: tuple[int, ...]) -> dict[str, Any]:
    """Trains that make the sync round's updates arrive in ``order`` (client indices): each
    client starts its round-r training once ``3 r + (its place in order)`` uploads have been
    acknowledged."""

    def make(place: int) -> Any:
        def fn(model: Any, task: TaskContext) -> Result:
            need = task.version * len(order) + place
            deadline = time.monotonic() + 20
            while service[0].stats.uploads < need:
                if time.monotonic() > deadline:
                    raise AssertionError(f"job {task.job}: {need} uploads never acknowledged")
                time.sleep(0.002)
            return _train(model, task)

        return fn

    return {NAMES[c]: make(place) for place, c in enumerate(order)}


async def _run_ordered(d: Path, order: tuple[int, ...], fold: str) -> Federation:
    fed = _fed(d, order=fold)
    service = FederationService(fed, RING, _opts())
    await _serve(service, _in_order([service], order))
    return fed


@pytest.mark.parametrize("fold", ["canonical", "arrival"])
def test_sync_over_memory_in_two_arrival_orders(tmp_path: Path, fold: str, clean: Any) -> None:
    """Sync rounds, the updates arriving in two different orders: with canonical fold order
    the same bits (a clean run's); with arrival order the same model up to rounding."""
    orders = [(0, 1, 2), (2, 0, 1)]
    feds = [asyncio.run(_run_ordered(tmp_path / str(i), o, fold)) for i, o in enumerate(orders)]
    for i, (fed, order) in enumerate(zip(feds, orders, strict=True)):
        assert fed.finished and fed.server.version == ROUNDS
        assert arrivals(tmp_path / str(i)) == list(order) * ROUNDS  # the order was as asked
        assert folded(tmp_path / str(i)) == [(0, 3), (1, 3)]
    a, b = (np.asarray(f.server.params) for f in feds)
    if fold == "canonical":
        assert a.tobytes() == b.tobytes() == clean.tobytes()
    else:
        np.testing.assert_allclose(a, clean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(b, clean, rtol=1e-4, atol=1e-6)
        # (here the two orders fold to bits ~2e-8 apart, float addition not being
        # associative; whether they differ at all depends on the CPU's summation, so it is
        # not asserted: the arrivals above show the orders really differed)


@pytest.mark.parametrize(
    ("kind", "rounds", "per_round"),
    [("fedbuff", 3, 2), ("fedasync", 4, 1)],
)
def test_an_async_policy_over_memory_runs_to_its_end(
    tmp_path: Path, kind: str, rounds: int, per_round: int
) -> None:
    fed = asyncio.run(_run(tmp_path, kind=kind, order="arrival", rounds=rounds))
    assert fed.finished and fed.server.version == rounds
    assert [f for _, f in folded(tmp_path)] == [per_round] * rounds
    accepted = uploads(tmp_path)
    assert len(accepted) >= rounds * per_round
    assert len(set(accepted)) == len(accepted)
    params = np.asarray(fed.server.params)
    assert np.isfinite(params).all() and np.any(params != 0)


# -- crashes without processes -------------------------------------------------------------------
async def _stop_after(d: Path, acked: int) -> dict[tuple[int, int], tuple[int, Result]]:
    """Serve until ``acked`` uploads are acknowledged (no training beyond those starts), then
    stop the service: what each acknowledged upload carried, by (client, job)."""
    fed = _fed(d)
    service = FederationService(fed, RING, _opts())
    await service.start()
    budget = threading.Semaphore(acked)
    release = threading.Event()
    sent: dict[tuple[int, int], tuple[int, Result]] = {}

    def gated(name: str) -> Any:
        def fn(model: Any, task: TaskContext) -> Result:
            res = _train(model, task)
            if budget.acquire(blocking=False):
                sent[(NAMES.index(name), task.job)] = (task.version, res)
            else:
                release.wait(30)  # never uploaded: the service stops meanwhile
            return res

        return fn

    clients = [asyncio.create_task(_client(service, n, gated(n)).run_async()) for n in NAMES]
    try:
        await until(lambda: service.stats.uploads >= acked, 20, f"{acked} uploads",
                    lambda: service.stats.uploads)  # fmt: skip
    finally:
        await _cancel(clients)  # the clients die with the service
        release.set()
        await service.stop()
    return sent


async def _resume(d: Path, sent: dict[tuple[int, int], tuple[int, Result]]
                  ) -> tuple[Federation, list[pb.PushReply], list[pb.PushReply]]:  # fmt: skip
    """Re-open the service over ``d``; each acknowledged upload is sent again (before the
    clients are back, and again once the federation is over), then the clients finish it."""
    fed = _fed(d)
    service = FederationService(fed, RING, _opts())
    await service.start()

    async def resend() -> list[pb.PushReply]:
        out = []
        for (client, job), (version, res) in sorted(sent.items()):
            peer = MemPeer(service, KEYS[NAMES[client]])
            data = np.asarray(res.delta, np.float32).tobytes()
            u = Upload(job, version, data, float(res.num_examples), dict(res.metrics))
            out.append(await peer.apush(peer.upload(u)))
        return out

    clients: list[asyncio.Task[Any]] = []
    try:
        before = await resend()
        clients = [asyncio.create_task(_client(service, n).run_async()) for n in NAMES]
        await _finish(service, clients)
        after = await resend()
    finally:
        await _cancel(clients)
        await service.stop()
    return fed, before, after


@pytest.mark.parametrize("acked", [1, 2, 4])
def test_a_service_stopped_between_accepting_and_folding_folds_each_upload_once(
    tmp_path: Path, acked: int, clean: Any
) -> None:
    """Stopped with ``acked`` uploads acknowledged and their round open (round 1 for 1 and 2;
    round 2, round 1 folded, for 4), re-opened over its state directory: the acknowledged
    uploads are in the log, their retries are acknowledged as duplicates, and the federation
    ends with an uninterrupted run's bits, every upload folded once."""
    sent = asyncio.run(_stop_after(tmp_path, acked))
    assert sorted(sent) == sorted(uploads(tmp_path))
    assert len(sent) == acked
    assert folded(tmp_path) == ([(0, 3)] if acked > 3 else [])  # the last round still open
    fed, before, after = asyncio.run(_resume(tmp_path, sent))
    assert [(r.task, r.duplicate) for r in before] == [(j, True) for _, j in sorted(sent)]
    assert [(r.task, r.duplicate) for r in after] == [(j, True) for _, j in sorted(sent)]
    assert fed.finished and fed.server.version == ROUNDS
    assert uploads(tmp_path) == ALL_UPLOADS
    assert folded(tmp_path) == [(0, 3), (1, 3)]
    assert np.asarray(fed.server.params).tobytes() == clean.tobytes()


async def _stop_mid_upload(d: Path) -> tuple[list[str], Upload]:
    """Client 0, by hand, sends its first update's header and two chunks, then stalls; the
    service is stopped while it receives it: what the spool held then, and the update."""
    fed = _fed(d)
    service = FederationService(fed, RING, _opts())
    await service.start()
    clients = [asyncio.create_task(_client(service, n).run_async()) for n in NAMES[1:]]
    peer = MemPeer(service, KEYS["c0"])
    stream = TaskStream(peer)
    stall = asyncio.Event()
    push: asyncio.Task[Any] | None = None
    try:
        hello = pb.HelloReply.FromString(await peer.aunary("Hello", peer.hello()))
        spec = ParamSpec.from_dict(json.loads(hello.spec_json))
        first = await stream.next()
        good = train(_train, spec, await peer.pull(first), first, peer.key)
        msgs = peer.upload(good)

        async def stalled() -> Any:
            for m in msgs[:2]:
                yield m
            await stall.wait()

        push = asyncio.create_task(
            peer.mem.stream_unary(SERVICE + "Push")(stalled(), metadata=peer.md("Push"))
        )
        await until(lambda: any(n.startswith("tmp-") for n in spool(d)), 20, "the upload",
                    lambda: spool(d))  # fmt: skip
        await until(lambda: len(uploads(d)) == 2, 20, "clients 1 and 2", lambda: uploads(d))
        seen = spool(d)
    finally:
        if push is not None:
            push.cancel()
            await asyncio.gather(push, return_exceptions=True)
        await stream.close()
        await _cancel(clients)
        await service.stop()
    return seen, good


def test_an_upload_cut_off_by_a_stop_is_not_kept_and_is_accepted_when_sent_again(
    tmp_path: Path, clean: Any
) -> None:
    """The service stops while client 0's upload is half received (clients 1 and 2 are in):
    re-opened, it keeps no trace of it (no spool file, no log row), takes it in full when
    sent again (not a duplicate), and ends with the clean run's bits."""
    seen, good = asyncio.run(_stop_mid_upload(tmp_path))
    assert sum(n.startswith("tmp-") for n in seen) == 1, seen
    assert uploads(tmp_path) == [(1, 1), (2, 2)]

    async def resume() -> tuple[list[str], pb.PushReply, Federation]:
        fed = _fed(tmp_path)
        service = FederationService(fed, RING, _opts())
        await service.start()
        clients: list[asyncio.Task[Any]] = []
        try:
            leftover = spool(tmp_path)
            peer = MemPeer(service, KEYS["c0"])
            reply = await peer.apush(peer.upload(good))
            clients = [asyncio.create_task(_client(service, n).run_async()) for n in NAMES]
            await _finish(service, clients)
        finally:
            await _cancel(clients)
            await service.stop()
        return leftover, reply, fed

    leftover, reply, fed = asyncio.run(resume())
    assert not [n for n in leftover if n.startswith("tmp-")], leftover
    assert (reply.task, reply.duplicate) == (0, False)
    assert uploads(tmp_path) == ALL_UPLOADS
    assert folded(tmp_path) == [(0, 3), (1, 3)]
    assert np.asarray(fed.server.params).tobytes() == clean.tobytes()
