"""The edge aggregator's engine and the policies' ``Merge`` event, in process (no network).

:class:`~fedagg.deploy._edge.EdgeEngine` is fed the way the server's engine thread feeds it:
``log()`` a batch of events ``(kind, time, client, job, tag, UploadRow | PartialRows | None)``
whose spool files are written here, then ``step()`` the rows it returns; what it must send to
its parent comes back in ``Effects.forward``.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedagg
from fedagg import strategies
from fedagg.core.participation import fedau
from fedagg.core.spec import ParamSpec
from fedagg.core.update import Update
from fedagg.deploy._edge import EdgeEngine, Forward
from fedagg.deploy._fed import Effects, TaskInfo
from fedagg.deploy._partial import (
    load_partial,
    mean_state,
    partial_buffers,
    partial_info,
    partial_nbytes,
)
from fedagg.deploy._store import PartialRows, UploadRow
from fedagg.errors import ConfigError, StateError
from fedagg.policy import AllAvailable, Applied, Arrival, Dispatch, Merge, Start
from fedagg.sim import SyncPolicy, fedbuff

SPEC = ParamSpec.from_arrays([np.zeros((3, 4), np.float32), np.zeros(5, np.float32)])  # 17


# -- helpers -----------------------------------------------------------------------------------
def _delta(job: int, spec: ParamSpec = SPEC) -> np.ndarray:
    """A seeded update whose magnitudes span orders (so the compensation has work to do)."""
    rng = np.random.default_rng(1000 + job)
    scale = 10.0 ** rng.integers(-6, 3, spec.size)
    return (rng.standard_normal(spec.size) * scale).astype(spec.dtype)


def _weight(job: int) -> float:
    return float(3 + 7 * job % 5)


def _upload(eng: EdgeEngine, client: int, job: int, version: int = 0) -> UploadRow:
    """A client's update, spooled the way the server spools it."""
    d = _delta(job, eng.spec)
    path = eng.spool / f"{job:012d}-{client}.upd"
    d.tofile(path)
    return UploadRow(client, job, str(path), _weight(job), version,
                     {"train_loss": 0.25 * job}, d.nbytes, b"\0" * 32)  # fmt: skip


def _engine(d: Path, acc: str = "float64", **kw: Any) -> EdgeEngine:
    eng = EdgeEngine(fedagg.aggregators.mean(acc), SPEC, num_clients=8, directory=d, **kw)  # type: ignore[arg-type]
    eng.open()
    return eng


def _feed(eng: EdgeEngine, *events: tuple[Any, ...]) -> Effects:
    rows = eng.log(list(events))
    assert all(r is not None for r in rows), rows
    return eng.step([r for r in rows if r is not None])


def _arrive(eng: EdgeEngine, u: UploadRow, t: float = 1.0) -> Effects:
    return _feed(eng, ("arrival", t, u.client, u.job, None, u))


def _tasks(eng: EdgeEngine, jobs: dict[int, tuple[int, int]]) -> Effects:
    """``jobs``: job -> (client, version)."""
    return eng.add_tasks([TaskInfo(j, c, v, 1) for j, (c, v) in jobs.items()], seed=5)


def _mean_state(agg: Any, jobs: list[int], version: int = 0, spec: ParamSpec = SPEC) -> Any:
    """The in-process mean of ``jobs``' updates, folded one at a time in that order."""
    st = agg.init(spec, version=version)
    for j in jobs:
        agg.fold(st, Update(delta=_delta(j, spec), weight=_weight(j)))
    return st


def _reference(acc: str, jobs: list[int], version: int = 0) -> np.ndarray:
    agg = fedagg.aggregators.mean(acc)  # type: ignore[arg-type]
    out: np.ndarray = agg.finalize_flat(_mean_state(agg, jobs, version))
    return out


def _finalize(eng: EdgeEngine, fwd: Forward) -> np.ndarray:
    out: np.ndarray = eng.agg.finalize_flat(fwd.state)
    return out


def _write_partial(path: Path, state: Any) -> dict[str, Any]:
    """A child's partial aggregate as the server spools it, and its logged info."""
    with open(path, "wb") as f:
        for b in partial_buffers(state):
            f.write(b)
    info = partial_info(state)
    return {k: info[k] for k in ("weight", "weight_comp", "accumulator")} | {"edge": "child"}


def _child_partial(eng: EdgeEngine, jobs: dict[int, int], version: int = 0) -> PartialRows:
    """A child edge's partial of ``jobs`` (job -> client), as the parent logs it."""
    agg = eng.agg
    state = _mean_state(agg, sorted(jobs), version)
    path = eng.spool / f"partial-{min(jobs):012d}.upd"
    info = _write_partial(path, state)
    nbytes = path.stat().st_size
    parts = tuple(
        UploadRow(c, j, str(path), _weight(j), version, {"train_loss": 0.25 * j}, nbytes, b"")
        for j, c in sorted(jobs.items())
    )
    return PartialRows(parts, info)


