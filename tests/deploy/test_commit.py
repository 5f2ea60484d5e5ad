"""The spool committer of ``durability = "retained"`` (:mod:`fedagg.deploy._commit`) in
process: the watermark, flushes, checkpoints covering, the mark file, the power fault, and
cutting the event log (:meth:`Store.truncate`)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from fedagg.deploy import _faults
from fedagg.deploy._commit import Committer, read_mark, write_mark
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
        assert store.truncate(4) == 2  # the arrivals of jobs 2 and 3
        assert store.verify() == 3 and store.last_seq() == 3
        assert store.accepted_keys() == {(0, 0), (1, 1)}
        _, seq = store.log_batch(3, events[3:4])  # logged again after the cut: chained on
        assert seq == 4 and store.verify() == 4
        store.add_checkpoint(4, str(tmp_path / "ck2"), 0, b"\0" * 32)
        with pytest.raises(StateError, match="checkpoint covers"):
            store.truncate(3)
    finally:
        store.close()
