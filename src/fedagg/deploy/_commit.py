"""Group commit of spooled uploads, and the committed watermark (``durability = "retained"``).

With ``[deploy] durability = "retained"`` an upload is acknowledged once its event is committed
to the log (SQLite, fsynced), its spool file written but not yet fsynced; the acknowledgement
says ``retain``: the client keeps the update. A :class:`Committer` thread fsyncs the written
spool files in the background, all that are waiting in one pass (then the spool directory,
for their renames), then records in the *mark file* (``synced``) how far the log is covered
(the last event seq whose spool, and every one before it, is on disk) and the new
watermark: the lowest job of an event logged after the mark, or of an open task
dispatched less than :data:`HOLD` seconds ago; only then is the watermark sent. Every
acknowledged upload of a job below it is durable. An upload of a job below it (a task
already closed, or a straggler's, dispatched longer ago) is *late*: synced before it is
acknowledged (:meth:`Committer.logged` says which). So an open task holds the watermark
back (the other clients keep their acknowledged updates) for at most ``HOLD`` seconds, not
for as long as a straggler trains. It never decreases, across restarts too: a restart
resumes from the recorded one (or the lowest open job, if higher); a job reopened by a cut
below it is late.

A checkpoint covers what it folded: its events need no spool fsync (:meth:`covered`).

On a power loss the files after the mark may be missing, empty or truncated: at restart
(:meth:`fedagg.deploy._fed.Federation.open`) the log is cut at the first such event after the
mark and the newest checkpoint; those jobs are open again and their clients push the copies
they kept. A file at or before the mark that does not match its log row is corruption, and
refused as in ``"fsync"`` mode. The cut is recorded in the store (``meta.cuts``: the old
head's seq and chain, the seq cut from, how many events; see :meth:`Store.truncate`), so a
rollback of the log stays visible. It runs only when the store says the previous run was
``"retained"`` (``meta.durability``, written at each start by :func:`settle` before the mark
file) and the mark file is valid: a cut on the word of a mark file in a state directory last
run with ``"fsync"``, or of one that does not check (torn or altered: it is written in one
sector, and created whole by a rename, so neither happens by itself), refuses to start
(:class:`~fedagg.errors.StateError`), nothing cut.

The mark is 24 bytes written in place (one sector): the seq, the watermark and their xxh64.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import struct
import threading
import time
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
#: seconds an open task holds the watermark back (see :meth:`Committer._candidate`): past
#: it, a straggler's upload is synced before its acknowledgement, and the other clients stop
#: keeping theirs (their memory does not grow with one slow client)
HOLD = 60.0


def read_mark(d: Path) -> tuple[int, int] | None:
    """The seq and watermark recorded in ``d``'s mark file; None if there is none (``"fsync"``
    mode), (0, 0) if it is unreadable (nothing is known to be synced past the checkpoint).
    Recovery reads it with :func:`checked_mark`, which refuses an unreadable one."""
    try:
        return checked_mark(d)
    except StateError:
        return 0, 0


def checked_mark(d: Path) -> tuple[int, int] | None:
    """As :func:`read_mark`, but a mark file that does not check (torn, altered, planted) is a
    :class:`StateError`: recovery never cuts the log on its word."""
    try:
        data = (d / MARK).read_bytes()
    except FileNotFoundError:
        return None
    if len(data) == 24:
        seq, watermark, check = struct.unpack("<QQQ", data)
        if xxhash.xxh64_intdigest(data[:16]) == check:
            return int(seq), int(watermark)
    raise StateError(
        f"the mark file {d / MARK} is unreadable (torn or altered: it is written in place in "
        "one sector and created whole, so a crash does not leave it so); recovery will not "
        "cut the event log on its word. Restore the state directory from a backup, or move "
        "it aside to start a new federation"
    )


def write_mark(d: Path, seq: int, watermark: int = 0, sync: bool = True) -> None:
    """Record ``seq`` and ``watermark`` in ``d``'s mark file: in place, or, if there is none,
    created whole (a temporary file renamed, the directory synced)."""
    path = d / MARK
    head = struct.pack("<QQ", seq, watermark)
    data = head + struct.pack("<Q", xxhash.xxh64_intdigest(head))
    new = not path.exists()
    target = d / (MARK + ".tmp") if new else path
    fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, data, 0)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        os.replace(target, path)
        if sync:
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
    acknowledged), :meth:`opened` with its next job to dispatch after each step, :meth:`covered`
    after a checkpoint and :meth:`flush` before a new model version leaves it; any thread
    reads :attr:`watermark`. ``sync=False`` (``[deploy] fsync = false``): nothing is
    fsynced, the mark and the watermark advance all the same (durable across a crash of the
    process only)."""

    def __init__(self, directory: Path, spool: Path, seq: int, low: int, version: int,
                 sync: bool = True, hold: float = HOLD) -> None:  # fmt: skip
        self.dir, self.spool, self.sync = directory, spool, sync
        self._cv = threading.Condition()
        self._mark_lock = threading.Lock()  # held while the mark is written (and by a power loss)
        #: events logged after the mark, in log order: (seq, spool paths, jobs)
        self._pending: list[tuple[int, tuple[str, ...], tuple[int, ...]]] = []
        self.durable = seq  # every event up to this seq is durable
        self._open = low  # the lowest open job (or the next to dispatch, none open)
        self.hold = hold
        self.clock = time.monotonic  # (a test's own clock)
        #: (when, next job to dispatch then), oldest first: the jobs dispatched by a time
        self._dispatched: collections.deque[tuple[float, int]] = collections.deque()
        self._old = low  # every job below it was dispatched more than ``hold`` ago
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

    def opened(self, low: int, high: int | None = None) -> None:
        """Every open task's job is >= ``low``; every job dispatched so far is below
        ``high`` (the next job to dispatch; default ``low``)."""
        high = low if high is None else high
        now = self.clock()
        with self._cv:
            self._open = max(self._open, low)
            last = self._dispatched[-1] if self._dispatched else (-math.inf, self._old)
            if high > last[1]:
                if now - last[0] < self.hold / 64:  # (coalesced: a bounded deque)
                    self._dispatched[-1] = (last[0], high)
                else:
                    self._dispatched.append((now, high))
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

    def barrier(self, seq: int, low_open: int, versions: Sequence[int], closed: bool,
                high: int | None = None) -> None:  # fmt: skip
        """After a step up to ``seq`` (``low_open``: the lowest open job, ``high``: the next
        job to dispatch): a new model version (its tasks, a closed round's model, the end:
        ``closed``) leaves the engine only once every event it follows is durable."""
        self.opened(low_open, high)
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

    def _expire(self, now: float) -> float | None:
        """Forget the dispatch times older than ``hold``; when the next one expires."""
        while self._dispatched and now - self._dispatched[0][0] >= self.hold:
            self._old = max(self._old, self._dispatched.popleft()[1])
        return self._dispatched[0][0] + self.hold if self._dispatched else None

    def _candidate(self) -> int:
        """The watermark the log allows now (never lower than the one sent): the lowest job
        of an event after the mark (their spools are not yet synced), and of an open task
        dispatched less than ``hold`` ago (its upload, when it comes, is acknowledged as
        "retain"). An older open task does not hold it: its upload is late, synced before
        its acknowledgement, and the other clients do not keep theirs meanwhile."""
        self._expire(self.clock())
        low = min((j for _, _, jobs in self._pending for j in jobs), default=math.inf)
        return int(max(self.watermark, min(max(self._open, self._old), low)))

    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not (self._pending or self._stop or self._candidate() > self.watermark):
                        until = self._expire(self.clock())  # an old task stops holding
                        self._cv.wait(None if until is None else until - self.clock())
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