def _job(j: int, client: int | None = None) -> tuple[int, int, float, float]:
    return (j if client is None else client, j, _weight(j), 0.25 * j)


# -- EdgeEngine: construction and tasks ----------------------------------------------------------
def test_the_engine_refuses_bad_settings(tmp_path: Path) -> None:
    mean = fedagg.aggregators.mean("float64")
    with pytest.raises(ConfigError, match="edge_mode"):
        EdgeEngine(mean, SPEC, num_clients=2, directory=tmp_path, mode="merge")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="flush_after"):
        EdgeEngine(mean, SPEC, num_clients=2, directory=tmp_path, flush_after=0.0)
    # a rule that is not a mean monoid cannot be split into partials (but can be relayed)
    with pytest.raises(ConfigError, match="mean-monoid"):
        EdgeEngine(fedagg.aggregators.median(), SPEC, num_clients=2, directory=tmp_path / "m")
    EdgeEngine(fedagg.aggregators.median(), SPEC, num_clients=2, directory=tmp_path / "r",
               mode="relay").close()  # fmt: skip


def test_add_tasks_takes_new_tasks_once(tmp_path: Path) -> None:
    eng = _engine(tmp_path)
    eff = _tasks(eng, {0: (0, 0), 1: (1, 0)})
    assert eff.tasks == [TaskInfo(0, 0, 0, 1), TaskInfo(1, 1, 0, 1)]
    assert eng.seed == 5
    assert eng.task_problem(0, 0, 0) is None
    assert eng.task_problem(1, 0, 0) == "denied"
    assert eng.task_problem(0, 0, 1) == "version"
    assert eng.task_problem(0, 9, 0) == "unknown"
    # the parent re-sending a task it already gave (a reconnect) adds nothing
    assert _tasks(eng, {0: (0, 0), 2: (2, 0)}).tasks == [TaskInfo(2, 2, 0, 1)]
    # nor one whose update is already logged here (the parent's stream raced the upload)
    _arrive(eng, _upload(eng, 0, 0))
    assert _tasks(eng, {0: (0, 0)}).tasks == []
    assert set(eng.tasks) == {1, 2}
    eng.close()


# -- EdgeEngine: partial aggregates --------------------------------------------------------------
@pytest.mark.parametrize("acc", ["float64", "float32"])
def test_a_version_is_forwarded_once_every_task_is_resolved(tmp_path: Path, acc: str) -> None:
    eng = _engine(tmp_path, acc, flush_after=5.0)
    _tasks(eng, {0: (0, 0), 1: (1, 0), 2: (2, 0), 3: (3, 1)})  # job 3 is of another version
    eff = _arrive(eng, _upload(eng, 2, 2), t=10.0)
    assert eff.forward == []
    assert eff.timers == [(15.0, 0)]  # flush_after seconds after the version's first update
    eff = _arrive(eng, _upload(eng, 0, 0), t=11.0)
    assert (eff.forward, eff.timers) == ([], [])  # the timer is armed once per partial
    u1 = _upload(eng, 1, 1)
    eff = _arrive(eng, u1, t=12.0)
    (fwd,) = eff.forward
    assert fwd.version == 0
    assert fwd.jobs == [_job(2), _job(0), _job(1)]  # in arrival order
    assert (fwd.dropped, fwd.relay) == ([], None)
    assert sorted(fwd.paths) == sorted(str(eng.spool / f"{j:012d}-{j}.upd") for j in range(3))
    # the partial's mean is the in-process mean of the same updates (same fold order)
    got = _finalize(eng, fwd)
    want = _reference(acc, [2, 0, 1])
    assert got.dtype == np.float32
    assert np.array_equal(got, want), np.max(np.abs(got - want))
    ms = mean_state(fwd.state)
    assert (ms.count, ms.version, ms.accumulator) == (3, 0, acc)
    assert ms.weight + ms.weight_comp == _weight(0) + _weight(1) + _weight(2)
    assert eng.pending == {} and set(eng.tasks) == {3}
    assert eng.task_problem(1, 1, 0) == "unknown"  # resolved
    eng.close()


def test_float64_partial_equals_the_flat_mean_bitwise(tmp_path: Path) -> None:
    """Not just the same fold: also a flat fold_many of the same updates."""
    eng = _engine(tmp_path, "float64")
    jobs = list(range(6))
    _tasks(eng, {j: (j, 0) for j in jobs})
    fwds = []
    for j in jobs:
        fwds += _arrive(eng, _upload(eng, j, j)).forward
    (fwd,) = fwds
    agg = fedagg.aggregators.mean("float64")
    flat = agg.fold_many(
        agg.init(SPEC, version=0), [Update(delta=_delta(j), weight=_weight(j)) for j in jobs]
    )
    assert np.array_equal(_finalize(eng, fwd), agg.finalize_flat(flat))
    eng.close()


