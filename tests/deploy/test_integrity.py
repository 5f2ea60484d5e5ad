"""Spooled updates are re-verified when read back (issue 14, finding 8).

A server is SIGKILLed with updates spooled and logged but not yet folded; a spool file is
then altered (a finite value changed), truncated, or given a NaN. The restarted server must
refuse to go on, exit 3 (a StateError, like any unusable state directory) with the file named
and a recovery path, without a traceback and without folding anything; restoring the file
lets it start again.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedagg.deploy._commit import write_mark
from tests.deploy.harness import (
    Fed,
    federation,
    kill,
    read_log,
    start_client,
    start_server,
    wait,
    wait_listening,
)

CLIENTS = 3


def _spooled(state: Path) -> list[str]:
    with sqlite3.connect(state / "state.db") as db:
        return [r[0] for r in db.execute("SELECT path FROM uploads ORDER BY seq")]


def _rounds(state: Path) -> int:
    with sqlite3.connect(state / "state.db") as db:
        return int(db.execute("SELECT count(*) FROM rounds").fetchone()[0])


def _alter(data: bytes) -> bytes:
    a = np.frombuffer(data, np.float32).copy()
    a[len(a) // 2] += 0.25  # still finite: only a checksum can tell
    return a.tobytes()


def _nan(data: bytes) -> bytes:
    a = np.frombuffer(data, np.float32).copy()
    a[0] = np.nan
    return a.tobytes()


CORRUPTIONS = {"altered": _alter, "truncated": lambda d: d[: len(d) // 2], "nan": _nan}


@pytest.mark.parametrize(
    ("order", "digest", "durability"),
    [("canonical", True, "fsync"), ("arrival", True, "fsync"), ("arrival", False, "fsync"),
     ("canonical", True, "retained")],
)  # fmt: skip
def test_a_corrupted_spool_file_is_refused_at_restart(
    tmp_path: Path, order: str, digest: bool, durability: str
) -> None:
    """With or without signed digests: each spool file's at-rest checksum (xxh3-128, computed
    as it was received) is logged with it and checked when it is read back. Under "retained",
    once the committer has synced them (its mark covers them; one not yet synced is what a
    power loss leaves, and is cut from the log instead: see test_durable.py)."""
    cfg: dict[str, Any] = {
        "clients": CLIENTS,
        "rounds": 2,
        "deploy": {
            "order": order,
            "client_timeout": 60.0,
            "digest": digest,
            "durability": durability,
        },
    }
    with federation(tmp_path, **cfg) as fed:
        # killed about to fold the round's last arrival: every upload of round 1 is spooled
        # and logged, none covered by a checkpoint (the restart replays them all)
        server = start_server(fed, env={"FEDAGG_CRASH_AT": f"fold:{CLIENTS}"})
        wait_listening(fed, server)
        clients = [start_client(fed, i) for i in range(CLIENTS)]
        assert wait(server, 120) == -9, read_log(fed)
        for c in clients:
            kill(c)
        paths = _spooled(fed.state)
        assert len(paths) == CLIENTS, paths
        assert _rounds(fed.state) == 0
        if durability == "retained":  # the committer had synced them all before the kill
            with sqlite3.connect(fed.state / "state.db") as db:
                write_mark(fed.state, int(db.execute("SELECT max(seq) FROM events").fetchone()[0]))
        target = Path(paths[1])
        original = target.read_bytes()
        for name, corrupt in CORRUPTIONS.items():
            target.write_bytes(corrupt(original))
            log = f"server-{name}.log"
            p = start_server(fed, log=log)
            rc = wait(p, 60)
            out = read_log(fed, log)
            assert rc == 3, (name, rc, out)
            assert str(target) in out and "corrupted" in out, (name, out)
            assert "backup" in out, (name, out)  # a way out
            assert "Traceback" not in out, (name, out)
            assert _rounds(fed.state) == 0, name  # nothing folded into a closed round
            assert not (fed.state / "final.npz").exists()
        if durability == "retained":
            _unsynced_is_cut(fed, paths, target)
            return
        # the file restored (from a backup): the server starts again
        target.write_bytes(original)
        p = start_server(fed, log="server-restored.log")
        wait_listening(fed, p, log="server-restored.log")
        kill(p)
        assert p.returncode is not None and p.returncode != 3


def _unsynced_is_cut(fed: Fed, paths: list[str], target: Path) -> None:
    """Under "retained", the same bad file after the mark (not yet synced) is what a power
    loss leaves: the log is cut there (and its chain's head reset), the server starts."""
    with sqlite3.connect(fed.state / "state.db") as db:
        seq = db.execute("SELECT seq FROM uploads WHERE path = ?", (str(target),)).fetchone()[0]
    write_mark(fed.state, 0)  # nothing synced
    p = start_server(fed, log="server-cut.log")
    wait_listening(fed, p, log="server-cut.log")
    kill(p)
    out = read_log(fed, "server-cut.log")
    assert f"from seq {seq} on" in out and "cut from the log" in out, out
    with sqlite3.connect(fed.state / "state.db") as db:
        head = db.execute("SELECT value FROM meta WHERE key='chain_head'").fetchone()[0]
    assert _spooled(fed.state) == paths[:1]  # the first update stays, the rest is cut
    assert head.startswith(f"{seq - 1}:")
    assert not target.exists() and not Path(paths[2]).exists()
