"""The run database: an embedded SQLite file holding every run's config and per-round metrics.

One row per run (name, kind, status, seed, config as JSON, start/end, summary) and one per
closed round (the columns of :meth:`RoundRecord.row`: the numbers of :data:`ROUND_COLUMNS`
and the text of :data:`TEXT_COLUMNS`). WAL mode, one transaction per round, so a crashed run
keeps every round it finished and a reader never blocks the writer. ``epsilon`` is the run's
differential-privacy epsilon after the round (:class:`fedagg.policy.PrivatePolicy`; NULL
without DP).

Recording a run (the simulator does it in :func:`fedagg.sim.run_config`; a deployment's
server does the same with ``kind="deploy"``)::

    with RunDB("runs/fedagg.db") as db:
        run_id = db.start_run("mnist-fedbuff", seed=0, config=cfg, kind="deploy")
        for row in rounds:                  # a dict per closed round: ROUND_COLUMNS keys,
            db.add_round(run_id, row)       # plus "refusals" ("reason: n; ..."); missing: NULL
        db.finish_run(run_id, "finished", {"rounds": n, "final_accuracy": acc})

``kind`` is ``"simulate"`` (the default) or ``"deploy"``; ``status`` is ``"running"``, then
``"finished"``, ``"failed"`` or ``"interrupted"`` (Ctrl-C or SIGTERM: the rounds stored so far
are kept and the summary says how many).

A database is created on first use and an older one gains the newer columns (``ALTER
TABLE``). A file that is not a run database (another SQLite database, e.g. a deployment's
``state.db``, or not SQLite at all) is refused with :class:`~fedagg.errors.StateError`
before anything is written to it.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedagg.errors import StateError

__all__ = ["KINDS", "ROUND_COLUMNS", "STATUSES", "TEXT_COLUMNS", "RunDB", "RunInfo", "jsonable"]

ROUND_COLUMNS = (
    "round", "version", "virtual_time", "wall_time", "test_loss", "test_accuracy",
    "client_loss", "client_accuracy", "train_loss", "train_accuracy", "selected", "dispatched",
    "folded", "dropped", "refused", "late", "applied", "bytes_down", "bytes_up", "staleness_mean",
    "staleness_max", "epsilon",
)  # fmt: skip
#: The rounds' text columns: why updates were refused ("dtype float64, expected float32: 3").
TEXT_COLUMNS = ("refusals",)
_ALL_COLUMNS = ROUND_COLUMNS + TEXT_COLUMNS
#: Round columns that hold counts (stored as REAL, read back as int).
_INT_COLUMNS = frozenset(
    ("round", "version", "selected", "dispatched", "folded", "dropped", "refused", "late",
     "applied", "bytes_down", "bytes_up", "staleness_max")
)  # fmt: skip
KINDS = ("simulate", "deploy")
STATUSES = ("running", "finished", "failed", "interrupted")
#: The tables of a run database, and the columns any version of it has.
_TABLES = {
    "runs": {"id", "name", "status", "seed", "config", "started"},
    "rounds": {"run_id", "round"},
}

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    kind TEXT NOT NULL DEFAULT 'simulate',
    status TEXT NOT NULL,
    seed INTEGER NOT NULL,
    config TEXT NOT NULL,
    started REAL NOT NULL,
    ended REAL,
    summary TEXT
);
CREATE TABLE IF NOT EXISTS rounds (
    run_id INTEGER NOT NULL REFERENCES runs(id),
    {", ".join(f"{c} REAL" for c in ROUND_COLUMNS)},
    {", ".join(f"{c} TEXT" for c in TEXT_COLUMNS)},
    PRIMARY KEY (run_id, round)
);
"""


@dataclass(frozen=True, slots=True)
class RunInfo:
    id: int
    name: str
    status: str
    seed: int
    started: float
    ended: float | None
    summary: dict[str, Any]
    config: dict[str, Any]
    kind: str = "simulate"


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


def _check_run_db(path: str) -> None:
    """Raise :class:`StateError` unless ``path`` is absent, empty, or a run database (of any
    fedagg version): read-only, so a file that is not one is left exactly as it was."""
    if not os.path.exists(path) or (
        os.path.getsize(path) == 0 and not os.path.exists(path + "-wal")
    ):
        return
    try:
        # read-only; and with no -wal file beside it, immutable too: SQLite then creates no
        # -wal or -shm file (a WAL-mode file, such as a server's state.db, would get both)
        wal = os.path.exists(path + "-wal")
        uri = Path(path).resolve().as_uri() + ("?mode=ro" if wal else "?mode=ro&immutable=1")
        con = sqlite3.connect(uri, uri=True)
        try:
            tables = {
                r[0]
                for r in con.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND name NOT LIKE 'sqlite_%'"
                )
            }
            columns = {t: {r[1] for r in con.execute(f"PRAGMA table_info({t})")} for t in tables
                       if t in _TABLES}  # fmt: skip
        finally:
            con.close()
    except sqlite3.DatabaseError as e:
        raise StateError(f"{path} is not a fedagg run database: {e}") from e
    other = sorted(tables - set(_TABLES))
    if other:
        raise StateError(
            f"{path} is not a fedagg run database (it has tables {', '.join(other[:5])}; "
            "a deployment's state.db is not one: runs are recorded in [output] db)"
        )
    for t, cols in columns.items():
        if not _TABLES[t] <= cols:
            missing = ", ".join(sorted(_TABLES[t] - cols))
            raise StateError(f"{path} is not a fedagg run database: table {t} lacks {missing}")