def test_a_timer_flushes_a_partial_early(tmp_path: Path) -> None:
    eng = _engine(tmp_path, flush_after=2.0)
    _tasks(eng, {0: (0, 0), 1: (1, 0), 2: (2, 0)})
    eff = _arrive(eng, _upload(eng, 0, 0), t=1.0)
    ((at, tag),) = eff.timers
    assert (at, tag) == (3.0, 0)
    assert _feed(eng, ("timer", 2.0, None, None, 7, None)).forward == []  # another version's
    (fwd,) = _feed(eng, ("timer", at, None, None, tag, None)).forward
    assert (fwd.version, fwd.jobs) == (0, [_job(0)])
    assert np.array_equal(_finalize(eng, fwd), _reference("float64", [0]))
    assert set(eng.tasks) == {1, 2}  # still open: the rest comes in a later partial
    eff = _arrive(eng, _upload(eng, 1, 1), t=4.0)
    assert eff.forward == [] and eff.timers == [(6.0, 0)]  # a new partial, a new timer
    (fwd,) = _arrive(eng, _upload(eng, 2, 2), t=5.0).forward
    assert fwd.jobs == [_job(1), _job(2)]
    assert np.array_equal(_finalize(eng, fwd), _reference("float64", [1, 2]))
    # a timer of a partial already sent does nothing
    assert _feed(eng, ("timer", 6.0, None, None, 0, None)).forward == []
    eng.close()


def test_a_dropout_goes_up_with_the_next_forward(tmp_path: Path) -> None:
    eng = _engine(tmp_path)
    _tasks(eng, {0: (0, 0), 1: (1, 0), 2: (2, 0)})
    assert _arrive(eng, _upload(eng, 0, 0)).forward == []
    assert _feed(eng, ("dropout", 2.0, 1, 1, None, None)).forward == []  # job 2 still open
    assert set(eng.tasks) == {2}
    (fwd,) = _arrive(eng, _upload(eng, 2, 2), t=3.0).forward
    assert fwd.jobs == [_job(0), _job(2)]
    assert fwd.dropped == [(1, 1)]
    assert np.array_equal(_finalize(eng, fwd), _reference("float64", [0, 2]))
    assert eng.dropped == []
    eng.close()


def test_a_dropout_with_nothing_pending_goes_up_alone(tmp_path: Path) -> None:
    eng = _engine(tmp_path)
    _tasks(eng, {0: (0, 0), 1: (1, 0)})
    (fwd,) = _feed(eng, ("dropout", 1.0, 1, 1, None, None)).forward
    assert (fwd.version, fwd.jobs, fwd.dropped, fwd.state, fwd.paths) == (-1, [], [(1, 1)],
                                                                           None, [])  # fmt: skip
    assert set(eng.tasks) == {0}
    eng.close()


def test_relay_mode_forwards_each_update_unchanged(tmp_path: Path) -> None:
    eng = _engine(tmp_path, mode="relay")
    _tasks(eng, {0: (0, 0), 1: (1, 0), 2: (2, 1)})
    u0, u2 = _upload(eng, 0, 0), _upload(eng, 2, 2, version=1)
    eff = _arrive(eng, u0)
    (fwd,) = eff.forward
    assert eff.timers == []  # nothing waits
    assert (fwd.version, fwd.jobs, fwd.relay, fwd.state) == (0, [_job(0)], u0, None)
    assert (fwd.dropped, fwd.paths) == ([], [u0.path])
    (fwd,) = _arrive(eng, u2).forward  # each update keeps its own base version
    assert (fwd.version, fwd.jobs, fwd.relay) == (1, [_job(2)], u2)
    (fwd,) = _feed(eng, ("dropout", 3.0, 1, 1, None, None)).forward
    assert (fwd.jobs, fwd.dropped, fwd.relay) == ([], [(1, 1)], None)
    assert eng.pending == {} and eng.tasks == {}
    eng.close()


def test_a_childs_partial_merges_into_the_pending_partial(tmp_path: Path) -> None:
    """An intermediate: a child edge's partial (jobs 0-2) and its own clients' updates (3, 4)
    go up as one partial whose mean is the flat mean of all five, bit for bit (float64)."""
    eng = _engine(tmp_path)
    _tasks(eng, {j: (j, 0) for j in range(5)})
    assert _arrive(eng, _upload(eng, 3, 3)).forward == []
    eff = _feed(eng, ("partial", 2.0, None, None, None, _child_partial(eng, {0: 0, 1: 1, 2: 2})))
    assert eff.forward == []
    assert set(eng.tasks) == {4}  # the partial resolved its three jobs
    (fwd,) = _arrive(eng, _upload(eng, 4, 4), t=3.0).forward
    assert fwd.jobs == [_job(3), _job(0), _job(1), _job(2), _job(4)]
    assert len(fwd.paths) == 3  # two updates and the child's payload
    ms = mean_state(fwd.state)
    assert ms.count == 5
    assert np.array_equal(_finalize(eng, fwd), _reference("float64", list(range(5))))
    eng.close()


