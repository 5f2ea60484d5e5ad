"""Bad input from edge aggregators against a real root server process (loopback, no TLS).

The root serves 4 clients (logistic regression on digits, 2 rounds, every client each round,
float64 accumulator) and authorizes two edge keys, ``edge-a`` (clients 0 and 1) and ``edge-b``
(clients 2 and 3). The test plays both edges over raw gRPC (bytes in, bytes out, signed with
the edges' keys as :class:`~fedagg.deploy._edge.ParentLink` signs), plus a normal client and an
unregistered edge key. Every bad input must get the right status and a clear message and change
nothing; then the correct partial aggregate is accepted once, its re-sends are acknowledged as
duplicates, and the root's state.db counts every job once.

The scenario runs once (a module fixture) and records every outcome; the tests below check
them one by one.
"""

from __future__ import annotations

import hashlib
import json
import math
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from fedagg.aggregators import mean
from fedagg.config import build_strategy, load_config, resolve_config
from fedagg.core.spec import ParamSpec
from fedagg.core.update import Update
from fedagg.deploy import ClientKey, make_keys
from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._auth import (
    AUTH_FAILED,
    body,
    edge_upload_body,
    signing_bytes,
    upload_body,
)
from fedagg.deploy._calls import signed_channel
from fedagg.deploy._digest import digest_of as hash_with
from fedagg.deploy._options import ServerOptions
from fedagg.deploy._partial import partial_buffers
from fedagg.deploy._wire import MODEL_CHUNK, decode_chunk, encode_chunk
from tests.deploy.harness import Fed, federation, read_log, start_server, wait, wait_listening

SERVICE = "/fedagg.v1.Federation/"
RPC_TIMEOUT = 20.0
CLIENTS = 4
SERVES = {"edge-a": [0, 1], "edge-b": [2, 3]}
#: the clients' own keys: what a genuine edge forwards carries their signatures (``Origin``)
CLIENT_KEYS: dict[int, ClientKey] = {}

INVALID, DENIED, UNAUTH, PRECOND = (
    "INVALID_ARGUMENT", "PERMISSION_DENIED", "UNAUTHENTICATED", "FAILED_PRECONDITION",
)  # fmt: skip
ONLY_EDGES = "only edge aggregators relay or merge"

#: case -> (status code, a substring of the status message)
EXPECTED: dict[str, tuple[str, str]] = {
    # who may be an edge, and of what
    "hello_claims_client_out_of_range": (DENIED, "edge 'edge-a' may not serve clients [4] here"),
    "relay_after_the_refused_hello": (DENIED, "client 0 is not in the subtree of edge 'edge-a'"),
    "hello_unknown_edge_key": (UNAUTH, AUTH_FAILED),
    "tasks_unknown_edge_key": (UNAUTH, AUTH_FAILED),
    "client_relays": (DENIED, ONLY_EDGES),
    "client_pushes_partial": (DENIED, ONLY_EDGES),
    "client_reports_dropouts": (DENIED, ONLY_EDGES),
    # the subtree
    "relay_for_client_of_another_edge": (DENIED, "client 2 is not in the subtree of edge 'edge-a'"),
    "partial_for_client_of_another_edge": (
        DENIED,
        "client 2 is not in the subtree of edge 'edge-a'",
    ),
    "relay_of_another_clients_task": (DENIED, "task 1 was given to another client"),
    "partial_job_of_another_client": (PRECOND, "job 1 of client 0 cannot be merged (denied)"),
    # the partial's fields
    "partial_lists_a_job_twice": (INVALID, "a partial lists a job twice"),
    "partial_wrong_byte_count": (INVALID, "partial has 10392 bytes, expected 10400"),
    "partial_accumulator_bits_16": (INVALID, "bad partial accumulator or weight"),
    "partial_accumulator_bits_0": (INVALID, "bad partial accumulator or weight"),
    "partial_weight_zero": (INVALID, "bad partial accumulator or weight"),
    "partial_job_weight_nan": (INVALID, "weights must be finite and > 0"),
    "partial_job_not_open": (PRECOND, "job 999 of client 0 cannot be merged (unknown)"),
    "partial_wrong_version": (PRECOND, "job 0 of client 0 cannot be merged (version)"),
    "relay_wrong_nbytes": (INVALID, "update has 10400 bytes, the model 2600"),
    # signatures
    "partial_header_tampered": (UNAUTH, AUTH_FAILED),
    "partial_jobs_tampered": (UNAUTH, AUTH_FAILED),
    "partial_signed_by_another_edge": (UNAUTH, AUTH_FAILED),
    "partial_trailer_signed_by_another_edge": (UNAUTH, f"trailer: {AUTH_FAILED}"),
    "partial_payload_altered": (INVALID, "do not match its trailer's sha256"),
    # after the first partial was accepted
    "partial_overlaps_accepted_uploads": (PRECOND, "a partial overlaps accepted uploads"),
}

