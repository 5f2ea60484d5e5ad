"""The stream transport (the data port, ``deploy/_stream.py``) in a real federation over
loopback: the same bits as gRPC, with TLS and without, one stream or two per upload; and the
client's fallback to gRPC when the advertised port cannot be reached."""

from __future__ import annotations

import asyncio
import gc
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedagg.deploy import Client, Federation, Server, make_certs
from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._options import data_address
from fedagg.deploy._stream_client import chunk_parts
from fedagg.deploy._wire import encode_chunk
from fedagg.errors import ConfigError
from tests.deploy.harness import free_port
from tests.deploy.test_memory_transport import (
    _GRPC_LEFTOVERS,
    KEYS,
    NAMES,
    RING,
    _fed,
    _opts,
    _train,
)


class _Counting(Client):
    """Counts the uploads that went over the data port and over gRPC."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.via: dict[str, int] = {"stream": 0, "grpc": 0}

    def _method(self, name: str, kind: str) -> Any:
        if name == "Push":
            self.via["grpc"] += 1
        return super()._method(name, kind)

    def upload_options(self, reply: pb.HelloReply) -> None:
        super().upload_options(reply)
        if self._data is not None and not isinstance(self._data, _Counted):
            self._data = _Counted(self._data, self.via)  # type: ignore[assignment]


class _Counted:
    """A data port call, counted."""

    parts = True

    def __init__(self, push: Any, via: dict[str, int]) -> None:
        self.push, self.via = push, via

    async def __call__(self, messages: Any, **kw: Any) -> bytes:
        self.via["stream"] += 1
        out: bytes = await self.push(messages, **kw)
        return out


async def _run(d: Path, *, transport: str = "auto", tls: bool = False, streams: int = 0,
               data_listen: str = "auto", port_override: int | None = None,
               max_conns: int | None = None,
               **opts: Any) -> tuple[Federation, list[_Counting], int]:  # fmt: skip
    fed = _fed(d)
    ca = None
    kw: dict[str, Any] = {}
    if tls:
        paths = make_certs(d / "certs")
        ca = paths["ca"].read_bytes()
        kw = {"tls": (paths["cert"].read_bytes(), paths["key"].read_bytes()),
              "insecure": False}  # fmt: skip
    server = Server(fed, RING, _opts(data_listen=data_listen, **kw, **opts))
    await server.start()
    if port_override is not None:
        server.service.data_port = port_override
    if max_conns is not None and server.data is not None:
        server.data.max_conns = max_conns
    try:
        host = "localhost" if tls else "127.0.0.1"
        clients = [_Counting(f"{host}:{server.port}", KEYS[n], _train, insecure=not tls, ca=ca,
                             retry_for=5.0, heartbeat=1.0, transport=transport, streams=streams)
                   for n in NAMES]  # fmt: skip
        await asyncio.wait_for(asyncio.gather(server.wait(), *[c.run_async() for c in clients]), 60)
    finally:
        await server.stop(0.1)
    return fed, clients, server.data_port


def _via(clients: list[_Counting]) -> dict[str, int]:
    return {k: sum(c.via[k] for c in clients) for k in ("stream", "grpc")}


@_GRPC_LEFTOVERS
@pytest.mark.parametrize("tls", [False, True], ids=["plain", "tls"])
def test_the_data_port_gives_the_bits_of_grpc(tmp_path: Path, tls: bool) -> None:
    """Two streams per upload (chunks of 4 KiB, 12 KB updates: shards of 3 chunks) over the
    data port, against one gRPC stream: the same model, to the bit."""
    net, grpc_clients, _ = asyncio.run(_run(tmp_path / "grpc", transport="grpc"))
    how = "stream" if tls else "auto"  # under TLS, "auto" keeps to gRPC (see TLS_STREAM)
    where = "127.0.0.1:0" if tls else "auto"  # and "auto" opens no data port under TLS
    data, clients, port = asyncio.run(
        _run(tmp_path / "data", tls=tls, streams=2, transport=how, data_listen=where)
    )
    gc.collect()
    assert port > 0 and all(c.data_port == port for c in clients)
    assert _via(grpc_clients) == {"stream": 0, "grpc": 9}
    assert _via(clients) == {"stream": 18, "grpc": 0}  # 9 uploads, 2 shards each
    assert data.server.version == net.server.version == 3
    assert data.server.params.tobytes() == net.server.params.tobytes()
    assert np.any(data.server.params != 0)


@_GRPC_LEFTOVERS
def test_an_unreachable_data_port_falls_back_to_grpc_for_the_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The hello advertises a port nobody listens on: each client's first upload fails to
    connect, goes over gRPC, and so does every later one."""
    caplog.set_level(logging.WARNING, "fedagg.client")
    net, _, _ = asyncio.run(_run(tmp_path / "grpc", transport="grpc"))
    fed, clients, _ = asyncio.run(_run(tmp_path / "off", port_override=free_port()))
    gc.collect()
    tried = [c for c in clients if c.via["stream"]]
    assert tried and all(c._data is None and c.via["stream"] == 1 for c in tried)
    assert _via(clients)["grpc"] == 9
    assert fed.server.params.tobytes() == net.server.params.tobytes()
    assert sum("data port is unreachable" in r.getMessage() for r in caplog.records) >= 3