def test_a_childs_compensation_buffer_is_merged_and_forwarded(tmp_path: Path) -> None:
    """A child's partial of ``1e16`` and ``1`` (the 1 is only in its compensation buffer),
    merged with this edge's own ``-1e16``: the mean is 1/3, here and at the parent that loads
    what this edge forwards. Reading a partial's sums but not its compensation gives 0."""
    eng = _engine(tmp_path)
    _tasks(eng, {j: (j, 0) for j in range(3)})
    values = [1e16, 1.0, -1e16]
    deltas = [np.full(SPEC.size, v, np.float32) for v in values]
    child = eng.agg.init(SPEC, version=0)
    for d in deltas[:2]:
        eng.agg.fold(child, Update(delta=d, weight=1.0))
    assert np.all(child.comp == 1.0)
    path = eng.spool / "partial-child.upd"
    info = _write_partial(path, child)
    size = path.stat().st_size
    parts = tuple(UploadRow(j, j, str(path), 1.0, 0, {}, size, b"") for j in (0, 1))
    assert _feed(eng, ("partial", 1.0, None, None, None, PartialRows(parts, info))).forward == []
    own = eng.spool / f"{2:012d}-2.upd"
    deltas[2].tofile(own)
    up = UploadRow(
        2,
        2,
        str(own),
        1.0,
        0,
        {"train_loss": 0.5},
        deltas[2].nbytes,
        hashlib.sha256(deltas[2].tobytes()).digest(),
    )
    (fwd,) = _arrive(eng, up, t=2.0).forward
    agg = eng.agg
    flat = agg.fold_many(agg.init(SPEC, version=0), [Update(d, 1.0) for d in deltas])
    want = agg.finalize_flat(flat)
    assert np.all(want == np.float32(1 / 3))
    assert np.array_equal(_finalize(eng, fwd), want)
    ms = mean_state(fwd.state)
    assert np.array_equal(ms.acc, flat.acc) and np.array_equal(ms.comp, flat.comp)
    # the parent: what this edge sends (sums, then compensation), loaded and finalized
    sent = tmp_path / "sent.upd"
    info = _write_partial(sent, fwd.state)
    assert sent.stat().st_size == partial_nbytes(SPEC, "float64")
    at_parent = load_partial(agg, SPEC, 0, sent, info, 3)
    assert np.array_equal(agg.finalize_flat(at_parent), want)
    eng.close()


def test_a_partial_with_another_accumulator_is_refused(tmp_path: Path) -> None:
    eng = _engine(tmp_path, "float64")
    _tasks(eng, {0: (0, 0), 1: (1, 0)})
    agg32 = fedagg.aggregators.mean("float32")
    state = _mean_state(agg32, [0])
    path = eng.spool / "p32.upd"
    info = _write_partial(path, state)
    rows = PartialRows((UploadRow(0, 0, str(path), _weight(0), 0, {}, 68, b""),), info)
    with pytest.raises(StateError, match="float32 accumulator cannot merge"):
        _feed(eng, ("partial", 1.0, None, None, None, rows))
    eng.close()


# -- EdgeEngine: the log ---------------------------------------------------------------------------
def test_log_refuses_duplicate_keys(tmp_path: Path) -> None:
    eng = _engine(tmp_path)
    _tasks(eng, {j: (j, 0) for j in range(4)})
    u0 = _upload(eng, 0, 0)
    (row,) = eng.log([("arrival", 1.0, 0, 0, None, u0)])
    assert row is not None and row.seq == 1
    assert eng.log([("arrival", 2.0, 0, 0, None, u0)]) == [None]  # a retry
    u1 = _upload(eng, 1, 1)
    a, b = eng.log([("arrival", 3.0, 1, 1, None, u1), ("arrival", 3.0, 1, 1, None, u1)])
    assert a is not None and a.seq == 2 and b is None  # in one batch, too
    # a partial overlapping a logged update is refused whole
    partial = _child_partial(eng, {1: 1, 2: 2})
    assert eng.log([("partial", 4.0, None, None, None, partial)]) == [None]
    assert not eng.store.has_upload(2, 2)
    (c,) = eng.log([("partial", 4.0, None, None, None, _child_partial(eng, {2: 2, 3: 3}))])
    assert c is not None and c.seq == 3 and [u.job for u in c.parts] == [2, 3]
    assert c.info["accumulator"] == "float64"
    assert eng.log([("partial", 5.0, None, None, None, _child_partial(eng, {3: 3}))]) == [None]
    assert eng.store.count_uploads() == 4
    assert eng.store.last_seq() == 3
    eng.close()