#: the digest the servers under test sign with (their default)
DIGEST = ServerOptions.digest_algorithm


# -- an edge (or a client) over raw gRPC ---------------------------------------------------------
@dataclass(frozen=True)
class Job:
    client: int
    task: int
    weight: float
    loss: float = math.nan


class Peer:
    """One key speaking the protocol by hand over an insecure channel."""

    def __init__(self, address: str, key: ClientKey) -> None:
        self.channel = signed_channel(grpc.insecure_channel(address), key)  # call credentials
        self.key = key

    def auth(self, method: str, content: bytes, key: ClientKey | None = None) -> pb.Auth:
        """Signed with this peer's key, or (a forgery) with ``key`` under this peer's name."""
        fields = self.key.sign(method, content)
        if key is not None:
            ts, nonce = fields["timestamp_ms"], fields["nonce"]
            signed = signing_bytes(method, self.key.name, ts, nonce, content)
            fields["signature"] = key.private.sign(signed)
        return pb.Auth(**fields)

    def hello(self, serves: Sequence[int]) -> pb.HelloReply:
        serves = sorted(serves)
        req = pb.HelloRequest(auth=self.auth("Hello", body(protocol=1, serves=serves)),
                              protocol=1, serves=serves)  # fmt: skip
        reply: pb.HelloReply = pb.HelloReply.FromString(
            self.unary("Hello", req.SerializeToString())
        )
        return reply

    def unary(self, method: str, raw: bytes) -> bytes:
        out: bytes = self.channel.unary_unary(SERVICE + method)(raw, timeout=RPC_TIMEOUT)
        return out

    def pull(self, task: int, spec: ParamSpec) -> np.ndarray[Any, Any]:
        req = pb.PullRequest(auth=self.auth("Pull", body(task=task)), task=task)
        buf = bytearray()
        call = self.channel.unary_stream(SERVICE + "Pull")
        for raw in call(req.SerializeToString(), timeout=RPC_TIMEOUT):
            c = decode_chunk(raw, MODEL_CHUNK)
            assert c.ints.get(2, 0) == len(buf)
            buf += c.data
        assert len(buf) == spec.nbytes
        return np.frombuffer(bytes(buf), dtype=spec.dtype).copy()

    # -- uploads -------------------------------------------------------------------------------
    def sign_header(self, head: pb.UploadHeader, *, edge: bool = True,
                    key: ClientKey | None = None) -> pb.UploadHeader:  # fmt: skip
        content = upload_body(head.task, head.version, head.weight, head.nbytes,
                              dict(head.metrics))  # fmt: skip
        if edge:
            content = edge_upload_body(content, head)
        head.auth.CopyFrom(self.auth("Push", content, key))
        return head

    def messages(self, head: pb.UploadHeader, data: bytes, *, key: ClientKey | None = None,
                 digest_of: bytes | None = None) -> list[bytes]:  # fmt: skip
        """Header, data chunks (4 KiB), and the trailer: the data's sha256 signed with the
        header's timestamp and nonce, over the header's signature and the digest."""
        payload = data if digest_of is None else digest_of
        client_digest = hashlib.sha256(payload).digest()  # a relay's client signed sha256
        with_origins(head, client_digest)
        # the trailer: a relay's is its client's digest (the bytes are hashed once, with the
        # client's algorithm); a partial's, the server's algorithm
        digest = client_digest if head.relay else hash_with(DIGEST, payload)
        a = head.auth
        sig = (key or self.key).sign_bytes("PushTrailer", a.timestamp_ms, a.nonce,
                                           a.signature + digest)  # fmt: skip
        out = [encode_chunk({}, b"", head.SerializeToString())]
        step = 4096
        out += [encode_chunk({2: off}, data[off : off + step]) for off in range(0, len(data), step)]
        trailer = pb.UploadTrailer(sha256=digest, signature=sig).SerializeToString()
        out.append(encode_chunk({}, b"", None, trailer))
        return out

    def push(self, messages: Iterable[bytes]) -> pb.PushReply:
        raw = self.channel.stream_unary(SERVICE + "Push")(iter(messages), timeout=RPC_TIMEOUT)
        reply: pb.PushReply = pb.PushReply.FromString(raw)
        return reply


