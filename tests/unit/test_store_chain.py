"""The event log at rest is hash-chained (issue 14, finding 9), in process.

Every event row of ``state.db`` carries ``chain = sha256(previous chain || its canonical
encoding)``; ``meta.chain_head`` holds the last one; a checkpoint record holds its file's sha256,
bound to the chain. ``Store.verify`` (run by ``Federation.open`` and ``EdgeEngine.open``) walks
the whole log: an edited field, a deleted, added or reordered row is a ``StateError`` naming
the first bad seq. A ``state.db`` that is missing, table-less or unreadable next to another
federation's checkpoints or spooled updates is refused, never started afresh over them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fedagg
from fedagg import strategies
from fedagg.deploy import Federation
from fedagg.deploy._edge import EdgeEngine
from fedagg.deploy._store import LogItem, PartialRows, Store, UploadRow, checksum
from fedagg.errors import StateError
from fedagg.sim import SyncPolicy

# -- a log with every kind of event --------------------------------------------------------------
_FLOATS = st.one_of(
    st.floats(allow_nan=False, allow_subnormal=True),
    st.sampled_from([0.0, -0.0, 1e12, 1e-310, 5e-324, 1.0 / 3.0, math.inf, -math.inf]),
)


def _up(client: int, job: int, weight: float = 1.5, loss: float = 0.25) -> UploadRow:
    path = f"/spool/{job:012d}-{client}.upd"
    digest = hashlib.sha256(f"{client}/{job}".encode()).digest()
    return UploadRow(client, job, path, weight, 3, {"train_loss": loss}, 4096, digest,
                     checksum(f"{client}/{job}".encode()))  # fmt: skip


def _events(weights: list[float], loss: float = 0.5) -> list[LogItem]:
    evs: list[LogItem] = [("start", 0.0, None, None, None, None)]
    for j, w in enumerate(weights):
        evs.append(("arrival", 1.0 + j, j % 5, j, None, _up(j % 5, j, w, loss)))
    n = len(weights)
    part = PartialRows(
        (_up(7, n + 1, 2.0), _up(6, n), _up(8, n + 2, 0.5)),  # not in job order
        {"weight_sum": 4.5, "accumulator": "float64", "version": 3, "x": 1 / 3},
    )
    evs += [
        ("partial", 50.5, None, n, None, part),
        ("dropout", 51.25, 4, n + 3, None, None),
        ("timer", 52.0, None, None, 7, None),
        ("acked", 53.0, 6, n, None, None),
    ]
    return evs


def _store(d: Path, weights: list[float], batches: int = 2) -> Store:
    s = Store(d / "state.db")
    evs = _events(weights)
    seq = 0
    size = max(1, len(evs) // batches)
    for i in range(0, len(evs), size):
        rows, seq = s.log_batch(seq, evs[i : i + size])
        assert all(r is not None for r in rows)
    return s


def _sql(d: Path, *stmts: str) -> None:
    with closing(sqlite3.connect(d / "state.db")) as db, db:
        for q in stmts:
            db.execute(q)


def _refused(d: Path) -> str:
    s = Store(d / "state.db")
    try:
        with pytest.raises(StateError) as e:
            s.verify()
    finally:
        s.close()
    msg = str(e.value)
    assert "backup" in msg and "move the state directory aside" in msg, msg
    return msg


def test_a_logged_chain_verifies_and_survives_reopening(tmp_path: Path) -> None:
    s = _store(tmp_path, [1.0, 2.0, 1e-300, -0.0, 3.5])
    n = s.last_seq()
    assert s.verify() == n == 10
    rows = list(s.events_after(0))
    assert [r.kind for r in rows][:2] == ["start", "arrival"]
    s.close()
    again = Store(tmp_path / "state.db")
    assert again.verify() == n
    # logging goes on from the stored head, and the whole still verifies
    _, seq = again.log_batch(n, [("timer", 60.0, None, None, 9, None)])
    assert again.verify() == seq == n + 1
    again.close()


@given(
    weights=st.lists(_FLOATS, min_size=1, max_size=6),
    loss=_FLOATS,
    batches=st.integers(1, 4),
)
def test_any_floats_round_trip_through_the_chain(
    tmp_path_factory: pytest.TempPathFactory, weights: list[float], loss: float, batches: int
) -> None:
    d = tmp_path_factory.mktemp("rt")
    s = Store(d / "state.db")
    evs = _events(weights, loss)
    seq = 0
    size = max(1, len(evs) // batches)
    for i in range(0, len(evs), size):
        _, seq = s.log_batch(seq, evs[i : i + size])
    s.close()
    again = Store(d / "state.db")
    assert again.verify() == seq
    ups = [r.upload for r in again.events_after(0) if r.kind == "arrival"]
    assert [u.weight for u in ups if u] == [float(w) + 0.0 for w in weights]  # -0.0: 0
    again.close()


# each edit: (SQL, the seq it breaks) on the log of _events([1.0, 2.0, 3.0, 4.0]):
# 1 start, 2..5 arrivals (jobs 0..3), 6 partial (jobs 4, 5, 6), 7 dropout, 8 timer, 9 acked
EDITS: dict[str, tuple[str, int]] = {
    "weight to 1e12": ("UPDATE uploads SET weight=1e12 WHERE job=2", 4),
    "weight by one ulp": (f"UPDATE uploads SET weight={math.nextafter(2.0, 3.0)!r} WHERE job=1", 3),
    "metrics": ("""UPDATE uploads SET metrics='{"train_loss": 0.0}' WHERE job=3""", 5),
    "path": ("UPDATE uploads SET path='/spool/other.upd' WHERE job=0", 2),
    "nbytes": ("UPDATE uploads SET nbytes=8192 WHERE job=0", 2),
    "digest": ("UPDATE uploads SET sha256=x'00' WHERE job=1", 3),
    "checksum": ("UPDATE uploads SET checksum=x'00' WHERE job=1", 3),
    "checksum removed": ("UPDATE uploads SET checksum=NULL WHERE job=3", 5),
    "version": ("UPDATE uploads SET version=4 WHERE job=3", 5),
    "client": ("UPDATE uploads SET client=4 WHERE job=3", 5),
    "weight as text": ("UPDATE uploads SET weight='heavy' WHERE job=1", 3),
    "a partial's part": ("UPDATE uploads SET weight=20.0 WHERE job=5", 6),
    "a partial's info": ("""UPDATE partials SET info='{"weight_sum": 45.0}'""", 6),
    "time": ("UPDATE events SET time=2.5 WHERE seq=7", 7),
    "kind": ("UPDATE events SET kind='dropout' WHERE seq=3", 3),
    "tag": ("UPDATE events SET tag=8 WHERE seq=8", 8),
    "chain nulled": ("UPDATE events SET chain=NULL WHERE seq=9", 9),
    "an arrival deleted": ("DELETE FROM events WHERE seq=4", 4),  # its upload row is left
    "an arrival and its upload deleted": (
        "DELETE FROM events WHERE seq=4; DELETE FROM uploads WHERE seq=4", 5),
    "a timer deleted": ("DELETE FROM events WHERE seq=8", 9),
    "the last event deleted": ("DELETE FROM events WHERE seq=9", 9),
    "an upload row deleted": ("DELETE FROM uploads WHERE job=2", 4),
    "an upload row added": (
        "INSERT INTO uploads SELECT 9, 99, seq, path, weight, version, metrics, nbytes, sha256,"
        " checksum FROM uploads WHERE job=1", 3),
    "an upload row for no event": (
        "INSERT INTO uploads SELECT 9, 99, 42, path, weight, version, metrics, nbytes, sha256,"
        " checksum"
        " FROM uploads WHERE job=1", 42),
    "two arrivals swapped": (
        "UPDATE events SET seq=-3 WHERE seq=3; UPDATE uploads SET seq=-3 WHERE seq=3;"
        "UPDATE events SET seq=3 WHERE seq=4; UPDATE uploads SET seq=3 WHERE seq=4;"
        "UPDATE events SET seq=4 WHERE seq=-3; UPDATE uploads SET seq=4 WHERE seq=-3", 3),
    "an event appended": (
        "INSERT INTO events VALUES (10, 'timer', 60.0, NULL, NULL, 1, x'00')", 10),
    "the head removed": ("DELETE FROM meta WHERE key='chain_head'", 9),
}  # fmt: skip


@pytest.mark.parametrize("edit", list(EDITS))
def test_an_edited_log_is_refused_naming_the_first_bad_seq(tmp_path: Path, edit: str) -> None:
    _store(tmp_path, [1.0, 2.0, 3.0, 4.0]).close()
    sql, bad = EDITS[edit]
    with closing(sqlite3.connect(tmp_path / "state.db")) as db, db:
        db.executescript(sql)
    msg = _refused(tmp_path)
    assert f"broken at seq {bad} " in msg, msg


@given(
    n=st.integers(1, 8),
    pick=st.integers(0, 100),
    value=st.one_of(_FLOATS, st.integers(-5, 5)),
    column=st.sampled_from(["weight", "version", "nbytes", "client", "job"]),
)
def test_any_changed_upload_field_is_refused(
    tmp_path_factory: pytest.TempPathFactory, n: int, pick: int, value: float, column: str
) -> None:
    d = tmp_path_factory.mktemp("edit")
    weights = [float(i) + 0.5 for i in range(n)]
    _store(d, weights).close()
    job = pick % n
    with closing(sqlite3.connect(d / "state.db")) as db, db:
        old = db.execute(f"SELECT {column}, seq FROM uploads WHERE job=?", (job,)).fetchone()
        if column == "job":
            value = 1000 + pick  # keeps (client, job) unique
        db.execute(f"UPDATE uploads SET {column}=? WHERE job=?", (value, job))
        new = db.execute(f"SELECT {column} FROM uploads WHERE seq=?", (old[1],)).fetchone()
    s = Store(d / "state.db")
    if new[0] == old[0] and type(new[0]) is type(old[0]) and str(new[0]) == str(old[0]):
        assert s.verify() == s.last_seq()  # the same value written back: nothing changed
    else:
        with pytest.raises(StateError, match=f"broken at seq {old[1]} "):
            s.verify()
    s.close()


# -- forgetting spool paths does not rewrite the chained rows -----------------------------------
def test_forgotten_paths_are_blank_but_the_chain_still_verifies(tmp_path: Path) -> None:
    s = _store(tmp_path, [1.0, 2.0, 3.0, 4.0])
    s.add_checkpoint(2, str(_ckpt(tmp_path, 2)), 1)
    s.add_checkpoint(4, str(_ckpt(tmp_path, 4)), 1)
    assert s.spooled_through(4) == [_up(j % 5, j).path for j in range(3)]
    s.retire(4)
    assert [seq for seq, _ in s.checkpoints()] == [4]  # the older record is dropped with it
    assert s.spooled_through(4) == [] and s.spooled_through(5) == [_up(3, 3).path]
    paths = {r.seq: r.upload.path for r in s.events_after(0) if r.upload}
    assert paths[2] == paths[4] == "" and paths[5] == _up(3, 3).path
    assert s.verify() == 9
    s.close()


# -- checkpoints are bound to the chain ----------------------------------------------------------
def _ckpt(d: Path, seq: int) -> Path:
    p = d / f"checkpoint-{seq:012d}.npz"
    p.write_bytes(b"checkpoint %d " % seq * 100)
    return p


def test_a_checkpoint_file_or_record_that_changed_is_refused(tmp_path: Path) -> None:
    s = _store(tmp_path, [1.0, 2.0])
    path = _ckpt(tmp_path, 3)
    s.add_checkpoint(3, str(path), 1)
    data = path.read_bytes()
    assert s.read_checkpoint(3) == data
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 1
    path.write_bytes(bytes(flipped))
    with pytest.raises(StateError, match="is corrupted: its sha256 differs"):
        s.read_checkpoint(3)
    # a forger who also records the new digest breaks the record's binding to the chain
    s.db.execute("UPDATE checkpoints SET sha256=? WHERE seq=3", (hashlib.sha256(flipped).digest(),))
    with pytest.raises(StateError, match="does not match the event log's hash chain"):
        s.read_checkpoint(3)
    path.unlink()
    with pytest.raises(StateError, match="cannot be read"):
        s.read_checkpoint(3)
    s.close()


# -- a state database from before the chain -----------------------------------------------------
_OLD_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE events (
    seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, time REAL NOT NULL,
    client INTEGER, job INTEGER, tag INTEGER);
CREATE INDEX events_by_job ON events (job, kind);
CREATE TABLE uploads (
    client INTEGER NOT NULL, job INTEGER NOT NULL, seq INTEGER NOT NULL, path TEXT NOT NULL,
    weight REAL NOT NULL, version INTEGER NOT NULL, metrics TEXT NOT NULL,
    nbytes INTEGER NOT NULL, sha256 BLOB NOT NULL, PRIMARY KEY (client, job));
CREATE TABLE partials (seq INTEGER PRIMARY KEY, info TEXT NOT NULL);
CREATE TABLE checkpoints (
    seq INTEGER PRIMARY KEY, path TEXT NOT NULL, version INTEGER NOT NULL);
CREATE TABLE rounds (
    round INTEGER PRIMARY KEY, version INTEGER NOT NULL, folded INTEGER NOT NULL,
    applied INTEGER NOT NULL, seq INTEGER NOT NULL, stats TEXT NOT NULL);
"""


