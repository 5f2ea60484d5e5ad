"""Prometheus metrics (``[deploy] metrics``): the collector's counts after a real federation
over the in-memory transport agree with the server's own stats; a real ``fedagg server``
serves them at ``/metrics`` while it runs and stops serving with it; metrics off listen
nowhere; a bad ``deploy.metrics`` is refused naming the key."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from fedagg import ConfigError, strategies
from fedagg.deploy import (
    Client,
    ClientKey,
    Federation,
    Keyring,
    Result,
    Server,
    ServerOptions,
    TaskContext,
    _metrics,
    options_from_config,
)
from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._edge import Forward
from fedagg.deploy._fed import Effects
from fedagg.deploy._memory import MemoryChannel, MemoryTransport
from fedagg.deploy._metrics import METRICS, Metrics, _loopback, attach
from fedagg.deploy._service import FederationService
from fedagg.sim import SyncPolicy
from tests.deploy.harness import (
    PY,
    _env,
    free_port,
    kill,
    make_fed,
    read_log,
    start_server,
    wait,
    wait_listening,
)

N = 3
D = 1000
ROUNDS = 2
NAMES = [f"m{i}" for i in range(N)]
KEYS = {n: ClientKey(n, Ed25519PrivateKey.generate()) for n in NAMES}
RING = Keyring({n: KEYS[n].private.public_key() for n in NAMES})
DOCS = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def _fed(d: Path) -> Federation:
    strategy = strategies.fedavg()
    policy = SyncPolicy(strategy=strategy, rounds=ROUNDS, clients_per_round=N)
    server = strategy.init([np.zeros(D, np.float32)])
    return Federation(policy, server, num_clients=N, seed=3, directory=d,
                      identity={"test": "metrics"})  # fmt: skip


def _opts(**kw: Any) -> ServerOptions:
    base: dict[str, Any] = dict(listen="127.0.0.1:0", insecure=True, fsync=False, chunk_bytes=4096)
    return ServerOptions(**{**base, **kw})


def _train(model: Any, task: TaskContext) -> Result:
    delta = (task.rng().standard_normal(D) * 0.01).astype(np.float32)
    return Result(delta, 10.0, {"loss": 0.5})


class _Noisy(Client):
    """Before its first upload, sends one of the wrong size (refused: invalid_argument); then
    sends its first upload twice (the second is acknowledged as a duplicate)."""

    extra = True

    async def _push(self, t: pb.Task, delta: Any, weight: float, metrics: Any) -> pb.PushReply:
        if not self.extra:
            return await super()._push(t, delta, weight, metrics)
        self.extra = False
        with contextlib.suppress(Exception):
            await super()._push(t, delta[:-1], weight, metrics)
        reply = await super()._push(t, delta, weight, metrics)
        again = await super()._push(t, delta, weight, metrics)
        assert again.duplicate and not reply.duplicate
        return reply


def _client(service: FederationService, name: str, cls: type[Client] = Client) -> Client:
    channel = MemoryChannel(service, max_message=service.opt.chunk_bytes + 64 * 1024)
    return cls("memory", KEYS[name], _train, insecure=True, retry_for=5.0, heartbeat=1.0,
               channel=channel)  # fmt: skip


def _parse(text: str) -> dict[str, float]:
    """Every sample, by name and labels (``name{a="x"}``), as Prometheus would read it."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()) if k != "le")
            key = f"{s.name}{{{labels}}}" if labels else s.name
            if "le" not in s.labels:
                out[key] = float(s.value)
    return out


async def _memory_federation(d: Path) -> tuple[FederationService, Metrics, Federation]:
    fed = _fed(d)
    service = FederationService(fed, RING, _opts())
    metrics = attach(service)
    await service.start()
    clients = [_client(service, n, _Noisy if i == 0 else Client) for i, n in enumerate(NAMES)]
    tasks = [asyncio.create_task(c.run_async()) for c in clients]
    try:
        await asyncio.wait_for(service.wait(), 30)
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await service.stop()
    return service, metrics, fed


