"""``durability = "retained"`` with real processes: acknowledged before the spool is synced,
kept by the client until the committed watermark covers it, sent again after a power loss.

A power loss is simulated by the ``power`` fault (:mod:`fedagg.deploy._faults`): before the
SIGKILL, every spool file the committer has not yet synced is deleted, emptied or cut in half.
The restarted server must cut its log at the first such update, open those tasks again, and
get the kept copies back from the clients (not retrained), ending with exactly the model of
an uninterrupted run (canonical fold order), every update folded once.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np

from fedagg.deploy._commit import read_mark
from tests.deploy.harness import (
    federation,
    read_acks,
    read_log,
    read_retained,
    run_all,
    start_client,
    start_server,
    wait,
    wait_listening,
)

ROUNDS, CLIENTS = 4, 3


def _cfg(durability: str = "retained", **deploy: Any) -> dict[str, Any]:
    return {
        "clients": CLIENTS,
        "rounds": ROUNDS,
        "extra": {"model": {"name": "mlp", "hidden": [64]}},
        "deploy": {
            "order": "canonical",
            "client_timeout": 60.0,
            "durability": durability,
            **deploy,
        },
    }


def _db(state: Path) -> sqlite3.Connection:
    return sqlite3.connect(state / "state.db")


def _trained(text: str) -> list[int]:
    """The tasks a client's log says it trained (one line per training)."""
    return [int(t) for t in re.findall(r"task (\d+): train from", text)]


def test_a_power_loss_cuts_the_log_and_the_clients_send_their_kept_updates(
    tmp_path: Path,
) -> None:
    """The committer stalls before its first pass, then the power fails: round 1's uploads
    were all acknowledged ("retain") and logged, and the round closed in memory, but its new
    model waits for them to be synced (checkpoints every 2 rounds: no checkpoint covers them).
    The restarted server cuts the updates it lost, and their clients send their kept copies
    again, untrained."""
    with federation(tmp_path / "ref", **_cfg("fsync")) as fed:
        run_all(fed, timeout=120)
        ref = np.asarray(fed.final().params)
    with federation(tmp_path / "run", **_cfg(checkpoint_every=2)) as fed:
        server = start_server(fed, env={"FEDAGG_CRASH_AT": "commit:1:1.5:power"})
        wait_listening(fed, server)
        cl = [start_client(fed, i, args=("--retry-for", "120"), record_acks=True)
              for i in range(CLIENTS)]  # fmt: skip
        assert wait(server, 120) == -9, read_log(fed)
        lost = read_log(fed)
        assert "power loss (fault injection)" in lost, lost
        server = start_server(fed, log="server-2.log")
        assert wait(server, 120) == 0, read_log(fed, "server-2.log")
        for i, c in enumerate(cl):
            assert wait(c, 60) == 0, read_log(fed, f"client-{i}.log")
        after = read_log(fed, "server-2.log")
        logs = [(fed.dir / f"client-{i}.log").read_text() for i in range(CLIENTS)]
        with _db(fed.state) as db:
            keys = [(c, j) for c, j in db.execute("SELECT client, job FROM uploads")]
            folded = [r[0] for r in db.execute("SELECT folded FROM rounds ORDER BY round")]
        acked = {(c, t) for c, t, _ in read_acks(fed)}
        final = fed.final()
    assert "cut from the log" in after, after  # something acknowledged was lost, and cut
    assert any("sending the kept update" in t for t in logs), logs
    for i, text in enumerate(logs):  # no task trained twice: the kept copy was sent instead
        trained = _trained(text)
        assert len(trained) == len(set(trained)), (i, trained)
    assert len(keys) == len(set(keys)) == ROUNDS * CLIENTS  # each update logged once
    assert acked == set(keys)  # every acknowledged update is in the log
    assert folded == [CLIENTS] * ROUNDS  # and folded into its round once
    assert final.version == ROUNDS
    assert np.array_equal(final.params, ref)
    for client, seen in read_retained(fed).items():  # the watermark never decreased
        marks = [w for _, w in seen]
        assert marks == sorted(marks), (client, seen)
        assert all(w <= task for task, w in seen), (client, seen)  # a kept task is above it


def test_retained_acknowledges_before_the_sync_and_the_watermark_covers_every_round(
    tmp_path: Path,
) -> None:
    """Without a crash: every upload is acknowledged as "retain", the watermark rises round
    after round, and the run is the one an "fsync" server gives."""
    with federation(tmp_path / "ref", **_cfg("fsync")) as fed:
        run_all(fed, timeout=120)
        ref = np.asarray(fed.final().params)
    with federation(tmp_path / "run", **_cfg()) as fed:
        server = start_server(fed)
        wait_listening(fed, server)
        cl = [start_client(fed, i, record_acks=True) for i in range(CLIENTS)]
        assert wait(server, 120) == 0, read_log(fed)
        for c in cl:
            assert wait(c, 60) == 0
        seen = read_retained(fed)
        assert np.array_equal(fed.final().params, ref)
        with _db(fed.state) as db:
            last = int(db.execute("SELECT max(seq) FROM events").fetchone()[0])
        assert (read_mark(fed.state) or (0, 0))[0] >= last  # everything synced by the end
    assert sum(len(v) for v in seen.values()) == ROUNDS * CLIENTS
    for client, acks in seen.items():
        marks = [w for _, w in acks]
        assert marks == sorted(marks) and marks[-1] > marks[0], (client, acks)
