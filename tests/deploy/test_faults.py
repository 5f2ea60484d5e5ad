"""Crash safety with real processes: SIGKILL the server (and clients) at random points.

The federation runs in canonical fold order, so its final model depends only on which
updates were accepted; client training is deterministic. A run with crashes must then end
with exactly the model of an uninterrupted run, bit for bit, having accepted every update
exactly once.

Clients record every acknowledgement they receive, and the runs check at all times that each
acknowledged upload is in the server's log: the server acknowledges only what it has
committed, so no crash can lose one. A run that stops accepting uploads fails after
``STALL`` seconds, with what it knows, rather than waiting out its deadline.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fedagg.deploy._faults import POINTS
from tests.deploy.harness import (
    Fed,
    federation,
    kill,
    read_acks,
    read_log,
    run_all,
    start_client,
    start_server,
    wait,
    wait_listening,
)

# ("commit": the committer of durability = "retained", about to sync acknowledged spools)
SERVER_POINTS = [p for p in POINTS if not p.startswith(("client", "edge")) and p != "commit"]
STALL = 60.0  # seconds without a newly accepted upload: stuck (normal pauses <= ~11 s here)


def _crash_at(point: str, nth: int, power: bool = False) -> dict[str, str]:
    # at "upload-queued" the commit stalls a moment before the kill, as a slow disk would:
    # whatever the server does meanwhile (an acknowledgement sent too early) gets out.
    # ``power``: a power loss (what the committer had not synced is lost first)
    stall = ":0.3" if point in ("upload-queued", "commit") else (":0" if power else "")
    return {"FEDAGG_CRASH_AT": f"{point}:{nth}{stall}" + (":power" if power else "")}


def _logged(fed: Fed) -> set[tuple[int, int]] | None:
    """The (client, task) keys in the server's log now (None: not readable this time)."""
    path = fed.state / "state.db"
    if not path.exists():
        return set()
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            return {(int(c), int(j)) for c, j in db.execute("SELECT client, job FROM uploads")}
    except sqlite3.Error:  # no schema yet, or busy
        return None


def _check_acks(fed: Fed, kept: bool = False) -> set[tuple[int, int]] | None:
    """Every upload a client has seen acknowledged is in the server's log (read after the
    acknowledgements: each was recorded after its commit). Returns the log's keys. ``kept``:
    a power loss may have cut acknowledged ("retain") uploads, which their clients send again:
    checked at the end only."""
    acked = {(c, t) for c, t, _ in read_acks(fed)}
    logged = _logged(fed)
    if logged is None or kept:
        return logged
    lost = sorted(acked - logged)
    assert not lost, (
        f"{len(lost)} upload(s) acknowledged to their clients are not in the server's log, "
        f"(client, task) {lost[:8]}: acknowledged before being committed, and lost in a "
        f"crash (their clients will not send them again)\n{read_log(fed)}"
    )
    return logged


def _supervise(
    fed: Fed, server: subprocess.Popen[bytes], timeout: float, kept: bool = False
) -> int:
    """Wait for the server to exit and return its code, checking every 0.2 s that no
    acknowledged upload is missing from its log and that uploads keep being accepted."""
    t0 = time.monotonic()
    seen, progress = -1, t0
    while (rc := server.poll()) is None:
        logged = _check_acks(fed, kept)
        now = time.monotonic()
        if logged is not None and len(logged) != seen:
            seen, progress = len(logged), now
        if now - progress > STALL or now - t0 > timeout:
            kill(server)
            acked = read_acks(fed)
            why = f"no upload accepted for {STALL:.0f} s" if now - t0 <= timeout else (
                f"the server did not finish in {timeout:.0f} s")  # fmt: skip
            raise AssertionError(
                f"stuck: {why} ({seen} in the log, {len(acked)} acknowledged to clients)"
                f"\n{read_log(fed)}"
            )
        time.sleep(0.2)
    _check_acks(fed, kept)
    return rc


def test_a_crash_point_kills_at_its_nth_pass_and_can_stall_first() -> None:
    """``point:n:seconds``: the thread at the point waits, the others run on, then the
    process dies (SIGKILL) at the n-th pass. Configured through the Python API (the
    environment is read by the command line only: the harness's processes)."""
    code = """if True:
        import sys, threading, time
        from fedagg.deploy._faults import configure, crash_point
        configure("upload-queued:2:0.3")
        def other():
            while True:
                print("other", flush=True)
                time.sleep(0.02)
        crash_point("upload-queued")
        print("first pass", flush=True)
        threading.Thread(target=other, daemon=True).start()
        crash_point("upload-queued")
        print("survived", flush=True)
    """
    env = {k: v for k, v in os.environ.items() if k != "FEDAGG_CRASH_AT"}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    out = p.stdout.decode().splitlines()
    assert p.returncode == -9, p.stderr.decode()
    assert out[0] == "first pass" and "survived" not in out
    assert out.count("other") >= 5  # the other thread ran during the stall


def _cfg(rounds: int, clients: int, durability: str = "fsync") -> dict[str, object]:
    return {
        "clients": clients,
        "rounds": rounds,
        "extra": {"model": {"name": "mlp", "hidden": [64]}},
        # 4 KiB chunks: a 19 KB update streams in 5 chunks, so "mid-upload" exists
        "deploy": {
            "order": "canonical",
            "chunk_mib": 4096 / 2**20,
            "client_timeout": 60.0,
            "durability": durability,
        },
    }


