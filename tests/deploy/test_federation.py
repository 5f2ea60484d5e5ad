"""The federation engine without the network: event log, replay, idempotency, fold order."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedagg import strategies
from fedagg.core.aggregate import mean
from fedagg.core.spec import ParamSpec
from fedagg.core.update import Update
from fedagg.deploy import Federation, canonical_strategy
from fedagg.deploy._canonical import Canonical
from fedagg.deploy._store import UploadRow
from fedagg.errors import EmptyAggregate, NonFiniteUpdate, StateError
from fedagg.sim import SyncPolicy, fedbuff

N = 6  # clients
D = 1000  # parameters


def _fed(d: Path, *, canonical: bool = False, kind: str = "sync", **kw: Any) -> Federation:
    strategy = strategies.fedadam(lr=0.1)
    if canonical:
        strategy = canonical_strategy(strategy)
    policy: Any
    if kind == "sync":
        policy = SyncPolicy(strategy=strategy, rounds=3, clients_per_round=4)
    else:
        policy = fedbuff(strategy, rounds=4, buffer=3, concurrency=4)
    server = strategy.init([np.zeros(D, np.float32)])
    return Federation(
        policy, server, num_clients=N, seed=7, directory=d,
        identity={"test": "federation"}, **kw,
    )  # fmt: skip


def _delta(job: int) -> np.ndarray:
    rng = np.random.default_rng(job)
    return (rng.standard_normal(D) * 10.0 ** rng.integers(-4, 1)).astype(np.float32)


def _upload(fed: Federation, job: int, client: int, version: int) -> UploadRow:
    path = fed.spool / f"{job:012d}-c{client}.upd"
    d = _delta(job)
    d.tofile(path)
    return UploadRow(
        client,
        job,
        str(path),
        float(10 + job % 3),
        version,
        {},
        d.nbytes,
        hashlib.sha256(d.tobytes()).digest(),
    )


def _drive(fed: Federation, order: Any = None, stop_after: int | None = None) -> int:
    """Run to the end: start, then answer every open task (in ``order`` of each batch)."""
    effects = fed.open()
    if not fed.started:
        fed.step([r for r in fed.log([("start", 0.0, None, None, None, None)]) if r])
    events = 0
    t = 1.0
    while not fed.finished:
        tasks = sorted(fed.tasks.values(), key=lambda x: x.job)
        assert tasks, "no open task but not finished"
        if order is not None:
            tasks = order(tasks)
        task = tasks[0]
        up = _upload(fed, task.job, task.client, task.version)
        rows = fed.log([("arrival", t, task.client, task.job, None, up)])
        fed.step([r for r in rows if r])
        t += 1.0
        events += 1
        if stop_after is not None and events >= stop_after:
            return events
    del effects
    return events


def test_runs_to_the_end_and_counts_every_update_once(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    n = _drive(fed)
    assert fed.server.version == 3
    assert n == 12 and fed.store.count_uploads() == 12
    rounds = fed.store.rounds()
    assert [r["folded"] for r in rounds] == [4, 4, 4]
    assert not list(fed.spool.glob("*.upd"))  # covered by the last checkpoint: deleted


@pytest.mark.parametrize("kind", ["sync", "fedbuff"])
@pytest.mark.parametrize("mid", [0, 1, 2])
def test_a_crash_after_any_event_replays_to_the_same_bits(
    tmp_path: Path, kind: str, mid: int
) -> None:
    ref = _fed(tmp_path / "ref", kind=kind, checkpoint_updates=mid)
    total = _drive(ref)
    want = ref.server.params.copy()
    for k in range(1, total):
        d = tmp_path / f"k{k}"
        first = _fed(d, kind=kind, checkpoint_updates=mid)
        _drive(first, stop_after=k)
        first.close()  # the process dies here; nothing but the directory survives
        again = _fed(d, kind=kind, checkpoint_updates=mid)
        _drive(again)
        assert again.server.version == ref.server.version
        assert np.array_equal(again.server.params, want), k
        assert again.store.count_uploads() == total


def test_a_retried_upload_is_acknowledged_but_not_logged_again(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    fed.open()
    fed.step([r for r in fed.log([("start", 0.0, None, None, None, None)]) if r])
    task = min(fed.tasks.values(), key=lambda x: x.job)
    up = _upload(fed, task.job, task.client, task.version)
    rows = fed.log([("arrival", 1.0, task.client, task.job, None, up)] * 2)
    assert rows[0] is not None and rows[1] is None
    assert fed.check_upload(task.client, task.job, task.version) == "duplicate"
    other = next(t for t in fed.tasks.values() if t.job != task.job)
    assert fed.check_upload(other.client, other.job, other.version) is None
    assert fed.check_upload((other.client + 1) % N, other.job, other.version) == "denied"
    assert fed.check_upload(other.client, other.job, other.version + 1) == "version"
    assert fed.check_upload(other.client, 10_000, 0) == "unknown"


def test_canonical_order_makes_the_model_independent_of_arrival_order(tmp_path: Path) -> None:
    finals = []
    orders = [None, lambda ts: ts[::-1], lambda ts: ts[1:] + ts[:1]]
    for i, order in enumerate(orders):
        fed = _fed(tmp_path / f"c{i}", canonical=True)
        _drive(fed, order)
        finals.append(fed.server.params.copy())
    for a, b in itertools.pairwise(finals):
        assert np.array_equal(a, b)
    # in arrival order the last bits depend on the order (deltas span 4 decades here)
    arrival = []
    for i, order in enumerate(orders[:2]):
        fed = _fed(tmp_path / f"a{i}")
        _drive(fed, order)
        arrival.append(fed.server.params.copy())
    np.testing.assert_allclose(arrival[0], finals[0], rtol=1e-5, atol=1e-7)
    assert not np.array_equal(arrival[0], arrival[1])


def test_a_state_directory_of_another_federation_is_refused(tmp_path: Path) -> None:
    _fed(tmp_path).open()
    strategy = strategies.fedavg()
    other = Federation(
        SyncPolicy(strategy=strategy, rounds=1, clients_per_round=1),
        strategy.init([np.zeros(D, np.float32)]), num_clients=N, seed=7, directory=tmp_path,
        identity={"test": "another"},
    )  # fmt: skip
    with pytest.raises(StateError, match="another federation"):
        other.open()


def test_a_missing_spool_file_is_a_clear_error(tmp_path: Path) -> None:
    fed = _fed(tmp_path)
    _drive(fed, stop_after=2)
    fed.close()
    for p in fed.spool.glob("*.upd"):
        p.unlink()
    with pytest.raises(StateError, match="missing"):
        _fed(tmp_path).open()


def test_a_batch_that_closes_a_round_keeps_the_rest_of_the_batch(tmp_path: Path) -> None:
    """Events are logged a batch at a time, then applied one by one; a round closing (and
    checkpointing) mid-batch must cover only what was applied: the later arrivals' spool
    files stay, and a restart replays them."""
    strategy = strategies.fedavg()
    policy = SyncPolicy(strategy=strategy, rounds=2, clients_per_round=2, over_select=1.0)

    def make() -> Federation:
        return Federation(
            policy, strategy.init([np.zeros(D, np.float32)]), num_clients=N, seed=3,
            directory=tmp_path, identity={"test": "batch"},
        )  # fmt: skip

    fed = make()
    fed.open()
    fed.step([r for r in fed.log([("start", 0.0, None, None, None, None)]) if r])
    tasks = sorted(fed.tasks.values(), key=lambda t: t.job)
    assert len(tasks) == 4
    batch = [
        ("arrival", 1.0 + i, t.client, t.job, None, _upload(fed, t.job, t.client, t.version))
        for i, t in enumerate(tasks[:3])
    ]
    rows = [r for r in fed.log(batch) if r]
    effects = fed.step(rows)  # the 2nd arrival closes round 1; the 3rd is late
    assert [r.folded for r in effects.rounds] == [2]
    assert fed.store.rounds()[0]["folded"] == 2
    late = fed.store.rounds()
    del late
    fed.close()
    again = make()
    again.open()  # replays the late arrival from its spool file: no missing-file error
    assert again.server.version == 1
    assert again.applied == again.seq == 4


# -- canonical order: an overflowing update never reaches the round's fold ----------------------
def _up(cid: str, value: float, weight: float) -> Update:
    return Update(delta=np.full(D, value, np.float32), weight=weight, client_id=cid)


def test_canonical_order_refuses_on_arrival_what_would_overflow_the_round_fold() -> None:
    agg = Canonical(mean(), key=lambda u: u.client_id)
    spec = ParamSpec.from_arrays([np.zeros(D, np.float32)])
    st = agg.init(spec)
    agg.fold(st, _up("a", 1.0, 2.0))
    for value, weight in [(3e38, 10.0), (1e30, 1e12)]:  # too large by itself
        with pytest.raises(NonFiniteUpdate, match="weighted delta too large"):
            agg.fold(st, _up("x", value, weight))
    with pytest.raises(NonFiniteUpdate, match="weight 1e\\+39 overflows"):  # cast to float32
        agg.fold(st, _up("x", 1e-40, 1e39))
    agg.fold(st, _up("b", 1e38, 1.0))  # fits alone, but not twice: the sum could overflow
    with pytest.raises(NonFiniteUpdate, match="room left"):
        agg.fold_many(st, [_up("c", 1.0, 1.0), _up("d", 1e38, 1.0)])  # all or none
    assert [u.client_id for u in st.pending] == ["a", "b"]
    assert st.bound == 2.0 + float(np.float32(1e38))
    np.testing.assert_allclose(agg.finalize_flat(st), 1e38 / 3.0, rtol=1e-6)


def test_canonical_round_fold_skips_an_update_the_rule_refuses_and_keeps_the_others() -> None:
    # an update that got past the arrival check (here: put in by hand) and overflows at the
    # round's fold is refused there, the others folded in key order: no exception, and the
    # same outcome each time the same updates are folded (a replay)
    agg = Canonical(mean(), key=lambda u: u.client_id)
    spec = ParamSpec.from_arrays([np.zeros(D, np.float32)])
    outs = []
    for _ in range(2):
        st = agg.init(spec)
        st.pending = [_up("c", 3.0, 1.0), _up("b", 3e38, 10.0), _up("a", 1.0, 1.0)]
        outs.append(agg.finalize_flat(st))
        assert st.refused and st.refused[0][0] == "b" and "overflow" in st.refused[0][1]
        assert agg.count(st) == 2 and not st.pending
    assert np.array_equal(outs[0], outs[1]) and (outs[0] == 2.0).all()
    st = agg.init(spec)
    st.pending = [_up("b", 3e38, 10.0)]
    with pytest.raises(EmptyAggregate):  # nothing left to apply: the policy skips the round
        agg.finalize_flat(st)


def test_a_deferred_step_leaves_the_rounds_checkpoint_to_settle(tmp_path: Path) -> None:
    """The service steps with ``defer=True``: a closed round's tasks come back before its
    checkpoint is written; ``settle`` writes it; the end is checkpointed in the step itself;
    a crash between the step and ``settle`` replays to the same bits."""
    ref = _fed(tmp_path / "ref")
    _drive(ref)
    want = ref.server.params.copy()
    fed = _fed(tmp_path / "fed")
    fed.open()
    fed.step([r for r in fed.log([("start", 0.0, None, None, None, None)]) if r])
    t, closed = 1.0, 0
    while not fed.finished:
        task = min(fed.tasks.values(), key=lambda x: x.job)
        before = len(fed.store.checkpoints())
        up = _upload(fed, task.job, task.client, task.version)
        rows = [r for r in fed.log([("arrival", t, task.client, task.job, None, up)]) if r]
        effects = fed.step(rows, defer=True)
        t += 1.0
        if not effects.rounds:
            fed.settle()  # nothing due: settle writes nothing
            assert len(fed.store.checkpoints()) == before
            continue
        closed += 1
        if effects.finished:  # the end: checkpointed in the step
            assert fed.store.checkpoints()[0][0] == fed.applied
            break
        assert effects.tasks  # the next round's tasks, before its checkpoint
        assert fed.store.checkpoints()[0][0] < fed.applied
        if closed == 1:  # die here, before settle: the log replays it
            fed.close()
            fed = _fed(tmp_path / "fed")
            fed.open()
            continue
        fed.settle()
        assert fed.store.checkpoints()[0][0] == fed.applied
    assert closed == 3 and fed.finished
    assert np.array_equal(fed.server.params, want)
