"""Upload slots cannot be held by a silent peer (issue 14, findings 1 and 5).

A real server process on loopback (TLS, logistic regression), started with short deadlines
(``first_timeout``, ``idle_timeout``: :data:`FIRST`, :data:`IDLE`; the ``[deploy]`` table has
no keys for them, so the server process is started with patched defaults). Checked:

(a) Push streams from an outsider that send nothing take no slot: the run ends while they
    wait, and each is cut off once its header is late.
(b) A registered client's signed upload headers followed by nothing: two are received (the
    server's ``client_uploads``), the others are refused at once, those received are cut off
    when idle, leaving no spool file; the other clients' uploads are acknowledged meanwhile.
(c) A fresh upload padded with thousands of empty messages is refused.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._auth import body
from fedagg.deploy._calls import signed_channel
from fedagg.deploy._wire import encode_chunk
from tests.deploy.harness import (
    PY,
    Fed,
    _env,
    federation,
    kill,
    read_acks,
    read_log,
    start_client,
    wait,
    wait_listening,
)
from tests.deploy.test_limits import SERVICE, Peer, TaskStream

FIRST = 2.0  # seconds for an upload's header
IDLE = 2.0  # seconds an upload holding a slot may stay silent
SILENT = 10  # silent streams opened: more than max_uploads (8)
BOUND = 40.0  # seconds the test waits for what must happen (it fails, not hangs)

# ``fedagg server`` with short upload deadlines (only options this server knows are set, so
# the same script runs a server without them, to see these tests fail)
_SERVER = f"""
import dataclasses, functools, sys
from fedagg.deploy import _app, _server

known = {{f.name for f in dataclasses.fields(_server.ServerOptions)}}
short = {{"first_timeout": {FIRST}, "idle_timeout": {IDLE}}}
_options = _app.options_from_config


@functools.wraps(_options)
def options(*args, **kw):
    opts = _options(*args, **kw)
    return dataclasses.replace(opts, **{{k: v for k, v in short.items() if k in known}})


_app.options_from_config = options
from fedagg.cli import main
sys.exit(main(sys.argv[1:]))
"""


def start_server(fed: Fed) -> subprocess.Popen[bytes]:
    with open(fed.dir / "server.log", "ab") as out:
        p = subprocess.Popen(
            [PY, "-c", _SERVER, "server", str(fed.config)],
            stdout=out, stderr=subprocess.STDOUT, env=_env(None), start_new_session=True,
        )  # fmt: skip
    fed.procs.append(p)
    wait_listening(fed, p)
    return p


class Silent:
    """Push streams, one per item of ``firsts``: each sends its messages (maybe none), then
    nothing more until closed."""

    def __init__(self, channel: grpc.Channel, firsts: list[list[bytes]]) -> None:
        self.stop = threading.Event()
        call = channel.stream_unary(SERVICE + "Push")
        self.futures = [call.future(self._messages(m), timeout=BOUND + 30) for m in firsts]
        self.t0 = time.monotonic()

    def _messages(self, first: list[bytes]) -> Iterator[bytes]:
        yield from first
        self.stop.wait()

    def outcomes(self, timeout: float) -> list[tuple[str, float]]:
        """Each stream's status code and when it ended (seconds after opening)."""
        out = []
        for f in self.futures:
            try:
                f.result(timeout=max(0.01, self.t0 + timeout - time.monotonic()))
                out.append(("OK", time.monotonic() - self.t0))
            except grpc.FutureTimeoutError:
                out.append(("STILL OPEN", timeout))
            except grpc.RpcError as e:
                out.append((e.code().name, time.monotonic() - self.t0))
        return out

    def close(self) -> None:
        self.stop.set()
        for f in self.futures:
            f.cancel()


def spool_tmp(fed: Fed) -> list[str]:
    return sorted(p.name for p in fed.state.rglob("tmp-*"))


def test_outsider_silent_streams_take_no_slot(tmp_path: Path) -> None:
    with federation(tmp_path, clients=2, rounds=2) as fed:
        server = start_server(fed)
        ca = (fed.dir / "certs" / "ca.pem").read_bytes()
        channel = grpc.secure_channel(fed.address, grpc.ssl_channel_credentials(ca))
        silent = Silent(channel, [[]] * SILENT)
        try:
            time.sleep(0.5)
            clients = [start_client(fed, i) for i in range(2)]
            t0 = time.monotonic()
            assert wait(server, BOUND) == 0, read_log(fed)
            ended = time.monotonic() - t0
            for i, c in enumerate(clients):
                assert wait(c, 30) == 0, read_log(fed, f"client-{i}.log")
            print(f"run ended {ended:.1f}s after the clients started")
        finally:
            silent.close()
            channel.close()


def test_outsider_silent_streams_are_refused_as_they_open(tmp_path: Path) -> None:
    """Without call credentials a stream is refused before anything is read (it used to be
    held until first_timeout, and before that forever)."""
    with federation(tmp_path, clients=2, rounds=1) as fed:
        start_server(fed)
        ca = (fed.dir / "certs" / "ca.pem").read_bytes()
        channel = grpc.secure_channel(fed.address, grpc.ssl_channel_credentials(ca))
        silent = Silent(channel, [[]] * SILENT)
        try:
            got = silent.outcomes(FIRST + 10)
        finally:
            silent.close()
            channel.close()
        assert all(code == "UNAUTHENTICATED" for code, _ in got), got
        assert all(t < FIRST for _, t in got), got