def test_a_job_that_dropped_out_is_not_reopened_when_the_parent_resends_it(
    tmp_path: Path,
) -> None:
    """The parent re-sends every open task of the subtree when the edge's task stream
    reconnects; a job the edge has already reported (or is about to report) as dropped must
    stay resolved, as an uploaded one does: else its client is handed the job again, and the
    partial that then carries it is refused by the parent whole (its other jobs with it)."""
    eng = _engine(tmp_path)
    _tasks(eng, {0: (0, 0), 1: (1, 0), 2: (2, 0)})
    _arrive(eng, _upload(eng, 0, 0))
    _feed(eng, ("dropout", 2.0, 1, 1, None, None))
    # the link reconnects before the dropout reached the parent: its stream re-sends 1 and 2
    eff = _tasks(eng, {1: (1, 0), 2: (2, 0)})
    assert eff.tasks == []
    assert set(eng.tasks) == {2}
    eng.close()


# -- EdgeEngine: restart -------------------------------------------------------------------------
def _ack(eng: EdgeEngine, fwd: Forward, t: float = 50.0) -> None:
    """What the edge server logs once the parent acknowledged ``fwd``."""
    keys = [(c, j) for c, j, _, _ in fwd.jobs] + list(fwd.dropped)
    _feed(eng, *[("acked", t, c, j, None, None) for c, j in keys])


def test_restart_reforwards_what_the_parent_did_not_acknowledge(tmp_path: Path) -> None:
    d = tmp_path / "edge"
    eng = _engine(d, flush_after=60.0)
    # version 0: jobs 0, 1 (forwarded and acknowledged) and a dropout (acknowledged with them)
    _tasks(eng, {0: (0, 0), 1: (1, 0), 2: (2, 0)})
    _arrive(eng, _upload(eng, 0, 0))
    _feed(eng, ("dropout", 2.0, 2, 2, None, None))
    (f0,) = _arrive(eng, _upload(eng, 1, 1)).forward
    assert f0.dropped == [(2, 2)]
    _ack(eng, f0)
    # version 1: job 3 forwarded, not acknowledged (the edge died before the parent answered)
    _tasks(eng, {3: (3, 1)})
    (f1,) = _arrive(eng, _upload(eng, 3, 3, version=1)).forward
    # version 2: jobs 4 (an update) and 5-6 (a child's partial) still pending (job 7 is open),
    # and job 8 dropped out, not yet reported
    _tasks(eng, {j: (j, 2) for j in range(4, 9)})
    _arrive(eng, _upload(eng, 4, 4, version=2))
    _feed(eng, ("partial", 3.0, None, None, None, _child_partial(eng, {5: 5, 6: 6}, 2)))
    _feed(eng, ("dropout", 4.0, 8, 8, None, None))
    assert sorted(eng.pending) == [2]
    (eng.spool / "tmp-cut-off").write_bytes(b"half an upload")
    eng.close()

    again = EdgeEngine(fedagg.aggregators.mean("float64"), SPEC, num_clients=8, directory=d,
                       flush_after=60.0)  # fmt: skip
    eff = again.open()
    assert not (again.spool / "tmp-cut-off").exists()
    assert again.replayed == 4  # job 3, job 4, the partial, job 8's dropout: not the acked
    by_version = {f.version: f for f in eff.forward}
    assert sorted(by_version) == [1, 2], eff.forward
    assert by_version[1].jobs == f1.jobs
    assert np.array_equal(_finalize(again, by_version[1]), _finalize(eng, f1))
    f2 = by_version[2]
    assert f2.jobs == [_job(4), _job(5), _job(6)]
    assert np.array_equal(_finalize(again, f2), _reference("float64", [4, 5, 6], version=2))
    dropped = [d for f in eff.forward for d in f.dropped]
    assert dropped == [(8, 8)]  # the acknowledged dropout of job 2 is not re-sent
    assert again.pending == {} and again.dropped == []
    # the parent re-sending the still open job 7 is taken; the uploaded ones are not
    assert _tasks(again, {j: (j, 2) for j in range(4, 8)}).tasks == [TaskInfo(7, 7, 2, 1)]
    # acknowledge everything, restart again: nothing left to send
    for f in eff.forward:
        _ack(again, f)
    again.close()
    third = EdgeEngine(fedagg.aggregators.mean("float64"), SPEC, num_clients=8, directory=d)
    assert third.open().forward == []
    assert third.replayed == 0
    third.close()