#: ``meta`` key: the durability mode of the store's last start ("fsync" or "retained")
MODE = "durability"


def cut_lost_tail(store: Store, directory: Path, checkpoint: int) -> list[int]:
    """Recovery, before the replay: if the previous run was ``"retained"`` (the store's
    ``meta.durability``) and its mark file says spools may be unsynced, find the first event
    after the mark and the newest ``checkpoint`` whose spool is missing or does not match its
    log row (lost in a power failure), and cut the log there (with the spool files of the
    events cut), recording the cut in the store. Returns the jobs of the events cut.

    A cut on the word of a mark file that does not check, or of one in a state directory
    whose previous run was ``"fsync"`` (planted, or copied from another run: those uploads
    were acknowledged as durable, their clients keep nothing), is refused instead (a
    :class:`StateError`, nothing cut); with no spool damaged, such a mark is harmless (the
    mode's :func:`settle` removes or rewrites it). A store of before ``meta.durability`` is
    taken as ``"retained"`` if it has a mark file."""
    mode = store.meta(MODE)
    try:
        mark, torn = checked_mark(directory), None
    except StateError as e:  # scanned from the checkpoint: a cut would be refused
        mark, torn = (0, 0), e
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
    damaged = f"the spool file of event {bad} (after the checkpoint) is missing or damaged"
    if torn is not None:
        raise StateError(f"{damaged}, and {torn}")
    if mode is not None and mode != "retained":
        raise StateError(
            f"{damaged}, and {directory / MARK} exists but the state directory's last run had "
            f"durability = {mode!r}, which writes no mark file: it was planted or copied from "
            "another run, and the event log is not cut on its word (every upload logged in "
            "that mode was acknowledged as durable). Restore the state directory from a "
            "backup, or move it aside to start a new federation"
        )
    cut = store.truncate(bad, why=f"spool lost after the synced mark (seq {mark[0]})")
    for p in lost:
        with contextlib.suppress(OSError):
            os.unlink(p)
    log.warning(
        "recovery: %d event(s) from seq %d on (the log's head was seq %d, chain %s) were "
        "logged but their updates never reached the disk (a power failure before they were "
        "synced): cut from the log, and the cut recorded in its meta table (cuts); their "
        "tasks are open again and their clients send the copies they kept",
        cut["events"], bad, cut["head"], cut["chain"],
    )  # fmt: skip
    return jobs


def settle(store: Store, directory: Path, spool: Path, seq: int, version: int, low_open: int,
           retained: bool, sync: bool) -> Committer | None:  # fmt: skip
    """Recovery, after the replay: the spools the log still needs are synced now (a crash may
    have left them in the page cache only); the mode recorded in the store
    (``meta.durability``); then a :class:`Committer` for ``"retained"`` whose watermark
    resumes from the recorded one (or the lowest open job ``low_open``, if higher: every
    logged upload is durable now; it never decreases), or the mark file removed for
    ``"fsync"`` (every upload is then synced before it is logged). The mode is recorded
    before the mark file is created and after it is removed, so the store never says
    "fsync" next to a mark of its own."""
    mode = "retained" if retained else "fsync"
    mark = read_mark(directory)
    if mark is not None or retained:
        sync_files(store.spooled_through(seq), spool, sync)
    if not retained:
        remove_mark(directory)
    if store.meta(MODE) != mode:
        store.set_meta({MODE: mode})
    if retained:
        low = low_open if mark is None else max(mark[1], low_open)
        return Committer(directory, spool, seq, low, version, sync)
    return None
