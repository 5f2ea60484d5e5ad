"""Client-controlled quantities are bounded before the server does work for them (issue 14,
finding 15): an upload's metrics (count, name length and charset, finite values) and a re-sent
upload of an already accepted task (its size and offsets, its message count).

A real server process on loopback (TLS, 2 clients, 2 rounds, logistic regression: a 2,600
byte update). Client 1 is a real ``fedagg client``; the test plays client 0 over raw gRPC,
sending all-zero updates (finite, so acceptable). Its first task gets every oversized-metrics
upload (refused before anything is written: no row, no spool file, ``state.db`` unchanged),
then a correct upload with metrics at the limits, an honest re-send (acknowledged as a
duplicate), and re-sends padded with 64 MiB of junk, which the server must cut off after
about the accepted upload's size; then client 0 does its second task and the run must end.
"""

from __future__ import annotations

import functools
import math
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpc
import pytest

from fedagg.deploy import ClientKey
from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._auth import body, upload_body
from fedagg.deploy._calls import signed_channel
from fedagg.deploy._digest import digest_of
from fedagg.deploy._options import ServerOptions
from fedagg.deploy._wire import encode_chunk
from tests.deploy.harness import (
    Fed,
    federation,
    read_log,
    start_client,
    start_server,
    wait,
    wait_listening,
)
from tests.deploy.test_bad_input import TaskStream, outcome, wait_for

#: the digest the servers under test sign with (their default)
DIGEST = ServerOptions.digest_algorithm

SERVICE = "/fedagg.v1.Federation/"
RPC_TIMEOUT = 30.0
JUNK = 64 << 20  # bytes of junk after a re-sent upload
JUNK_STEP = 1 << 20
MAX_METRICS = 64  # the server's limits (fedagg.deploy._options)
MAX_METRIC_NAME = 64


class Peer:
    """Client 0 by hand: raw bytes over TLS."""

    def __init__(self, fed: Fed) -> None:
        ca = (fed.dir / "certs" / "ca.pem").read_bytes()
        self.key = ClientKey.load(fed.key(0))
        channel = grpc.secure_channel(fed.address, grpc.ssl_channel_credentials(ca))
        self.channel = signed_channel(channel, self.key)  # its calls carry call credentials

    def auth(self, method: str, content: bytes) -> pb.Auth:
        return pb.Auth(**self.key.sign(method, content))

    def hello(self) -> pb.HelloReply:
        req = pb.HelloRequest(auth=self.auth("Hello", body(protocol=1)), protocol=1)
        raw = self.channel.unary_unary(SERVICE + "Hello")(
            req.SerializeToString(), timeout=RPC_TIMEOUT
        )
        reply: pb.HelloReply = pb.HelloReply.FromString(raw)
        return reply

    def header(self, task: pb.Task, data: bytes, metrics: dict[str, float]) -> pb.UploadHeader:
        content = upload_body(task.task, task.version, 1.0, len(data), metrics)
        return pb.UploadHeader(
            auth=self.auth("Push", content), task=task.task, version=task.version,
            weight=1.0, nbytes=len(data), metrics=metrics,
        )  # fmt: skip

    def trailer(self, head: pb.UploadHeader, data: bytes) -> bytes:
        digest = digest_of(DIGEST, data)
        a = head.auth
        sig = self.key.sign_bytes("PushTrailer", a.timestamp_ms, a.nonce, a.signature + digest)
        out: bytes = encode_chunk(
            {}, b"", None, pb.UploadTrailer(sha256=digest, signature=sig).SerializeToString()
        )
        return out

    def upload(self, task: pb.Task, data: bytes, metrics: dict[str, float]) -> list[bytes]:
        """A correct upload: the header with the data (one chunk), then the trailer."""
        head = self.header(task, data, metrics)
        return [encode_chunk({}, data, head.SerializeToString()), self.trailer(head, data)]

    def push(self, messages: Iterable[bytes]) -> pb.PushReply:
        call = self.channel.stream_unary(SERVICE + "Push")
        reply: pb.PushReply = pb.PushReply.FromString(call(iter(messages), timeout=RPC_TIMEOUT))
        return reply


