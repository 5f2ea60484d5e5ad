"""The spool committer of ``durability = "retained"`` (:mod:`fedagg.deploy._commit`) in
process: the watermark, flushes, checkpoints covering, the mark file, the power fault, and
cutting the event log (:meth:`Store.truncate`)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from fedagg.deploy import _faults
from fedagg.deploy._commit import Committer, checked_mark, read_mark, write_mark
from fedagg.deploy._faults import Faults
from fedagg.deploy._store import Store, UploadRow
from fedagg.errors import ConfigError, StateError


def _files(tmp_path: Path, n: int) -> list[str]:
    (tmp_path / "spool").mkdir(exist_ok=True)
    out = []
    for i in range(n):
        p = tmp_path / "spool" / f"{i}.upd"
        p.write_bytes(bytes(range(16)) * 4)
        out.append(str(p))
    return out


def _settled(c: Committer, w: int) -> None:
    """Wait (bounded) for the committer's pass that sends watermark ``w``."""
    deadline = time.monotonic() + 10
    while c.watermark < w and time.monotonic() < deadline:
        time.sleep(0.005)


def test_the_watermark_waits_for_the_sync_and_never_decreases(tmp_path: Path) -> None:
    paths = _files(tmp_path, 3)
    c = Committer(tmp_path, tmp_path / "spool", seq=1, low=4, version=0)
    try:
        assert c.watermark == 4 and read_mark(tmp_path) == (1, 4)
        with c._mark_lock:  # no pass can record anything meanwhile
            c.opened(7)  # jobs 4..6 resolved
            assert c.logged(3, paths[:2], [7, 8]) == set()  # not yet synced, acknowledged
            c.opened(9)
            assert c.watermark == 4  # sent only once recorded
        c.flush(3)  # synced, and the mark recorded, before flush returns
        assert c.durable >= 3 and read_mark(tmp_path) == (3, 9)
        assert c.watermark == 9 and c.files >= 2
        seen = [c.watermark]
        with c._mark_lock:
            c.logged(4, paths[2:], [9])
            c.opened(5)  # a stale lower report changes nothing
            seen.append(c.watermark)
        c.opened(12)
        c.flush(4)
        _settled(c, 12)
        seen.append(c.watermark)
        assert seen == sorted(seen) and seen[-1] == 12
        assert read_mark(tmp_path) == (4, 12)
        assert c.logged(5, [], [3, 12]) == {3}  # a closed task's late arrival: synced first
    finally:
        c.close()


def test_an_old_open_task_stops_holding_the_watermark(tmp_path: Path) -> None:
    """Review M2: a straggler's open task (job 2) holds the watermark for ``hold`` seconds
    only; then it rises to the younger open tasks' jobs, and the straggler's upload, when it
    comes, is late (synced before its acknowledgement)."""
    paths = _files(tmp_path, 2)
    now = [0.0]
    c = Committer(tmp_path, tmp_path / "spool", seq=0, low=0, version=0, sync=False, hold=5.0)
    c.clock = lambda: now[0]
    try:
        c.barrier(0, 0, [], False, high=3)  # jobs 0..2 dispatched at t=0
        c.logged(1, paths[:1], [0])
        c.logged(2, [], [1])
        c.barrier(2, 2, [], False, high=3)  # job 2, the straggler's, open
        c.flush(2)
        _settled(c, 2)
        assert c.watermark == 2  # held by the young open task
        now[0] = 10.0
        c.barrier(2, 2, [], False, high=6)  # jobs 3..5 dispatched at t=10
        _settled(c, 3)
        assert c.watermark == 3  # job 2 is 10 s old: the first younger job holds it
        with c._mark_lock:
            assert c.logged(3, paths[1:], [4]) == set()  # a young task's upload: retained
            assert c.logged(4, [], [2]) == {2}  # the straggler's: late, synced before its ack
        c.flush(4)
        assert c.watermark == 3  # jobs 3 and 5 still open and young
        now[0] = 16.0
        c.barrier(4, 3, [], False, high=6)
        _settled(c, 6)  # old too now, nothing pending: the next job to dispatch
        assert c.watermark == 6 and read_mark(tmp_path) == (4, 6)
    finally:
        c.close()


def test_a_pending_event_holds_the_watermark_however_old(tmp_path: Path) -> None:
    paths = _files(tmp_path, 1)
    now = [0.0]
    c = Committer(tmp_path, tmp_path / "spool", seq=0, low=0, version=0, hold=1.0)
    c.clock = lambda: now[0]
    try:
        with c._mark_lock:  # no pass: the event stays unsynced
            c.barrier(0, 0, [], False, high=2)
            c.logged(1, paths, [1])
            c.barrier(1, 5, [], False, high=5)
            now[0] = 100.0
            assert c._candidate() == 1
        c.flush(1)
        _settled(c, 5)
        assert c.watermark == 5
    finally:
        c.close()