def _old_db(d: Path) -> Path:
    """A state.db as the previous version wrote it: no chain; folded paths blanked."""
    ck = _ckpt(d, 2)
    with closing(sqlite3.connect(d / "state.db")) as db, db:
        db.executescript(_OLD_SCHEMA)
        db.execute("INSERT INTO events VALUES (1, 'start', 0.0, NULL, NULL, NULL)")
        for seq, job in ((2, 0), (3, 1)):
            db.execute("INSERT INTO events VALUES (?, 'arrival', ?, ?, ?, NULL)",
                       (seq, float(seq), job, job))  # fmt: skip
            u = _up(job, job, 1.0 + job)
            db.execute(
                "INSERT INTO uploads VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (job, job, seq, "" if seq <= 2 else u.path, u.weight, u.version,
                 json.dumps(u.metrics), u.nbytes, u.sha256),
            )  # fmt: skip
        db.execute("INSERT INTO checkpoints VALUES (2, ?, 1)", (str(ck),))
    return ck


def test_an_old_log_is_chained_once_as_it_is(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ck = _old_db(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedagg.server"):
        s = Store(tmp_path / "state.db")
    assert "predates the event log's hash chain" in caplog.text
    assert "3 events were chained" in caplog.text
    assert s.verify() == 3
    assert s.read_checkpoint(2) == ck.read_bytes()
    _, seq = s.log_batch(3, [("timer", 9.0, None, None, 1, None)])
    assert seq == 4 and s.verify() == 4
    s.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedagg.server"):
        Store(tmp_path / "state.db").close()  # once: no second migration
    assert "predates" not in caplog.text
    # from now on an edit is seen
    _sql(tmp_path, "UPDATE uploads SET weight=1e12 WHERE job=1")
    assert "broken at seq 3 " in _refused(tmp_path)


# -- a lost, empty or unreadable state.db --------------------------------------------------------
@pytest.mark.parametrize("left", ["spool/000000000003-1-abc.upd", "checkpoint-000000000000.npz"])
def test_a_missing_state_db_next_to_a_federation_is_refused(tmp_path: Path, left: str) -> None:
    (tmp_path / "spool").mkdir()
    (tmp_path / left).write_bytes(b"x")
    with pytest.raises(StateError) as e:
        Store(tmp_path / "state.db")
    msg = str(e.value)
    assert "is missing" in msg and "acknowledged" in msg and "backup" in msg, msg
    assert not (tmp_path / "state.db").exists()  # nothing created over it


def test_an_empty_state_db_next_to_a_federation_is_refused(tmp_path: Path) -> None:
    _ckpt(tmp_path, 0)
    (tmp_path / "state.db").write_bytes(b"")
    with pytest.raises(StateError, match="holds no tables"):
        Store(tmp_path / "state.db")
    assert (tmp_path / "state.db").read_bytes() == b""


def test_a_state_db_that_lost_its_tables_is_refused(tmp_path: Path) -> None:
    _store(tmp_path, [1.0]).close()
    _sql(tmp_path, "DROP TABLE events")
    with pytest.raises(StateError, match=r"has lost tables \(events\)"):
        Store(tmp_path / "state.db")


def test_a_garbage_state_db_is_refused(tmp_path: Path) -> None:
    (tmp_path / "state.db").write_bytes(b"not a database at all " * 100)
    with pytest.raises(StateError, match=r"is unreadable.*backup"):
        Store(tmp_path / "state.db")


@pytest.mark.parametrize("empty_file", [False, True])
def test_a_new_directory_starts_normally(tmp_path: Path, empty_file: bool) -> None:
    (tmp_path / "spool").mkdir()
    (tmp_path / "spool" / "tmp-123").write_bytes(b"cut off, never acknowledged")
    if empty_file:  # a crash right after creating the file, before any table
        (tmp_path / "state.db").write_bytes(b"")
    s = Store(tmp_path / "state.db")
    assert s.verify() == 0
    s.close()


# -- the engines check the chain when they open --------------------------------------------------
D = 64


def _fed(d: Path) -> Federation:
    strategy = strategies.fedavg()
    policy = SyncPolicy(strategy=strategy, rounds=2, clients_per_round=3)
    server = strategy.init([np.zeros(D, np.float32)])
    return Federation(policy, server, num_clients=3, seed=1, directory=d)


def _drive(fed: Federation, uploads: int) -> None:
    fed.open()
    if not fed.started:
        fed.step([r for r in fed.log([("start", 0.0, None, None, None, None)]) if r])
    for _ in range(uploads):
        task = min(fed.tasks.values(), key=lambda t: t.job)
        delta = np.full(D, 0.01 * (task.job + 1), np.float32)
        path = fed.spool / f"{task.job:012d}-{task.client}.upd"
        delta.tofile(path)
        up = UploadRow(task.client, task.job, str(path), 2.0, task.version, {}, delta.nbytes,
                       hashlib.sha256(delta.tobytes()).digest())  # fmt: skip
        fed.step([r for r in fed.log([("arrival", 1.0, task.client, task.job, None, up)]) if r])


def _run(d: Path, uploads: int) -> Federation:
    fed = _fed(d)
    _drive(fed, uploads)
    return fed


def test_federation_open_refuses_an_edited_weight_and_resumes_once_restored(
    tmp_path: Path,
) -> None:
    ref = _run(tmp_path / "ref", 6)
    assert ref.finished
    # killed mid-round 2 (after a checkpoint and its forgotten paths), then a weight is edited
    fed = _run(tmp_path / "run", 5)
    fed.close()
    db = tmp_path / "run" / "state.db"
    backup = db.read_bytes()
    seq = _sql_one(db, "SELECT seq FROM uploads ORDER BY seq DESC LIMIT 1")
    _sql(
        tmp_path / "run", "UPDATE uploads SET weight=1e12 WHERE seq=(SELECT max(seq) FROM uploads)"
    )
    again = _fed(tmp_path / "run")
    with pytest.raises(StateError, match=f"broken at seq {seq} .*backup"):
        again.open()
    again.close()
    assert not list((tmp_path / "run").glob("checkpoint-*.npz"))[1:]  # nothing new written
    for side in ("state.db-wal", "state.db-shm"):
        (tmp_path / "run" / side).unlink(missing_ok=True)
    db.write_bytes(backup)  # restored from the backup: resumes and finishes, same bits
    done = _fed(tmp_path / "run")
    _drive(done, 1)
    assert done.finished and np.array_equal(done.server.params, ref.server.params)
    # a reopened, finished federation verifies its whole log again (paths forgotten since)
    done.close()
    last = _fed(tmp_path / "run")
    last.open()
    last.close()


def _sql_one(db: Path, q: str) -> int:
    with closing(sqlite3.connect(db)) as con:
        return int(con.execute(q).fetchone()[0])


def test_federation_open_refuses_a_flipped_checkpoint(tmp_path: Path) -> None:
    _run(tmp_path, 4).close()
    (ck,) = tmp_path.glob("checkpoint-*.npz")
    data = bytearray(ck.read_bytes())
    data[-200] ^= 0x10
    ck.write_bytes(bytes(data))
    fed = _fed(tmp_path)
    with pytest.raises(StateError, match="corrupted"):
        fed.open()
    fed.close()


def test_edge_engine_open_refuses_an_edited_log(tmp_path: Path) -> None:
    from fedagg.core.spec import ParamSpec

    spec = ParamSpec.from_arrays([np.zeros(17, np.float32)])

    def engine() -> EdgeEngine:
        agg: Any = fedagg.aggregators.mean("float64")
        return EdgeEngine(agg, spec, num_clients=4, directory=tmp_path)

    eng = engine()
    eng.open()
    d = np.ones(17, np.float32)
    path = eng.spool / "000000000001-2.upd"
    d.tofile(path)
    up = UploadRow(2, 1, str(path), 3.0, 0, {}, d.nbytes, hashlib.sha256(d.tobytes()).digest())
    eng.log([("arrival", 1.0, 2, 1, None, up)])
    eng.close()
    _sql(tmp_path, "UPDATE uploads SET weight=1e12")
    again = engine()
    with pytest.raises(StateError, match="broken at seq 1 "):
        again.open()
    again.close()


def test_only_the_bookkeeping_commit_skips_its_own_fsync(tmp_path: Path) -> None:
    """``retire`` commits with ``synchronous=NORMAL``; every other commit stays FULL (an
    acknowledged upload is fsynced before its ack), also after a failed bookkeeping one."""
    s = _store(tmp_path, [1.0, 2.0])
    full = 2
    assert s.db.execute("PRAGMA synchronous").fetchone()[0] == full
    seen: list[int] = []
    s.db.set_trace_callback(
        lambda sql: seen.append(0) if sql.startswith("PRAGMA synchronous=NORMAL") else None
    )
    s.retire(2)
    assert seen == [0]
    assert s.db.execute("PRAGMA synchronous").fetchone()[0] == full
    with pytest.raises(ZeroDivisionError), s.tx(durable=False):
        1 / 0  # noqa: B018
    assert s.db.execute("PRAGMA synchronous").fetchone()[0] == full
    s.db.set_trace_callback(None)
    s.close()
