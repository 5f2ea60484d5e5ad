"""The server's durable state: one SQLite database in WAL mode.

Tables:
    meta         key -> value (the federation's identity: spec, seed, config digest; the
                 chain's head; ``durability``, the mode of the last start; ``cuts``, every
                 cut of the log's tail at a recovery, see :meth:`Store.truncate`)
    events       the event log fed to the policy, in order (start, arrival, dropout, timer,
                 partial, secure: a client's reply to a secure aggregation stage)
    uploads      accepted updates, unique by (client, job): the idempotency keys (a partial
                 aggregate from an edge has one row per job it covers, all with its seq)
    partials     what a partial aggregate holds besides its payload (weight sums, accumulator);
                 a secure reply's round, stage and message (a :class:`Note`)
    checkpoints  policy-state snapshots and the last event each one includes
    rounds       one row per closed round (what the policy reported)

Only the engine thread writes. ``synchronous=FULL``: a committed transaction survives a
crash of the process or the machine.

The event log is hash-chained: each event's ``chain`` is ``sha256(previous chain || its
canonical encoding)`` (seq, kind, time, client, job, tag, every upload row field, a partial's
info); ``meta.chain_head`` holds the last one, and each checkpoint record the sha256 of its
file, bound to the chain at its seq. :meth:`Store.verify` walks the whole log at startup: an
edited, deleted or reordered row is a :class:`StateError` naming the first bad seq; recovery:
restore ``state.db`` (with its -wal file) from a backup, or move the state directory aside to
start a new federation. A log from before the chain is chained once, as it is, with a warning.
A missing or table-less ``state.db`` next to checkpoints or spooled updates is refused too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time as _time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import xxhash

from fedagg.deploy._faults import crash_point
from fedagg.deploy._rows import EventRow, LogItem, Note, PartialRows, UploadRow
from fedagg.errors import StateError

__all__ = [
    "EventRow", "LogItem", "Note", "PartialRows", "Store", "UploadRow", "checksum", "new_checksum",
]  # fmt: skip

log = logging.getLogger("fedagg.server")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, time REAL NOT NULL,
    client INTEGER, job INTEGER, tag INTEGER, chain BLOB);
CREATE INDEX IF NOT EXISTS events_by_job ON events (job, kind);
CREATE TABLE IF NOT EXISTS uploads (
    client INTEGER NOT NULL, job INTEGER NOT NULL, seq INTEGER NOT NULL, path TEXT NOT NULL,
    weight REAL NOT NULL, version INTEGER NOT NULL, metrics TEXT NOT NULL,
    nbytes INTEGER NOT NULL, sha256 BLOB NOT NULL, checksum BLOB, PRIMARY KEY (client, job));
CREATE TABLE IF NOT EXISTS partials (seq INTEGER PRIMARY KEY, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (
    seq INTEGER PRIMARY KEY, path TEXT NOT NULL, version INTEGER NOT NULL,
    sha256 BLOB, chain BLOB);
CREATE TABLE IF NOT EXISTS rounds (
    round INTEGER PRIMARY KEY, version INTEGER NOT NULL, folded INTEGER NOT NULL,
    applied INTEGER NOT NULL, seq INTEGER NOT NULL, stats TEXT NOT NULL);
"""


#: what to do about a state database that cannot be read (in every such error's message)
RECOVERY_HINT = (
    "restore it (with its -wal file) from a backup, or move the state directory aside to "
    "start a new federation (its progress is then lost)"
)


#: the tables every state database has (``partials`` and ``rounds`` may postdate it)
_CORE = frozenset({"meta", "events", "uploads", "checkpoints"})
#: the chain value before the first event
GENESIS = hashlib.sha256(b"fedagg event log v1").digest()


