"""The event log at rest: hash-chained, and never silently replaced (issue 14, finding 9).

A server is SIGKILLed with a round's updates acknowledged and logged but not yet folded. Then:

* an upload's weight is edited to 1e12 directly in ``state.db``: the restarted server must
  exit 3 (a StateError) naming the broken seq and a recovery path, without a traceback and
  without folding anything; the database restored from a backup, it resumes and finishes;
* ``state.db`` is deleted (the spool and a checkpoint still there): the restarted server must
  exit 3 and not start a new federation over the acknowledged updates.
"""

from __future__ import annotations

import shutil
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

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
CFG: dict[str, Any] = {"clients": CLIENTS, "rounds": 2, "tls": False,
                       "deploy": {"client_timeout": 60.0}}  # fmt: skip


def _crash_with_a_round_logged(fed: Fed) -> None:
    """Killed about to fold the round's last arrival: every upload of round 1 is spooled,
    acknowledged and logged; none is covered by a checkpoint."""
    server = start_server(fed, env={"FEDAGG_CRASH_AT": f"fold:{CLIENTS}"})
    wait_listening(fed, server)
    clients = [start_client(fed, i) for i in range(CLIENTS)]
    assert wait(server, 60) == -9, read_log(fed)
    for c in clients:
        kill(c)
    with closing(sqlite3.connect(fed.state / "state.db")) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # state.db alone holds it all now
        assert db.execute("SELECT count(*) FROM uploads").fetchone()[0] == CLIENTS
        assert db.execute("SELECT count(*) FROM rounds").fetchone()[0] == 0


def _rounds(state: Path) -> int:
    with closing(sqlite3.connect(state / "state.db")) as db:
        return int(db.execute("SELECT count(*) FROM rounds").fetchone()[0])


def _refused(fed: Fed, log: str) -> str:
    p = start_server(fed, log=log)
    rc = wait(p, 30)
    out = read_log(fed, log)
    assert rc == 3, (rc, out)
    assert "Traceback" not in out and "listening" not in out, out
    assert "backup" in out and "move the state directory aside" in out, out  # a way out
    assert not (fed.state / "final.npz").exists()
    return out


def _finish(fed: Fed, log: str) -> None:
    p = start_server(fed, log=log)
    wait_listening(fed, p, log=log)
    clients = [start_client(fed, i) for i in range(CLIENTS)]
    assert wait(p, 60) == 0, read_log(fed, log)
    for c in clients:
        wait(c, 30)
    assert (fed.state / "final.npz").exists()
    assert _rounds(fed.state) == 2


def test_an_edited_weight_is_refused_and_a_restored_log_resumes(tmp_path: Path) -> None:
    with federation(tmp_path, **CFG) as fed:
        _crash_with_a_round_logged(fed)
        db = fed.state / "state.db"
        backup = tmp_path / "backup.db"
        shutil.copyfile(db, backup)
        with closing(sqlite3.connect(db)) as con, con:
            seq = con.execute("SELECT min(seq) FROM uploads").fetchone()[0]
            con.execute("UPDATE uploads SET weight=1e12 WHERE seq=?", (seq,))
        out = _refused(fed, "server-edited.log")
        assert f"the event log in {db} is broken at seq {seq} " in out, out
        assert _rounds(fed.state) == 0  # nothing folded into a closed round
        # restored from the backup: it replays the round, closes it, and finishes
        for side in ("state.db-wal", "state.db-shm"):
            (fed.state / side).unlink(missing_ok=True)
        shutil.copyfile(backup, db)
        _finish(fed, "server-restored.log")


def test_a_deleted_state_db_does_not_start_a_new_federation(tmp_path: Path) -> None:
    with federation(tmp_path, **CFG) as fed:
        _crash_with_a_round_logged(fed)
        assert list((fed.state / "spool").glob("*.upd"))
        db = fed.state / "state.db"
        kept = tmp_path / "kept.db"
        db.replace(kept)
        for side in ("state.db-wal", "state.db-shm"):
            (fed.state / side).unlink(missing_ok=True)
        for wal in ("gone", "stale"):
            if wal == "stale":  # a -wal file left without its database (not empty: not "lost")
                (fed.state / "state.db-wal").write_bytes(b"\x37\x7f\x06\x82" + b"\0" * 60)
            before = sorted(p.name for p in fed.state.rglob("*"))
            out = _refused(fed, f"server-lost-{wal}.log")
            assert str(db) in out and "missing" in out, (wal, out)
            after = sorted(p.name for p in fed.state.rglob("*"))
            assert after == before, wal  # nothing started afresh
        # the database put back: the federation goes on where it was
        (fed.state / "state.db-wal").unlink()
        shutil.copyfile(kept, db)
        p = start_server(fed, log="server-back.log")
        wait_listening(fed, p, log="server-back.log")
        kill(p)
