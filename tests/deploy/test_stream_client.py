"""The data port's client (``deploy/_stream_client.py``): many calls at once in one process,
more than its worker threads, all complete (no thread waits on a server that does not read)."""

from __future__ import annotations

import asyncio
import gc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedagg import strategies
from fedagg.deploy import Client, ClientKey, Federation, Keyring, Result, Server, canonical_strategy
from fedagg.deploy import _stream_client as sc
from fedagg.sim import SyncPolicy
from tests.deploy.test_memory_transport import _GRPC_LEFTOVERS, _opts

N, D = 4, 2 << 20  # clients, values per update (8 MiB: more than the kernel's buffers)
NAMES = [f"p{i}" for i in range(N)]
KEYS = {n: ClientKey(n, Ed25519PrivateKey.generate()) for n in NAMES}
RING = Keyring({n: KEYS[n].private.public_key() for n in NAMES})


def _train(model: Any, task: Any) -> Result:
    return Result(np.full(D, 0.001, np.float32), 10, {"loss": 0.5})


@_GRPC_LEFTOVERS
def test_more_calls_than_worker_threads_all_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One slot on the server, four clients in one process uploading at once over the data
    port, and one worker thread: the three waiting for the slot are not read by the server;
    the one holding it still sends (a thread blocked in a waiting call's send would starve it
    until the server cut it for idling)."""
    pool = ThreadPoolExecutor(1)
    monkeypatch.setattr(sc, "_pool", pool)
    strategy = canonical_strategy(strategies.fedadam(lr=0.1))
    fed = Federation(SyncPolicy(strategy=strategy, rounds=1, clients_per_round=N),
                     strategy.init([np.zeros(D, np.float32)]), num_clients=N, seed=7,
                     directory=tmp_path, identity={"t": "pool"})  # fmt: skip

    async def go() -> list[Client]:
        server = Server(fed, RING, _opts(chunk_bytes=1 << 20, max_uploads=1, idle_timeout=2.0))
        await server.start()
        at = f"127.0.0.1:{server.port}"
        clients = [Client(at, KEYS[n], _train, insecure=True, retry_for=20.0, heartbeat=1.0)
                   for n in NAMES]  # fmt: skip
        try:
            await asyncio.wait_for(
                asyncio.gather(server.wait(), *[c.run_async() for c in clients]), 60
            )
            assert server.data is not None and server.data.cut == 0
        finally:
            await server.stop(0.1)
        return clients

    try:
        clients = asyncio.run(go())
    finally:
        pool.shutdown()
    gc.collect()
    assert all(c._data is not None for c in clients)  # none fell back to gRPC
    assert sum(c.report.retries for c in clients) == 0
    assert fed.server.version == 1
