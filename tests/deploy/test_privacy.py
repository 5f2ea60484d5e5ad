"""Central DP in a deployment (the in-memory transport: the real client and service, no
network): the server steps the same PrivatePolicy as the simulator, reports each round's
epsilon, and ends the federation before a round whose epsilon would exceed max_epsilon."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedagg import privacy, strategies
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
from fedagg.policy import ClientDPPolicy, PrivatePolicy, SyncPolicy, dp_strategy

N = 6
D = 500
NAMES = [f"c{i}" for i in range(N)]
KEYS = {n: ClientKey(n, Ed25519PrivateKey.generate()) for n in NAMES}
RING = Keyring({n: KEYS[n].private.public_key() for n in NAMES})
Z, Q = 1.0, 0.5
DELTA = 1e-3


def _eps(t: int) -> float:
    return privacy.epsilon(noise_multiplier=Z, sample_rate=Q, steps=t, delta=DELTA)


def _train(model: Any, task: TaskContext) -> Result:
    delta = np.full(D, 1.0, np.float32)  # norm ~22: clipped to 1 by the server
    return Result(delta, 10, {"loss": 0.5})


async def _run(d: Path, max_epsilon: float) -> tuple[Federation, list[Any]]:
    strategy = canonical_strategy(dp_strategy(strategies.fedavg(1.0), 1.0))
    inner = SyncPolicy(strategy=strategy, rounds=20, clients_per_round=3, sampling="poisson")
    policy = PrivatePolicy(
        inner, noise_multiplier=Z, clip=1.0, delta=DELTA, max_epsilon=max_epsilon
    )
    server = strategy.init([np.zeros(D, np.float32)])
    fed = Federation(policy, server, num_clients=N, seed=5, directory=d, identity={"t": "dp"})
    opts = ServerOptions(listen="127.0.0.1:0", insecure=True, fsync=False, chunk_bytes=4096)
    rounds: list[Any] = []
    service = FederationService(fed, RING, opts, on_round=rounds.append)
    await service.start()
    clients = []
    for n in NAMES:
        ch = MemoryChannel(service, max_message=opts.chunk_bytes + 64 * 1024)
        c = Client("memory", KEYS[n], _train, insecure=True, retry_for=5.0, heartbeat=1.0,
                   channel=ch)  # fmt: skip
        clients.append(asyncio.create_task(c.run_async()))
    try:
        await asyncio.wait_for(service.wait(), 60)
        await asyncio.wait_for(asyncio.gather(*clients, return_exceptions=True), 30)
    finally:
        for c in clients:
            c.cancel()
        await asyncio.gather(*clients, return_exceptions=True)
        await service.stop()
    return fed, rounds


def test_a_deployment_stops_before_max_epsilon(tmp_path: Path) -> None:
    cap = (_eps(2) + _eps(3)) / 2
    fed, rounds = asyncio.run(_run(tmp_path, cap))
    assert len(rounds) == 2  # the third round would exceed the budget: never dispatched
    for t, r in enumerate(rounds, 1):
        assert r.epsilon == _eps(t) <= cap
    assert fed.state.finished and fed.state.steps == 2
    applied = sum(r.applied for r in rounds)
    assert fed.server.version == applied
    # every update was clipped to 1 and noised: the model moved, by about C / (qN) per round
    assert np.all(np.isfinite(fed.server.params)) and np.any(fed.server.params != 0)


def test_the_noise_key_is_a_secret_of_the_state_directory_not_the_seed(tmp_path: Path) -> None:
    """Two deployments with the same config and seed add different noise (each made its own
    32-byte key, 0600 in its state directory): the seed in a config file cannot rebuild it."""
    cap = (_eps(3) + _eps(4)) / 2  # three rounds each (the cohorts are random: one may be empty)
    a, _ = asyncio.run(_run(tmp_path / "a", cap))
    b, _ = asyncio.run(_run(tmp_path / "b", cap))
    for d in ("a", "b"):
        key = tmp_path / d / "dp.key"
        assert key.stat().st_mode & 0o777 == 0o600 and len(key.read_bytes()) == 32
    assert (tmp_path / "a" / "dp.key").read_bytes() != (tmp_path / "b" / "dp.key").read_bytes()
    assert a.server.version >= 1 and b.server.version >= 1
    assert not np.array_equal(a.server.params, b.server.params)


def test_deployed_cohorts_derive_from_the_secret_not_the_seed(tmp_path: Path) -> None:
    """Two deployments with the same config and seed sample different Poisson cohorts (each
    draws them from its own dp.key), so nobody holding the config can recompute who was
    sampled; a simulation (no secret) keeps the seed's stream."""
    cap = (_eps(6) + _eps(7)) / 2  # six rounds each
    a, ra = asyncio.run(_run(tmp_path / "a", cap))
    _, rb = asyncio.run(_run(tmp_path / "b", cap))
    assert len(ra) == len(rb) == 6
    cohorts_a = [(r.selected, tuple(sorted(r.participants))) for r in ra]
    cohorts_b = [(r.selected, tuple(sorted(r.participants))) for r in rb]
    assert cohorts_a != cohorts_b  # same seed: identical cohorts had they come from it
    # the rng of a deployment's round is the secret's; without a secret, the seed's
    from fedagg.policy._sync import _sampling_rng

    secret = (tmp_path / "a" / "dp.key").read_bytes()
    assert a.ctx.noise_secret == secret
    seeded = np.random.default_rng([a.ctx.seed, 0x5EC7, 0]).random(8)
    assert not np.array_equal(_sampling_rng(a.ctx, 0).random(8), seeded)

    class _Sim:
        seed = a.ctx.seed
        noise_secret = None

    assert np.array_equal(_sampling_rng(_Sim(), 0).random(8), seeded)  # type: ignore[arg-type]


def test_client_side_dp_deployments_get_a_secret_too(tmp_path: Path) -> None:
    inner = SyncPolicy(strategy=strategies.fedavg(1.0), rounds=2, clients_per_round=3,
                       sampling="poisson")  # fmt: skip
    p = ClientDPPolicy(inner, "local", 2.0, delta=DELTA)
    fed = Federation(p, strategies.fedavg(1.0).init([np.zeros(D, np.float32)]), num_clients=N,
                     seed=5, directory=tmp_path)  # fmt: skip
    assert fed.ctx.noise_secret == (tmp_path / "dp.key").read_bytes()