class Store:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        path = os.fspath(path)
        self.path = path
        existed = os.path.lexists(path)
        if not existed:  # before anything creates it: a lost database is not a new one
            _refuse_over_leftovers(path, "is missing")
        try:
            # created 0600 (SQLite gives the -wal and -shm files the database file's mode)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
            self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as e:
            raise StateError(f"cannot open the state database {path}: {e}; {RECOVERY_HINT}") from e
        try:
            q = "SELECT name FROM sqlite_master WHERE type='table'"  # (writes nothing)
            tables = {str(r[0]) for r in self.db.execute(q).fetchall()}
            if not tables and existed:
                _refuse_over_leftovers(path, "holds no tables")
            elif tables and not tables >= _CORE:
                missing = ", ".join(sorted(_CORE - tables))
                raise StateError(
                    f"the state database {path} has lost tables ({missing}): {RECOVERY_HINT}"
                )
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(_SCHEMA)
            self.db.execute("SELECT count(*) FROM meta").fetchone()
            self._upgrade()
        except StateError:
            self.db.close()
            raise
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
        def __init__(self, db: sqlite3.Connection, durable: bool) -> None:
            self.db, self.durable = db, durable

        def __enter__(self) -> None:
            if not self.durable:
                self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("BEGIN IMMEDIATE")

        def __exit__(self, et: Any, ev: Any, tb: Any) -> None:
            try:
                self.db.execute("COMMIT" if et is None else "ROLLBACK")
            finally:
                if not self.durable:
                    self.db.execute("PRAGMA synchronous=FULL")

    def tx(self, durable: bool = True) -> Store._Tx:
        """A transaction; committed with an fsync of the log unless ``durable`` is False:
        then it is on disk once the OS writes it back, or at the next durable commit (the
        write-ahead log is sequential), which is enough for bookkeeping whose loss on a power
        failure is harmless (it is redone)."""
        return Store._Tx(self.db, durable)

    # -- events ------------------------------------------------------------------------------
    def last_seq(self) -> int:
        row = self.db.execute("SELECT max(seq) FROM events").fetchone()
        return int(row[0]) if row[0] is not None else 0

    def has_upload(self, client: int, job: int) -> bool:
        q = "SELECT 1 FROM uploads WHERE client=? AND job=?"
        return self.db.execute(q, (client, job)).fetchone() is not None

    def log_batch(
        self, seq: int, events: Sequence[LogItem],
        also: Sequence[tuple[str, Sequence[tuple[Any, ...]]]] = (),
    ) -> tuple[list[EventRow | None], int]:  # fmt: skip
        """Log events after ``seq`` in one transaction; returns their rows and the new last seq.
        An upload whose key is already logged (a retry) gives None and is not logged again (a
        partial aggregate: if any of its keys is). ``also``: ``(sql, rows)`` statements run in
        the same transaction (an edge's side tables, kept in step with its log)."""
        rows: list[EventRow | None] = []
        prev: bytes | None = None  # the chain so far (read once, when an event is logged)
        with self.tx():
            for sql, params in also:
                self.db.executemany(sql, params)
            for kind, now, client, job, tag, upload in events:
                parts = upload.parts if isinstance(upload, PartialRows) else ()
                single = upload if isinstance(upload, UploadRow) else None
                keys = parts or ((single,) if single is not None else ())
                if any(self.has_upload(u.client, u.job) for u in keys):
                    rows.append(None)
                    continue
                if keys:  # an accepted upload, queued: its batch is not committed yet
                    crash_point("upload-queued")
                if prev is None:
                    prev = self._chain_at(seq)
                seq += 1
                info = upload.info if isinstance(upload, PartialRows | Note) else None
                prev = self.append(seq, kind, now, client, job, tag, single, parts, info, prev=prev)
                first = parts[0] if parts else single
                rows.append(EventRow(seq, kind, now, client, job, tag, first, parts, info or {}))
            if prev is not None:  # the head, in the same transaction: a cut tail shows
                self._set_head(seq, prev)
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
        *,
        prev: bytes | None = None,
    ) -> bytes:
        """Log one event (inside a transaction); an arrival's upload row with it, or a
        partial aggregate's rows (one per job) and info. ``prev`` is the chain of the event
        before (read from the log if not given); returns this event's (the caller updates the
        head, :meth:`_set_head`)."""
        rows = parts or ((upload,) if upload is not None else ())
        ups = [
            (u.client, u.job, u.path, u.weight, u.version, json.dumps(u.metrics), u.nbytes,
             u.sha256, u.checksum or None)
            for u in rows
        ]  # fmt: skip
        text = None if info is None else json.dumps(info)
        if prev is None:
            prev = self._chain_at(seq - 1)
        chain = _link(prev, _encode(seq, kind, time, client, job, tag, ups, text))
        self.db.execute(
            "INSERT INTO events (seq, kind, time, client, job, tag, chain)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (seq, kind, time, client, job, tag, chain),
        )
        for c, j, path, w, v, m, n, h, x in ups:
            self.db.execute(
                "INSERT INTO uploads (client, job, seq, path, weight, version, metrics, nbytes,"
                " sha256, checksum) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (c, j, seq, path, w, v, m, n, h, x),
            )
        if text is not None:
            self.db.execute("INSERT INTO partials VALUES (?, ?)", (seq, text))
        return chain

    def events_after(self, seq: int) -> Iterator[EventRow]:
        """The events after ``seq``, in order (a forgotten spool path reads as ``''``)."""
        q = (
            "SELECT e.seq, e.kind, e.time, e.client, e.job, e.tag,"
            " CASE WHEN e.seq <= ? THEN '' ELSE u.path END, u.weight, u.version,"
            " u.metrics, u.nbytes, u.sha256, u.checksum FROM events e"
            " LEFT JOIN uploads u ON u.seq = e.seq AND e.kind = 'arrival'"
            " WHERE e.seq > ? ORDER BY e.seq"
        )
        for r in self.db.execute(q, (self._forgotten(), seq)).fetchall():
            up = None
            if r[1] == "arrival":
                up = UploadRow(r[3], r[4], r[6], r[7], r[8], json.loads(r[9]), r[10], r[11],
                               r[12] or b"")  # fmt: skip
            if r[1] == "partial":
                yield self._partial(r)
                continue
            if r[1] == "secure":
                got = self.db.execute("SELECT info FROM partials WHERE seq = ?", (r[0],)).fetchone()
                info = json.loads(got[0]) if got is not None else {}
                yield EventRow(r[0], r[1], r[2], r[3], r[4], r[5], None, (), info)
                continue
            yield EventRow(r[0], r[1], r[2], r[3], r[4], r[5], up)

    def _partial(self, r: Any) -> EventRow:
        q = (
            "SELECT client, job, CASE WHEN seq <= ? THEN '' ELSE path END, weight, version,"
            " metrics, nbytes, sha256, checksum FROM uploads WHERE seq = ? ORDER BY job"
        )
        parts = tuple(
            UploadRow(int(c), int(j), p, w, v, json.loads(m), n, h, x or b"")
            for c, j, p, w, v, m, n, h, x in self.db.execute(
                q, (self._forgotten(), r[0])
            ).fetchall()
        )
        got = self.db.execute("SELECT info FROM partials WHERE seq = ?", (r[0],)).fetchone()
        info = json.loads(got[0]) if got is not None else {}
        return EventRow(r[0], "partial", r[2], r[3], r[4], r[5], parts[0] if parts else None,
                        parts, info)  # fmt: skip

    def spooled_through(self, seq: int) -> list[str]:
        """The spool files of uploads up to ``seq`` not yet forgotten."""
        q = "SELECT DISTINCT path FROM uploads WHERE seq <= ? AND seq > ? AND path != ''"
        return [str(r[0]) for r in self.db.execute(q, (seq, self._forgotten())).fetchall()]

    def retire(self, seq: int) -> None:
        """After the checkpoint at ``seq`` is recorded (durably) and what it covers deleted:
        drop the older checkpoints' records and mark the spool files of uploads up to ``seq``
        as deleted (their ids stay; the rows are not rewritten, the chain covers them as
        logged: ``meta.forgotten_through`` says up to which seq their paths are gone). One
        transaction, not fsynced on its own: lost on a power failure, the restart loads the
        newest checkpoint all the same, never reads a path up to it, and the next checkpoint
        retires them again."""
        with self.tx(durable=False):
            self.db.execute("DELETE FROM checkpoints WHERE seq < ?", (seq,))
            new = max(seq, self._forgotten())
            self.db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('forgotten_through', ?)", (str(new),)
            )

    def truncate(self, seq: int, why: str = "") -> dict[str, Any]:
        """Delete the events from ``seq`` on (their upload, partial and round rows with them)
        and reset the chain's head to the event before, in one transaction that also appends
        the cut to ``meta.cuts`` (:meth:`cuts`: the old head's seq and chain, ``seq``, how
        many events went, when, ``why``), so a rollback of the log stays visible to whoever
        saw the old head. Returns that record. For ``durability = "retained"`` recovery only:
        those events were never durable (an upload's spool lost in a power failure), and no
        checkpoint covers them."""
        if any(s >= seq for s, _ in self.checkpoints()):
            raise StateError(f"cannot cut the event log at seq {seq}: a checkpoint covers it")
        with self.tx():
            n = int(self.db.execute("SELECT count(*) FROM events WHERE seq >= ?",
                                    (seq,)).fetchone()[0])  # fmt: skip
            head, _, chain = (self.meta("chain_head") or "0:").partition(":")
            record = {"at": seq, "head": int(head or 0), "chain": chain, "events": n,
                      "time": _time.time(), "why": why}  # fmt: skip
            for table in ("events", "uploads", "partials", "rounds"):
                self.db.execute(f"DELETE FROM {table} WHERE seq >= ?", (seq,))
            self._set_head(seq - 1, self._chain_at(seq - 1))
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('cuts', ?)",
                            (json.dumps([*self.cuts(), record]),))  # fmt: skip
        return record

    def cuts(self) -> list[dict[str, Any]]:
        """Every cut of the log's tail at a recovery (:meth:`truncate`), oldest first."""
        raw = self.meta("cuts")
        return list(json.loads(raw)) if raw else []

    def _forgotten(self) -> int:
        return int(self.meta("forgotten_through") or 0)

    # -- the hash chain ----------------------------------------------------------------------
    def _chain_at(self, seq: int) -> bytes:
        """The chain value after event ``seq`` (GENESIS for 0; b'' if there is no such event)."""
        if seq == 0:
            return GENESIS
        row = self.db.execute("SELECT chain FROM events WHERE seq=?", (seq,)).fetchone()
        return bytes(row[0]) if row is not None and isinstance(row[0], bytes) else b""

    def _set_head(self, seq: int, chain: bytes) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO meta VALUES ('chain_head', ?)", (f"{seq}:{chain.hex()}",)
        )

    def _walk(self) -> Iterator[tuple[int, Any, bytes]]:
        """Every event in seq order, with its stored chain and the chain its content and the
        events before it give: ``(seq, stored, expected)``. An upload or partial row that
        belongs to no event is a :class:`StateError`."""
        ups = self.db.execute(
            "SELECT seq, client, job, path, weight, version, metrics, nbytes, sha256, checksum"
            " FROM uploads ORDER BY seq, job, client"
        )
        infos = self.db.execute("SELECT seq, info FROM partials ORDER BY seq")
        evs = self.db.execute(
            "SELECT seq, kind, time, client, job, tag, chain FROM events ORDER BY seq"
        )
        nu, ni = next(ups, None), next(infos, None)
        prev, last = GENESIS, 0
        for seq, kind, time, client, job, tag, chain in evs:
            mine = []
            while nu is not None and nu[0] <= seq:
                if nu[0] < seq:
                    raise self._broken(nu[0], last, f"an upload row (client {nu[1]}, job "
                                       f"{nu[2]}) belongs to no event")  # fmt: skip
                mine.append(tuple(nu[1:]))
                nu = next(ups, None)
            info = None
            if ni is not None and ni[0] <= seq:
                if ni[0] < seq:
                    raise self._broken(ni[0], last, "a partial aggregate's row belongs to no event")
                info, ni = ni[1], next(infos, None)
            try:
                expect = _link(prev, _encode(seq, kind, time, client, job, tag, mine, info))
            except (TypeError, ValueError, OverflowError):  # a field of the wrong type
                expect = b""
            yield int(seq), chain, expect
            prev, last = expect, int(seq)
        if nu is not None:
            raise self._broken(nu[0], last, f"an upload row (client {nu[1]}, job {nu[2]}) "
                               "belongs to no event")  # fmt: skip
        if ni is not None:
            raise self._broken(ni[0], last, "a partial aggregate's row belongs to no event")

    def _broken(self, seq: int, last: int, why: str) -> StateError:
        if seq == last + 2:
            why += f"; event {last + 1} is missing"
        elif seq > last + 2:
            why += f"; events {last + 1}..{seq - 1} are missing"
        return StateError(
            f"the event log in {self.path} is broken at seq {seq} ({why}): it was edited or "
            f"is corrupted, and replaying it could fold an update that was never accepted or "
            f"drop an acknowledged one, so the server will not start; {self._hint()}"
        )

    def _hint(self) -> str:
        return (
            f"restore {self.path} (with its -wal file) and the checkpoints from a backup, or "
            "move the state directory aside to start a new federation (its progress is then "
            "lost)"
        )

    def verify(self) -> int:
        """Check the whole event log against its hash chain and recorded head (one sha256 per
        event, none over update bytes); returns the number of events. A mismatch is a
        :class:`StateError` naming the first bad seq."""
        last, chain, n = 0, GENESIS, 0
        for seq, stored, expect in self._walk():
            if stored != expect or not expect:
                raise self._broken(seq, last, "its content does not match its hash chain")
            last, chain, n = seq, expect, n + 1
        head = self.meta("chain_head")
        if head is None:
            if n:
                raise self._broken(last, last - 1, "the log's recorded head is missing")
            return 0
        hseq, _, hchain = head.partition(":")
        try:
            at = int(hseq)
        except ValueError:
            raise self._broken(last, last - 1, "its recorded head is unreadable") from None
        if at > last:
            raise self._broken(last + 1, last, f"the log ends at seq {last}, its recorded head "
                               f"is seq {at}: events were deleted")  # fmt: skip
        if at < last:
            raise self._broken(at + 1, at, f"events after the recorded head (seq {at}) were "
                               "added behind the server's back")  # fmt: skip
        if hchain != chain.hex():
            raise self._broken(last, last - 1, "it does not match the log's recorded head")
        forgotten = self._forgotten()
        newest = max((s for s, _ in self.checkpoints()), default=0)
        if forgotten > newest:
            raise StateError(
                f"the state database {self.path} marks the spool files of events up to seq "
                f"{forgotten} as deleted, but its newest checkpoint is at seq {newest}: "
                f"{self._hint()}"
            )
        return n

    def _upgrade(self) -> None:
        """A state database from before the upload checksum: add its column (old rows keep
        none, and are checked by their sha256). From before the hash chain: chain its log
        (and bind its checkpoints) once, as they are, in one transaction."""
        up = {str(r[1]) for r in self.db.execute("PRAGMA table_info(uploads)").fetchall()}
        if "checksum" not in up:  # from before the fast checksum: its rows have none
            self.db.execute("ALTER TABLE uploads ADD COLUMN checksum BLOB")
        ev = {str(r[1]) for r in self.db.execute("PRAGMA table_info(events)").fetchall()}
        ck = {str(r[1]) for r in self.db.execute("PRAGMA table_info(checkpoints)").fetchall()}
        if "chain" in ev and {"sha256", "chain"} <= ck:
            return
        with self.tx():
            if "chain" not in ev:
                self.db.execute("ALTER TABLE events ADD COLUMN chain BLOB")
            for col in ("sha256", "chain"):
                if col not in ck:
                    self.db.execute(f"ALTER TABLE checkpoints ADD COLUMN {col} BLOB")
            chains = [(expect, seq) for seq, _, expect in self._walk()]
            self.db.executemany("UPDATE events SET chain=? WHERE seq=?", chains)
            if chains:
                self._set_head(chains[-1][1], chains[-1][0])
            q = "SELECT seq, path, version FROM checkpoints"
            for seq, path, version in self.db.execute(q).fetchall():
                try:
                    with open(path, "rb") as f:
                        digest = hashlib.file_digest(f, "sha256").digest()
                except OSError:
                    continue  # gone: refused when (if) it is the one to load
                tag = self._checkpoint_tag(seq, path, version, digest)
                self.db.execute(
                    "UPDATE checkpoints SET sha256=?, chain=? WHERE seq=?", (digest, tag, seq)
                )
        log.warning(
            "the state database %s predates the event log's hash chain: its %d events were "
            "chained as they are (from now on an edit is detected)",
            self.path,
            len(chains),
        )

    # -- checkpoints and rounds --------------------------------------------------------------
    def add_checkpoint(
        self, seq: int, path: str, version: int, sha256: bytes | None = None
    ) -> None:
        """Record the checkpoint file ``path`` (covering the events up to ``seq``) with its
        sha256 (read back from the file if not given), bound to the event chain at ``seq``."""
        if sha256 is None:
            with open(path, "rb") as f:
                sha256 = hashlib.file_digest(f, "sha256").digest()
        with self.tx():
            tag = self._checkpoint_tag(seq, path, version, sha256)
            self.db.execute(
                "INSERT OR REPLACE INTO checkpoints (seq, path, version, sha256, chain)"
                " VALUES (?, ?, ?, ?, ?)",
                (seq, path, version, sha256, tag),
            )

    def _checkpoint_tag(self, seq: int, path: str, version: int, sha256: bytes) -> bytes:
        doc = ["checkpoint", int(seq), str(path), int(version), bytes(sha256).hex()]
        return _link(self._chain_at(seq), json.dumps(doc, separators=(",", ":")).encode())

    def read_checkpoint(self, seq: int) -> bytes:
        """The bytes of the checkpoint recorded at ``seq``, checked against its record (its
        sha256, bound to the event chain at ``seq``)."""
        row = self.db.execute(
            "SELECT path, version, sha256, chain FROM checkpoints WHERE seq=?", (seq,)
        ).fetchone()
        if row is None:
            raise StateError(f"no checkpoint is recorded at seq {seq}: {self._hint()}")
        path, version, digest, tag = row
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise StateError(f"the checkpoint {path} cannot be read ({e}): {self._hint()}") from e
        ok = isinstance(digest, bytes) and isinstance(tag, bytes)
        if not ok or tag != self._checkpoint_tag(seq, path, version, digest):
            raise StateError(
                f"the record of the checkpoint {path} (seq {seq}) does not match the event "
                f"log's hash chain (edited or corrupted): {self._hint()}"
            )
        if hashlib.sha256(data).digest() != digest:
            raise StateError(
                f"the checkpoint {path} is corrupted: its sha256 differs from the one recorded "
                f"when it was written; {self._hint()}"
            )
        return data

    def checkpoints(self) -> list[tuple[int, str]]:
        q = "SELECT seq, path FROM checkpoints ORDER BY seq DESC"
        return [(int(a), str(b)) for a, b in self.db.execute(q).fetchall()]

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


