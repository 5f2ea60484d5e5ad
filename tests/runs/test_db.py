"""The run database: migration of an older file, refusal of a file that is not one, kinds."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest

import fedagg
from fedagg.runs import ROUND_COLUMNS, RunDB

#: The schema of the run database before issue 16 (no run kind, no refusals column).
OLD_SCHEMA = f"""
CREATE TABLE runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, status TEXT NOT NULL,
    seed INTEGER NOT NULL, config TEXT NOT NULL, started REAL NOT NULL, ended REAL, summary TEXT
);
CREATE TABLE rounds (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    {", ".join(f"{c} REAL" for c in ROUND_COLUMNS)},
    PRIMARY KEY (run_id, round)
);
"""


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_old_run_database_is_migrated_and_keeps_its_runs(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.executescript(OLD_SCHEMA)
    con.execute(
        "INSERT INTO runs (name, status, seed, config, started, summary) "
        "VALUES ('old', 'finished', 1, '{\"rounds\": 2}', 0, '{\"rounds\": 1}')"
    )
    con.execute("INSERT INTO rounds (run_id, round, test_accuracy) VALUES (1, 1, 0.5)")
    con.commit()
    con.close()
    with RunDB(path) as db:
        (old,) = db.runs()
        assert (old.name, old.kind, old.status, old.config) == ("old", "simulate", "finished",
                                                                {"rounds": 2})  # fmt: skip
        (row,) = db.rounds(1)
        assert row["round"] == 1 and row["test_accuracy"] == 0.5 and row["refusals"] is None
        rid = db.start_run("new", 0, {}, kind="deploy")
        db.add_round(rid, {"round": 1, "refused": 3, "refusals": "shape: 3"})
        assert db.rounds(rid)[0]["refusals"] == "shape: 3"
        assert db.run(rid).kind == "deploy"
    con = sqlite3.connect(path)
    cols = {r[1]: r[2] for r in con.execute("PRAGMA table_info(rounds)")}
    kinds = {r[1] for r in con.execute("PRAGMA table_info(runs)")}
    con.close()
    assert cols["refusals"] == "TEXT" and all(cols[c] == "REAL" for c in ROUND_COLUMNS)
    assert "kind" in kinds


def test_a_deployment_state_database_is_refused_unchanged(tmp_path: Path) -> None:
    from fedagg.deploy._store import Store

    path = tmp_path / "state.db"
    store = Store(path)
    store.close()
    before = digest(path)
    listing = sorted(os.listdir(tmp_path))
    with pytest.raises(fedagg.StateError, match="not a fedagg run database"):
        RunDB(path)
    assert digest(path) == before
    assert sorted(os.listdir(tmp_path)) == listing  # no -wal, -shm or journal left either
    live = Store(path)  # a running server: its -wal and -shm files exist
    try:
        before = digest(path)
        with pytest.raises(fedagg.StateError, match="not a fedagg run database"):
            RunDB(path)
        assert digest(path) == before
    finally:
        live.close()


def test_other_databases_and_non_sqlite_files_are_refused_unchanged(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE rounds (x INTEGER)")  # a table of our name, but not ours
    con.commit()
    con.close()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite at all " * 300)
    for path in (other, junk):
        before = digest(path)
        with pytest.raises(fedagg.StateError, match="not a fedagg run database"):
            RunDB(path)
        assert digest(path) == before


def test_kinds_and_statuses_are_checked(tmp_path: Path) -> None:
    with RunDB(tmp_path / "r.db") as db:
        with pytest.raises(fedagg.StateError, match="kind"):
            db.start_run("x", 0, {}, kind="experiment")
        rid = db.start_run("x", 0, {})
        with pytest.raises(fedagg.StateError, match="status"):
            db.finish_run(rid, "done", {})
        db.finish_run(rid, "interrupted", {"rounds": 0})
        assert db.run(rid).status == "interrupted" and db.run(rid).kind == "simulate"
    empty = tmp_path / "empty.db"
    empty.touch()
    with RunDB(empty) as db:  # an empty file is a new database
        assert db.runs() == []
