"""Bad input against a real server process: every malformed, forged, replayed or out-of-bounds
request gets the right gRPC status and a message that says what is wrong, and changes nothing.

One federation (3 clients, 2 rounds, canonical fold order, 4 KiB chunks, an MLP whose update
spans 5 chunks) runs on loopback with TLS. Clients 1 and 2 are real ``fedagg client``
processes; the test plays client 0 over raw gRPC (bytes in, bytes out): it says Hello, opens
its task stream and, before sending its correct update, fires every bad input at the server.
An upload is a header (signed: task, version, weight, size, metrics), data chunks, and a
trailer (the data's sha256, signed together with the header's signature). Client 1 is made
to die in the middle of its first upload (``FEDAGG_CRASH_AT``), so that its
task is certainly still open while client 0 tries to take it, and is restarted afterwards.
The run must end with the model of a clean run, bit for bit, having accepted exactly the six
real updates.

The scenario runs once (a module fixture) and records every outcome; the tests below check
them one by one, so a failure names the input that was mishandled.
"""

from __future__ import annotations

import json
import math
import queue
import re
import secrets
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedagg import sim
from fedagg.core.spec import ParamSpec
from fedagg.deploy import ClientKey, TaskContext, config_trainer, make_keys
from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._auth import body, signing_bytes
from fedagg.deploy._calls import signed_channel
from fedagg.deploy._digest import digest_of
from fedagg.deploy._options import ServerOptions
from fedagg.deploy._wire import MODEL_CHUNK, decode_chunk, encode_chunk
from tests.deploy.harness import (
    PY,
    Fed,
    _env,
    federation,
    read_log,
    run_all,
    start_client,
    start_server,
    wait,
    wait_listening,
    write_toml,
)

#: the digest the servers under test sign with (their default)
DIGEST = ServerOptions.digest_algorithm

CHUNK = 4096
CFG: dict[str, Any] = {
    "clients": 3,
    "rounds": 2,
    "extra": {"model": {"name": "mlp", "hidden": [64]}},  # 4810 float32: 19,240 bytes
    # client 1 is down (killed, then restarted) for a while: keep its task open meanwhile
    "deploy": {"order": "canonical", "chunk_mib": CHUNK / 2**20, "client_timeout": 60.0},
}
SERVICE = "/fedagg.v1.Federation/"
RPC_TIMEOUT = 20.0
GARBAGE = b"garbage!\xff\xff\xff"  # neither a protobuf message nor a chunk

INVALID = "INVALID_ARGUMENT"
UNAUTH = "UNAUTHENTICATED"
STALE = "timestamp outside the allowed clock skew"
#: an unknown name and a bad signature of a known one get the same answer (issue 14, finding 11)
BAD_SIG = "authentication failed (unknown name or bad signature)"
MISSING = "missing credentials"