@_GRPC_LEFTOVERS
def test_a_full_data_port_sends_that_upload_over_grpc(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Over its connection cap the data port answers FULL: each upload then goes over gRPC,
    and the client keeps trying the data port for the next one (unlike an unreachable port)."""
    caplog.set_level(logging.WARNING, "fedagg.client")
    net, _, _ = asyncio.run(_run(tmp_path / "grpc", transport="grpc"))
    fed, clients, _ = asyncio.run(_run(tmp_path / "full", max_conns=0))
    gc.collect()
    assert all(c._data is not None for c in clients)
    assert _via(clients) == {"stream": 9, "grpc": 9}  # each upload tried, then over gRPC
    assert fed.server.params.tobytes() == net.server.params.tobytes()
    assert sum("data port is full" in r.getMessage() for r in caplog.records) == 9


@_GRPC_LEFTOVERS
def test_no_data_port_when_turned_off(tmp_path: Path) -> None:
    fed, clients, port = asyncio.run(_run(tmp_path, data_listen=""))
    gc.collect()
    assert port == 0 and all(c.data_port == 0 for c in clients)
    assert _via(clients) == {"stream": 0, "grpc": 9}
    assert fed.server.version == 3


@pytest.mark.parametrize("n", [0, 1, 5000])
def test_chunk_parts_are_the_encoded_message(n: int) -> None:
    data = memoryview(bytes(range(256)) * 20)[:n]
    for head, trailer in ((b"\x0a\x02hi", None), (None, None), (None, b"\x0a\x01x")):
        parts = chunk_parts({2: 12345}, data, head, trailer)
        assert b"".join(bytes(p) for p in parts) == encode_chunk({2: 12345}, data, head, trailer)
    if n:
        assert chunk_parts({}, data)[1] is data  # not copied


def test_the_data_port_options_are_checked() -> None:
    assert data_address("auto", "0.0.0.0:7531") == ("0.0.0.0", 0)
    assert data_address("auto", "[::1]:7531") == ("::1", 0)
    assert data_address("auto", "unix:/tmp/x") is None  # no host to share: no data port
    assert data_address("", "127.0.0.1:7531") is None
    assert data_address("10.0.0.1:7532", "127.0.0.1:7531") == ("10.0.0.1", 7532)
    for bad in ("7532", "host:", "host:99999", "a b:1"):
        with pytest.raises(ConfigError, match="data_listen"):
            _opts(data_listen=bad)
    with pytest.raises(ConfigError, match="transport"):
        Client("127.0.0.1:1", KEYS["c0"], _train, insecure=True, transport="quic")


def test_the_config_keys_reach_the_server_and_the_client(tmp_path: Path) -> None:
    """``[deploy] data_listen`` and ``transport``, as ``fedagg server`` / ``client`` read them."""
    from fedagg.config import resolve_config
    from fedagg.deploy import make_keys
    from fedagg.deploy._app import client_from_config, options_from_config

    make_keys(tmp_path / "keys", ["c0"])
    cfg = {"deploy": {"data_listen": "127.0.0.1:7599", "transport": "grpc"}}
    assert options_from_config(cfg, insecure=True).data_listen == "127.0.0.1:7599"
    assert options_from_config({}, insecure=True).data_listen == "auto"
    key = tmp_path / "keys" / "c0.key"
    assert client_from_config(cfg, key, insecure=True).transport == "grpc"
    assert client_from_config({}, key, insecure=True).transport == "auto"
    with pytest.raises(ConfigError, match="transport"):
        resolve_config({"deploy": {"transport": "udp"}})


async def _edge_tree(d: Path, transport: str) -> tuple[Federation, list[_Counting], int]:
    """Root (over memory) <- a relaying edge served over gRPC and its data port <- clients
    over loopback, uploading to the edge with ``transport``."""
    from fedagg.deploy import EdgeEngine, EdgeServer, ParentLink
    from fedagg.deploy._memory import MemoryChannel
    from fedagg.deploy._service import FederationService
    from tests.deploy.test_memory_transport import EDGE, EDGES, N

    fed = _fed(d / "root")
    root = FederationService(fed, RING, _opts(), edges=EDGES, edge_clients={"e0": range(N)})
    await root.start()
    engine = EdgeEngine(fed.policy.strategy.aggregator, fed.spec, num_clients=N,
                        directory=d / "edge", mode="relay")  # fmt: skip
    link = ParentLink("memory", EDGE, range(N), insecure=True, retry_for=5.0,
                      channel=MemoryChannel(root))  # fmt: skip
    edge = EdgeServer(engine, RING, _opts(), link, serves=set(range(N)))
    made: list[_Counting] = []
    runs: list[asyncio.Task[Any]] = []
    starting = asyncio.create_task(edge.start())  # it links up once its clients are in
    try:
        while not edge.server.service.data_port:  # listening
            assert not starting.done()
            await asyncio.sleep(0.01)
        at = f"127.0.0.1:{edge.server.port}"
        made = [_Counting(at, KEYS[n], _train, insecure=True, retry_for=5.0, heartbeat=1.0,
                          transport=transport) for n in NAMES]  # fmt: skip
        runs = [asyncio.create_task(c.run_async()) for c in made]
        await asyncio.wait_for(starting, 30)
        await asyncio.wait_for(root.wait(), 60)
        await asyncio.wait_for(asyncio.gather(*runs), 30)
    finally:
        for r in [*runs, starting]:
            r.cancel()
        await asyncio.gather(*runs, starting, return_exceptions=True)
        await edge.stop()
        await root.stop()
    return fed, made, edge.server.data_port


@_GRPC_LEFTOVERS
def test_an_edge_takes_its_clients_uploads_on_its_data_port(tmp_path: Path) -> None:
    ref, grpc_clients, _ = asyncio.run(_edge_tree(tmp_path / "grpc", "grpc"))
    fed, clients, port = asyncio.run(_edge_tree(tmp_path / "data", "auto"))
    gc.collect()
    assert port > 0 and all(c.data_port == port for c in clients)
    assert _via(grpc_clients) == {"stream": 0, "grpc": 9}
    assert _via(clients) == {"stream": 9, "grpc": 0}
    assert fed.server.version == ref.server.version == 3
    assert fed.server.params.tobytes() == ref.server.params.tobytes()


@_GRPC_LEFTOVERS
def test_auto_keeps_uploads_on_grpc_under_tls(tmp_path: Path) -> None:
    """Until the data port's TLS is as fast as gRPC's (``_client.TLS_STREAM``): a data port
    opened explicitly is not used by ``transport = "auto"`` clients, and ``data_listen =
    "auto"`` opens none under TLS."""
    fed, clients, port = asyncio.run(_run(tmp_path / "explicit", tls=True,
                                          data_listen="127.0.0.1:0"))  # fmt: skip
    gc.collect()
    assert port > 0 and all(c.data_port == 0 for c in clients)
    assert _via(clients) == {"stream": 0, "grpc": 9}
    assert fed.server.version == 3
    fed, clients, port = asyncio.run(_run(tmp_path / "auto", tls=True))
    gc.collect()
    assert port == 0 and all(c.data_port == 0 for c in clients)
    assert _via(clients) == {"stream": 0, "grpc": 9}
    assert fed.server.version == 3