def _peer_with_task(fed: Fed) -> tuple[Peer, TaskStream, pb.Task, int]:
    """Client 0 by hand, connected, with its first task (the round starts once it is
    connected: ``wait_for = 1``)."""
    peer = Peer(fed)
    nbytes = peer.hello().model_bytes
    tasks = TaskStream(peer)
    return peer, tasks, tasks.next(30), nbytes


def test_client_silent_uploads_do_not_block_others(tmp_path: Path) -> None:
    with federation(tmp_path, clients=3, rounds=1, deploy={"wait_for": 1}) as fed:
        start_server(fed)
        peer, tasks, task, nbytes = _peer_with_task(fed)
        silent = None
        try:
            data = bytes(nbytes)
            heads = [
                encode_chunk({}, b"", peer.header(task, data, {}).SerializeToString())
                for _ in range(SILENT)
            ]
            silent = Silent(peer.channel, [[h] for h in heads])
            time.sleep(0.5)
            t0 = time.monotonic()
            for i in (1, 2):
                start_client(fed, i, record_acks=True)
            deadline = t0 + BOUND
            while {c for c, _, _ in read_acks(fed)} != {1, 2}:
                assert time.monotonic() < deadline, (
                    f"the other clients' uploads were not acknowledged: {read_acks(fed)}\n"
                    + read_log(fed)
                )
                time.sleep(0.1)
            print(f"other clients acknowledged after {time.monotonic() - t0:.1f}s")
            got = silent.outcomes(IDLE + 10)
            codes = sorted(code for code, _ in got)
            held = 1  # one upload per open task at a time: the others are refused at once
            assert codes == ["DEADLINE_EXCEEDED"] * held + ["RESOURCE_EXHAUSTED"] * (SILENT - held)
            cut = [t for code, t in got if code == "DEADLINE_EXCEEDED"]
            assert all(IDLE - 0.5 < t < IDLE + 5 for t in cut), got
            assert spool_tmp(fed) == []
            # the slot is free again: the real upload is received and acknowledged
            reply = peer.push(peer.upload(task, data, {}))
            assert not reply.duplicate
        finally:
            if silent is not None:
                silent.close()
            tasks.close()
            peer.channel.close()


def test_fresh_upload_of_empty_messages_is_refused(tmp_path: Path) -> None:
    with federation(tmp_path, clients=2, rounds=1, deploy={"wait_for": 1}) as fed:
        start_server(fed)
        peer, tasks, task, nbytes = _peer_with_task(fed)
        try:
            data = bytes(nbytes)
            head = peer.header(task, data, {})
            messages = [encode_chunk({}, b"", head.SerializeToString())]
            messages += [encode_chunk({}, b"")] * 5000
            messages += [encode_chunk({}, data), peer.trailer(head, data)]
            try:
                peer.push(messages)
                raise AssertionError("an upload of 5000 empty messages was accepted")
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
                assert "empty message" in (e.details() or ""), e
            assert spool_tmp(fed) == []
            assert not peer.push(peer.upload(task, data, {})).duplicate
        finally:
            tasks.close()
            peer.channel.close()


def test_stalled_downloads_are_capped_per_client(tmp_path: Path) -> None:
    """A client that pulls its model and stops reading makes gRPC buffer the model for it
    until the RPC ends: it may hold at most ``client_uploads`` (2) such downloads; a third is
    refused (RESOURCE_EXHAUSTED), the other client's download and upload go on, and once the
    stalled calls end their slots are free again. Before, one client could open any number,
    each holding a copy of the model in the server's memory."""
    model = {"name": "mlp", "hidden": [4096, 512]}  # ~9.6 MB: more than the stream windows
    deploy = {"wait_for": 2, "client_timeout": 60.0}
    with federation(tmp_path, clients=2, rounds=1, extra={"model": model},
                    deploy=deploy) as fed:  # fmt: skip
        start_server(fed)
        peer = Peer(fed)
        peer.hello()
        tasks = TaskStream(peer)
        ca = (fed.dir / "certs" / "ca.pem").read_bytes()
        opts = [("grpc.http2.bdp_probe", 0), ("grpc.max_receive_message_length", 8 << 20)]
        slow = signed_channel(
            grpc.secure_channel(fed.address, grpc.ssl_channel_credentials(ca), options=opts),
            peer.key,
        )
        other = start_client(fed, 1, record_acks=True)
        try:
            task = tasks.next(60)

            def pull() -> Any:
                auth = peer.auth("Pull", body(task=task.task))
                req = pb.PullRequest(auth=auth, task=task.task).SerializeToString()
                return slow.unary_stream(SERVICE + "Pull")(req, timeout=120)

            stalled = [pull(), pull()]
            for call in stalled:  # each past its slot (taken before the first chunk), then stalled
                next(call)
            with pytest.raises(grpc.RpcError) as err:
                list(pull())
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
            assert "model downloads of yours are in progress" in (err.value.details() or "")
            t0 = time.monotonic()
            while not read_acks(fed):  # client 1 pulls, trains and uploads meanwhile
                assert time.monotonic() - t0 < BOUND, read_log(fed)
                time.sleep(0.1)
            for call in stalled:
                call.cancel()
            time.sleep(1.0)
            assert len(b"".join(pb.ModelChunk.FromString(m).data for m in pull())) > 9_000_000
        finally:
            slow.close()
            tasks.close()
            peer.channel.close()
            kill(other)