def test_restart_is_bitwise_the_same_partial(tmp_path: Path) -> None:
    """A crash between two arrivals of a version: the re-folded partial is the one the edge
    would have sent (the accumulator's and compensation's bits)."""
    clean = _engine(tmp_path / "clean")
    _tasks(clean, {j: (j, 0) for j in range(4)})
    for j in range(3):
        _arrive(clean, _upload(clean, j, j))
    (want,) = clean._flush(force=True).forward  # what a timer would have sent

    d = tmp_path / "crash"
    eng = _engine(d)
    _tasks(eng, {j: (j, 0) for j in range(4)})
    for j in range(3):
        _arrive(eng, _upload(eng, j, j))
    eng.close()
    again = EdgeEngine(fedagg.aggregators.mean("float64"), SPEC, num_clients=8, directory=d)
    (got,) = again.open().forward
    assert got.jobs == want.jobs
    a, b = mean_state(got.state), mean_state(want.state)
    assert np.array_equal(a.acc, b.acc) and a.comp is not None and b.comp is not None
    assert np.array_equal(a.comp, b.comp)
    assert (a.weight, a.weight_comp, a.count) == (b.weight, b.weight_comp, b.count)
    again.close()
    clean.close()


# -- load_partial / mean_state ---------------------------------------------------------------------
@pytest.mark.parametrize("acc", ["float64", "float32"])
def test_load_partial_round_trips(tmp_path: Path, acc: str) -> None:
    agg = fedagg.aggregators.mean(acc)  # type: ignore[arg-type]
    state = _mean_state(agg, [0, 1, 2], version=3)
    path = tmp_path / "p.upd"
    info = _write_partial(path, state)
    assert path.stat().st_size == partial_nbytes(SPEC, acc)
    got = load_partial(agg, SPEC, 3, path, info, 3)
    assert np.array_equal(mean_state(got).acc, state.acc)
    assert (got.weight, got.weight_comp, got.count, got.version) == (
        state.weight, state.weight_comp, 3, 3,
    )  # fmt: skip
    assert np.array_equal(agg.finalize_flat(got), agg.finalize_flat(state))


def test_load_partial_refusals(tmp_path: Path) -> None:
    agg = fedagg.aggregators.mean("float64")
    state = _mean_state(agg, [0, 1])
    path = tmp_path / "p.upd"
    info = _write_partial(path, state)
    with pytest.raises(StateError, match="float32 accumulator cannot merge into a float64"):
        load_partial(agg, SPEC, 0, path, {**info, "accumulator": "float32"}, 2)
    with pytest.raises(StateError, match="accumulator"):
        load_partial(agg, SPEC, 0, path, {k: v for k, v in info.items() if k != "accumulator"}, 2)
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(StateError, match="finite weight > 0"):
            load_partial(agg, SPEC, 0, path, {**info, "weight": bad}, 2)
    with pytest.raises(StateError, match="finite weight > 0"):
        load_partial(agg, SPEC, 0, path, {**info, "weight_comp": math.nan}, 2)
    with pytest.raises(StateError, match="finite weight > 0 and updates"):
        load_partial(agg, SPEC, 0, path, info, 0)
    short = tmp_path / "short.upd"
    short.write_bytes(path.read_bytes()[:-8])  # the compensation's last value is missing
    with pytest.raises(StateError, match="truncated"):
        load_partial(agg, SPEC, 0, short, info, 2)
    half = tmp_path / "half.upd"
    half.write_bytes(path.read_bytes()[: SPEC.size * 8])  # the sums without compensation
    with pytest.raises(StateError, match="truncated"):
        load_partial(agg, SPEC, 0, half, info, 2)


def test_mean_state_finds_the_monoid_or_refuses(tmp_path: Path) -> None:
    clipped = fedagg.aggregators.compose(fedagg.transforms.clip_norm(1.0),
                                         fedagg.aggregators.mean("float64"))  # fmt: skip
    st = clipped.init(SPEC, version=0)
    assert mean_state(st).accumulator == "float64"
    with pytest.raises(ConfigError, match="is not one"):
        mean_state(fedagg.aggregators.median().init(SPEC, version=0))
    with pytest.raises(ConfigError, match="mean-monoid"):
        mean_state(object())


# -- the policies and Merge ------------------------------------------------------------------------
N = 4
D = 257


def _server_delta(job: int) -> np.ndarray:
    rng = np.random.default_rng(77 + job)
    return (rng.standard_normal(D) * 10.0 ** rng.integers(-5, 2, D)).astype(np.float32)