def origin(client: int, task: int, version: int, weight: float, nbytes: int,
           metrics: dict[str, float], digest: bytes) -> pb.Origin:  # fmt: skip
    """What a genuine edge keeps of a client's upload: the client's header Auth, digest and
    trailer signature, signed with the client's own key."""
    key = CLIENT_KEYS[client]
    auth = pb.Auth(**key.sign("Push", upload_body(task, version, weight, nbytes, metrics)))
    sig = key.sign_bytes("PushTrailer", auth.timestamp_ms, auth.nonce, auth.signature + digest)
    return pb.Origin(auth=auth, sha256=digest, trailer_signature=sig, metrics=metrics)


def with_origins(head: pb.UploadHeader, digest: bytes, nbytes: int = 2600) -> None:
    """The clients' signatures over what an edge's header says of them (the edge's own
    signature does not cover them): a relay's over its header and bytes, each partial job's
    over the job."""
    if not CLIENT_KEYS:
        return
    if head.relay and not head.HasField("origin") and head.on_behalf in CLIENT_KEYS:
        head.origin.CopyFrom(origin(head.on_behalf, head.task, head.version, head.weight,
                                    head.nbytes, dict(head.metrics), digest))  # fmt: skip
    for j in head.partial.jobs:
        if not j.HasField("origin") and j.client in CLIENT_KEYS:
            m = {} if math.isnan(j.train_loss) else {"train_loss": j.train_loss}
            d = hashlib.sha256(f"job {j.task}".encode()).digest()
            j.origin.CopyFrom(origin(j.client, j.task, head.version, j.weight, nbytes, m, d))


def partial_header(version: int, jobs: Sequence[Job], state: Any, nbytes: int, *,
                   bits: int = 64, dropped: Sequence[Job] = ()) -> pb.UploadHeader:  # fmt: skip
    """As ParentLink.push_forward builds it."""
    head = pb.UploadHeader(version=version, nbytes=nbytes, task=jobs[0].task if jobs else 0)
    if state is not None:
        head.partial.weight = float(state.weight)
        head.partial.weight_comp = float(state.weight_comp)
    head.partial.accumulator_bits = bits
    for j in jobs:
        head.partial.jobs.add(task=j.task, client=j.client, weight=j.weight, train_loss=j.loss)
    for j in dropped:
        head.partial.dropped.add(task=j.task, client=j.client, weight=1.0, train_loss=math.nan)
    return head


def relay_header(job: Job, version: int, nbytes: int) -> pb.UploadHeader:
    head = pb.UploadHeader(task=job.task, version=version, weight=job.weight, nbytes=nbytes,
                           relay=True, on_behalf=job.client)  # fmt: skip
    head.metrics["train_loss"] = 0.5
    return head


