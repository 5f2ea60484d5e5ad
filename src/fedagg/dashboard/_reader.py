"""Reading a run database and a server's state directory without writing to either.

A connection per request, opened read-only so that nothing beside the file appears:

* no ``-wal`` file beside the database (no writer has it open): ``immutable=1`` (no locks,
  no ``-wal``, ``-shm`` or journal file is created);
* a ``-wal`` and a ``-shm`` file (a simulation or a server is writing): ``mode=ro``; both
  files are the writer's and stay its;
* a non-empty ``-wal`` without ``-shm`` (a writer killed mid-run): the database and its
  ``-wal`` are copied to a temporary directory elsewhere and the copy is read.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sqlite3
import tempfile
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedagg.errors import StateError
from fedagg.runs import ROUND_COLUMNS, TEXT_COLUMNS

__all__ = ["RunReader", "clean", "parse_refusals", "round_progress"]

_COLUMNS = ROUND_COLUMNS + TEXT_COLUMNS
_INT = frozenset(
    (
        "round",
        "version",
        "selected",
        "dispatched",
        "folded",
        "dropped",
        "refused",
        "late",
        "applied",
        "bytes_down",
        "bytes_up",
        "staleness_max",
    )
)


def clean(v: Any) -> Any:
    """``v`` with every non-finite float as None (JSON has no NaN)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Mapping):
        return {str(k): clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [clean(x) for x in v]
    return v


def _uri(path: Path, mode: str) -> str:
    return f"file:{urllib.parse.quote(str(path))}?{mode}"


@contextlib.contextmanager
def read_only(path: str | os.PathLike[str]) -> Iterator[sqlite3.Connection]:
    """``path`` opened so that nothing is written beside it (see the module docstring)."""
    db = Path(path).resolve()
    wal, shm = Path(f"{db}-wal"), Path(f"{db}-shm")
    tmp: tempfile.TemporaryDirectory[str] | None = None
    try:
        if wal.exists() and shm.exists():
            uri = _uri(db, "mode=ro")
        elif wal.exists() and wal.stat().st_size > 0:
            tmp = tempfile.TemporaryDirectory(prefix="fedagg-dashboard-")
            shutil.copyfile(db, Path(tmp.name) / "runs.db")
            shutil.copyfile(wal, Path(tmp.name) / "runs.db-wal")
            uri = _uri(Path(tmp.name) / "runs.db", "mode=ro")
        else:
            uri = _uri(db, "mode=ro&immutable=1")
        try:
            con = sqlite3.connect(uri, uri=True, check_same_thread=False)
        except sqlite3.Error as e:
            raise StateError(f"cannot read {db}: {e}") from e
        try:
            yield con
        finally:
            con.close()
    finally:
        if tmp is not None:
            tmp.cleanup()


def parse_refusals(text: str | None) -> dict[str, int]:
    """``"dtype float64, expected float32: 3; non-finite values: 1"`` as a dict."""
    out: dict[str, int] = {}
    for part in (text or "").split("; "):
        reason, sep, n = part.rpartition(": ")
        if sep and n.strip().isdigit():
            out[reason] = out.get(reason, 0) + int(n)
        elif part.strip():
            out[part.strip()] = out.get(part.strip(), 0) + 1
    return out


class RunReader:
    """The read side of a run database (:class:`fedagg.runs.RunDB`'s schema), read-only."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def exists(self) -> bool:
        return self.path.is_file() and self.path.stat().st_size > 0

    def check(self) -> None:
        """A StateError unless the file is absent or a run database."""
        if not self.exists():
            return
        try:
            with read_only(self.path) as con:
                tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master")}
        except sqlite3.DatabaseError as e:
            raise StateError(f"{self.path} is not a fedagg run database: {e}") from e
        if not {"runs", "rounds"} <= tables:
            raise StateError(
                f"{self.path} is not a fedagg run database (no runs and rounds tables; a "
                "deployment's state.db is not one: give it to --state)"
            )

    @contextlib.contextmanager
    def _con(self) -> Iterator[sqlite3.Connection]:
        try:
            with read_only(self.path) as con:
                yield con
        except sqlite3.DatabaseError as e:
            raise StateError(f"cannot read the run database {self.path}: {e}") from e

    def runs(self) -> list[dict[str, Any]]:
        """Every run: id, name, kind, status, seed, started, ended, rounds, final accuracy."""
        if not self.exists():
            return []
        with self._con() as con:
            counts = dict(con.execute("SELECT run_id, COUNT(*) FROM rounds GROUP BY run_id"))
            rows = con.execute(
                "SELECT id, name, kind, status, seed, started, ended, summary FROM runs ORDER BY id"
            ).fetchall()
            out = []
            for rid, name, kind, status, seed, started, ended, summary in rows:
                s = json.loads(summary or "{}")
                acc = s.get("final_accuracy") if isinstance(s, dict) else None
                if not isinstance(acc, (int, float)) or not math.isfinite(acc):
                    last = con.execute(
                        "SELECT test_accuracy FROM rounds WHERE run_id = ? AND test_accuracy "
                        "IS NOT NULL ORDER BY round DESC LIMIT 1",
                        (rid,),
                    ).fetchone()
                    acc = last[0] if last else None
                out.append(
                    {
                        "id": rid,
                        "name": name,
                        "kind": kind,
                        "status": status,
                        "seed": seed,
                        "started": started,
                        "ended": ended,
                        "rounds": int(counts.get(rid, 0)),
                        "final_accuracy": acc,
                    }
                )
        return clean(out)  # type: ignore[no-any-return]

    def run(self, run_id: int) -> dict[str, Any] | None:
        """A run's row (config and summary parsed), or None if there is none."""
        if not self.exists():
            return None
        with self._con() as con:
            r = con.execute(
                "SELECT id, name, kind, status, seed, started, ended, summary, config FROM runs "
                "WHERE id = ?",
                (run_id,),
            ).fetchone()
            if r is None:
                return None
            n = con.execute("SELECT COUNT(*) FROM rounds WHERE run_id = ?", (run_id,)).fetchone()
        keys = ("id", "name", "kind", "status", "seed", "started", "ended")
        out = dict(zip(keys, r[:7], strict=True))
        out["summary"] = json.loads(r[7] or "{}")
        out["config"] = json.loads(r[8] or "{}")
        out["rounds"] = int(n[0])
        return clean(out)  # type: ignore[no-any-return]

    def rounds(self, run_id: int, columns: tuple[str, ...] = _COLUMNS) -> dict[str, list[Any]]:
        """A run's rounds by column: ``{"round": [1, 2, ...], "test_accuracy": [...], ...}``."""
        cols = [c for c in columns if c in _COLUMNS]
        out: dict[str, list[Any]] = {c: [] for c in cols}
        if not self.exists():
            return out
        with self._con() as con:
            have = {r[1] for r in con.execute("PRAGMA table_info(rounds)")}
            cols = [c for c in cols if c in have]  # an older database lacks newer columns
            out = {c: [] for c in cols}
            rows = con.execute(
                f"SELECT {', '.join(cols)} FROM rounds WHERE run_id = ? ORDER BY round",
                (run_id,),
            ).fetchall()
        for i, c in enumerate(cols):
            if c in _INT:
                out[c] = [None if r[i] is None else int(r[i]) for r in rows]
            elif c in TEXT_COLUMNS:
                out[c] = [r[i] for r in rows]
            else:
                out[c] = [r[i] if r[i] is None or math.isfinite(r[i]) else None for r in rows]
        return out


def round_progress(state_dir: str | os.PathLike[str], running: bool) -> dict[str, Any]:
    """From a server's ``state.db``: uploads accepted since the last round closed, and the
    last 100 closed rounds' participation (read-only; {} if it cannot be read so)."""
    d = Path(state_dir)
    db, wal = d / "state.db", d / "state.db-wal"
    if running:
        uri = _uri(db.resolve(), "mode=ro")
    elif not wal.exists() or wal.stat().st_size == 0:
        uri = _uri(db.resolve(), "immutable=1")
    else:  # a killed server's tail: read_status has the totals; skip the details
        return {}
    try:
        con = sqlite3.connect(uri, uri=True)
        try:
            last = con.execute("SELECT max(seq) FROM rounds").fetchone()[0] or 0
            since = con.execute("SELECT COUNT(*) FROM uploads WHERE seq > ?", (last,))
            received = int(since.fetchone()[0])
            rows = con.execute("SELECT stats FROM rounds ORDER BY round DESC LIMIT 100")
            stats = [json.loads(r[0]) for r in rows.fetchall()][::-1]
        finally:
            con.close()
    except (sqlite3.Error, ValueError):
        return {}
    keys = ("round", "folded", "dropped", "refused", "late", "dispatched", "started", "ended")
    rounds = {k: [s.get(k) for s in stats] for k in keys}
    rounds["round"] = [r + 1 if isinstance(r, int) else r for r in rounds["round"]]
    return clean({"received": received, "rounds": rounds})  # type: ignore[no-any-return]