def test_a_checkpoint_covers_what_it_folded_without_a_sync(tmp_path: Path) -> None:
    paths = _files(tmp_path, 1)
    c = Committer(tmp_path, tmp_path / "spool", seq=0, low=0, version=0, sync=False)
    try:
        c.covered(5)
        c.logged(5, paths, [0])  # logged at or before a checkpoint: durable already
        c.opened(3)
        c.flush(5)
        _settled(c, 3)
        assert c.watermark == 3
    finally:
        c.close()


def test_a_new_model_version_waits_for_the_flush(tmp_path: Path) -> None:
    paths = _files(tmp_path, 1)
    c = Committer(tmp_path, tmp_path / "spool", seq=0, low=0, version=0)
    try:
        c.logged(2, paths, [0])
        c.barrier(2, 1, [1], closed=False)  # version 1's tasks leave: the update is durable
        _settled(c, 1)
        assert c.durable >= 2 and c.exposed == 1 and c.watermark == 1
    finally:
        c.close()


def test_the_power_fault_loses_the_unsynced_files(tmp_path: Path) -> None:
    """The hook the ``power`` fault runs: every file after the mark gone, empty or cut short,
    and the committer records nothing more (in a real run the process dies next)."""
    paths = _files(tmp_path, 3)
    c = Committer(tmp_path, tmp_path / "spool", seq=0, low=0, version=0)
    c._mark_lock.acquire()  # the committer cannot record a pass: the files stay unsynced
    c.logged(1, paths, [0, 1, 2])
    c._mark_lock.release()
    lose = threading.Thread(target=c._lose_unsynced)  # takes the mark lock for good
    lose.start()
    lose.join(10)
    sizes = [Path(p).stat().st_size if Path(p).exists() else None for p in paths]
    assert read_mark(tmp_path) == (0, 0) and c.durable == 0 and c.watermark == 0
    assert sizes == [None, 0, 32], sizes
    c._stop = True  # (its thread is parked on the mark lock, as in a killed process)


def test_the_mark_file_is_checked(tmp_path: Path) -> None:
    assert read_mark(tmp_path) is None  # no mark: "fsync" mode, nothing to cut
    write_mark(tmp_path, 41, 7)
    assert read_mark(tmp_path) == (41, 7)
    data = bytearray((tmp_path / "synced").read_bytes())
    data[0] ^= 1
    (tmp_path / "synced").write_bytes(bytes(data))
    assert read_mark(tmp_path) == (0, 0)  # torn or altered: nothing known to be synced
    with pytest.raises(StateError, match=r"mark file .* is unreadable"):
        checked_mark(tmp_path)  # what recovery reads: it does not cut on its word
    (tmp_path / "synced").unlink()
    write_mark(tmp_path, 3, 2, sync=False)  # a new mark is created whole (renamed)
    assert checked_mark(tmp_path) == (3, 2) and not (tmp_path / "synced.tmp").exists()


def test_power_fault_specs() -> None:
    f = Faults.parse("commit:2:0.5:power")
    assert (f.point, f.nth, f.stall, f.power) == ("commit", 2, 0.5, True)
    assert str(f) == "commit:2:0.5:power" and Faults.parse(str(f)) == f
    assert not Faults.parse("fold:3").power
    for bad in ("fold:1:0:powr", "fold:1:0:power:x"):
        with pytest.raises(ConfigError, match="power"):
            Faults.parse(bad)
    _faults.configure(None)


def _row(job: int, path: str) -> UploadRow:
    return UploadRow(job, job, path, 1.0, 0, {}, 4, b"\0" * 32, b"\1" * 16)


def test_truncate_cuts_the_log_tail_and_resets_the_chain(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    try:
        store.add_checkpoint(0, str(tmp_path / "ck"), 0, b"\0" * 32)
        events = [("start", 0.0, None, None, None, None)] + [
            ("arrival", float(j), j, j, None, _row(j, f"p{j}")) for j in range(4)
        ]
        _, seq = store.log_batch(0, events)
        assert seq == 5 and store.verify() == 5
        head = store.meta("chain_head")
        cut = store.truncate(4, why="test")  # the arrivals of jobs 2 and 3
        assert cut["events"] == 2 and f"{cut['head']}:{cut['chain']}" == head
        assert cut["at"] == 4 and cut["why"] == "test"
        assert store.cuts() == [cut]  # recorded with the cut (the old head: a rollback shows)
        assert store.verify() == 3 and store.last_seq() == 3
        assert store.accepted_keys() == {(0, 0), (1, 1)}
        _, seq = store.log_batch(3, events[3:4])  # logged again after the cut: chained on
        assert seq == 4 and store.verify() == 4
        store.add_checkpoint(4, str(tmp_path / "ck2"), 0, b"\0" * 32)
        with pytest.raises(StateError, match="checkpoint covers"):
            store.truncate(3)
    finally:
        store.close()
