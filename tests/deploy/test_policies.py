"""The simulator's policies over the network, unchanged: sync (deadline, over-selection,
minimum), FedBuff, FedAsync and FedFix, each a real server and real clients on loopback."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedagg.deploy import build_federation
from fedagg.errors import ConfigError
from tests.deploy.harness import federation, make_fed, run_all


def _rounds(fed: Any) -> list[dict[str, Any]]:
    import json

    with sqlite3.connect(fed.state / "state.db") as db:
        return [json.loads(r[0]) for r in db.execute("SELECT stats FROM rounds ORDER BY round")]


@pytest.mark.parametrize(
    ("policy", "rounds", "check"),
    [
        # over-selection: 4 of 5 dispatched... each round closes at 3 folded (late ones ignored)
        (
            {"kind": "sync", "clients_per_round": 3, "over_select": 0.5, "min_updates": 2},
            3,
            lambda rs: all(r["folded"] == 3 and r["dispatched"] == 5 for r in rs),
        ),
        (
            {"kind": "fedbuff", "buffer": 2, "concurrency": 3},
            4,
            lambda rs: all(r["folded"] == 2 for r in rs),
        ),
        (
            {"kind": "fedasync", "alpha": 0.5, "concurrency": 2},
            5,
            lambda rs: all(r["folded"] == 1 for r in rs),
        ),
        (
            {"kind": "fedfix", "window": 0.3, "concurrency": 5, "weights": "unbiased"},
            6,
            lambda rs: sum(r["folded"] for r in rs) >= 3,
        ),
    ],
    ids=["sync-overselect", "fedbuff", "fedasync", "fedfix"],
)
def test_policy_runs_over_the_network(
    tmp_path: Path, policy: dict[str, Any], rounds: int, check: Any
) -> None:
    per_round = policy.pop("clients_per_round", 5)
    with federation(tmp_path, clients=5, rounds=rounds, per_round=per_round, policy=policy) as fed:
        run_all(fed, timeout=120)
        rs = _rounds(fed)
        final = fed.final()
    assert len(rs) == rounds and check(rs), rs
    applied = [r for r in rs if r["applied"]]
    assert final.version == len(applied) >= 1
    assert np.isfinite(final.params).all() and np.abs(final.params).max() > 0


def test_sync_deadline_closes_a_round_without_a_silent_client(tmp_path: Path) -> None:
    """A client that connects but never answers (it is stopped) does not hold the round:
    the deadline closes it with the others' updates."""
    import os
    import signal

    from tests.deploy.harness import (
        read_log,
        start_client,
        start_server,
        wait,
        wait_listening,
    )

    with federation(
        tmp_path, clients=3, rounds=2, policy={"deadline": 3.0, "min_updates": 2},
        deploy={"client_timeout": 60.0, "wait_for": 2},
    ) as fed:  # fmt: skip
        server = start_server(fed)
        wait_listening(fed, server)
        cl = [start_client(fed, i) for i in range(3)]
        os.kill(cl[2].pid, signal.SIGSTOP)  # frozen: never answers (the start waits for 2)
        try:
            assert wait(server, 120) == 0, read_log(fed)
        finally:
            os.kill(cl[2].pid, signal.SIGCONT)
        rs = _rounds(fed)
    assert [r["folded"] for r in rs] == [2, 2]
    assert all(r["applied"] for r in rs)


def test_stateful_server_algorithms_are_refused_for_deployment(tmp_path: Path) -> None:
    fed = make_fed(tmp_path, clients=2, extra={"client": {"algorithm": "scaffold"}})
    with pytest.raises(ConfigError, match="simulator only"):
        build_federation(fed.cfg, tmp_path / "state")


def test_heartbeats_keep_a_disconnected_clients_task_open(tmp_path: Path) -> None:
    """A client whose task stream is cut while it trains (here: a slow train function and a
    server-side drop timer shorter than the training) keeps its task through heartbeats."""
    import asyncio
    import time

    from fedagg.deploy import Client, ClientKey, Result
    from tests.deploy.harness import read_log, start_server, wait, wait_listening

    with federation(
        tmp_path, clients=1, rounds=1, deploy={"client_timeout": 1.0, "heartbeat": 0.3}
    ) as fed:
        server = start_server(fed)
        wait_listening(fed, server)
        ca = (fed.dir / "certs" / "ca.pem").read_bytes()
        holder: dict[str, Any] = {}

        def train(model: Any, task: Any) -> Result:
            # cut the task stream from the client side, then train for 3 x client_timeout
            holder["loop"].call_soon_threadsafe(holder["cut"])
            time.sleep(3.0)
            return Result({k: np.full_like(v, 0.01) for k, v in model.items()}, 5)

        async def go() -> Any:
            c = Client(fed.address, ClientKey.load(fed.key(0)), train, ca=ca, heartbeat=0.3)
            holder["loop"] = asyncio.get_running_loop()
            holder["cut"] = lambda: c._stream.cancel()  # the task stream only
            return c, await c.run_async()

        _, report = asyncio.run(go())
        assert wait(server, 60) == 0, read_log(fed)
        rs = _rounds(fed)
    assert report.heartbeats >= 5 and report.uploads == 1, report
    assert [(r["folded"], r["dropped"]) for r in rs] == [(1, 0)]
