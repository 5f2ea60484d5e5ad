"""The run database: an embedded SQLite file holding every run's config and per-round metrics.

One row per run (name, status, seed, config as JSON, start/end, summary) and one per closed
round (the columns of :meth:`RoundRecord.row`). WAL mode, one transaction per round, so a
crashed run keeps every round it finished and a reader never blocks the writer.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedagg.errors import StateError

__all__ = ["ROUND_COLUMNS", "RunDB", "RunInfo"]

ROUND_COLUMNS = (
    "round", "version", "virtual_time", "wall_time", "test_loss", "test_accuracy",
    "client_loss", "client_accuracy", "train_loss", "train_accuracy", "selected", "dispatched",
    "folded", "dropped", "refused", "late", "applied", "bytes_down", "bytes_up", "staleness_mean",
    "staleness_max",
)  # fmt: skip

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
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


def _clean(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else v


class RunDB:
    """Runs and their rounds in one SQLite file (created on first use)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(_SCHEMA)
            have = {r[1] for r in self._db.execute("PRAGMA table_info(rounds)")}
            with self._db:  # a database from an older fedagg: add the new columns
                for c in ROUND_COLUMNS:
                    if c not in have:
                        self._db.execute(f"ALTER TABLE rounds ADD COLUMN {c} REAL")
        except sqlite3.DatabaseError as e:
            raise StateError(f"{self.path} is not a fedagg run database: {e}") from e

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RunDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start_run(self, name: str, seed: int, config: Mapping[str, Any]) -> int:
        with self._db:
            cur = self._db.execute(
                "INSERT INTO runs (name, status, seed, config, started) VALUES (?, ?, ?, ?, ?)",
                (name, "running", seed, json.dumps(config, default=str), time.time()),
            )
        assert cur.lastrowid is not None
        return int(cur.lastrowid)

    def add_round(self, run_id: int, row: Mapping[str, Any]) -> None:
        cols = ", ".join(ROUND_COLUMNS)
        marks = ", ".join("?" for _ in ROUND_COLUMNS)
        with self._db:
            self._db.execute(
                f"INSERT OR REPLACE INTO rounds (run_id, {cols}) VALUES (?, {marks})",
                (run_id, *(_clean(row.get(c)) for c in ROUND_COLUMNS)),
            )

    def finish_run(self, run_id: int, status: str, summary: Mapping[str, Any]) -> None:
        with self._db:
            self._db.execute(
                "UPDATE runs SET status = ?, ended = ?, summary = ? WHERE id = ?",
                (status, time.time(), json.dumps(summary, default=str), run_id),
            )

    def runs(self) -> list[RunInfo]:
        rows = self._db.execute(
            "SELECT id, name, status, seed, started, ended, summary, config FROM runs ORDER BY id"
        ).fetchall()
        return [
            RunInfo(r[0], r[1], r[2], r[3], r[4], r[5], json.loads(r[6] or "{}"), json.loads(r[7]))
            for r in rows
        ]

    def run(self, run_id: int) -> RunInfo:
        for r in self.runs():
            if r.id == run_id:
                return r
        raise StateError(f"no run {run_id} in {self.path}")

    def rounds(self, run_id: int) -> list[dict[str, Any]]:
        cur = self._db.execute(
            f"SELECT {', '.join(ROUND_COLUMNS)} FROM rounds WHERE run_id = ? ORDER BY round",
            (run_id,),
        )
        return [dict(zip(ROUND_COLUMNS, r, strict=True)) for r in cur.fetchall()]

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
                    "status": info.status,
                    "rounds": len(rows),
                    "final_accuracy": last.get("test_accuracy"),
                    "best_accuracy": best,
                    "final_loss": last.get("test_loss"),
                    "virtual_time": last.get("virtual_time"),
                    "wall_time": last.get("wall_time"),
                }
            )
        return out