def _policy(**kw: Any) -> tuple[SyncPolicy, Any, AllAvailable, Dispatch]:
    strategy = strategies.fedadam(lr=0.1, aggregator=fedagg.aggregators.mean("float64"))
    policy = SyncPolicy(strategy=strategy, rounds=2, clients_per_round=N, **kw)
    ctx = AllAvailable(N, 3)
    x0 = np.random.default_rng(0).standard_normal(D).astype(np.float32)
    state = policy.init(strategy.init([x0]), ctx)
    (dispatch, *_) = policy.step(state, Start(0.0), ctx)
    assert isinstance(dispatch, Dispatch) and dispatch.clients == tuple(range(N))
    assert state.pending == set(range(N))
    return policy, state, ctx, dispatch


def _arrival(job: int, t: float = 1.0) -> Arrival:
    u = Update(delta=_server_delta(job), weight=_weight(job), client_id=str(job),
               base_version=0, metrics={"train_loss": 0.25 * job})  # fmt: skip
    return Arrival(t, job, job, u)


def _merge(policy: SyncPolicy, jobs: list[int], t: float = 1.0, version: int = 0) -> Merge:
    agg = policy.strategy.aggregator
    spec = ParamSpec.from_arrays([np.zeros(D, np.float32)])
    st = agg.init(spec, version=version)
    for j in jobs:
        agg.fold(st, Update(delta=_server_delta(j), weight=_weight(j)))
    return Merge(t, tuple(_job(j) for j in jobs), st)


def _applied(actions: list[Any]) -> Applied:
    (a,) = [x for x in actions if isinstance(x, Applied)]
    return a


def _run(policy: SyncPolicy, state: Any, ctx: AllAvailable, events: list[Any]) -> Applied:
    actions: list[Any] = []
    for ev in events:
        assert not actions, "the round closed early"
        actions = policy.step(state, ev, ctx)
    return _applied(actions)


def test_a_merge_closes_the_round_like_the_arrivals_bit_for_bit() -> None:
    p, flat_state, ctx, _ = _policy()
    flat = _run(p, flat_state, ctx, [_arrival(j) for j in range(N)])
    shapes: list[list[int | list[int]]] = [
        [[0, 1], 2, 3],
        [[0, 1], [2, 3]],
        [[0, 1, 2, 3]],
        [0, [1, 2], 3],
    ]
    for shape in shapes:
        p, st, ctx, _ = _policy()
        events = [_merge(p, j) if isinstance(j, list) else _arrival(j) for j in shape]
        got = _run(p, st, ctx, events)
        assert np.array_equal(st.server.params, flat_state.server.params), shape
        assert st.server.version == flat_state.server.version == 1
        s, f = got.stats, flat.stats
        assert (s.folded, s.dropped, s.late, s.refused, s.applied) == (N, 0, 0, 0, True)
        assert s.participants == f.participants == tuple(range(N))
        assert s.weight == f.weight
        assert s.client_loss == pytest.approx(f.client_loss)
        assert s.omega == f.omega
        assert st.round == 1 and st.pending == set(range(N, 2 * N))  # the next round opened


def test_a_merge_with_a_job_not_pending_is_late_and_ignored_whole() -> None:
    p, st, ctx, _ = _policy()
    assert p.step(st, _arrival(0), ctx) == []
    agg_before = mean_state(st.agg)
    count, weight = agg_before.count, agg_before.weight
    acc = agg_before.acc.copy()
    assert p.step(st, _merge(p, [0, 1]), ctx) == []  # job 0 was already folded
    assert (st.late, st.folded) == (2, 1)
    assert st.pending == {1, 2, 3}  # job 1 is still awaited
    ms = mean_state(st.agg)
    assert (ms.count, ms.weight) == (count, weight) and np.array_equal(ms.acc, acc)
    assert p.step(st, _merge(p, [7]), ctx) == []  # a job never dispatched
    assert st.late == 3
    a = _run(p, st, ctx, [_arrival(1), _merge(p, [2, 3])])
    assert (a.stats.folded, a.stats.late, a.stats.participants) == (4, 3, (0, 1, 2, 3))
    # after the round closed, a merge of its jobs is late
    assert p.step(st, _merge(p, [0, 1], t=3.0), ctx) == []
    assert st.late == 2 and st.folded == 0  # counted in the new round


def test_a_merge_of_another_version_is_refused_not_folded() -> None:
    p, st, ctx, _ = _policy()
    assert p.step(st, _merge(p, [0, 1], version=5), ctx) == []
    assert (st.refused, st.folded) == (2, 0)
    assert st.pending == {2, 3}
    a = _run(p, st, ctx, [_arrival(2), _arrival(3)])
    assert (a.stats.folded, a.stats.refused, a.stats.participants) == (2, 2, (2, 3))


def test_participation_weighting_and_merge_do_not_mix() -> None:
    p, st, ctx, _ = _policy(weighting=fedau())
    with pytest.raises(ConfigError, match="participation weighting"):
        p.step(st, _merge(p, [0, 1]), ctx)


