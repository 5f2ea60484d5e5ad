"""The server's durable state: one SQLite database in WAL mode.

Tables:
    meta         key -> value (the federation's identity: spec, seed, config digest)
    events       the event log fed to the policy, in order (start, arrival, dropout, timer)
    uploads      accepted updates, unique by (client, job): the idempotency keys (a partial
                 aggregate from an edge has one row per job it covers, all with its seq)
    partials     what a partial aggregate holds besides its payload (weight sums, accumulator)
    checkpoints  policy-state snapshots and the last event each one includes
    rounds       one row per closed round (what the policy reported)

Only the engine thread writes. ``synchronous=FULL``: a committed transaction survives a
crash of the process or the machine.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from fedagg.deploy._faults import crash_point
from fedagg.errors import StateError

__all__ = ["EventRow", "LogItem", "PartialRows", "Store", "UploadRow"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, time REAL NOT NULL,
    client INTEGER, job INTEGER, tag INTEGER);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job, kind);
CREATE TABLE IF NOT EXISTS uploads (
    client INTEGER NOT NULL, job INTEGER NOT NULL, seq INTEGER NOT NULL, path TEXT NOT NULL,
    weight REAL NOT NULL, version INTEGER NOT NULL, metrics TEXT NOT NULL,
    nbytes INTEGER NOT NULL, sha256 BLOB NOT NULL, PRIMARY KEY (client, job));
CREATE TABLE IF NOT EXISTS partials (seq INTEGER PRIMARY KEY, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY, path TEXT NOT NULL, version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, version INTEGER NOT NULL, folded INTEGER NOT NULL,
    applied INTEGER NOT NULL, seq INTEGER NOT NULL, stats TEXT NOT NULL);
"""


@dataclass(frozen=True, slots=True)
class UploadRow:
    client: int
    job: int
    path: str
    weight: float
    version: int
    metrics: dict[str, float]
    nbytes: int
    sha256: bytes


@dataclass(frozen=True, slots=True)
class PartialRows:
    """What a partial aggregate logs: one upload row per job it covers (all pointing at its
    payload file) and its info (weight sums, accumulator, version)."""

    parts: tuple[UploadRow, ...]
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class EventRow:
    seq: int
    kind: str
    time: float
    client: int | None
    job: int | None
    tag: int | None
    upload: UploadRow | None
    #: a partial aggregate's jobs (one row each; ``upload`` is the first) and its info
    parts: tuple[UploadRow, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)


#: An event as the server hands it to the engine's ``log``:
#: ``(kind, time, client, job, tag, upload or partial aggregate)``.
LogItem = tuple[str, float, int | None, int | None, int | None, UploadRow | PartialRows | None]


#: what to do about a state database that cannot be read (in every such error's message)
RECOVERY_HINT = (
    "restore it (with its -wal file) from a backup, or move the state directory aside to "
    "start a new federation (its progress is then lost)"
)