class TaskStream:
    """An edge's long-lived Tasks stream, read by a thread into a queue."""

    def __init__(self, peer: Peer) -> None:
        req = pb.TasksRequest(auth=peer.auth("Tasks", body())).SerializeToString()
        self.call = peer.channel.unary_stream(SERVICE + "Tasks")(req)
        self.q: queue.Queue[pb.Task | BaseException] = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            for raw in self.call:
                self.q.put(pb.Task.FromString(raw))
        except grpc.RpcError as e:
            self.q.put(e)

    def take(self, n: int, timeout: float) -> list[pb.Task]:
        """The next ``n`` tasks (or the "finished" message), skipping heartbeats."""
        out: list[pb.Task] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            item = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(item, BaseException):
                raise item
            if not item.heartbeat:
                out.append(item)
        return out

    def poll(self, seconds: float) -> list[pb.Task]:
        """Whatever tasks arrive within ``seconds``."""
        out: list[pb.Task] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                item = self.q.get(timeout=left)
            except queue.Empty:
                break
            if isinstance(item, pb.Task) and not item.heartbeat:
                out.append(item)
        return out

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(10)


def outcome(fn: Callable[[], Any]) -> tuple[str, str]:
    """("OK", repr of the reply) or (status code name, status message)."""
    try:
        return "OK", repr(fn())
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""


def db_rows(fed: Fed, query: str) -> list[tuple[Any, ...]]:
    con = sqlite3.connect(fed.state / "state.db")
    try:
        return [tuple(r) for r in con.execute(query).fetchall()]
    finally:
        con.close()


def uploads(fed: Fed) -> list[tuple[int, int]]:
    return [
        (int(c), int(j)) for c, j in db_rows(fed, "SELECT client, job FROM uploads ORDER BY job")
    ]


def wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def delta(client: int, round_: int, spec: ParamSpec) -> np.ndarray[Any, Any]:
    rng = np.random.default_rng([client, round_, 11])
    return (rng.standard_normal(spec.size) * 0.01).astype(spec.dtype)


def weight(client: int) -> float:
    return float(10 + 3 * client)


def partial_of(jobs: Sequence[Job], round_: int, spec: ParamSpec, version: int,
               acc: str = "float64") -> tuple[Any, bytes]:  # fmt: skip
    """The mean-monoid state of ``jobs``' updates, and its payload bytes."""
    agg = mean(acc)  # type: ignore[arg-type]
    st = agg.init(spec, version=version)
    for j in jobs:
        agg.fold(st, Update(delta=delta(j.client, round_, spec), weight=j.weight))
    return st, b"".join(bytes(b) for b in partial_buffers(st))


# -- the scenario ------------------------------------------------------------------------------
@dataclass
class Scenario:
    outcomes: dict[str, tuple[str, str]] = field(default_factory=dict)
    early_tasks: list[pb.Task] = field(default_factory=list)
    round0: dict[int, pb.Task] = field(default_factory=dict)
    after_bad: dict[str, Any] = field(default_factory=dict)
    accepted: dict[str, tuple[str, str]] = field(default_factory=dict)
    uploads_round0: list[tuple[int, int]] = field(default_factory=list)
    rounds_round0: list[tuple[Any, ...]] = field(default_factory=list)
    model1: np.ndarray[Any, Any] | None = None
    expected1: np.ndarray[Any, Any] | None = None
    rogue_partial: tuple[str, str] = ("", "")
    refused_with_dropped: tuple[str, str] = ("", "")
    job_open_after_refused_dropped: tuple[str, str] = ("", "")
    mixed_accumulator: tuple[str, str] = ("", "")
    alive_after_mixed_accumulator: bool = False
    server_rc: int | None = None
    restart: tuple[int, str] | None = None
    server_log: str = ""
    final_uploads: list[tuple[int, int]] = field(default_factory=list)
    final_rounds: list[tuple[Any, ...]] = field(default_factory=list)
    seconds: float = 0.0


def _alive(server: Any, peer: Peer) -> bool:
    """The root process runs and answers (a heartbeat)."""
    req = pb.HeartbeatRequest(auth=peer.auth("Heartbeat", body(tasks=[])))
    ok = outcome(lambda: peer.unary("Heartbeat", req.SerializeToString()))[0] == "OK"
    return bool(server.poll() is None and ok)