def test_async_policies_refuse_a_merge() -> None:
    strategy = strategies.fedavg(aggregator=fedagg.aggregators.mean("float64"))
    policy = fedbuff(strategy, rounds=3, buffer=2, concurrency=N)
    ctx = AllAvailable(N, 0)
    state = policy.init(strategy.init([np.zeros(D, np.float32)]), ctx)
    policy.step(state, Start(0.0), ctx)
    sp = SyncPolicy(strategy=strategy, rounds=1, clients_per_round=N)
    with pytest.raises(ConfigError, match="relay"):
        policy.step(state, _merge(sp, [0, 1]), ctx)


# -- robust at the leaves, mean above (deploy.leaf_rule) -------------------------------------
def test_a_leaf_rule_edge_forwards_its_robust_result_as_a_mean_partial(tmp_path: Path) -> None:
    """An edge with a leaf rule (the median) over 5 clients, one of them wild, forwards the
    median of its clients as a float64 mean partial weighted by their total weight; the root
    merging two such edges gets the weight-weighted mean of the two medians."""
    med = fedagg.aggregators.median()
    eng = EdgeEngine(fedagg.aggregators.mean("float64"), SPEC, num_clients=8,
                     directory=tmp_path / "a", leaf_rule=med)  # fmt: skip
    eng.open()
    _tasks(eng, {j: (j, 0) for j in range(5)})
    ups = [_upload(eng, j, j) for j in range(5)]
    wild = np.full(SPEC.size, 1e6, np.float32)
    wild.tofile(ups[4].path)  # client 4 sends garbage: the median ignores it
    fwd: list[Forward] = []
    for u in ups:
        fwd += _arrive(eng, u).forward
    assert len(fwd) == 1 and sorted(j for _, j, _, _ in fwd[0].jobs) == [0, 1, 2, 3, 4]
    rows = [_delta(j) for j in range(4)] + [wild]
    expected = np.median(np.stack(rows).astype(np.float64), axis=0).astype(np.float32)
    got = _finalize(eng, fwd[0])
    assert np.array_equal(got, expected)
    ms = mean_state(fwd[0].state)
    assert ms.count == 1 and math.isclose(ms.weight, sum(u.weight for u in ups))
    eng.close()
    # a second edge's sealed median, merged at the "root" with the float64 mean monoid
    eng2 = EdgeEngine(fedagg.aggregators.mean("float64"), SPEC, num_clients=8,
                      directory=tmp_path / "b", leaf_rule=med)  # fmt: skip
    eng2.open()
    _tasks(eng2, {j: (j, 0) for j in range(5, 8)})
    fwd2: list[Forward] = []
    for j in range(5, 8):
        fwd2 += _arrive(eng2, _upload(eng2, j, j)).forward
    med2 = np.median(np.stack([_delta(j) for j in range(5, 8)]).astype(np.float64), axis=0)
    root = fedagg.aggregators.mean("float64")
    st = root.init(SPEC, version=0)
    root.merge(st, fwd[0].state)
    root.merge(st, fwd2[0].state)
    w1, w2 = sum(u.weight for u in ups), sum(_weight(j) for j in range(5, 8))
    want = (w1 * expected.astype(np.float64) + w2 * med2.astype(np.float32)) / (w1 + w2)
    assert np.allclose(root.finalize_flat(st), want, rtol=1e-6, atol=0)
    eng2.close()


def test_a_leaf_rule_needs_the_float64_mean_and_aggregate_mode(tmp_path: Path) -> None:
    med = fedagg.aggregators.median()
    with pytest.raises(ConfigError, match="float64 mean"):
        EdgeEngine(fedagg.aggregators.mean("float32"), SPEC, num_clients=8,
                   directory=tmp_path / "a", leaf_rule=med)  # fmt: skip
    with pytest.raises(ConfigError, match="float64 mean"):
        EdgeEngine(fedagg.aggregators.mean("float64"), SPEC, num_clients=8,
                   directory=tmp_path / "b", mode="relay", leaf_rule=med)  # fmt: skip


def test_a_leaf_rule_with_too_few_updates_reports_them_dropped(tmp_path: Path) -> None:
    krum = fedagg.aggregators.krum(1)  # needs n >= 2f + 3 = 5
    eng = EdgeEngine(fedagg.aggregators.mean("float64"), SPEC, num_clients=8,
                     directory=tmp_path, leaf_rule=krum)  # fmt: skip
    eng.open()
    _tasks(eng, {0: (0, 0), 1: (1, 0)})
    fwd = _arrive(eng, _upload(eng, 0, 0)).forward + _arrive(eng, _upload(eng, 1, 1)).forward
    assert len(fwd) == 1 and fwd[0].jobs == [] and sorted(fwd[0].dropped) == [(0, 0), (1, 1)]
    eng.close()