_REFERENCES: dict[tuple[int, int], np.ndarray] = {}


def _reference(root: Path, rounds: int, clients: int) -> np.ndarray:
    """The model of an uninterrupted run: a function of (rounds, clients) alone (canonical
    order, deterministic training), so it is run once per module and shared by the tests that
    compare against it (both durabilities' crash runs use the same 30-round reference)."""
    if (rounds, clients) not in _REFERENCES:
        with federation(root, **_cfg(rounds, clients)) as fed:  # type: ignore[arg-type]
            run_all(fed, timeout=180)
            _REFERENCES[rounds, clients] = np.asarray(fed.final().params)
    return _REFERENCES[rounds, clients].copy()


def _db(fed_state: Path) -> sqlite3.Connection:
    return sqlite3.connect(fed_state / "state.db")


@pytest.mark.parametrize("durability", ["fsync", "retained"])
def test_server_sigkill_at_random_points_gives_the_uninterrupted_model(
    tmp_path: Path, durability: str
) -> None:
    """Under "retained", every other crash is a power loss too (what the committer had not
    synced is lost), and the committer's own point is in the plan."""
    rounds, clients = 30, 5
    ref = _reference(tmp_path / "ref", rounds, clients)
    rng = random.Random(20261126)
    retained = durability == "retained"
    points = [*SERVER_POINTS, "commit"] if retained else SERVER_POINTS
    # every crash point at least once, in a random order, each at a random occurrence (one
    # extra: each crash costs a restart, ~5 s; 8 of them keep the test near a minute)
    plan = [*points, *rng.choices(points, k=1)]
    rng.shuffle(plan)
    cfg = _cfg(rounds, clients, durability)

    def crash(i: int) -> dict[str, str]:
        return _crash_at(plan[i], rng.randint(1, 12), power=retained and i % 2 == 0)

    with federation(tmp_path / "crash", **cfg) as fed:  # type: ignore[arg-type]
        crashes: list[str] = []
        server = start_server(fed, env=crash(0))
        wait_listening(fed, server)
        cl = [
            start_client(fed, i, args=("--retry-for", "120"), record_acks=True)
            for i in range(clients)
        ]
        deadline = time.monotonic() + 400
        while True:
            rc = _supervise(fed, server, max(1.0, deadline - time.monotonic()), retained)
            if rc == 0:
                break
            assert rc == -9, f"server failed (rc {rc}):\n{read_log(fed)}"
            crashes.append(plan[len(crashes)])
            nxt = len(crashes) if len(crashes) < len(plan) else None
            server = start_server(fed, env=crash(nxt) if nxt is not None else None)
        for i, c in enumerate(cl):
            assert wait(c, 60) == 0, read_log(fed, f"client-{i}.log")
        log = read_log(fed)
        final = fed.final()
        acked = [(c, t) for c, t, _ in read_acks(fed)]
        with _db(fed.state) as db:
            uploads = db.execute("SELECT count(*), count(DISTINCT job) FROM uploads").fetchone()
            logged = {(c, j) for c, j in db.execute("SELECT client, job FROM uploads")}
            folded = [r[0] for r in db.execute("SELECT folded FROM rounds ORDER BY round")]
    # enough crashes happened, of every kind planned (a point may not be reached if its
    # occurrence number exceeds what is left of the run; most are)
    assert len(crashes) >= len(points), crashes
    assert "upload-queued" in crashes, crashes
    assert final.version == rounds
    assert uploads == (rounds * clients, rounds * clients)  # each update accepted once
    # each acknowledged to its client once (one crashed before its commit was retried; under
    # "retained", one a power loss cut was sent again, and acknowledged again)
    assert (retained or len(acked) == len(set(acked))) and set(acked) == logged
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


@pytest.mark.parametrize("durability", ["fsync", "retained"])
@pytest.mark.parametrize("point", ["logged", "upload-queued", "spooled"])
def test_an_upload_acknowledged_or_not_before_a_crash_is_counted_once(
    tmp_path: Path, point: str, durability: str
) -> None:
    """A crash right after logging (the ack may be lost), between queuing and committing, or
    right after spooling (not yet logged): an upload acknowledged before the crash is still
    in the log after it, and a client's retry is counted exactly once either way."""
    with federation(tmp_path, **_cfg(2, 2, durability)) as fed:  # type: ignore[arg-type]
        server = start_server(fed, env=_crash_at(point, 1))
        wait_listening(fed, server)
        cl = [start_client(fed, i, record_acks=True) for i in range(2)]
        assert _supervise(fed, server, 60) == -9
        server = start_server(fed)
        assert _supervise(fed, server, 120) == 0, read_log(fed)
        for c in cl:
            assert wait(c, 30) == 0
        acked = [(c, t) for c, t, _ in read_acks(fed)]
        with _db(fed.state) as db:
            assert db.execute("SELECT count(*) FROM uploads").fetchone()[0] == 4
            folded = [r[0] for r in db.execute("SELECT folded FROM rounds ORDER BY round")]
        assert len(acked) == len(set(acked)) == 4
        assert folded == [2, 2]
        kill(server)