def _scenario(fed: Fed, root: Path, sc: Scenario) -> None:
    t0 = time.monotonic()
    out = sc.outcomes
    server = start_server(fed)
    make_keys(root / "rogue", ["edge-rogue"])
    keys = root / "edgekeys"
    ka, kb = ClientKey.load(keys / "edge-a.key"), ClientKey.load(keys / "edge-b.key")
    rogue_key = ClientKey.load(root / "rogue" / "edge-rogue.key")
    client_key = ClientKey.load(fed.key(2))
    CLIENT_KEYS.update({c: ClientKey.load(fed.key(c)) for c in range(CLIENTS)})
    wait_listening(fed, server)
    a, b = Peer(fed.address, ka), Peer(fed.address, kb)
    rogue, client = Peer(fed.address, rogue_key), Peer(fed.address, client_key)

    # -- before any edge has said Hello ---------------------------------------------------------
    out["hello_claims_client_out_of_range"] = outcome(lambda: a.hello([0, 1, 4]))
    d0 = np.zeros(650, np.float32).tobytes()
    relay0 = a.sign_header(relay_header(Job(0, 0, 10.0), 0, len(d0)))
    out["relay_after_the_refused_hello"] = outcome(lambda: a.push(a.messages(relay0, d0)))
    out["hello_unknown_edge_key"] = outcome(lambda: rogue.hello([0, 1]))
    tasks_req = pb.TasksRequest(auth=rogue.auth("Tasks", body())).SerializeToString()
    out["tasks_unknown_edge_key"] = outcome(
        lambda: list(rogue.channel.unary_stream(SERVICE + "Tasks")(tasks_req, timeout=5))
    )

    # -- the edges say Hello; edge-a opens its task stream first --------------------------------
    hello = a.hello(SERVES["edge-a"])
    spec = ParamSpec.from_dict(json.loads(hello.spec_json))
    assert spec.nbytes == 2600, spec  # logistic regression on digits: 64 x 10 + 10 float32
    b.hello(SERVES["edge-b"])
    ta = TaskStream(a)
    # wait_for = 0: the first round needs every client; edge-b's two are not connected yet
    sc.early_tasks = ta.poll(1.5)
    tb = TaskStream(b)
    got = sc.early_tasks + ta.take(2 - len(sc.early_tasks), 60) + tb.take(2, 60)
    sc.round0 = {int(t.client): t for t in got}
    assert sorted(sc.round0) == [0, 1, 2, 3], got
    job = {c: Job(c, int(t.task), weight(c), 0.1 * c) for c, t in sc.round0.items()}
    assert [job[c].task for c in range(CLIENTS)] == list(range(CLIENTS)), got  # sorted clients
    x0 = a.pull(job[0].task, spec)

    # -- bad inputs ---------------------------------------------------------------------------
    st, payload = partial_of([job[0], job[1]], 0, spec, 0)
    n = len(payload)
    assert n == 2 * 650 * 8

    def push_partial(peer: Peer, jobs: Sequence[Job], *, version: int = 0, state: Any = st,
                     data: bytes = payload, nbytes: int | None = None, bits: int = 64,
                     dropped: Sequence[Job] = ()) -> tuple[str, str]:  # fmt: skip
        head = partial_header(version, jobs, state, len(data) if nbytes is None else nbytes,
                              bits=bits, dropped=dropped)  # fmt: skip
        return outcome(lambda: peer.push(peer.messages(peer.sign_header(head), data)))

    # a normal client (correctly signed) may not relay nor merge
    d2 = delta(2, 0, spec).tobytes()
    h = client.sign_header(relay_header(job[2], 0, len(d2)), edge=False)
    out["client_relays"] = outcome(lambda: client.push(client.messages(h, d2)))
    h = client.sign_header(partial_header(0, [job[2]], st, n), edge=False)
    out["client_pushes_partial"] = outcome(lambda: client.push(client.messages(h, payload)))
    h = client.sign_header(partial_header(0, [], None, 0, dropped=[job[2]]), edge=False)
    out["client_reports_dropouts"] = outcome(lambda: client.push(client.messages(h, b"")))
    # an unregistered key pushing a partial (checked in its own test below)
    h = rogue.sign_header(partial_header(0, [job[0], job[1]], st, n))
    sc.rogue_partial = outcome(lambda: rogue.push(rogue.messages(h, payload)))

    # edge-a overstepping its subtree
    h = a.sign_header(relay_header(job[2], 0, len(d2)))
    out["relay_for_client_of_another_edge"] = outcome(lambda: a.push(a.messages(h, d2)))
    out["partial_for_client_of_another_edge"] = push_partial(a, [job[0], job[2]])
    d0 = delta(0, 0, spec).tobytes()
    h = a.sign_header(relay_header(Job(0, job[1].task, 10.0), 0, len(d0)))
    out["relay_of_another_clients_task"] = outcome(lambda: a.push(a.messages(h, d0)))
    out["partial_job_of_another_client"] = push_partial(
        a, [job[0], Job(0, job[1].task, job[1].weight)]
    )
    # the partial's fields
    out["partial_lists_a_job_twice"] = push_partial(a, [job[0], job[1], job[0]])
    out["partial_wrong_byte_count"] = push_partial(a, [job[0], job[1]], data=payload[:-8])
    out["partial_accumulator_bits_16"] = push_partial(a, [job[0], job[1]], bits=16)
    out["partial_accumulator_bits_0"] = push_partial(a, [job[0], job[1]], bits=0)
    zero = type("W", (), {"weight": 0.0, "weight_comp": 0.0})()
    out["partial_weight_zero"] = push_partial(a, [job[0], job[1]], state=zero)
    out["partial_job_weight_nan"] = push_partial(a, [job[0], Job(1, job[1].task, math.nan)])
    out["partial_job_not_open"] = push_partial(a, [job[0], Job(0, 999, 1.0)])
    out["partial_wrong_version"] = push_partial(a, [job[0], job[1]], version=1)
    h = a.sign_header(relay_header(job[0], 0, n))
    out["relay_wrong_nbytes"] = outcome(lambda: a.push(a.messages(h, payload)))
    # signatures
    h = a.sign_header(partial_header(0, [job[0], job[1]], st, n))
    h.partial.weight *= 2  # after signing
    out["partial_header_tampered"] = outcome(lambda: a.push(a.messages(h, payload)))
    h = a.sign_header(partial_header(0, [job[0], job[1]], st, n))
    h.partial.jobs[1].weight += 1.0
    out["partial_jobs_tampered"] = outcome(lambda: a.push(a.messages(h, payload)))
    h = a.sign_header(partial_header(0, [job[0], job[1]], st, n), key=kb)  # named edge-a
    out["partial_signed_by_another_edge"] = outcome(lambda: a.push(a.messages(h, payload)))
    h = a.sign_header(partial_header(0, [job[0], job[1]], st, n))
    out["partial_trailer_signed_by_another_edge"] = outcome(
        lambda: a.push(a.messages(h, payload, key=kb))
    )
    altered = bytearray(payload)
    altered[100] ^= 1
    h = a.sign_header(partial_header(0, [job[0], job[1]], st, n))
    out["partial_payload_altered"] = outcome(
        lambda: a.push(a.messages(h, bytes(altered), digest_of=payload))
    )

    def still_open(c: int) -> tuple[str, str]:
        return outcome(lambda: (a if c < 2 else b).pull(job[c].task, spec).size)

    spool = fed.state / "spool"
    sc.after_bad = {
        "alive": _alive(server, a),
        "log": read_log(fed),
        "uploads": uploads(fed),
        "spool": sorted(p.name for p in spool.iterdir()),
        "open": {c: still_open(c) for c in range(CLIENTS)},
    }

    # -- the correct partial, once ------------------------------------------------------------
    acc = sc.accepted
    acc["partial"] = push_partial(a, [job[0], job[1]])
    acc["partial_again"] = push_partial(a, [job[0], job[1]])  # a retry: fresh signature
    acc["partial_again_reordered"] = push_partial(a, [job[1], job[0]])
    d2 = delta(2, 0, spec).tobytes()
    h = b.sign_header(relay_header(job[2], 0, len(d2)))
    acc["relay"] = outcome(lambda: b.push(b.messages(h, d2)))
    h = b.sign_header(relay_header(job[2], 0, len(d2)))
    acc["relay_again"] = outcome(lambda: b.push(b.messages(h, d2)))
    st3, payload3 = partial_of([job[3]], 0, spec, 0)
    out["partial_overlaps_accepted_uploads"] = push_partial(
        b, [job[2], job[3]], state=st3, data=payload3
    )
    acc["partial_b"] = push_partial(b, [job[3]], state=st3, data=payload3)
    round1 = {int(t.client): t for t in ta.take(2, 60) + tb.take(2, 60)}
    acc["partial_after_the_round"] = push_partial(a, [job[0], job[1]])
    sc.uploads_round0 = uploads(fed)
    sc.rounds_round0 = db_rows(fed, "SELECT round, folded, stats FROM rounds ORDER BY round")
    sc.model1 = a.pull(int(round1[0].task), spec)
    strategy = build_strategy(resolve_config(load_config(fed.config)))
    server0 = strategy.init(spec.unflatten(x0))
    ups = [Update(delta=delta(c, 0, spec), weight=weight(c)) for c in range(CLIENTS)]
    sc.expected1 = np.asarray(strategy.round(server0, ups).params)

    # -- round 1: a refused partial carrying a dropout; a float32 partial at a float64 root ----
    job1 = {c: Job(c, int(t.task), weight(c)) for c, t in round1.items()}
    st1, payload1 = partial_of([job1[0]], 1, spec, 1)
    sc.refused_with_dropped = push_partial(
        a, [job1[0], job1[0]], version=1, state=st1, data=payload1, dropped=[job1[1]]
    )
    time.sleep(1.0)  # a dropout is taken by the engine asynchronously
    sc.job_open_after_refused_dropped = outcome(lambda: a.pull(job1[1].task, spec).size)
    mine = [job1[0], job1[1]] if sc.job_open_after_refused_dropped[0] == "OK" else [job1[0]]
    sta, pa = partial_of(mine, 1, spec, 1)
    push_partial(a, mine, version=1, state=sta, data=pa)
    st32, payload32 = partial_of([job1[2], job1[3]], 1, spec, 1, acc="float32")
    sc.mixed_accumulator = push_partial(
        b, [job1[2], job1[3]], version=1, state=st32, data=payload32, bits=32
    )
    time.sleep(1.0)
    sc.alive_after_mixed_accumulator = _alive(server, b)
    if sc.alive_after_mixed_accumulator:  # finish the federation
        if outcome(lambda: b.pull(job1[2].task, spec).size)[0] == "OK":
            stb, pbytes = partial_of([job1[2], job1[3]], 1, spec, 1)
            push_partial(b, [job1[2], job1[3]], version=1, state=stb, data=pbytes)
        sc.server_rc = wait(server, 60)
    else:  # the root died: does it come back?
        sc.server_rc = wait(server, 30)
        again = start_server(fed, log="restart.log")
        sc.restart = (wait(again, 30), read_log(fed, "restart.log"))
    ta.close()
    tb.close()
    for p in (a, b, rogue, client):
        p.channel.close()
    sc.server_log = read_log(fed)
    sc.final_uploads = uploads(fed)
    sc.final_rounds = db_rows(fed, "SELECT round, folded FROM rounds ORDER BY round")
    sc.seconds = time.monotonic() - t0


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    root = tmp_path_factory.mktemp("edge-bad-input")
    edges = make_keys(root / "edgekeys", sorted(SERVES))
    sc = Scenario()
    with federation(root, clients=CLIENTS, rounds=2, tls=False,
                    extra={"strategy": {"accumulator": "float64"}},
                    deploy={"edges": str(edges), "client_timeout": 60.0,
                            "edge_clients": {e: [f"client-{c:03d}" for c in cs]
                                             for e, cs in SERVES.items()}}) as fed:  # fmt: skip
        _scenario(fed, root, sc)
    return sc


