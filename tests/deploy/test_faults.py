"""Crash safety with real processes: SIGKILL the server (and clients) at random points.

The federation runs in canonical fold order, so its final model depends only on which
updates were accepted; client training is deterministic. A run with crashes must then end
with exactly the model of an uninterrupted run, bit for bit, having accepted every update
exactly once.
"""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from fedagg.deploy._faults import POINTS
from tests.deploy.harness import (
    federation,
    kill,
    read_log,
    run_all,
    start_client,
    start_server,
    wait,
    wait_listening,
)

SERVER_POINTS = [p for p in POINTS if not p.startswith(("client", "edge"))]


def _cfg(rounds: int, clients: int) -> dict[str, object]:
    return {
        "clients": clients,
        "rounds": rounds,
        "extra": {"model": {"name": "mlp", "hidden": [64]}},
        # 4 KiB chunks: a 19 KB update streams in 5 chunks, so "mid-upload" exists
        "deploy": {"order": "canonical", "chunk_mib": 4096 / 2**20, "client_timeout": 60.0},
    }


def _reference(root: Path, rounds: int, clients: int) -> np.ndarray:
    with federation(root, **_cfg(rounds, clients)) as fed:  # type: ignore[arg-type]
        run_all(fed, timeout=180)
        return np.asarray(fed.final().params)


def _db(fed_state: Path) -> sqlite3.Connection:
    return sqlite3.connect(fed_state / "state.db")


def test_server_sigkill_at_random_points_gives_the_uninterrupted_model(tmp_path: Path) -> None:
    rounds, clients = 30, 5
    ref = _reference(tmp_path / "ref", rounds, clients)
    rng = random.Random(20261126)
    # every crash point at least once, in a random order, each at a random occurrence
    plan = [*SERVER_POINTS, *rng.choices(SERVER_POINTS, k=3)]
    rng.shuffle(plan)
    with federation(tmp_path / "crash", **_cfg(rounds, clients)) as fed:  # type: ignore[arg-type]
        crashes: list[str] = []
        server = start_server(fed, env={"FEDAGG_CRASH_AT": f"{plan[0]}:{rng.randint(1, 12)}"})
        wait_listening(fed, server)
        cl = [start_client(fed, i, args=("--retry-for", "120")) for i in range(clients)]
        deadline = time.monotonic() + 400
        while True:
            rc = wait(server, max(1.0, deadline - time.monotonic()))
            if rc == 0:
                break
            assert rc == -9, f"server failed (rc {rc}):\n{read_log(fed)}"
            crashes.append(plan[len(crashes)])
            nxt = plan[len(crashes)] if len(crashes) < len(plan) else None
            env = {"FEDAGG_CRASH_AT": f"{nxt}:{rng.randint(1, 12)}"} if nxt else None
            server = start_server(fed, env=env)
        for i, c in enumerate(cl):
            assert wait(c, 60) == 0, read_log(fed, f"client-{i}.log")
        log = read_log(fed)
        final = fed.final()
        with _db(fed.state) as db:
            uploads = db.execute("SELECT count(*), count(DISTINCT job) FROM uploads").fetchone()
            folded = [r[0] for r in db.execute("SELECT folded FROM rounds ORDER BY round")]
    # enough crashes happened, of every kind planned (a point may not be reached if its
    # occurrence number exceeds what is left of the run; most are)
    assert len(crashes) >= len(SERVER_POINTS), crashes
    assert final.version == rounds
    assert uploads == (rounds * clients, rounds * clients)  # each update accepted once
    assert folded == [clients] * rounds  # and folded into its round exactly once
    assert np.array_equal(final.params, ref), (np.abs(final.params - ref).max(), log)


def test_client_killed_mid_upload_recovers_the_same_model(tmp_path: Path) -> None:
    rounds, clients = 4, 3
    ref = _reference(tmp_path / "ref", rounds, clients)
    with federation(tmp_path / "crash", **_cfg(rounds, clients)) as fed:  # type: ignore[arg-type]
        server = start_server(fed)
        wait_listening(fed, server)
        cl = [start_client(fed, i) for i in range(clients - 1)]
        victim = start_client(fed, clients - 1, env={"FEDAGG_CRASH_AT": "client-upload:7"})
        assert wait(victim, 60) == -9  # died mid-way through its second upload
        cl.append(start_client(fed, clients - 1))  # restarted: retrains, re-sends
        assert wait(server, 120) == 0, read_log(fed)
        for c in cl:
            assert wait(c, 30) == 0
        with _db(fed.state) as db:
            n = db.execute("SELECT count(*) FROM uploads").fetchone()[0]
        assert n == rounds * clients
        assert np.array_equal(fed.final().params, ref)


def test_a_client_that_never_comes_back_is_dropped_and_rounds_go_on(tmp_path: Path) -> None:
    with federation(
        tmp_path, clients=4, rounds=3, deploy={"client_timeout": 1.0, "wait_for": 3}
    ) as fed:
        server = start_server(fed)
        wait_listening(fed, server)
        cl = [start_client(fed, i) for i in range(3)]  # client 3 never shows up
        assert wait(server, 120) == 0, read_log(fed)
        for c in cl:
            assert wait(c, 30) == 0
        with _db(fed.state) as db:
            rows = db.execute("SELECT folded, applied, stats FROM rounds ORDER BY round").fetchall()
        assert [(r[0], r[1]) for r in rows] == [(3, 1)] * 3
        assert all('"dropped": 1' in r[2] for r in rows)
        assert fed.final().version == 3


@pytest.mark.parametrize("point", ["logged", "spooled"])
def test_an_upload_acknowledged_or_not_before_a_crash_is_counted_once(
    tmp_path: Path, point: str
) -> None:
    """A crash right after logging (the ack may be lost) or right after spooling (not yet
    logged): the client's retry must be counted exactly once either way."""
    with federation(tmp_path, **_cfg(2, 2)) as fed:  # type: ignore[arg-type]
        server = start_server(fed, env={"FEDAGG_CRASH_AT": f"{point}:1"})
        wait_listening(fed, server)
        cl = [start_client(fed, i) for i in range(2)]
        assert wait(server, 60) == -9
        server = start_server(fed)
        assert wait(server, 120) == 0, read_log(fed)
        for c in cl:
            assert wait(c, 30) == 0
        with _db(fed.state) as db:
            assert db.execute("SELECT count(*) FROM uploads").fetchone()[0] == 4
            folded = [r[0] for r in db.execute("SELECT folded FROM rounds ORDER BY round")]
        assert folded == [2, 2]
        kill(server)
