"""``[deploy] receivers``: the root folds its uploads in receiver processes through shared memory
(:mod:`fedagg.deploy._receivers`, :mod:`fedagg.plane`). Real processes, no network: the engine
is driven with logged events as the server drives it.

* the receivers' model is the in-process fold's, bit for bit (float32 and float64
  accumulators, sync and FedBuff, a weight that makes an update refused);
* a restart (after a stop mid-round, with or without mid-round checkpoints) replays the log
  into fresh receivers: every accepted update folded once, the same bits;
* a receiver killed (SIGKILL) is a typed error (:class:`~fedagg.plane.AggregatorFailed`), not a
  hang, and a restart recovers to the same bits;
* what receivers cannot fold (anything but a plain mean) is a ConfigError; no shared memory
  is left behind.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedagg import strategies
from fedagg.aggregators import median
from fedagg.config import resolve_config
from fedagg.core.aggregate import Mean
from fedagg.core.spec import ParamSpec
from fedagg.core.strategy import Strategy
from fedagg.core.update import Update
from fedagg.deploy import Federation, canonical_strategy
from fedagg.deploy._app import build_federation, options_from_config
from fedagg.deploy._receivers import PlaneMean, PlaneState, plane_strategy
from fedagg.deploy._store import UploadRow
from fedagg.errors import ConfigError, NonFiniteUpdate, StateError
from fedagg.plane import SHM_PREFIX, AggregatorFailed, ShmAggregator
from fedagg.policy import SyncPolicy, fedbuff

N = 6  # clients
D = 30_011  # parameters (odd: uneven shards)
SPEC = ParamSpec.from_arrays([np.zeros(D, np.float32)])


def _segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIX)}


@pytest.fixture(autouse=True)
def no_leaks() -> Any:
    before = _segments()
    yield
    assert _segments() - before == set(), "shared memory left behind"


def _strategy(acc: str, receivers: int) -> Strategy:
    base = strategies.fedadam(lr=0.1)
    import dataclasses

    base = dataclasses.replace(base, aggregator=Mean(acc))  # type: ignore[arg-type]
    return plane_strategy(base, receivers, SPEC)


def _fed(d: Path, *, acc: str = "float32", receivers: int = 0, kind: str = "sync",
         **kw: Any) -> Federation:  # fmt: skip
    strategy = _strategy(acc, receivers)
    policy: Any
    if kind == "sync":
        policy = SyncPolicy(strategy=strategy, rounds=3, clients_per_round=4)
    else:
        policy = fedbuff(strategy, rounds=4, buffer=3, concurrency=4)
    server = strategy.init([np.zeros(D, np.float32)])
    return Federation(policy, server, num_clients=N, seed=7, directory=d,
                      identity={"test": "receivers"}, **kw)  # fmt: skip


def _delta(job: int) -> np.ndarray:
    rng = np.random.default_rng(job)
    return (rng.standard_normal(D) * 10.0 ** rng.integers(-4, 1)).astype(np.float32)


def _upload(fed: Federation, job: int, client: int, version: int) -> UploadRow:
    path = fed.spool / f"{job:012d}-c{client}.upd"
    d = _delta(job)
    d.tofile(path)
    # job 5 claims a weight the float32 accumulator does not take: refused by the fold (in
    # process and in the receivers alike), the round goes on without it
    weight = 1e39 if job == 5 else float(10 + job % 3)
    return UploadRow(client, job, str(path), weight, version, {}, d.nbytes, b"")


def _drive(fed: Federation, stop_after: int | None = None, *, opened: bool = False) -> int:
    """Open (unless ``opened``), start, and answer the open tasks in job order to the end (or
    for ``stop_after`` arrivals)."""
    if not opened:
        fed.open()
    if not fed.started:
        fed.step([r for r in fed.log([("start", 0.0, None, None, None, None)]) if r])
    events = 0
    while not fed.finished:
        task = min(fed.tasks.values(), key=lambda x: x.job)
        up = _upload(fed, task.job, task.client, task.version)
        rows = fed.log([("arrival", 1.0 + task.job, task.client, task.job, None, up)])
        fed.step([r for r in rows if r])
        events += 1
        if stop_after is not None and events >= stop_after:
            break
    return events


def _run(d: Path, **kw: Any) -> tuple[np.ndarray, list[dict[str, Any]]]:
    fed = _fed(d, **kw)
    try:
        _drive(fed)
        return np.array(fed.server.params, copy=True), fed.store.rounds()
    finally:
        fed.close()


def _plane(fed: Federation) -> PlaneMean:
    agg = fed.policy.strategy.aggregator  # type: ignore[attr-defined]
    assert isinstance(agg, PlaneMean)
    return agg


def _rounds(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [(r["round"], r["folded"], r["applied"]) for r in rows]


@pytest.mark.parametrize(("acc", "kind"), [("float32", "sync"), ("float64", "sync"),
                                           ("float32", "fedbuff")])  # fmt: skip
def test_receivers_fold_the_bits_of_the_in_process_fold(
    tmp_path: Path, acc: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref, ref_rounds = _run(tmp_path / "inproc", acc=acc, kind=kind)
    commits = []
    commit = ShmAggregator.commit

    def counted(self: ShmAggregator, *a: Any, **k: Any) -> None:
        commits.append(1)
        commit(self, *a, **k)

    monkeypatch.setattr(ShmAggregator, "commit", counted)
    fed = _fed(tmp_path / "plane", acc=acc, kind=kind, receivers=2)
    try:
        _drive(fed)
        plane = _plane(fed)
        assert plane._plane is not None and len(plane._plane.worker_info) == 2  # they ran
        got, rounds = np.array(fed.server.params, copy=True), fed.store.rounds()
    finally:
        fed.close()
    assert plane._plane is None  # closed with the federation
    assert len(commits) >= 8  # read straight into a slot (all but the receivers' first)
    assert got.tobytes() == ref.tobytes()
    assert _rounds(rounds) == _rounds(ref_rounds)
    if kind == "sync":  # job 5's weight: refused by the float32 accumulator, in both
        assert [r["refused"] for r in rounds] == [r["refused"] for r in ref_rounds]
        assert sum(r["refused"] for r in rounds) == (acc == "float32")


@pytest.mark.parametrize("ckpt_updates", [0, 1])
def test_a_restart_replays_into_fresh_receivers(tmp_path: Path, ckpt_updates: int) -> None:
    ref, _ = _run(tmp_path / "inproc")
    d = tmp_path / "plane"
    fed = _fed(d, receivers=2, checkpoint_updates=ckpt_updates)
    try:
        assert _drive(fed, stop_after=6) == 6  # mid-round 2
    finally:
        fed.close()  # the receivers stop: their sums are gone, the log and spool stay
    fed = _fed(d, receivers=3, checkpoint_updates=ckpt_updates)  # another shard count, too
    try:
        fed.open()
        assert fed.replayed == (0 if ckpt_updates else 2)  # since the last checkpoint
        _drive(fed, opened=True)
        got = np.array(fed.server.params, copy=True)
        assert sum(r["folded"] for r in fed.store.rounds()) == 11  # 12 jobs, one refused
    finally:
        fed.close()
    assert got.tobytes() == ref.tobytes()


def test_a_killed_receiver_is_a_typed_error_and_a_restart_recovers(tmp_path: Path) -> None:
    ref, _ = _run(tmp_path / "inproc")
    d = tmp_path / "plane"
    fed = _fed(d, receivers=2)
    try:
        _drive(fed, stop_after=5)  # round 2 open, one update folded
        plane = _plane(fed)
        assert plane._plane is not None
        os.kill(plane._plane.worker_info[1], signal.SIGKILL)
        with pytest.raises(AggregatorFailed, match="worker 1"):
            _drive(fed, opened=True)
    finally:
        fed.close()
    fed = _fed(d, receivers=2)
    try:
        _drive(fed)
        got = np.array(fed.server.params, copy=True)
    finally:
        fed.close()
    assert got.tobytes() == ref.tobytes()


def test_a_checkpointed_state_keeps_its_sums(tmp_path: Path) -> None:
    """The checkpoint view exports the receivers' sums; the loaded state puts them back."""
    agg = PlaneMean(Mean("float64"), 2, SPEC)
    try:
        st = agg.init(SPEC, version=0)
        assert agg.count(st) == 0 and agg._plane is None  # nothing started by init
        agg.fold(st, _update(1))
        agg.fold(st, _update(2))
        saved = st.checkpoint_view()
        assert isinstance(saved, PlaneState) and saved.saved is not None
        assert saved.saved.count == 2
        ref = Mean("float64")
        want = ref.fold(ref.fold(ref.init(SPEC, version=0), _update(1)), _update(2))
        assert saved.saved.acc.tobytes() == want.acc.tobytes()
        other = agg.init(SPEC, version=0)  # another state: the live one is set aside
        agg.fold(other, _update(3))
        assert st.saved is not None and st.saved.count == 2 and agg.count(other) == 1
        assert agg.finalize_flat(saved).tobytes() == ref.finalize_flat(want).tobytes()
    finally:
        agg.close_receivers()