# -- the checks --------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_edge_input_gets_its_status_and_a_clear_message(scenario: Scenario, case: str) -> None:
    code, message = EXPECTED[case]
    got = scenario.outcomes[case]
    assert got[0] == code, got
    assert message in got[1], got


def test_every_case_was_run(scenario: Scenario) -> None:
    assert set(scenario.outcomes) == set(EXPECTED)


def test_bad_input_changes_nothing(scenario: Scenario) -> None:
    a = scenario.after_bad
    assert a["alive"]
    assert a["uploads"] == []
    assert a["spool"] == []  # no half-written file of a refused upload is left behind
    for c in range(CLIENTS):  # every job of the round is still open
        assert a["open"][c] == ("OK", "650"), (c, a["open"][c])
    assert "Traceback" not in a["log"]


def test_the_correct_partial_is_accepted_once_and_resends_are_duplicates(
    scenario: Scenario,
) -> None:
    acc = scenario.accepted
    t = scenario.round0
    for case, task, duplicate in [
        ("partial", t[0].task, False),
        ("partial_again", t[0].task, True),
        ("partial_again_reordered", t[1].task, True),
        ("relay", t[2].task, False),
        ("relay_again", t[2].task, True),
        ("partial_b", t[3].task, False),
        ("partial_after_the_round", t[0].task, True),  # the log answers once the round closed
    ]:
        assert acc[case][0] == "OK", (case, acc[case])
        want = pb.PushReply(task=task, duplicate=duplicate)
        assert acc[case][1] == repr(want), (case, acc[case])


