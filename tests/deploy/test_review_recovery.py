"""The recovery cut of ``durability = "retained"`` (review M3, M4): over a state directory
left by an in-memory server (two of a round's three uploads logged, no checkpoint after
them), a power loss is played by hand (the mark file set back before the uploads, a spool
file deleted) and the federation opened again:

* the cut is recorded in the store (``meta.cuts``: the old head's seq and chain, where it
  cut, how many events), so the rollback is visible to whoever saw the old head;
* a mark file that does not check refuses to start, and nothing is cut;
* a state directory last run with ``durability = "fsync"`` refuses to start on a mark file
  (planted, or copied from another run), and nothing is cut, even with a spool damaged.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from fedagg.deploy import Federation
from fedagg.deploy._commit import MARK, read_mark, write_mark
from fedagg.deploy._service import FederationService
from fedagg.errors import StateError
from tests.deploy.test_fold_ingest import Hand, _fed, _session


def _two_uploads(d: Path, durability: str) -> Federation:
    async def script(hand: Hand, service: FederationService) -> None:
        await hand.good(0)
        await hand.good(1)

    return _run(d, script, durability)


def _run(d: Path, script: Any, durability: str) -> Federation:
    return asyncio.run(_session(d, "spool", script, opts={"durability": durability}))


def _log(d: Path) -> tuple[int, str, list[tuple[int, str]]]:
    """The log's last seq, its recorded head, its uploads (seq, path)."""
    with contextlib.closing(sqlite3.connect(d / "state.db")) as db:
        last = int(db.execute("SELECT max(seq) FROM events").fetchone()[0])
        head = str(db.execute("SELECT value FROM meta WHERE key='chain_head'").fetchone()[0])
        ups = [
            (int(s), str(p)) for s, p in db.execute("SELECT seq, path FROM uploads ORDER BY seq")
        ]
    return last, head, ups


def _reopen(d: Path, durability: str) -> Federation:
    fed = _fed(d)
    fed.set_durability(durability, sync=False)
    try:
        fed.open()
    except BaseException:
        fed.close()
        raise
    return fed


def _lose_last(d: Path) -> tuple[int, str, list[tuple[int, str]]]:
    """A power loss by hand: the mark set back before the uploads, the last one's file gone."""
    before = _log(d)
    ups = before[2]
    write_mark(d, ups[0][0] - 1, 0, sync=False)
    Path(ups[-1][1]).unlink()
    return before


def test_a_cut_is_recorded_in_the_store(tmp_path: Path) -> None:
    d = _two_uploads(tmp_path / "s", "retained").dir
    last, head, ups = _lose_last(d)
    fed = _reopen(d, "retained")
    try:
        assert fed.cut == [1]  # client 1's job (0-based jobs: clients 0, 1, 2 got 0, 1, 2)
        cuts = fed.store.cuts()
        assert len(cuts) == 1
        c = cuts[0]
        assert f"{c['head']}:{c['chain']}" == head and c["head"] == last
        assert c["at"] == ups[-1][0] and c["events"] == last - ups[-1][0] + 1
        assert fed.store.last_seq() == ups[-1][0] - 1
        assert fed.store.meta("durability") == "retained"
    finally:
        fed.close()
    with contextlib.closing(sqlite3.connect(d / "state.db")) as db:  # durable: another reader
        assert "cuts" in dict(db.execute("SELECT key, value FROM meta").fetchall())


@pytest.mark.parametrize("garbage", [b"", b"\x00" * 24, b"x" * 7])
def test_a_garbage_mark_refuses_to_start_and_cuts_nothing(tmp_path: Path, garbage: bytes) -> None:
    d = _two_uploads(tmp_path / "s", "retained").dir
    before = _lose_last(d)
    (d / MARK).write_bytes(garbage)
    with pytest.raises(StateError, match=r"mark file .* is unreadable"):
        _reopen(d, "retained")
    assert _log(d) == before  # nothing cut


def test_a_garbage_or_planted_mark_without_damage_is_harmless(tmp_path: Path) -> None:
    """Nothing to cut: the mark is not needed, the start goes on (and the mode's own settle
    rewrites or removes it)."""
    d = _two_uploads(tmp_path / "s", "retained").dir
    before = _log(d)
    (d / MARK).write_bytes(b"garbage")
    fed = _reopen(d, "retained")
    try:
        assert fed.cut == [] and fed.store.cuts() == []
    finally:
        fed.close()
    assert read_mark(d) not in (None, (0, 0)) and _log(d) == before
    d = _two_uploads(tmp_path / "f", "fsync").dir
    write_mark(d, 1, 0, sync=False)
    fed = _reopen(d, "fsync")
    fed.close()
    assert read_mark(d) is None


def test_a_mark_file_in_fsync_mode_refuses_to_start_and_cuts_nothing(tmp_path: Path) -> None:
    d = _two_uploads(tmp_path / "s", "fsync").dir
    assert read_mark(d) is None
    with contextlib.closing(sqlite3.connect(d / "state.db")) as db:
        mode = db.execute("SELECT value FROM meta WHERE key='durability'").fetchone()
    assert mode == ("fsync",)  # the mode is recorded
    before = _lose_last(d)  # a mark planted before the uploads, and a spool damaged
    for durability in ("fsync", "retained"):  # whatever the new run's mode
        with pytest.raises(StateError, match="planted or copied"):
            _reopen(d, durability)
        assert _log(d) == before
    (d / MARK).unlink()  # without the planted mark: the damage is refused as corruption
    with pytest.raises(StateError):
        _reopen(d, "fsync")
    assert _log(d) == before


def test_a_retained_run_after_an_fsync_run_and_back(tmp_path: Path) -> None:
    """The recorded mode follows the runs: fsync, retained (a mark of its own), fsync (the
    mark removed); each start is clean."""
    d = _two_uploads(tmp_path / "s", "fsync").dir
    for mode in ("retained", "fsync", "retained"):
        fed = _reopen(d, mode)
        try:
            assert fed.store.meta("durability") == mode and fed.cut == []
            assert (read_mark(d) is not None) == (mode == "retained")
        finally:
            fed.close()