class Store:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = os.fspath(path)
        try:
            # created 0600 (SQLite gives the -wal and -shm files the database file's mode)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise StateError(f"cannot open the state database {path}: {e}; {RECOVERY_HINT}") from e
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            self.db.execute("SELECT count(*) FROM meta").fetchone()
        except sqlite3.Error as e:
            self.db.close()
            raise StateError(
                f"the state database {path} is unreadable ({e}): {RECOVERY_HINT}"
            ) from e

    def close(self) -> None:
        self.db.close()

    # -- meta --------------------------------------------------------------------------------
    def meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, items: dict[str, str]) -> None:
        with self.tx():
            self.db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(items.items()))

    # -- transactions ------------------------------------------------------------------------
    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self) -> None:
            self.db.execute("BEGIN IMMEDIATE")

        def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
            self.db.execute("COMMIT" if et is None else "ROLLBACK")

    def tx(self) -> Store._Tx:
        return Store._Tx(self.db)

    # -- events ------------------------------------------------------------------------------
    def last_seq(self) -> int:
        row = self.db.execute("SELECT max(seq) FROM events").fetchone()
        return int(row[0]) if row[0] is not None else 0

    def has_upload(self, client: int, job: int) -> bool:
        q = "SELECT 1 FROM uploads WHERE client=? AND job=?"
        return self.db.execute(q, (client, job)).fetchone() is not None

    def log_batch(self, seq: int, events: Sequence[LogItem]) -> tuple[list[EventRow | None], int]:
        """Log events after ``seq`` in one transaction; returns their rows and the new last seq.
        An upload whose key is already logged (a retry) gives None and is not logged again (a
        partial aggregate: if any of its keys is)."""
        rows: list[EventRow | None] = []
        with self.tx():
            for kind, now, client, job, tag, upload in events:
                parts = upload.parts if isinstance(upload, PartialRows) else ()
                single = upload if isinstance(upload, UploadRow) else None
                keys = parts or ((single,) if single is not None else ())
                if any(self.has_upload(u.client, u.job) for u in keys):
                    rows.append(None)
                    continue
                if keys:  # an accepted upload, queued: its batch is not committed yet
                    crash_point("upload-queued")
                seq += 1
                info = upload.info if isinstance(upload, PartialRows) else None
                self.append(seq, kind, now, client, job, tag, single, parts, info)
                first = parts[0] if parts else single
                rows.append(EventRow(seq, kind, now, client, job, tag, first, parts, info or {}))
        return rows, seq

    def has_event(self, kind: str, job: int) -> bool:
        q = "SELECT 1 FROM events WHERE kind=? AND job=? LIMIT 1"
        return self.db.execute(q, (kind, job)).fetchone() is not None

    def append(
        self,
        seq: int,
        kind: str,
        time: float,
        client: int | None = None,
        job: int | None = None,
        tag: int | None = None,
        upload: UploadRow | None = None,
        parts: tuple[UploadRow, ...] = (),
        info: dict[str, Any] | None = None,
    ) -> None:
        """Log one event (inside a transaction); an arrival's upload row with it, or a
        partial aggregate's rows (one per job) and info."""
        self.db.execute(
            "INSERT INTO events VALUES (?, ?, ?, ?, ?, ?)", (seq, kind, time, client, job, tag)
        )
        rows = parts or ((upload,) if upload is not None else ())
        for u in rows:
            self.db.execute(
                "INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (u.client, u.job, seq, u.path, u.weight, u.version, json.dumps(u.metrics),
                 u.nbytes, u.sha256),
            )  # fmt: skip
        if info is not None:
            self.db.execute("INSERT INTO partials VALUES (?, ?)", (seq, json.dumps(info)))

    def events_after(self, seq: int) -> Iterator[EventRow]:
        q = (
            "SELECT e.seq, e.kind, e.time, e.client, e.job, e.tag, u.path, u.weight, u.version,"
            " u.metrics, u.nbytes, u.sha256 FROM events e"
            " LEFT JOIN uploads u ON u.seq = e.seq AND e.kind = 'arrival'"
            " WHERE e.seq > ? ORDER BY e.seq"
        )
        for r in self.db.execute(q, (seq,)).fetchall():
            up = None
            if r[1] == "arrival":
                up = UploadRow(r[3], r[4], r[6], r[7], r[8], json.loads(r[9]), r[10], r[11])
            if r[1] == "partial":
                yield self._partial(r)
                continue
            yield EventRow(r[0], r[1], r[2], r[3], r[4], r[5], up)

    def _partial(self, r: Any) -> EventRow:
        q = (
            "SELECT client, job, path, weight, version, metrics, nbytes, sha256 FROM uploads"
            " WHERE seq = ? ORDER BY job"
        )
        parts = tuple(
            UploadRow(int(c), int(j), p, w, v, json.loads(m), n, h)
            for c, j, p, w, v, m, n, h in self.db.execute(q, (r[0],)).fetchall()
        )
        got = self.db.execute("SELECT info FROM partials WHERE seq = ?", (r[0],)).fetchone()
        info = json.loads(got[0]) if got is not None else {}
        return EventRow(r[0], "partial", r[2], r[3], r[4], r[5], parts[0] if parts else None,
                        parts, info)  # fmt: skip

    def spooled_through(self, seq: int) -> list[str]:
        q = "SELECT DISTINCT path FROM uploads WHERE seq <= ? AND path != ''"
        return [str(r[0]) for r in self.db.execute(q, (seq,)).fetchall()]

    def forget_paths(self, seq: int) -> None:
        """Mark the spool files of uploads up to ``seq`` as deleted (their ids stay)."""
        with self.tx():
            self.db.execute("UPDATE uploads SET path='' WHERE seq <= ?", (seq,))

    # -- checkpoints and rounds --------------------------------------------------------------
    def add_checkpoint(self, seq: int, path: str, version: int) -> None:
        with self.tx():
            self.db.execute(
                "INSERT OR REPLACE INTO checkpoints VALUES (?, ?, ?)", (seq, path, version)
            )

    def checkpoints(self) -> list[tuple[int, str]]:
        q = "SELECT seq, path FROM checkpoints ORDER BY seq DESC"
        return [(int(a), str(b)) for a, b in self.db.execute(q).fetchall()]

    def drop_checkpoints_before(self, seq: int) -> None:
        with self.tx():
            self.db.execute("DELETE FROM checkpoints WHERE seq < ?", (seq,))

    def put_round(self, round_: int, version: int, folded: int, applied: bool, seq: int,
                  stats: dict[str, Any]) -> None:  # fmt: skip
        self.db.execute(
            "INSERT OR REPLACE INTO rounds VALUES (?, ?, ?, ?, ?, ?)",
            (round_, version, folded, int(applied), seq, json.dumps(stats)),
        )

    def rounds(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT stats FROM rounds ORDER BY round").fetchall()
        return [json.loads(r[0]) for r in rows]

    def accepted_keys(self) -> set[tuple[int, int]]:
        rows = self.db.execute("SELECT client, job FROM uploads").fetchall()
        return {(int(c), int(j)) for c, j in rows}

    def count_uploads(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM uploads").fetchone()[0])