def test_fold_many_is_all_or_nothing(tmp_path: Path) -> None:
    agg = PlaneMean(Mean("float32"), 2, SPEC)
    ref = Mean("float32")
    try:
        st = agg.init(SPEC, version=0)
        agg.fold_many(st, [_update(1), _update(2)])
        bad = Update(delta=np.full(D, np.nan, np.float32), weight=1.0, base_version=0)
        with pytest.raises(NonFiniteUpdate):
            agg.fold_many(st, [_update(4), bad])
        want = ref.fold_many(ref.init(SPEC, version=0), [_update(1), _update(2)])
        assert agg.count(st) == 2
        assert agg.finalize_flat(st).tobytes() == ref.finalize_flat(want).tobytes()
    finally:
        agg.close_receivers()


def _update(job: int) -> Any:
    return Update(delta=_delta(job), weight=float(job), base_version=0)


def test_only_a_plain_mean_runs_in_receivers(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="plain mean"):
        plane_strategy(strategies.fedavg(aggregator=median()), 2, SPEC)
    canon = plane_strategy(canonical_strategy(strategies.fedavg()), 2, SPEC)  # its mean
    assert isinstance(canon.aggregator.inner, PlaneMean)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="receivers"):
        PlaneMean(Mean(), 0, SPEC)
    agg = PlaneMean(Mean(), 1, SPEC)
    with pytest.raises(StateError, match="PlaneState"):
        agg.fold(Mean().init(SPEC), _update(1))  # type: ignore[arg-type]
    assert agg._plane is None
    # a state of another shape folds in process (the engine's warm-up does that)
    small = ParamSpec.from_arrays([np.zeros(3, np.float32)])
    st = agg.init(small)
    agg.fold(st, Update(delta=np.ones(3, np.float32), weight=2.0))
    assert agg.finalize_flat(st).tolist() == [1.0, 1.0, 1.0] and agg._plane is None


def test_the_receivers_key(tmp_path: Path) -> None:
    cfg: dict[str, Any] = {
        "data": {"num_clients": 4},
        "deploy": {"receivers": 2, "insecure": True},
    }
    assert options_from_config(cfg).receivers == 2
    fed = build_federation(cfg, tmp_path / "a")  # the default bounds fold through receivers
    try:
        plane = fed.policy.strategy.aggregator.inner  # type: ignore[attr-defined]
        assert isinstance(plane, PlaneMean) and plane.receivers == 2
        assert plane._plane is None
        fed.warmup()  # what the server does before it listens: the receivers start
        assert plane._plane is not None and len(plane._plane.worker_info) == 2
    finally:
        fed.close()
    assert plane._plane is None  # stopped with the federation (inside the bounds, too)
    robust = {**cfg, "strategy": {"aggregator": "median"}}
    with pytest.raises(ConfigError, match="plain mean"):
        build_federation(robust, tmp_path / "b")
    with pytest.raises(ConfigError):
        resolve_config({"deploy": {"receivers": -1}})