#: case -> (status code, a substring of the status message)
EXPECTED: dict[str, tuple[str, str]] = {
    # malformed bytes
    "hello_garbage": (INVALID, "malformed request"),
    "tasks_garbage": (INVALID, "malformed request"),
    "pull_garbage": (INVALID, "malformed request"),
    "heartbeat_garbage": (INVALID, "malformed request"),
    "push_garbage": (INVALID, "malformed chunk"),
    "push_garbage_header": (INVALID, "malformed request"),
    "push_garbage_second_chunk": (INVALID, "malformed chunk"),
    "push_empty_stream": (INVALID, "empty upload"),
    "push_no_header": (INVALID, "the first message needs a header"),
    "push_second_header": (INVALID, "a second header"),
    # authentication
    "hello_missing_auth": (UNAUTH, MISSING),
    "hello_stale_timestamp": (UNAUTH, STALE),
    "hello_future_timestamp": (UNAUTH, STALE),
    "hello_forged_signature": (UNAUTH, BAD_SIG),
    "hello_empty_signature": (UNAUTH, MISSING),
    "hello_signed_by_another_key": (UNAUTH, BAD_SIG),
    "hello_signed_for_another_method": (UNAUTH, BAD_SIG),
    "hello_content_altered": (UNAUTH, BAD_SIG),
    "hello_unknown_client": (UNAUTH, BAD_SIG),
    "hello_short_nonce": (UNAUTH, "nonce must be 16 bytes"),
    "hello_replayed": (UNAUTH, "replayed request"),
    "hello_protocol_2": ("FAILED_PRECONDITION", "protocol 2 not supported"),
    "tasks_forged_signature": (UNAUTH, BAD_SIG),
    "heartbeat_forged_signature": (UNAUTH, BAD_SIG),
    "pull_forged_signature": (UNAUTH, BAD_SIG),
    "pull_replayed": (UNAUTH, "replayed request"),
    "push_forged_signature": (UNAUTH, BAD_SIG),
    "push_missing_auth": (UNAUTH, MISSING),
    "push_stale_timestamp": (UNAUTH, STALE),
    "push_unknown_client": (UNAUTH, BAD_SIG),
    "push_header_altered_after_signing": (UNAUTH, BAD_SIG),
    "push_replayed_header": (UNAUTH, "replayed request"),
    # tasks
    "pull_another_clients_task": ("PERMISSION_DENIED", "task 1 is not yours"),
    "pull_unknown_task": ("FAILED_PRECONDITION", "task 999 is not open"),
    "push_another_clients_task": ("PERMISSION_DENIED", "task 1 was given to another client"),
    "push_unknown_task": ("FAILED_PRECONDITION", "task 999 is not open"),
    "push_wrong_version": (INVALID, "trains from version 0, not 1"),
    # the header's values
    "push_wrong_nbytes": (INVALID, "update has 2600 bytes, the model 19240"),
    "push_weight_zero": (INVALID, "weight must be finite and > 0"),
    "push_weight_negative": (INVALID, "weight must be finite and > 0"),
    "push_weight_nan": (INVALID, "weight must be finite and > 0"),
    "push_weight_inf": (INVALID, "weight must be finite and > 0"),
    "push_metric_nan": (INVALID, "metrics must be finite"),
    # the data
    "push_truncated": (INVALID, "truncated upload: 8192 of 19240 bytes"),
    "push_header_only": (INVALID, "truncated upload: 0 of 19240 bytes"),
    "push_nan_value": (INVALID, "non-finite values (NaN or Inf) in the chunk at offset 8192"),
    "push_inf_value": (INVALID, "non-finite values (NaN or Inf) in the chunk at offset 0"),
    "push_chunk_over_chunk_bytes": (INVALID, "bad chunk size 8192 at offset 0 (limit 4096"),
    "push_misaligned_chunk": (INVALID, "bad chunk size 4094 at offset 0 (limit 4096, multiple of"),
    "push_out_of_order_offset": (INVALID, "chunk at offset 8192, expected 4096"),
    "push_past_the_end": (INVALID, "bad chunk size 4 at offset 19240"),
    "push_data_after_trailer": (INVALID, "data after the trailer"),
    # the trailer: the data's digest, signed
    "push_garbage_trailer": (INVALID, "malformed request"),
    "push_no_trailer": (INVALID, "the upload has no trailer"),
    "push_sha256_mismatch": (INVALID, "do not match its trailer's sha256"),
    "push_data_and_digest_altered": (UNAUTH, "trailer: " + BAD_SIG),
    "push_trailer_forged_signature": (UNAUTH, "trailer: " + BAD_SIG),
    "push_trailer_signed_by_another_key": (UNAUTH, "trailer: " + BAD_SIG),
    "push_trailer_of_another_upload": (UNAUTH, "trailer: " + BAD_SIG),
    # gRPC's own limit (chunk_bytes + 64 KiB per message)
    "push_message_over_grpc_limit": ("RESOURCE_EXHAUSTED", "larger than max"),
    "push_second_message_over_grpc_limit": ("RESOURCE_EXHAUSTED", "larger than max"),
    # authenticated, but too many requests
    "heartbeat_rate_limited": ("RESOURCE_EXHAUSTED", "rate limit exceeded"),
}


# -- client 0, by hand -------------------------------------------------------------------------
def _jf(x: float) -> float | str:
    return x if math.isfinite(x) else repr(x)


@dataclass(frozen=True)
class Upload:
    """What an upload's header says, and its data (the flat float32 delta's bytes)."""

    task: int
    version: int
    data: bytes
    weight: float
    metrics: dict[str, float] = field(default_factory=dict)