def test_the_collector_counts_what_the_server_counts(tmp_path: Path) -> None:
    service, metrics, fed = asyncio.run(_memory_federation(tmp_path / "state"))
    st, m = service.stats, _parse(metrics.text())
    nbytes = fed.spec.nbytes
    assert st.uploads == ROUNDS * N and st.duplicates == 1 and st.refused == 1
    assert m["fedagg_uploads_accepted_total"] == st.uploads
    assert m["fedagg_uploads_duplicate_total"] == st.duplicates == 1
    assert m['fedagg_uploads_refused_total{reason="invalid_argument"}'] == 1
    refused = {k: v for k, v in m.items() if k.startswith("fedagg_requests_refused_total")}
    assert refused == {'fedagg_requests_refused_total{method="Push"}': 1.0}
    assert sum(refused.values()) == st.refused
    assert m["fedagg_rounds_closed_total"] == len(st.rounds) == ROUNDS
    assert m["fedagg_model_version"] == fed.server.version == ROUNDS
    assert m["fedagg_round_duration_seconds_count"] == ROUNDS
    durations = sum(r.ended - r.started for r in st.rounds)
    assert m["fedagg_round_duration_seconds_sum"] == pytest.approx(durations)
    # every acknowledged upload, the duplicate too
    assert m["fedagg_upload_latency_seconds_count"] == st.uploads + st.duplicates
    assert 0 < m["fedagg_upload_latency_seconds_sum"] < 30
    folded = sum(r.folded for r in st.rounds)
    assert m["fedagg_updates_folded_total"] == folded == ROUNDS * N
    assert m["fedagg_folded_bytes_total"] == folded * nbytes
    assert m["fedagg_received_bytes_total"] == st.bytes_in == ROUNDS * N * nbytes
    assert m["fedagg_sent_bytes_total"] == st.bytes_out >= ROUNDS * N * nbytes
    assert m["fedagg_fold_seconds_total"] == pytest.approx(fed.timings["policy"])
    # the fresh state's checkpoint, then one per round
    assert m["fedagg_checkpoint_duration_seconds_count"] == fed.checkpoints == ROUNDS + 1
    assert m["fedagg_checkpoint_duration_seconds_sum"] == pytest.approx(fed.timings["checkpoint"])
    assert m["fedagg_clients_registered"] == N
    assert "process_cpu_seconds_total" in m
    assert not any(k.startswith("fedagg_edge_") for k in m)  # the root has no edge metrics


def test_two_services_in_one_process_keep_their_own_registries(tmp_path: Path) -> None:
    a = attach(FederationService(_fed(tmp_path / "a"), RING, _opts()))
    b = attach(FederationService(_fed(tmp_path / "b"), RING, _opts()))
    a.requests_refused.labels("Hello").inc()
    assert _parse(a.text())['fedagg_requests_refused_total{method="Hello"}'] == 1
    assert 'fedagg_requests_refused_total{method="Hello"}' not in _parse(b.text())
    assert not [n for n in REGISTRY._names_to_collectors if n.startswith("fedagg")]


def test_an_edge_counts_its_forwards_by_kind(tmp_path: Path) -> None:
    service = FederationService(_fed(tmp_path / "e"), RING, _opts(), serves={0, 1, 2})
    metrics = attach(service)
    jobs = [(0, 1, 1.0, 0.5), (1, 2, 1.0, 0.5)]
    relay: Any = object()  # an UploadRow: only its presence counts here
    metrics.effects(Effects(forward=[Forward(0, jobs), Forward(0, jobs[:1], relay=relay),
                                     Forward(-1, [], dropped=[(2, 3)])]))  # fmt: skip
    m = _parse(metrics.text())
    assert m['fedagg_edge_forwards_total{kind="partial"}'] == 1
    assert m['fedagg_edge_forwards_total{kind="relay"}'] == 1
    assert m['fedagg_edge_forwards_total{kind="dropouts"}'] == 1
    assert m["fedagg_edge_forwarded_updates_total"] == 3
    assert "fedagg_rounds_closed_total" not in m


@pytest.mark.parametrize(
    "value", ["nonsense", "127.0.0.1", "127.0.0.1:99999", ":9464", "localhost:http", "a b:1"]
)
def test_a_bad_metrics_address_is_refused_naming_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match=r"deploy\.metrics"):
        ServerOptions(insecure=True, metrics=value)
    cfg = {"deploy": {"insecure": True, "certs": "", "metrics": value}}
    with pytest.raises(ConfigError, match=r"deploy\.metrics"):
        options_from_config(cfg)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as r:
        return str(r.read().decode())