def test_the_round_counts_each_job_once(scenario: Scenario) -> None:
    jobs = sorted((c, int(t.task)) for c, t in scenario.round0.items())
    assert scenario.uploads_round0 == jobs  # one row per (client, job), none twice
    ((round_, folded, stats),) = scenario.rounds_round0
    s = json.loads(stats)
    assert (round_, folded) == (0, CLIENTS)
    assert (s["folded"], s["dropped"], s["refused"], s["late"], s["applied"]) == (
        CLIENTS, 0, 0, 0, True,
    )  # fmt: skip
    assert sorted(s["participants"]) == list(range(CLIENTS))


def test_the_merged_round_gives_the_flat_folds_model_bit_for_bit(scenario: Scenario) -> None:
    assert scenario.model1 is not None and scenario.expected1 is not None
    assert np.array_equal(scenario.model1, scenario.expected1), np.max(
        np.abs(scenario.model1 - scenario.expected1)
    )


def test_the_federation_finishes_with_every_job_counted_once(scenario: Scenario) -> None:
    assert scenario.alive_after_mixed_accumulator
    assert scenario.server_rc == 0, scenario.server_log
    assert len(scenario.final_uploads) == len(set(scenario.final_uploads))
    assert scenario.final_rounds[0] == (0, CLIENTS)
    assert len(scenario.final_rounds) == 2