class Peer:
    """Client 0 speaking the protocol by hand: raw bytes in, raw bytes out, over TLS."""

    def __init__(self, fed: Fed, key: ClientKey) -> None:
        ca = (fed.dir / "certs" / "ca.pem").read_bytes()
        creds = grpc.ssl_channel_credentials(root_certificates=ca)
        # its calls carry the key's call credentials (fedagg.deploy._calls)
        self.channel = signed_channel(grpc.secure_channel(fed.address, creds), key)
        self.key = key

    def auth(
        self,
        method: str,
        content: bytes,
        *,
        name: str | None = None,
        signer: Ed25519PrivateKey | None = None,
        ts_ms: int | None = None,
        nonce: bytes | None = None,
    ) -> pb.Auth:
        name = self.key.name if name is None else name
        signer = self.key.private if signer is None else signer
        ts = int(time.time() * 1000) if ts_ms is None else ts_ms
        nonce = secrets.token_bytes(16) if nonce is None else nonce
        sig = signer.sign(signing_bytes(method, name, ts, nonce, content))
        return pb.Auth(client=name, timestamp_ms=ts, nonce=nonce, signature=sig)

    def hello(self, protocol: int = 1, **kw: Any) -> bytes:
        auth = self.auth("Hello", body(protocol=protocol), **kw)
        return pb.HelloRequest(auth=auth, protocol=protocol).SerializeToString()

    def pull_req(self, task: int, **kw: Any) -> bytes:
        auth = self.auth("Pull", body(task=task), **kw)
        return pb.PullRequest(auth=auth, task=task).SerializeToString()

    def heartbeat_req(self, **kw: Any) -> bytes:
        auth = self.auth("Heartbeat", body(tasks=[]), **kw)
        return pb.HeartbeatRequest(auth=auth).SerializeToString()

    def header(self, u: Upload, **kw: Any) -> pb.UploadHeader:
        nbytes = len(u.data)
        content = body(
            task=u.task, version=u.version, weight=_jf(u.weight), nbytes=nbytes,
            metrics={k: _jf(v) for k, v in u.metrics.items()},
        )  # fmt: skip
        return pb.UploadHeader(
            auth=self.auth("Push", content, **kw), task=u.task, version=u.version,
            weight=u.weight, nbytes=nbytes, metrics=u.metrics,
        )  # fmt: skip

    def trailer(
        self,
        head: pb.UploadHeader,
        data: bytes,
        *,
        digest: bytes | None = None,
        signer: Ed25519PrivateKey | None = None,
    ) -> bytes:
        """The upload's last message's trailer: the data's sha256 (or ``digest``), signed
        with the header's name, timestamp and nonce, over the header's signature and it."""
        digest = digest_of(DIGEST, data) if digest is None else digest
        signer = self.key.private if signer is None else signer
        a = head.auth
        signed = signing_bytes(
            "PushTrailer", a.client, a.timestamp_ms, a.nonce, a.signature + digest
        )
        out: bytes = pb.UploadTrailer(
            sha256=digest, signature=signer.sign(signed)
        ).SerializeToString()
        return out

    def upload(self, u: Upload, **kw: Any) -> list[bytes]:
        """A correct upload of ``u``: header, chunks, trailer."""
        head = self.header(u, **kw)
        return chunks(head, u.data, trailer=self.trailer(head, u.data))

    def unary(self, method: str, raw: bytes) -> bytes:
        out: bytes = self.channel.unary_unary(SERVICE + method)(raw, timeout=RPC_TIMEOUT)
        return out

    def stream(self, method: str, raw: bytes) -> list[bytes]:
        return list(self.channel.unary_stream(SERVICE + method)(raw, timeout=RPC_TIMEOUT))

    def push(self, messages: Iterable[bytes]) -> pb.PushReply:
        raw = self.channel.stream_unary(SERVICE + "Push")(iter(messages), timeout=RPC_TIMEOUT)
        return pb.PushReply.FromString(raw)


def chunks(
    head: pb.UploadHeader | bytes | None,
    data: bytes,
    step: int = CHUNK,
    trailer: bytes | None = None,
) -> list[bytes]:
    """An upload as the built-in client sends it: the header with the first chunk, one
    message per chunk with its offset, then (if given) the trailer in a message of its own."""
    if isinstance(head, pb.UploadHeader):
        head = head.SerializeToString()
    out = [encode_chunk({}, data[:step], head)]
    out += [encode_chunk({2: off}, data[off : off + step]) for off in range(step, len(data), step)]
    if trailer is not None:
        out.append(encode_chunk({}, b"", None, trailer))
    return out


def outcome(fn: Callable[[], Any]) -> tuple[str, str]:
    """("OK", repr of the reply) or (status code name, status message)."""
    try:
        return "OK", repr(fn())
    except grpc.RpcError as e:
        return e.code().name, e.details() or ""