def test_a_port_in_use_is_refused_before_the_state_is_opened(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fed = _fed(tmp_path / "state")
        server = Server(fed, RING, _opts(metrics=f"127.0.0.1:{port}"), transport=MemoryTransport)
        with pytest.raises(ConfigError, match=rf"deploy\.metrics = '127\.0\.0\.1:{port}'"):
            asyncio.run(server.start())
        assert server.metrics is None and fed.store.last_seq() == 0 and not fed.started
        fed.close()


def test_only_loopback_addresses_count_as_loopback() -> None:
    assert _loopback("127.0.0.1") and _loopback("::1") and _loopback("localhost")
    assert not _loopback("0.0.0.0") and not _loopback("::") and not _loopback("10.1.2.3")


def test_the_endpoint_warns_off_loopback_and_stops_with_the_server(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bound to 127.0.0.1 (this test listens on no other interface), taken for a public one
    monkeypatch.setattr(_metrics, "_loopback", lambda host: False)

    async def run() -> tuple[str, str]:
        fed = _fed(tmp_path / "s")
        server = Server(fed, RING, _opts(metrics="127.0.0.1:0"), transport=MemoryTransport)
        await server.start()
        assert server.metrics is not None
        url = f"http://127.0.0.1:{server.metrics.port}/metrics"
        text = await asyncio.to_thread(_get, url)
        await server.stop(0.1)
        assert server.metrics.thread.is_alive() is False
        return url, text

    with caplog.at_level(logging.WARNING, "fedagg.server"):
        url, text = asyncio.run(run())
    assert _parse(text)["fedagg_clients_registered"] == N
    assert any("not a loopback address" in r.getMessage() for r in caplog.records)
    with pytest.raises(urllib.error.URLError):
        _get(url)


def test_every_metric_is_documented() -> None:
    doc = DOCS.read_text()
    names = {m[0] for m in METRICS}
    documented = set(re.findall(r"`(fedagg_[a-z_]+)`", doc))
    assert names <= documented, names - documented
    assert documented <= names, documented - names
    assert "deploy.metrics" in doc or "metrics =" in doc


# -- a real server ----------------------------------------------------------------------------
# ``fedagg client`` whose uploads of the last round wait for $FEDAGG_TEST_GATE to exist, and
# whose client 0 sends its first upload twice (the second: a duplicate)
_GATED = """
import asyncio, os, sys
from pathlib import Path
from fedagg.deploy import _client

_push = _client.Client._push
GATE = Path(os.environ["FEDAGG_TEST_GATE"])
LAST = int(os.environ["FEDAGG_TEST_LAST"])

async def _gated(self, t, *args):
    while t.version >= LAST and not GATE.exists():
        await asyncio.sleep(0.05)
    reply = await _push(self, t, *args)
    if t.version == 0 and self.index == 0:
        await _push(self, t, *args)
    return reply

_client.Client._push = _gated
from fedagg.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _listening(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if f[3] == "0A" and f[9] in inodes:  # LISTEN
                    ports.add(int(f[1].rsplit(":", 1)[1], 16))
    return ports


def _scrape(port: int) -> dict[str, float] | None:
    try:
        return _parse(_get(f"http://127.0.0.1:{port}/metrics"))
    except OSError:
        return None


def test_a_real_server_serves_metrics_while_it_runs(tmp_path: Path) -> None:
    mport = free_port()
    rounds = 3
    # no data port (without TLS, data_listen = "auto" opens one): the ports are gRPC's (+ metrics)
    fed = make_fed(tmp_path / "on", clients=2, rounds=rounds, tls=False,
                   deploy={"metrics": f"127.0.0.1:{mport}", "data_listen": ""})  # fmt: skip
    off = make_fed(tmp_path / "off", clients=2, rounds=rounds, tls=False,
                   deploy={"data_listen": ""})  # fmt: skip
    gate = tmp_path / "go"
    env = {"FEDAGG_TEST_GATE": str(gate), "FEDAGG_TEST_LAST": str(rounds - 1)}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        server = start_server(fed)
        quiet = start_server(off)  # metrics off: it listens on its gRPC port only
        procs += [server, quiet]
        wait_listening(fed, server)
        wait_listening(off, quiet)
        assert _listening(quiet.pid) == {off.port}
        assert _listening(server.pid) == {fed.port, mport}
        first = _scrape(mport)
        assert first is not None, read_log(fed)
        assert first["fedagg_rounds_closed_total"] == 0 and first["fedagg_model_version"] == 0
        assert first["fedagg_clients_connected"] == 0 and first["fedagg_clients_registered"] == 2
        for i in range(2):
            with open(fed.dir / f"client-{i}.log", "ab") as out:
                procs.append(subprocess.Popen(
                    [PY, "-c", _GATED, "client", str(fed.config), "--key", str(fed.key(i))],
                    stdout=out, stderr=subprocess.STDOUT, env=_env(env), start_new_session=True,
                ))  # fmt: skip
        # the last round's uploads wait at the gate: the counts before it hold still
        deadline, m = time.monotonic() + 60, None
        while time.monotonic() < deadline:
            m = _scrape(mport)
            if m and m["fedagg_rounds_closed_total"] == rounds - 1:
                break
            time.sleep(0.1)
        assert m is not None and m["fedagg_rounds_closed_total"] == rounds - 1, read_log(fed)
        time.sleep(0.3)
        m = _scrape(mport)
        assert m is not None
        done = rounds - 1
        assert m["fedagg_rounds_closed_total"] == done
        assert m["fedagg_model_version"] == done
        assert m["fedagg_uploads_accepted_total"] == 2 * done
        assert m["fedagg_uploads_duplicate_total"] == 1
        assert m["fedagg_upload_latency_seconds_count"] == 2 * done + 1
        assert m["fedagg_round_duration_seconds_count"] == done
        assert m["fedagg_checkpoint_duration_seconds_count"] == done + 1
        assert m["fedagg_updates_folded_total"] == 2 * done
        assert m["fedagg_folded_bytes_total"] == m["fedagg_received_bytes_total"] > 0
        assert m["fedagg_sent_bytes_total"] >= m["fedagg_received_bytes_total"]
        assert m["fedagg_clients_connected"] == 2
        assert not any(k.startswith("fedagg_requests_refused_total") for k in m)
        gate.touch()
        assert wait(server, 60) == 0, read_log(fed)
        for p in procs[2:]:
            assert wait(p, 30) == 0
        assert "Prometheus metrics of this server at http://127.0.0.1" in read_log(fed)
        assert _scrape(mport) is None  # stopped with the server
    finally:
        for p in procs:
            kill(p)


def test_fedagg_server_refuses_a_bad_metrics_value(tmp_path: Path) -> None:
    fed = make_fed(tmp_path, clients=2, tls=False, deploy={"metrics": "localhost"})
    server = start_server(fed)
    try:
        assert wait(server, 60) == 2
        assert "deploy.metrics must be host:port" in read_log(fed)
    finally:
        kill(server)


EDGE = ClientKey("e0", Ed25519PrivateKey.generate())
EDGES = Keyring({"e0": EDGE.private.public_key()})


def test_an_edge_serves_its_own_metrics(tmp_path: Path) -> None:
    """Root <- edge (relay mode, deploy.metrics on) <- the clients, every hop over memory:
    the edge's /metrics counts what it relayed; the root's, the edge connected."""
    from fedagg.deploy import EdgeEngine, EdgeServer, ParentLink

    async def go() -> tuple[str, str, int]:
        fed = _fed(tmp_path / "root")
        root = FederationService(fed, RING, _opts(), edges=EDGES, edge_clients={"e0": range(N)})
        root_metrics = attach(root)
        await root.start()
        engine = EdgeEngine(fed.policy.strategy.aggregator, fed.spec, num_clients=N,
                            directory=tmp_path / "edge", mode="relay")  # fmt: skip
        link = ParentLink("memory", EDGE, range(N), insecure=True, retry_for=5.0,
                          channel=MemoryChannel(root))  # fmt: skip
        edge = EdgeServer(engine, RING, _opts(metrics="127.0.0.1:0"), link,
                          serves=set(range(N)), transport=MemoryTransport)  # fmt: skip
        clients: list[asyncio.Task[Any]] = []
        try:
            starting = asyncio.create_task(edge.start())
            clients = [asyncio.create_task(_client(edge.service, n).run_async()) for n in NAMES]
            await asyncio.wait_for(starting, 30)
            assert edge.server.metrics is not None
            url = edge.server.metrics.url
            during = _parse(await asyncio.to_thread(_get, url))
            assert during["fedagg_clients_connected"] == N
            assert _parse(root_metrics.text())["fedagg_edges_connected"] == 1
            await asyncio.wait_for(root.wait(), 30)
            await asyncio.wait_for(asyncio.gather(*clients), 30)
            text = await asyncio.to_thread(_get, url)
        finally:
            for c in clients:
                c.cancel()
            await asyncio.gather(*clients, return_exceptions=True)
            await edge.stop()
            await root.stop()
        return text, root_metrics.text(), edge.stats.uploads

    text, root_text, uploads = asyncio.run(go())
    m, r = _parse(text), _parse(root_text)
    assert uploads == N * ROUNDS
    assert m["fedagg_uploads_accepted_total"] == uploads
    assert m['fedagg_edge_forwards_total{kind="relay"}'] == uploads
    assert m["fedagg_edge_forwarded_updates_total"] == uploads
    assert m["fedagg_model_version"] == ROUNDS - 1  # the last version its clients trained from
    assert "fedagg_rounds_closed_total" not in m
    assert (
        r["fedagg_rounds_closed_total"] == ROUNDS and r["fedagg_uploads_accepted_total"] == uploads
    )
