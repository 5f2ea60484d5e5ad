"""Local DP in deployment (in-memory transport, the real client and service): the same
ClientDPPolicy object stops the federation before max_epsilon, with the epsilon per round of
the simulation's accounting, and each client's noise is drawn from its job's generator."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedagg import privacy, strategies
from fedagg.clients import LocalDP
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
from fedagg.deploy._memory import MemoryChannel
from fedagg.deploy._service import FederationService
from fedagg.policy import ClientDPPolicy, SyncPolicy

N, D, Z, CLIP = 3, 500, 2.0, 1.0
NAMES = [f"c{i}" for i in range(N)]
KEYS = {n: ClientKey(n, Ed25519PrivateKey.generate()) for n in NAMES}
RING = Keyring({n: KEYS[n].private.public_key() for n in NAMES})


class Ones:
    name, epochs, batch_size = "ones", 1, 1

    def train(self, model: Any, params: Any, data: Any, rng: Any, **kw: Any) -> tuple[Any, Any]:
        from tests.sim.fakes import Result as R

        return R({"w": np.full(D, 0.1, np.float32)}, 1, 1, {}, {}), None

    def train_many(self, *a: Any, **kw: Any) -> Any:
        raise NotImplementedError


ALG = LocalDP(Ones(), CLIP, Z)


def _train(model: Any, task: TaskContext) -> Result:
    res, _ = ALG.train(None, None, None, task.rng())  # the job's generator, as in simulation
    return Result(res.delta["w"], 1, {})


async def _run(d: Path, cap: float) -> tuple[Federation, list[Any]]:
    strategy = canonical_strategy(strategies.fedavg(1.0))
    policy = ClientDPPolicy(SyncPolicy(strategy, 6, N), "local", Z, delta=1e-5, max_epsilon=cap)
    fed = Federation(policy, strategy.init([np.zeros(D, np.float32)]), num_clients=N, seed=3,
                     directory=d, identity={"test": "local-dp"})  # fmt: skip
    seen: list[Any] = []
    opts = ServerOptions(listen="127.0.0.1:0", insecure=True, fsync=False, chunk_bytes=1 << 16)
    service = FederationService(fed, RING, opts, on_round=seen.append)
    await service.start()

    def client(name: str) -> Client:
        ch = MemoryChannel(service, max_message=opts.chunk_bytes + 64 * 1024)
        return Client("memory", KEYS[name], _train, insecure=True, retry_for=0.5, heartbeat=0.5,
                      channel=ch)  # fmt: skip

    tasks = [asyncio.create_task(client(n).run_async()) for n in NAMES]
    try:
        await asyncio.wait_for(service.wait(), 30)
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await service.stop()
    return fed, seen


def test_deployment_stops_before_max_epsilon_with_the_accounted_epsilon(tmp_path: Path) -> None:
    cap = (privacy.local_epsilon(Z, 2, 1e-5) + privacy.local_epsilon(Z, 3, 1e-5)) / 2
    fed, seen = asyncio.run(_run(tmp_path, cap))
    eps = [r.epsilon for r in seen]  # RoundStats
    assert eps == [privacy.local_epsilon(Z, k, 1e-5) for k in (1, 2)], eps
    assert fed.server.version == 2
    # the applied mean is the clipped update plus the mean of 3 clients' noise
    noise = fed.server.params.astype(np.float64) / 2 - 0.1 * min(1, CLIP / (0.1 * D**0.5))
    assert abs(noise.std() / (Z * CLIP / np.sqrt(N * 2)) - 1) < 0.15