def test_the_first_round_waits_for_every_edge(scenario: Scenario) -> None:
    """wait_for = 0: every client, direct or behind a connected edge. edge-a's task stream was
    open for 1.5 s before edge-b's: no task may have come (a client behind an edge was once
    counted twice, and the round started with half of them)."""
    assert scenario.early_tasks == []


# -- bugs this suite found ---------------------------------------------------------------------
def test_an_unknown_key_pushing_a_partial_is_unauthenticated(scenario: Scenario) -> None:
    assert scenario.rogue_partial[0] == UNAUTH, scenario.rogue_partial
    assert AUTH_FAILED in scenario.rogue_partial[1]


def test_a_refused_partial_reports_no_dropouts(scenario: Scenario) -> None:
    assert scenario.refused_with_dropped[0] == INVALID, scenario.refused_with_dropped
    assert scenario.job_open_after_refused_dropped == ("OK", "650")


def test_a_partial_with_another_accumulator_is_refused_and_the_root_lives(
    scenario: Scenario,
) -> None:
    assert scenario.mixed_accumulator[0] in (INVALID, PRECOND), scenario.mixed_accumulator
    assert "accumulator" in scenario.mixed_accumulator[1]
    assert scenario.alive_after_mixed_accumulator
    assert scenario.restart is None  # the root never had to be restarted