class RunDB:
    """Runs and their rounds in one SQLite file (created on first use; a file that is not a
    run database is refused with :class:`StateError`, unchanged)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        _check_run_db(self.path)
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as e:
            raise StateError(f"{self.path} is not a fedagg run database: {e}") from e

    def _migrate(self) -> None:
        """A database from an older fedagg: add the newer columns."""
        rounds = {r[1] for r in self._db.execute("PRAGMA table_info(rounds)")}
        runs = {r[1] for r in self._db.execute("PRAGMA table_info(runs)")}
        with self._db:
            for c in ROUND_COLUMNS:
                if c not in rounds:
                    self._db.execute(f"ALTER TABLE rounds ADD COLUMN {c} REAL")
            for c in TEXT_COLUMNS:
                if c not in rounds:
                    self._db.execute(f"ALTER TABLE rounds ADD COLUMN {c} TEXT")
            if "kind" not in runs:
                self._db.execute(
                    "ALTER TABLE runs ADD COLUMN kind TEXT NOT NULL DEFAULT 'simulate'"
                )

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RunDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_run(
        self, name: str, seed: int, config: Mapping[str, Any], *, kind: str = "simulate"
    ) -> int:
        """A new run, ``"running"``; ``kind`` is ``"simulate"`` or ``"deploy"``."""
        if kind not in KINDS:
            raise StateError(f"run kind must be one of {', '.join(KINDS)}, not {kind!r}")
        with self._db:
            cur = self._db.execute(
                "INSERT INTO runs (name, kind, status, seed, config, started) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (name, kind, "running", seed, json.dumps(config, default=str), time.time()),
            )
        assert cur.lastrowid is not None
        return int(cur.lastrowid)

    def add_round(self, run_id: int, row: Mapping[str, Any]) -> None:
        """Store one closed round (a :meth:`RoundRecord.row` dict; missing keys are NULL)."""
        cols = ", ".join(_ALL_COLUMNS)
        marks = ", ".join("?" for _ in _ALL_COLUMNS)
        values = [_clean(row.get(c)) for c in ROUND_COLUMNS]
        values += [None if row.get(c) is None else str(row[c]) for c in TEXT_COLUMNS]
        with self._db:
            self._db.execute(
                f"INSERT OR REPLACE INTO rounds (run_id, {cols}) VALUES (?, {marks})",
                (run_id, *values),
            )

    def resume_run(self, run_id: int) -> None:
        """A stopped run continues (a restarted server): ``"running"`` again, not ended."""
        with self._db:
            cur = self._db.execute(
                "UPDATE runs SET status = 'running', ended = NULL WHERE id = ?", (run_id,)
            )
        if cur.rowcount != 1:
            raise StateError(f"no run {run_id}")

    def finish_run(self, run_id: int, status: str, summary: Mapping[str, Any]) -> None:
        """Close a run: ``status`` is ``"finished"``, ``"failed"`` or ``"interrupted"``."""
        if status not in STATUSES:
            raise StateError(f"run status must be one of {', '.join(STATUSES)}, not {status!r}")
        with self._db:
            self._db.execute(
                "UPDATE runs SET status = ?, ended = ?, summary = ? WHERE id = ?",
                (status, time.time(), json.dumps(summary, default=str), run_id),
            )

    def runs(self) -> list[RunInfo]:
        rows = self._db.execute(
            "SELECT id, name, status, seed, started, ended, summary, config, kind FROM runs "
            "ORDER BY id"
        ).fetchall()
        return [
            RunInfo(
                r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6] or "{}"), json.loads(r[7]),
                r[8],
            )
            for r in rows
        ]  # fmt: skip

    def run(self, run_id: int) -> RunInfo:
        for r in self.runs():
            if r.id == run_id:
                return r
        raise StateError(f"no run {run_id} in {self.path}")

    def rounds(self, run_id: int) -> list[dict[str, Any]]:
        """The run's rounds in order: a dict per round of every column (NULL -> None)."""
        cur = self._db.execute(
            f"SELECT {', '.join(_ALL_COLUMNS)} FROM rounds WHERE run_id = ? ORDER BY round",
            (run_id,),
        )
        return [
            {c: int(v) if c in _INT_COLUMNS and isinstance(v, float) and v.is_integer() else v
             for c, v in zip(_ALL_COLUMNS, r, strict=True)}
            for r in cur.fetchall()
        ]  # fmt: skip

    def final_epsilon(self, run_id: int) -> float | None:
        """The run's epsilon after its last stored round (None: no DP, or no round)."""
        row = self._db.execute(
            "SELECT epsilon FROM rounds WHERE run_id = ? ORDER BY round DESC LIMIT 1", (run_id,)
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def round_count(self, run_id: int) -> int:
        """How many rounds of the run are stored."""
        row = self._db.execute("SELECT COUNT(*) FROM rounds WHERE run_id = ?", (run_id,)).fetchone()
        return int(row[0])

    def compare(self, run_ids: Sequence[int]) -> list[dict[str, Any]]:
        """Final metrics of several runs side by side (one dict per run)."""
        out = []
        for rid in run_ids:
            info = self.run(rid)
            rows = self.rounds(rid)
            last = rows[-1] if rows else {}
            best = max((r["test_accuracy"] or 0.0 for r in rows), default=math.nan)
            out.append(
                {
                    "id": rid,
                    "name": info.name,
                    "kind": info.kind,
                    "status": info.status,
                    "rounds": len(rows),
                    "final_accuracy": last.get("test_accuracy"),
                    "best_accuracy": best,
                    "final_loss": last.get("test_loss"),
                    "virtual_time": last.get("virtual_time"),
                    "wall_time": last.get("wall_time"),
                    "epsilon": last.get("epsilon"),
                }
            )
        return out


def jsonable(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """A resolved config as the run database stores it (non-finite floats as strings)."""

    def fix(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, Mapping):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [fix(x) for x in v]
        return v

    return {k: fix(v) for k, v in cfg.items()}
