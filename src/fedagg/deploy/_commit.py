"""Group commit of spooled uploads, and the committed watermark (``durability = "retained"``).

With ``[deploy] durability = "retained"`` an upload is acknowledged once its event is committed
to the log (SQLite, fsynced), its spool file written but not yet fsynced; the acknowledgement
says ``retain``: the client keeps the update. A :class:`Committer` thread fsyncs the written
spool files in the background, all that are waiting in one pass (then the spool directory,
for their renames), then records in the *mark file* (``synced``) how far the log is covered
(the last event seq whose spool, and every one before it, is on disk) and the new
watermark: the lowest job of an open task or of an event logged after the mark; only then is
the watermark sent. Every acknowledged upload of a job below it is durable, and it never
decreases, across restarts too: a restart resumes from the recorded one, and can only reopen
the jobs of events after the mark, which are not below it. An upload of a job below it (a
task already closed, whose arrival the policy refuses) is synced before it is acknowledged
(:meth:`Committer.logged` says which). An open task holds the watermark back: while a
straggler trains, the other clients keep their acknowledged updates.

A checkpoint covers what it folded: its events need no spool fsync (:meth:`covered`).

On a power loss the files after the mark may be missing, empty or truncated: at restart
(:meth:`fedagg.deploy._fed.Federation.open`) the log is cut at the first such event after the
mark and the newest checkpoint; those jobs are open again and their clients push the copies
they kept. A file at or before the mark that does not match its log row is corruption, and
refused as in ``"fsync"`` mode.

The mark is 24 bytes written in place (one sector): the seq, the watermark and their xxh64.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

import xxhash

from fedagg.deploy._faults import crash_point, on_power_loss
from fedagg.deploy._spoolcheck import fsync_dir, verify_file
from fedagg.deploy._store import EventRow, Store, UploadRow
from fedagg.errors import StateError

__all__ = [
    "Committer", "cut_lost_tail", "logged_files", "read_mark", "remove_mark", "settle",
    "write_mark",
]  # fmt: skip

log = logging.getLogger("fedagg.server")
MARK = "synced"


def read_mark(d: Path) -> tuple[int, int] | None:
    """The seq and watermark recorded in ``d``'s mark file; None if there is none (``"fsync"``
    mode), (0, 0) if it is unreadable (nothing is known to be synced past the checkpoint)."""
    try:
        data = (d / MARK).read_bytes()
    except FileNotFoundError:
        return None
    if len(data) != 24:
        return 0, 0
    seq, watermark, check = struct.unpack("<QQQ", data)
    return (int(seq), int(watermark)) if xxhash.xxh64_intdigest(data[:16]) == check else (0, 0)


def write_mark(d: Path, seq: int, watermark: int = 0, sync: bool = True) -> None:
    """Record ``seq`` and ``watermark`` in ``d``'s mark file (created, and the directory
    synced, if new)."""
    path = d / MARK
    new = not path.exists()
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        head = struct.pack("<QQ", seq, watermark)
        os.pwrite(fd, head + struct.pack("<Q", xxhash.xxh64_intdigest(head)), 0)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    if new and sync:
        fsync_dir(d)


def remove_mark(d: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(d / MARK)
        fsync_dir(d)


def sync_files(paths: Sequence[str], spool: Path, sync: bool = True) -> None:
    """fsync each file (one gone was recycled after a checkpoint: nothing to do), then the
    spool directory (their renames)."""
    if not sync or not paths:
        return
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fsync_dir(spool)


class Committer:
    """The background group commit of a federation's spool files (see the module docstring).

    The engine thread calls :meth:`logged` after each committed batch (before any of it is
    acknowledged), :meth:`opened` with its lowest open job after each step, :meth:`covered`
    after a checkpoint and :meth:`flush` before a new model version leaves it; any thread
    reads :attr:`watermark`. ``sync=False`` (``[deploy] fsync = false``): nothing is
    fsynced, the mark and the watermark advance all the same (durable across a crash of the
    process only)."""

    def __init__(self, directory: Path, spool: Path, seq: int, low: int, version: int,
                 sync: bool = True) -> None:  # fmt: skip
        self.dir, self.spool, self.sync = directory, spool, sync
        self._cv = threading.Condition()
        self._mark_lock = threading.Lock()  # held while the mark is written (and by a power loss)
        #: events logged after the mark, in log order: (seq, spool paths, jobs)
        self._pending: list[tuple[int, tuple[str, ...], tuple[int, ...]]] = []
        self.durable = seq  # every event up to this seq is durable
        self._next = low
        self.watermark = low  # sent only once recorded in the mark
        self.exposed = version  # the newest model version that has left the engine
        self._error: BaseException | None = None
        self._stop = False
        self.passes = 0  # fsync passes done (each covers every file waiting)
        self.files = 0  # files fsynced
        write_mark(directory, seq, low, sync)
        on_power_loss(self._lose_unsynced)
        self._thread = threading.Thread(target=self._run, name="fedagg-commit", daemon=True)
        self._thread.start()

    # -- the engine thread -------------------------------------------------------------------
    def logged(self, seq: int, paths: Sequence[str], jobs: Sequence[int]) -> set[int]:
        """Events up to ``seq`` are committed to the log, with these spool files and jobs.
        Returns the jobs below the watermark: their uploads must be synced (:meth:`flush`)
        before they are acknowledged (their clients would not keep them)."""
        with self._cv:
            if seq <= self.durable:  # (a checkpoint covers them already)
                return set()
            late = {j for j in jobs if j < self.watermark}
            self._pending.append((seq, tuple(paths), tuple(jobs)))
            self._cv.notify_all()
            return late

    def opened(self, low: int) -> None:
        """Every open task's job, and every job dispatched from now on, is >= ``low``."""
        with self._cv:
            self._next = max(self._next, low)
            self._cv.notify_all()

    def covered(self, seq: int) -> None:
        """A checkpoint (durable) covers the events up to ``seq``: their files need no fsync."""
        with self._cv:
            self._advance(seq)
            self._cv.notify_all()

    def flush(self, seq: int) -> None:
        """Return once every event up to ``seq`` is durable (a pass, if one is needed)."""
        with self._cv:
            while self.durable < seq and self._error is None and not self._stop:
                self._cv.wait()
            if self._error is not None:
                raise self._error

    def barrier(self, seq: int, low_open: int, versions: Sequence[int], closed: bool) -> None:
        """After a step up to ``seq``: a new model version (its tasks, a closed round's model,
        the end: ``closed``) leaves the engine only once every event it follows is durable."""
        self.opened(low_open)
        newest = max(versions, default=-1)
        if closed or newest > self.exposed:
            self.flush(seq)
            self.exposed = max(self.exposed, newest)

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self._thread.join(timeout=30)
        on_power_loss(None)

    # -- internals ---------------------------------------------------------------------------
    def _advance(self, seq: int) -> None:
        self.durable = max(self.durable, seq)
        self._pending = [p for p in self._pending if p[0] > self.durable]

    def _candidate(self) -> int:
        """The watermark the log allows now: the lowest job of an open task or of an event
        after the mark (never lower than the one sent)."""
        low = min((j for _, _, jobs in self._pending for j in jobs), default=math.inf)
        return int(max(self.watermark, min(self._next, low)))

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._pending or self._stop or self._candidate() > self.watermark):
                        self._cv.wait()
                    if self._stop:
                        return
                    batch = list(self._pending)
                upto = batch[-1][0] if batch else self.durable
                if batch:
                    crash_point("commit")
                sync_files([p for _, paths, _ in batch for p in paths], self.spool, self.sync)
                # recorded, then sent; logged() waits meanwhile (it judges late uploads by it)
                with self._mark_lock, self._cv:
                    self._advance(upto)
                    w = self._candidate()
                    write_mark(self.dir, self.durable, w, self.sync)
                    self.watermark = w
                    self.passes += 1
                    self.files += sum(len(p) for _, p, _ in batch)
                    self._cv.notify_all()
        except BaseException as e:  # a disk error: flushes fail, the watermark stops
            log.exception("the spool committer failed")
            with self._cv:
                self._error = e
                self._cv.notify_all()

    def _lose_unsynced(self) -> None:
        """The ``power`` fault (:mod:`fedagg.deploy._faults`): what a power loss may do to
        the files not yet covered by the mark: each gone, empty or cut in half, in turn.
        Holds the mark (the committer records nothing more) until the process is killed."""
        self._mark_lock.acquire()
        with self._cv:
            paths = [p for _, ps, _ in self._pending for p in ps]
        for i, p in enumerate(dict.fromkeys(paths)):
            with contextlib.suppress(OSError):
                if i % 3 == 0:
                    os.unlink(p)
                else:
                    os.truncate(p, 0 if i % 3 == 1 else os.path.getsize(p) // 2)
        log.warning("power loss (fault injection): %d spool file(s) not yet synced lost",
                    len(set(paths)))  # fmt: skip


def _files(row: EventRow) -> tuple[UploadRow, ...]:
    return row.parts or ((row.upload,) if row.upload is not None else ())


def logged_files(rows: Sequence[EventRow | None]) -> tuple[list[str], list[int]]:
    """The spool files and the jobs of a committed batch's events (for :meth:`Committer.logged`)."""
    paths: list[str] = []
    jobs: list[int] = []
    for r in rows:
        if r is None:
            continue
        paths += [u.path for u in _files(r) if u.path]
        jobs += [u.job for u in r.parts] or ([r.job] if r.job is not None else [])
    return paths, jobs


def cut_lost_tail(store: Store, directory: Path, checkpoint: int) -> list[int]:
    """Recovery, before the replay: if a mark file says spools may be unsynced, find the first
    event after the mark and the newest ``checkpoint`` whose spool is missing or does not
    match its log row (lost in a power failure), and cut the log there (with the spool files
    of the events cut). Returns the jobs of the events cut."""
    mark = read_mark(directory)
    if mark is None:
        return []
    bad: int | None = None
    lost: list[str] = []
    jobs: list[int] = []
    for row in store.events_after(max(checkpoint, mark[0])):
        for u in _files(row):
            if bad is None:
                try:
                    verify_file(u, f"client {u.client}, job {u.job}")
                except StateError:
                    bad = row.seq
            if bad is not None and u.path:
                lost.append(u.path)
        if bad is not None:
            jobs += [u.job for u in row.parts] or ([row.job] if row.job is not None else [])
    if bad is None:
        return []
    n = store.truncate(bad)
    for p in lost:
        with contextlib.suppress(OSError):
            os.unlink(p)
    log.warning(
        "recovery: %d event(s) from seq %d on were logged but their updates never reached the "
        "disk (a power failure before they were synced): cut from the log; their tasks are "
        "open again and their clients send the copies they kept",
        n, bad,
    )  # fmt: skip
    return jobs


def settle(store: Store, directory: Path, spool: Path, seq: int, version: int, low_open: int,
           retained: bool, sync: bool) -> Committer | None:  # fmt: skip
    """Recovery, after the replay: the spools the log still needs are synced now (a crash may
    have left them in the page cache only); then a :class:`Committer` for ``"retained"``
    whose watermark resumes from the recorded one (the lowest open job without one), or the
    mark file removed for ``"fsync"`` (every upload is then synced before it is logged)."""
    mark = read_mark(directory)
    if mark is None and not retained:
        return None
    sync_files(store.spooled_through(seq), spool, sync)
    if retained:
        low = low_open if mark is None else min(mark[1], low_open)
        return Committer(directory, spool, seq, low, version, sync)
    remove_mark(directory)
    return None