def _refuse_over_leftovers(path: str, problem: str) -> None:
    """A state database that ``problem`` (is missing, holds no tables) is a new one only if
    its directory holds no other federation's checkpoints or spooled updates."""
    d = Path(path).parent
    try:
        held = [*d.glob("checkpoint-*.npz"), *(d / "spool").glob("*.upd")]
    except OSError:
        held = []
    if held:
        raise StateError(
            f"the state database {path} {problem}, but {d} holds a federation's checkpoints "
            f"or spooled updates ({held[0].name}, ...): starting afresh would drop updates "
            f"that were acknowledged; {RECOVERY_HINT}"
        )


def _opt(x: Any) -> int | float | None:
    """An INTEGER column's value as SQLite gives it back: an integral float is stored as an
    integer, any other (an edit) stays a float, and is encoded as one."""
    if isinstance(x, float):
        return int(x) if x.is_integer() else x
    return None if x is None else int(x)


def _encode(
    seq: int,
    kind: str,
    time: float,
    client: int | None,
    job: int | None,
    tag: int | None,
    uploads: Sequence[tuple[Any, ...]],
    info: str | None,
) -> bytes:
    """The canonical encoding of an event row as stored (JSON: strings escaped, floats in
    their shortest exact repr, the digest in hex, the upload rows sorted by (job, client),
    metrics and a partial's info as their stored JSON text): values as SQLite gives them
    back, so the chain computed when logging is the one recomputed from the tables."""
    ups = [  # a checksum is encoded when there is one (rows from before it encode as they did)
        [_opt(c), _opt(j), str(p), _real(w), _opt(v), str(m), _opt(n), _hex(h)]
        + ([_hex(x)] if x else [])
        for c, j, p, w, v, m, n, h, x in uploads
    ]
    ups.sort(key=lambda u: (u[1], u[0]))
    doc = [_opt(seq), str(kind), _real(time), _opt(client), _opt(job), _opt(tag), ups, info]
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True, allow_nan=True).encode()


def new_checksum() -> Any:
    """The at-rest checksum of a spooled file, fed as its bytes are received: xxh3-128 (not
    a signature: it detects a file altered, truncated or corrupted on disk at ~20 GB/s, where
    re-hashing with sha256 would cost a second ~1-2 GB/s pass over every update)."""
    return xxhash.xxh3_128()


def checksum(data: Any) -> bytes:
    """:func:`new_checksum` of ``data`` (any buffer) in one call."""
    return bytes(xxhash.xxh3_128(data).digest())


def _real(x: Any) -> float:
    """A REAL column's value as SQLite gives it back (it stores -0.0 as the integer 0)."""
    return float(x) + 0.0


def _hex(h: Any) -> str:
    if not isinstance(h, bytes | bytearray | memoryview):
        raise TypeError("a digest is bytes")
    return bytes(h).hex()


def _link(prev: bytes, encoded: bytes) -> bytes:
    return hashlib.sha256(prev + encoded).digest()