class Counted:
    """Messages handed to gRPC one by one, counting the bytes taken."""

    def __init__(self, messages: Iterator[bytes]) -> None:
        self.messages = messages
        self.taken = 0
        self.count = 0

    def __iter__(self) -> Iterator[bytes]:
        for m in self.messages:
            self.taken += len(m)
            self.count += 1
            yield m


def db_bytes(fed: Fed) -> int:
    return sum(p.stat().st_size for p in fed.state.glob("state.db*"))


def uploads(fed: Fed) -> list[tuple[int, int]]:
    with sqlite3.connect(fed.state / "state.db") as db:
        rows = db.execute("SELECT client, job FROM uploads ORDER BY job").fetchall()
    db.close()
    return [(int(c), int(j)) for c, j in rows]


def spool_files(fed: Fed) -> list[str]:
    return sorted(p.name for p in fed.state.rglob("*.upd"))


METRIC_CASES: dict[str, Callable[[], dict[str, float]]] = {
    "200k metrics": lambda: {f"m{i:06d}": 0.5 for i in range(200_000)},
    "one metric too many": lambda: {f"m{i}": 0.5 for i in range(MAX_METRICS + 1)},
    "a name one byte too long": lambda: {"x" * (MAX_METRIC_NAME + 1): 0.5},
    "a name with a newline": lambda: {"loss\nlevel=error": 0.5},
    "an empty name": lambda: {"": 0.5},
    "a non-ASCII name": lambda: {"lössé": 0.5},
    "an infinite value": lambda: {"train_loss": math.inf},
}


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out: dict[str, Any] = {}
    root = tmp_path_factory.mktemp("limits")
    with federation(root, clients=2, rounds=2) as fed:
        server = start_server(fed)
        wait_listening(fed, server)
        peer = Peer(fed)
        hello = peer.hello()
        stream = TaskStream(peer)
        client1 = start_client(fed, 1)
        try:
            task = stream.next(60)
            data = bytes(hello.model_bytes)  # all zeros: a finite update
            # client 1's upload first: nothing else is written while the metrics are refused
            wait_for(lambda: any(c == 1 for c, _ in uploads(fed)), 60, "client 1's upload")
            time.sleep(0.3)
            size0, spool0 = db_bytes(fed), spool_files(fed)
            out["metrics"] = {}
            for name, make in METRIC_CASES.items():
                msgs = peer.upload(task, data, make())
                out["metrics"][name] = outcome(functools.partial(peer.push, msgs))

            def tiny(metrics: dict[str, float]) -> tuple[str, str]:
                """The upload in 4-byte chunks: hundreds of messages."""
                head = peer.header(task, data, metrics)
                msgs = [encode_chunk({}, data[:4], head.SerializeToString())]
                msgs += [encode_chunk({2: o}, data[o : o + 4]) for o in range(4, len(data), 4)]
                return outcome(lambda: peer.push([*msgs, peer.trailer(head, data)]))

            out["tiny_chunks"] = tiny({})
            out["db_growth"] = db_bytes(fed) - size0
            out["spool_unchanged"] = spool_files(fed) == spool0
            out["rows_after_refusals"] = uploads(fed)
            ok_metrics = {f"{i:02d}".ljust(MAX_METRIC_NAME, "a"): 0.25 for i in range(62)}
            ok_metrics |= {"train_loss": 0.5, "val/acc:top-1.x": 0.9}  # MAX_METRICS in all
            out["accepted"] = outcome(lambda: peer.push(peer.upload(task, data, ok_metrics)))
            out["honest_resend"] = outcome(lambda: peer.push(peer.upload(task, data, ok_metrics)))
            out["tiny_resend"] = tiny(ok_metrics)

            def junk(offsets: Callable[[int], int]) -> dict[str, Any]:
                good = peer.upload(task, data, ok_metrics)
                pad = bytes(JUNK_STEP)

                def gen() -> Iterator[bytes]:
                    yield good[0]
                    for i in range(JUNK // JUNK_STEP):
                        yield encode_chunk({2: offsets(i)}, pad)
                    yield good[1]

                msgs = Counted(gen())
                t0 = time.monotonic()
                res = outcome(lambda: peer.push(msgs))
                return {"outcome": res, "taken": msgs.taken, "secs": time.monotonic() - t0}

            n = len(data)
            out["junk_past_the_end"] = junk(lambda i: n + i * JUNK_STEP)
            out["junk_at_offset_0"] = junk(lambda i: 0)

            def empties() -> dict[str, Any]:
                good = peer.upload(task, data, ok_metrics)

                def gen() -> Iterator[bytes]:
                    yield good[0]
                    for _ in range(50_000):
                        yield encode_chunk({2: n}, b"")
                    yield good[1]

                msgs = Counted(gen())
                t0 = time.monotonic()
                res = outcome(lambda: peer.push(msgs))
                return {"outcome": res, "count": msgs.count, "secs": time.monotonic() - t0}

            out["junk_empty_messages"] = empties()
            # the server still serves: client 0's second task, and the run ends
            task2 = stream.next(60)
            out["second"] = outcome(lambda: peer.push(peer.upload(task2, data, {"x": 1.0})))
            out["server_rc"] = wait(server, 60)
            out["client1_rc"] = wait(client1, 30)
            out["log"] = read_log(fed)
        finally:
            stream.close()
            peer.channel.close()
    return out


def test_the_limits_are_the_servers() -> None:
    from fedagg.deploy import _options

    assert (_options.MAX_METRICS, _options.MAX_METRIC_NAME) == (MAX_METRICS, MAX_METRIC_NAME)


@pytest.mark.parametrize("case", list(METRIC_CASES))
def test_oversized_metrics_are_refused(scenario: dict[str, Any], case: str) -> None:
    code, message = scenario["metrics"][case]
    assert code == "INVALID_ARGUMENT", (code, message)
    if case == "200k metrics":  # refused on the header's length, before it is even parsed
        assert "at most 16384" in message, message
    else:
        assert "metric" in message, message


@pytest.mark.parametrize("case", ["tiny_chunks", "tiny_resend"])
def test_an_upload_in_tiny_chunks_is_refused(scenario: dict[str, Any], case: str) -> None:
    """The number of an upload's chunks is bounded (issue 14: chunk counts), fresh or re-sent:
    the model in 4-byte chunks is refused after a dozen of them."""
    code, message = scenario[case]
    assert code == "INVALID_ARGUMENT", (code, message)
    assert "too many chunks: more than 12 for" in message, message


def test_refused_metrics_write_nothing(scenario: dict[str, Any]) -> None:
    assert scenario["db_growth"] <= 4096, scenario["db_growth"]
    assert scenario["spool_unchanged"]
    assert all(c != 0 for c, _ in scenario["rows_after_refusals"]), scenario["rows_after_refusals"]


def test_metrics_at_the_limits_are_accepted(scenario: dict[str, Any]) -> None:
    assert scenario["accepted"][0] == "OK", scenario["accepted"]
    assert "duplicate" not in scenario["accepted"][1]


def test_an_honest_resend_is_a_duplicate(scenario: dict[str, Any]) -> None:
    assert scenario["honest_resend"][0] == "OK", scenario["honest_resend"]
    assert "duplicate: true" in scenario["honest_resend"][1]


@pytest.mark.parametrize("case", ["junk_past_the_end", "junk_at_offset_0"])
def test_a_resend_padded_with_junk_is_cut_off(scenario: dict[str, Any], case: str) -> None:
    r = scenario[case]
    code, message = r["outcome"]
    assert code == "INVALID_ARGUMENT", r
    assert "re-sent" in message, r
    # the accepted upload is 2,600 bytes: the server stops after a chunk or two of junk (gRPC
    # takes a few more messages into its buffers meanwhile), not after 64 MiB
    assert r["taken"] < 8 * JUNK_STEP, r


def test_a_resend_padded_with_empty_messages_is_cut_off(scenario: dict[str, Any]) -> None:
    r = scenario["junk_empty_messages"]
    assert r["outcome"][0] == "INVALID_ARGUMENT", r
    assert r["count"] < 5_000, r


def test_the_server_keeps_serving(scenario: dict[str, Any]) -> None:
    assert scenario["second"][0] == "OK", scenario["second"]
    assert scenario["server_rc"] == 0, scenario["log"]
    assert scenario["client1_rc"] == 0