class TaskStream:
    """Client 0's long-lived Tasks stream, read by a thread into a queue."""

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

    def next(self, timeout: float) -> pb.Task:
        """The next task (or the "finished" message), skipping heartbeats."""
        deadline = time.monotonic() + timeout
        while True:
            item = self.q.get(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(item, BaseException):
                raise item
            if not item.heartbeat:
                return item

    def close(self) -> None:
        self.call.cancel()
        self.thread.join(10)


def pull(peer: Peer, task: pb.Task, spec: ParamSpec) -> np.ndarray[Any, Any]:
    buf = bytearray()
    for raw in peer.stream("Pull", peer.pull_req(task.task)):
        c = decode_chunk(raw, MODEL_CHUNK)
        assert c.ints.get(1, 0) == task.version
        assert c.ints.get(2, 0) == len(buf)
        assert c.ints.get(4, 0) == spec.nbytes
        assert len(c.data) <= CHUNK
        buf += c.data
    assert len(buf) == spec.nbytes
    return np.frombuffer(bytes(buf), dtype=spec.dtype).copy()


def train(trainer: Callable[..., Any], spec: ParamSpec, flat: Any, task: pb.Task, key: ClientKey
          ) -> Upload:  # fmt: skip
    """The update client 0's built-in client would send for ``task`` (see _client.Client._do)."""
    ctx = TaskContext(task.task, task.version, task.epochs, task.seed, 0, key.name)
    res = trainer(spec.unflatten(flat), ctx)
    delta = np.ascontiguousarray(spec.as_flat(res.delta), dtype=spec.dtype)
    metrics = {k: float(v) for k, v in dict(res.metrics).items()}
    return Upload(task.task, task.version, delta.tobytes(), float(res.num_examples), metrics)


def uploads(fed: Fed) -> list[tuple[int, int]]:
    with sqlite3.connect(fed.state / "state.db") as db:
        rows = db.execute("SELECT client, job FROM uploads ORDER BY job").fetchall()
    db.close()
    return [(int(c), int(j)) for c, j in rows]


def wait_for(
    cond: Callable[[], bool], timeout: float, what: str, state: Callable[[], object] = str
) -> None:
    """Wait for ``cond``; on timeout, fail with ``state()`` (what was seen instead)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: {state()}")
        time.sleep(0.05)


def exit_time(proc: subprocess.Popen[bytes]) -> Callable[[], float]:
    """Seconds from now until ``proc`` exits (measured by a thread; call after it has)."""
    t0 = time.monotonic()
    out: list[float] = []
    th = threading.Thread(target=lambda: (proc.wait(), out.append(time.monotonic() - t0)))
    th.start()

    def get() -> float:
        th.join(60)
        return out[0]

    return get


def cli_client(
    fed: Fed, key: Path, log: str, *args: str, config: Path | None = None
) -> subprocess.Popen[bytes]:
    """``fedagg client`` with a key of our choosing, output to ``log`` in the federation dir."""
    with open(fed.dir / log, "wb") as out:
        p = subprocess.Popen(
            [PY, "-m", "fedagg.cli", "client", str(config or fed.config), "--key", str(key),
             *args],
            stdout=out, stderr=subprocess.STDOUT, env=_env(None), start_new_session=True,
        )  # fmt: skip
    fed.procs.append(p)
    return p


# -- the bad inputs ----------------------------------------------------------------------------
def hello_cases(
    peer: Peer, valid_hello: bytes, other_key: Ed25519PrivateKey
) -> dict[str, tuple[str, str]]:
    now_ms = int(time.time() * 1000)
    forged = pb.HelloRequest.FromString(peer.hello())
    forged.auth.signature = bytes([forged.auth.signature[0] ^ 1]) + forged.auth.signature[1:]
    empty_sig = pb.HelloRequest.FromString(peer.hello())
    empty_sig.auth.signature = b""
    wrong_method = pb.HelloRequest(auth=peer.auth("Tasks", body(protocol=1)), protocol=1)
    altered = pb.HelloRequest.FromString(peer.hello(protocol=1))
    altered.protocol = 2
    cases: dict[str, bytes] = {
        "hello_garbage": GARBAGE,
        "hello_missing_auth": pb.HelloRequest(protocol=1).SerializeToString(),
        "hello_stale_timestamp": peer.hello(ts_ms=now_ms - 300_000),
        "hello_future_timestamp": peer.hello(ts_ms=now_ms + 300_000),
        "hello_forged_signature": forged.SerializeToString(),
        "hello_empty_signature": empty_sig.SerializeToString(),
        "hello_signed_by_another_key": peer.hello(signer=other_key),
        "hello_signed_for_another_method": wrong_method.SerializeToString(),
        "hello_content_altered": altered.SerializeToString(),
        "hello_unknown_client": peer.hello(name="mallory", signer=Ed25519PrivateKey.generate()),
        "hello_short_nonce": peer.hello(nonce=secrets.token_bytes(15)),
        "hello_replayed": valid_hello,  # the exact bytes of the Hello that succeeded
        "hello_protocol_2": peer.hello(protocol=2),
    }
    return {name: outcome(lambda raw=raw: peer.unary("Hello", raw)) for name, raw in cases.items()}


def misc_cases(peer: Peer) -> dict[str, tuple[str, str]]:
    def forge(raw: bytes, cls: Any) -> bytes:
        msg = cls.FromString(raw)
        msg.auth.signature = bytes([msg.auth.signature[0] ^ 0x80]) + msg.auth.signature[1:]
        out: bytes = msg.SerializeToString()
        return out

    tasks_req = pb.TasksRequest(auth=peer.auth("Tasks", body())).SerializeToString()
    pull_ok = peer.pull_req(0)
    peer.stream("Pull", pull_ok)  # succeeds once...
    return {
        "tasks_garbage": outcome(lambda: peer.stream("Tasks", GARBAGE)),
        "tasks_forged_signature": outcome(
            lambda: peer.stream("Tasks", forge(tasks_req, pb.TasksRequest))
        ),
        "pull_garbage": outcome(lambda: peer.stream("Pull", GARBAGE)),
        "pull_forged_signature": outcome(
            lambda: peer.stream("Pull", forge(peer.pull_req(0), pb.PullRequest))
        ),
        "pull_replayed": outcome(lambda: peer.stream("Pull", pull_ok)),  # ...not twice
        "pull_another_clients_task": outcome(lambda: peer.stream("Pull", peer.pull_req(1))),
        "pull_unknown_task": outcome(lambda: peer.stream("Pull", peer.pull_req(999))),
        "heartbeat_garbage": outcome(lambda: peer.unary("Heartbeat", GARBAGE)),
        "heartbeat_forged_signature": outcome(
            lambda: peer.unary("Heartbeat", forge(peer.heartbeat_req(), pb.HeartbeatRequest))
        ),
    }


def push_cases(peer: Peer, good: Upload) -> dict[str, tuple[str, str]]:
    """Every bad upload of client 0's task (``good`` is its correct update)."""
    h, tr = peer.header, peer.trailer
    data = good.data
    arr = np.frombuffer(data, dtype=np.float32)

    def with_value(index: int, value: float) -> list[bytes]:
        a = arr.copy()
        a[index] = value
        return peer.upload(replace(good, data=a.tobytes()))  # trailer over the bad data

    def ok() -> list[bytes]:  # a correct upload, with a fresh signature
        return peer.upload(good)

    altered = arr.copy()
    altered[100] += 1.0  # same length, other bytes than those signed
    bad = altered.tobytes()
    tampered = h(good)
    tampered.weight = good.weight * 2
    forged = h(good)
    forged.auth.signature = bytes(64)
    no_auth = h(good)
    no_auth.ClearField("auth")
    stale = h(good, ts_ms=int(time.time() * 1000) - 300_000)
    small = np.zeros(650, np.float32).tobytes()  # logistic regression's 64x10 + 10: 2600 bytes
    rest = ok()[1:]  # the messages after the first, a trailer last: no header
    swapped = ok()
    swapped[1:3] = swapped[2:0:-1]
    late = ok()
    full = ok()
    late[-2:] = late[:-3:-1]  # the trailer before the last data chunk
    second_header = encode_chunk({2: CHUNK}, data[CHUNK : 2 * CHUNK], h(good).SerializeToString())
    truncated = chunks(h(good), data)[:2]
    big = np.zeros(32768, np.float32).tobytes()  # 128 KiB > 4 KiB + 64 KiB
    heads = [h(good) for _ in range(9)]
    other_key = Ed25519PrivateKey.generate()
    signature = pb.UploadTrailer.FromString(tr(heads[4], data)).signature  # over data's digest
    redigested = pb.UploadTrailer(sha256=digest_of(DIGEST, bad), signature=signature)
    unsigned = pb.UploadTrailer(sha256=digest_of(DIGEST, data), signature=bytes(64))
    cases: dict[str, list[bytes]] = {
        # malformed
        "push_garbage": [GARBAGE],
        "push_garbage_header": [b"\x0a\x04\xff\xff\xff\xff"],
        "push_garbage_second_chunk": [ok()[0], GARBAGE, *rest[1:]],
        "push_garbage_trailer": [*ok()[:-1], encode_chunk({}, b"", None, b"\xff\xff")],
        "push_empty_stream": [],
        "push_no_header": chunks(None, data, trailer=tr(heads[0], data)),
        "push_second_header": [ok()[0], second_header, *rest[1:]],
        # the header's authentication
        "push_forged_signature": chunks(forged, data, trailer=tr(forged, data)),
        "push_missing_auth": chunks(no_auth, data, trailer=tr(no_auth, data)),
        "push_stale_timestamp": chunks(stale, data, trailer=tr(stale, data)),
        "push_unknown_client": peer.upload(good, name="mallory", signer=other_key),
        "push_header_altered_after_signing": chunks(tampered, data, trailer=tr(tampered, data)),
        # tasks
        "push_another_clients_task": peer.upload(replace(good, task=1)),
        "push_unknown_task": peer.upload(replace(good, task=999)),
        "push_wrong_version": peer.upload(replace(good, version=1)),
        # the header's values
        "push_wrong_nbytes": peer.upload(replace(good, data=small)),
        "push_weight_zero": peer.upload(replace(good, weight=0.0)),
        "push_weight_negative": peer.upload(replace(good, weight=-1.0)),
        "push_weight_nan": peer.upload(replace(good, weight=math.nan)),
        "push_weight_inf": peer.upload(replace(good, weight=math.inf)),
        "push_metric_nan": peer.upload(replace(good, metrics={**good.metrics, "x": math.nan})),
        # the data
        "push_truncated": truncated,
        # then the exact first message of that upload, which got past authentication
        "push_replayed_header": [truncated[0], *rest],
        "push_header_only": [encode_chunk({}, b"", h(good).SerializeToString())],
        "push_nan_value": with_value(2048 + 7, math.nan),
        "push_inf_value": with_value(3, -math.inf),
        "push_chunk_over_chunk_bytes": chunks(heads[1], data, 2 * CHUNK, tr(heads[1], data)),
        "push_misaligned_chunk": chunks(heads[2], data, CHUNK - 2, tr(heads[2], data)),
        "push_out_of_order_offset": swapped,
        "push_past_the_end": [*full[:-1], encode_chunk({2: len(data)}, bytes(4)), full[-1]],
        "push_data_after_trailer": late,
        # the trailer
        "push_no_trailer": chunks(h(good), data),
        "push_sha256_mismatch": chunks(heads[3], bad, trailer=tr(heads[3], data)),
        "push_data_and_digest_altered": chunks(
            heads[4], bad, trailer=redigested.SerializeToString()
        ),
        "push_trailer_forged_signature": chunks(
            heads[5], data, trailer=unsigned.SerializeToString()
        ),
        "push_trailer_signed_by_another_key": chunks(
            heads[6], data, trailer=tr(heads[6], data, signer=other_key)
        ),
        "push_trailer_of_another_upload": chunks(heads[7], data, trailer=tr(heads[8], data)),
        # gRPC's own limit
        "push_message_over_grpc_limit": [encode_chunk({}, big, h(good).SerializeToString())],
        "push_second_message_over_grpc_limit": [ok()[0], encode_chunk({2: CHUNK}, big)],
    }
    return {name: outcome(lambda m=m: peer.push(m)) for name, m in cases.items()}


def hammer(peer: Peer, limit: int = 1000) -> tuple[int, float, tuple[str, str]]:
    """Heartbeats until the rate limit refuses one: (requests accepted, seconds, outcome)."""
    t0 = time.monotonic()
    for n in range(limit):
        res = outcome(lambda: peer.unary("Heartbeat", peer.heartbeat_req()))
        if res[0] != "OK":
            return n, time.monotonic() - t0, res
    return limit, time.monotonic() - t0, ("OK", "never refused")


# -- the scenario ------------------------------------------------------------------------------
@dataclass
class Scenario:
    outcomes: dict[str, tuple[str, str]]
    hello: pb.HelloReply
    spec: ParamSpec
    first_task: pb.Task
    second_task: pb.Task
    finished: pb.Task
    victim_rc: int
    after_bad: dict[str, Any]
    rate: tuple[int, float]
    accepted: pb.PushReply
    concurrent_retry: tuple[str, str]
    spool_after_concurrent_retry: bool
    uploads_at_concurrent_retry: list[tuple[int, int]]
    retry: pb.PushReply
    burnt_nonce: tuple[str, str]
    others_accepted_task: tuple[str, str]
    second_accepted: pb.PushReply
    server_rc: int
    server_log: str
    client_rcs: list[int]
    intruder: tuple[int, str]
    insecure: tuple[int, str, float]
    final: Any
    uploads: list[tuple[int, int]]
    folded: list[tuple[int, int]]
    clean: np.ndarray[Any, Any]
    seconds: float


def _clean_run(root: Path, out: dict[str, Any]) -> None:
    try:
        with federation(root, **CFG) as fed:
            run_all(fed, timeout=120)
            out["params"] = np.asarray(fed.final().params)
    except BaseException as e:  # reported by the fixture
        out["error"] = e


def _scenario(fed: Fed, root: Path) -> Scenario:
    t0 = time.monotonic()
    server = start_server(fed)
    c2 = start_client(fed, 2)
    # client 1 dies half-way through its first upload: its task 1 stays open
    victim = start_client(fed, 1, env={"FEDAGG_CRASH_AT": "client-upload:1"})
    make_keys(root / "intruder", ["intruder"])
    intruder = cli_client(fed, root / "intruder" / "intruder.key", "intruder.log")
    wait_listening(fed, server)
    # a plaintext client (no certificates configured: --insecure with them is refused)
    plain = fed.dir / "plain.toml"
    write_toml(plain, {**fed.cfg, "deploy": {**fed.cfg["deploy"], "certs": ""}})
    insecure = cli_client(fed, fed.key(2), "insecure.log", "--insecure", "--retry-for", "3",
                          config=plain)  # fmt: skip
    insecure_exit = exit_time(insecure)

    cfg = sim.load_config(fed.config)
    trainer = config_trainer(cfg)
    key = ClientKey.load(fed.key(0))
    peer = Peer(fed, key)
    valid_hello = peer.hello()
    hello = pb.HelloReply.FromString(peer.unary("Hello", valid_hello))
    spec = ParamSpec.from_dict(json.loads(hello.spec_json))
    out = hello_cases(peer, valid_hello, ClientKey.load(fed.key(1)).private)

    tasks = TaskStream(peer)
    first = tasks.next(timeout=90)  # the round starts once clients 1 and 2 are connected too
    assert (first.task, first.version, first.finished) == (0, 0, False), first
    victim_rc = wait(victim, 60)
    assert victim_rc == -9, read_log(fed, "client-1.log")
    out.update(misc_cases(peer))
    good = train(trainer, spec, pull(peer, first, spec), first, key)
    out.update(push_cases(peer, good))
    spool = fed.state / "spool"
    wait_for(lambda: (2, 2) in uploads(fed), 60, "client 2's upload")
    after_bad = {
        "alive": server.poll() is None,
        "uploads": uploads(fed),
        "spool": sorted(p.name for p in spool.iterdir()),
        "tasks_open": outcome(lambda: peer.stream("Pull", peer.pull_req(0))),
    }

    # an authenticated client that sends too many requests is slowed down
    n, secs, out["heartbeat_rate_limited"] = hammer(peer)
    time.sleep(1.0)  # refill (50 per second)

    # a refused request must not use up its nonce: the same nonce, signed, must pass
    nonce = secrets.token_bytes(16)
    forged = pb.HelloRequest.FromString(peer.hello(nonce=nonce))
    forged.auth.signature = bytes(64)
    assert outcome(lambda: peer.unary("Hello", forged.SerializeToString()))[0] == UNAUTH
    burnt = outcome(lambda: peer.unary("Hello", peer.hello(nonce=nonce)))

    # the correct upload, held open (received in full, not finished) while a retry of it
    # comes in on another stream (as after a lost connection the server has not yet noticed)
    sent, release = threading.Event(), threading.Event()

    def held() -> Iterator[bytes]:
        yield from peer.upload(good)
        sent.set()
        release.wait(30)

    def spooling() -> list[int]:  # sizes of the uploads being received
        return sorted(p.stat().st_size for p in spool.glob("tmp-*"))

    def task0_closed() -> bool:  # the engine pops the task once it has taken the update
        return outcome(lambda: peer.stream("Pull", peer.pull_req(0)))[0] != "OK"

    with ThreadPoolExecutor(1) as ex:
        fa = ex.submit(peer.push, held())
        assert sent.wait(20)
        wait_for(
            lambda: spooling() == [len(good.data)] or fa.done(), 20, "the upload spooling",
            lambda: (sorted(p.name for p in spool.iterdir()), spooling()),
        )  # fmt: skip
        assert not fa.done(), (outcome(fa.result), sorted(p.name for p in spool.iterdir()))
        # one upload per task at a time: the retry is refused at once, and retried later
        concurrent = outcome(lambda: peer.push(peer.upload(good)))
        release.set()
        accepted = fa.result(30)
        wait_for(task0_closed, 20, "the engine to take the accepted update")
    spool_kept = len(list(spool.glob(f"{0:012d}-0-*.upd"))) == 1
    uploads_then = uploads(fed)
    retry = peer.push(peer.upload(good))

    # client 1 comes back and finishes task 1; client 0 then tries to upload to it
    c1 = start_client(fed, 1)
    wait_for(lambda: (1, 1) in uploads(fed), 60, "client 1's upload")
    others = outcome(lambda: peer.push(peer.upload(replace(good, task=1))))

    second = tasks.next(timeout=60)
    assert (second.task, second.version) == (3, 1), second
    good2 = train(trainer, spec, pull(peer, second, spec), second, key)
    second_accepted = peer.push(peer.upload(good2))
    finished = tasks.next(timeout=60)
    tasks.close()
    peer.channel.close()

    server_rc = wait(server, 60)
    client_rcs = [wait(c, 30) for c in (c1, c2)]
    intruder_rc = wait(intruder, 60)
    insecure_rc = wait(insecure, 60)
    insecure_secs = insecure_exit()
    with sqlite3.connect(fed.state / "state.db") as db:
        folded = db.execute("SELECT round, folded FROM rounds ORDER BY round").fetchall()
    db.close()
    return Scenario(
        outcomes=out, hello=hello, spec=spec, first_task=first, second_task=second,
        finished=finished, victim_rc=victim_rc, after_bad=after_bad, rate=(n, secs),
        accepted=accepted, concurrent_retry=concurrent, spool_after_concurrent_retry=spool_kept,
        uploads_at_concurrent_retry=uploads_then,
        retry=retry, burnt_nonce=burnt, others_accepted_task=others,
        second_accepted=second_accepted, server_rc=server_rc, server_log=read_log(fed),
        client_rcs=client_rcs, intruder=(intruder_rc, read_log(fed, "intruder.log")),
        insecure=(insecure_rc, read_log(fed, "insecure.log"), insecure_secs),
        final=fed.final() if server_rc == 0 else None, uploads=uploads(fed), folded=folded,
        clean=np.empty(0), seconds=time.monotonic() - t0,
    )  # fmt: skip


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    root = tmp_path_factory.mktemp("bad-input")
    clean: dict[str, Any] = {}
    th = threading.Thread(target=_clean_run, args=(root / "clean", clean))
    th.start()
    try:
        with federation(root / "bad", **CFG) as fed:
            sc = _scenario(fed, root)
    finally:
        th.join(180)
    if "error" in clean:
        raise clean["error"]
    assert "params" in clean, "the clean run did not finish"
    sc.clean = clean["params"]
    return sc


# -- the checks --------------------------------------------------------------------------------
@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_input_gets_its_status_and_a_helpful_message(scenario: Scenario, case: str) -> None:
    code, message = EXPECTED[case]
    assert scenario.outcomes[case][0] == code, scenario.outcomes[case]
    assert message in scenario.outcomes[case][1], scenario.outcomes[case]


def test_every_case_was_run(scenario: Scenario) -> None:
    assert set(scenario.outcomes) == set(EXPECTED)


def test_the_hello_reply_describes_the_model(scenario: Scenario) -> None:
    h = scenario.hello
    assert (h.protocol, h.client_index, h.chunk_bytes, h.digest) == (1, 0, CHUNK, True)
    assert h.model_bytes == scenario.spec.nbytes == 4810 * 4


def test_bad_input_changes_nothing(scenario: Scenario) -> None:
    a = scenario.after_bad
    assert a["alive"]
    assert a["uploads"] == [(2, 2)]  # client 2's; client 1 died mid-upload; client 0's refused
    # only client 2's spooled update: no half-written file of a refused upload is left behind
    assert len(a["spool"]) == 1, a["spool"]
    assert re.fullmatch(rf"{2:012d}-2-[0-9a-f]{{12}}\.upd", a["spool"][0]), a["spool"]
    assert a["tasks_open"][0] == "OK"  # task 0 is still open to client 0
    assert "Traceback" not in scenario.server_log


def test_the_rate_limit_allows_the_burst_then_refuses(scenario: Scenario) -> None:
    n, secs = scenario.rate
    # burst 200, refilled at 50/s; client 0's earlier authenticated requests used a few
    assert 150 <= n <= 200 + 50 * secs + 1, scenario.rate


def test_the_correct_upload_is_accepted_once_and_retries_are_acknowledged(
    scenario: Scenario,
) -> None:
    assert (scenario.accepted.task, scenario.accepted.duplicate) == (0, False)
    assert scenario.concurrent_retry[0] == "RESOURCE_EXHAUSTED", scenario.concurrent_retry
    assert (scenario.retry.task, scenario.retry.duplicate) == (0, True)
    assert (scenario.second_accepted.task, scenario.second_accepted.duplicate) == (3, False)
    assert scenario.finished.finished


def test_the_federation_ends_with_the_clean_runs_model(scenario: Scenario) -> None:
    assert scenario.server_rc == 0, scenario.server_log
    assert scenario.victim_rc == -9
    assert scenario.client_rcs == [0, 0]
    assert scenario.uploads == [(0, 0), (1, 1), (2, 2), (0, 3), (1, 4), (2, 5)]
    assert scenario.folded == [(0, 3), (1, 3)]
    assert scenario.final.version == 2
    assert scenario.clean.shape == (4810,)
    assert np.array_equal(scenario.final.params, scenario.clean)
    # ~20 s on an idle 2-core machine; a wait that ran into its timeout would show here
    assert scenario.seconds < 120, scenario.seconds


def test_a_client_whose_key_is_not_registered_is_refused(scenario: Scenario) -> None:
    rc, log = scenario.intruder
    assert rc == 1, log
    assert f"fedagg client: error: UNAUTHENTICATED: {BAD_SIG}" in log


@pytest.mark.parametrize("rpc", ["hello", "push"])
def test_an_unknown_name_and_a_bad_signature_get_the_same_answer(
    scenario: Scenario, rpc: str
) -> None:
    """The peer cannot tell a registered name from an unregistered one (issue 14, finding 11):
    the same status code and the very same message (the server's log says which it was)."""
    assert (
        scenario.outcomes[f"{rpc}_unknown_client"] == scenario.outcomes[f"{rpc}_forged_signature"]
    )


def test_an_insecure_client_cannot_talk_to_a_tls_server(scenario: Scenario) -> None:
    rc, log, secs = scenario.insecure
    assert rc == 1, log
    assert "fedagg client: error: UNAVAILABLE" in log
    assert 3 <= secs < 3 + 45, secs  # it retried for --retry-for 3 s, then gave up


# -- regressions: bugs this suite found in the server ---------------------------------------------


def test_an_upload_to_another_clients_accepted_task_is_denied(scenario: Scenario) -> None:
    if scenario.uploads.count((1, 1)) != 1 or (0, 1) in scenario.uploads:
        pytest.fail(f"task 1 was not accepted once, from client 1: {scenario.uploads}")
    # not acknowledged as a duplicate (which would leak that it was accepted): the task is
    # closed, and whose it was is not said
    assert scenario.others_accepted_task == ("FAILED_PRECONDITION", "task 1 is not open")


def test_a_refused_request_does_not_use_up_its_nonce(scenario: Scenario) -> None:
    assert scenario.burnt_nonce[0] == "OK", scenario.burnt_nonce


def test_a_concurrent_retry_waits_for_the_upload_being_received(scenario: Scenario) -> None:
    """One upload per open task at a time (issue 14): a retry racing the upload it repeats is
    refused with a retryable status, the upload is accepted and kept, and the retry, sent
    again, is acknowledged as a duplicate."""
    if scenario.uploads_at_concurrent_retry != [(0, 0), (2, 2)]:  # the round was still open
        pytest.fail(f"unexpected state at the retry: {scenario.uploads_at_concurrent_retry}")
    assert scenario.concurrent_retry == (
        "RESOURCE_EXHAUSTED",
        "an upload of task 0 is already being received: retry later",
    )
    assert not scenario.accepted.duplicate
    assert scenario.retry.duplicate
    assert scenario.spool_after_concurrent_retry
