"""An edge aggregator in aggregate mode bounds its clients' claims as the root does (issue 14,
finding 6): a client's claimed weight is capped at ``weight_cap`` x the median claimed weight,
its update's norm bounded at ``norm_cap`` x the median norm, before the update is folded into
the edge's partial. The reference is the edge's own window (each recent client's latest
bounded claim among the jobs its parent acknowledged, rebuilt from its log on a restart); while
it warms up, a version's updates are kept (spool views) until the partial is flushed, and
bounded then against their own median. A partial's jobs keep their clients' signed weights;
its weight sum is the bounded one.

In process: :class:`~fedagg.deploy._edge.EdgeEngine` fed as the server's engine thread feeds
it (see test_edge_engine.py). Real processes: a root, one edge (the default ``edge_mode``,
aggregate under synchronous rounds) and five clients, one of which claims 1e12 examples and
sends values of 1e3: the model must end near the all-honest one.
"""

from __future__ import annotations

import json
import math
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedagg
from fedagg.core.spec import ParamSpec
from fedagg.deploy._app import build_federation
from fedagg.deploy._bounds import Bounds
from fedagg.deploy._edge import EdgeEngine, Forward
from fedagg.deploy._fed import Effects, TaskInfo
from fedagg.deploy._partial import partial_buffers, partial_info
from fedagg.deploy._store import UploadRow
from fedagg.sim import run_config
from tests.deploy.harness import PY, _env, read_log, wait
from tests.deploy.test_overflow import _POISON
from tests.hierarchy.tree_harness import (
    Tree,
    finish,
    node_log,
    start_node,
    start_tree_client,
    tree_context,
    wait_node,
)

SPEC = ParamSpec.from_arrays([np.zeros((8, 8), np.float32), np.zeros(8, np.float32)])  # 72
CLIENTS, ATTACKER = 5, 4
VALUE, WEIGHT = 1e3, 1e12
BOUNDS = Bounds(warmup=3)  # the defaults (caps 10, clip), warm once 3 clients have a claim


# -- in process --------------------------------------------------------------------------------
def _honest(job: int) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng(1000 + job)
    return (rng.standard_normal(SPEC.size) * 0.01).astype(np.float32), float(280 + job % 7)


def _sent(client: int, job: int) -> tuple[np.ndarray, float]:
    if client == ATTACKER:
        return np.full(SPEC.size, VALUE, np.float32), WEIGHT
    return _honest(job)


def _engine(d: Path, bounds: Bounds | None = BOUNDS, **kw: Any) -> EdgeEngine:
    eng = EdgeEngine(fedagg.aggregators.mean("float64"), SPEC, num_clients=CLIENTS,
                     directory=d, bounds=bounds, **kw)  # fmt: skip
    eng.open()
    return eng


def _feed(eng: EdgeEngine, *events: tuple[Any, ...]) -> Effects:
    rows = eng.log(list(events))
    return eng.step([r for r in rows if r is not None])


def _job(version: int, client: int) -> int:
    return CLIENTS * version + client


def _tasks(eng: EdgeEngine, version: int) -> None:
    eng.add_tasks([TaskInfo(_job(version, c), c, version, 1) for c in range(CLIENTS)], seed=1)


def _arrive(eng: EdgeEngine, version: int, client: int, t: float = 1.0) -> Effects:
    job = _job(version, client)
    d, w = _sent(client, job)
    path = eng.spool / f"{job:012d}-{client}.upd"
    d.tofile(path)
    u = UploadRow(client, job, str(path), w, version, {"train_loss": 1.0}, d.nbytes, b"\0" * 32)
    return _feed(eng, ("arrival", t, client, job, None, u))


def _ack(eng: EdgeEngine, fwd: Forward) -> None:
    _feed(eng, *[("acked", 9.0, c, j, None, None) for c, j, _, _ in fwd.jobs])


def _honest_mean(version: int) -> np.ndarray:
    ds = [_honest(_job(version, c)) for c in range(CLIENTS) if c != ATTACKER]
    total: np.ndarray = np.sum([w * d.astype(np.float64) for d, w in ds], axis=0)
    return total / sum(w for _, w in ds)


def _norm(version: int) -> float:  # the honest updates' typical norm
    return float(np.median([np.linalg.norm(_honest(_job(version, c))[0]) for c in range(4)]))


def _round(eng: EdgeEngine, version: int, order: list[int]) -> Forward:
    """One version's tasks, answered in ``order``: the partial forwarded once all are in."""
    _tasks(eng, version)
    fwds = []
    for c in order:
        fwds += _arrive(eng, version, c).forward
    assert len(fwds) == 1 and len(fwds[0].jobs) == CLIENTS, fwds
    return fwds[0]


def _check_bounded(fwd: Forward, version: int) -> None:
    got = fedagg.aggregators.mean("float64").finalize_flat(fwd.state)
    off = float(np.linalg.norm(got - _honest_mean(version)))
    # weight capped at 10x the median, norm clipped to 10x the median: ~7 honest norms' pull
    assert off <= 10 * _norm(version), off
    # the jobs carry the signed claims; the partial's weight sum is the bounded one
    claims = {c: w for c, _, w, _ in fwd.jobs}
    assert claims[ATTACKER] == WEIGHT
    weight = float(partial_info(fwd.state)["weight"])
    assert weight < 20 * 286 < sum(claims.values())


@pytest.mark.parametrize("attacker_first", [True, False])
def test_a_warming_up_edge_bounds_a_partial_against_its_own_median(
    tmp_path: Path, attacker_first: bool
) -> None:
    order = [ATTACKER, 0, 1, 2, 3] if attacker_first else [0, 1, 2, 3, ATTACKER]
    eng = _engine(tmp_path / "bounded")
    _check_bounded(_round(eng, 0, order), 0)
    # unbounded (no [deploy] bounds), the attacker alone sets the partial
    raw = _engine(tmp_path / "raw", bounds=None)
    got = fedagg.aggregators.mean("float64").finalize_flat(_round(raw, 0, order).state)
    assert float(np.linalg.norm(got - _honest_mean(0))) > 0.9 * VALUE * math.sqrt(SPEC.size)


def test_a_warming_up_partial_waits_for_enough_updates_to_bound_against(tmp_path: Path) -> None:
    """Its flush timer does not send the attacker's update alone (its own median would be
    its own claim): the partial goes once ``warmup`` clients' updates are in."""
    eng = _engine(tmp_path)
    _tasks(eng, 0)
    assert not _arrive(eng, 0, ATTACKER).forward
    assert not _feed(eng, ("timer", 2.0, None, None, 0, None)).forward  # too few: it waits
    assert not _arrive(eng, 0, 0).forward
    fwd = _arrive(eng, 0, 1).forward  # three clients: bounded against their median, sent
    assert len(fwd) == 1 and sorted(c for c, _, _, _ in fwd[0].jobs) == [0, 1, ATTACKER]
    assert float(partial_info(fwd[0].state)["weight"]) <= 10 * 281 + 280 + 281


def test_acknowledged_claims_warm_the_window_and_a_restart_rebuilds_it(tmp_path: Path) -> None:
    """Once its parent acknowledges a partial, its jobs' bounded claims join the edge's window:
    later versions are bounded as they arrive, against it. A restarted edge rebuilds the same
    window from its log and forwards, bit for bit, the partial an uninterrupted one sends."""
    eng = _engine(tmp_path / "a")
    fwd0 = _round(eng, 0, [ATTACKER, 0, 1, 2, 3])
    _ack(eng, fwd0)
    assert len(eng.window) == CLIENTS
    window = list(eng.window)
    w_att = dict((c, w) for c, w, _ in window)[str(ATTACKER)]
    assert w_att == 10 * 282  # capped at 10x the lower median claim (280..283, 1e12)
    # version 1: warm, bounded on arrival (nothing kept until the flush)
    _tasks(eng, 1)
    for c in [ATTACKER, 0, 1]:
        assert not _arrive(eng, 1, c).forward
    assert eng.pending[1].held is None and eng.pending[1].claims
    # a restart here (nothing of version 1 acknowledged) replays version 1 against the window
    # rebuilt from the log, and forwards it at once
    eng.close()
    fresh = EdgeEngine(fedagg.aggregators.mean("float64"), SPEC, num_clients=CLIENTS,
                       directory=tmp_path / "a", bounds=BOUNDS)  # fmt: skip
    replayed = [f for f in fresh.open().forward if f.jobs]
    assert fresh.window == window
    assert len(replayed) == 1 and sorted(c for c, _, _, _ in replayed[0].jobs) == [0, 1, 4]
    # the same three updates, on an edge that never stopped (its version 1 forced out now)
    ref = _engine(tmp_path / "b")
    _ack(ref, _round(ref, 0, [ATTACKER, 0, 1, 2, 3]))
    _tasks(ref, 1)
    for c in [ATTACKER, 0, 1]:
        _arrive(ref, 1, c)
    want = [f for f in ref._flush(force=True).forward if f.jobs]
    assert len(want) == 1
    assert [bytes(b) for b in partial_buffers(replayed[0].state)] == [
        bytes(b) for b in partial_buffers(want[0].state)
    ]
    assert partial_info(replayed[0].state) == partial_info(want[0].state)
    assert replayed[0].jobs == want[0].jobs
    # and the attacker was bounded against the window: weight 10x the median, norm clipped
    assert float(partial_info(want[0].state)["weight"]) == 10 * 282 + 285 + 286


def test_a_restart_while_warming_up_bounds_the_replayed_updates(tmp_path: Path) -> None:
    eng = _engine(tmp_path / "a")
    _tasks(eng, 0)
    for c in [ATTACKER, 0, 1, 2]:
        _arrive(eng, 0, c)
    eng.close()
    fresh = EdgeEngine(fedagg.aggregators.mean("float64"), SPEC, num_clients=CLIENTS,
                       directory=tmp_path / "a", bounds=BOUNDS)  # fmt: skip
    (fwd,) = [f for f in fresh.open().forward if f.jobs]
    assert len(fwd.jobs) == 4
    assert float(partial_info(fwd.state)["weight"]) <= 10 * 281 + 280 + 281 + 282


# -- real processes ----------------------------------------------------------------------------
def _start_poisoned(tree: Tree, i: int) -> subprocess.Popen[bytes]:
    """``fedagg client`` of client ``i``, connected to its edge, every upload replaced by
    all-VALUE with the claimed weight WEIGHT (signed as such: a registered client lying)."""
    fed = tree.fed
    env = _env({"FEDAGG_TEST_POISON": f"{VALUE!r},{WEIGHT!r}"})
    with open(fed.dir / f"client-{i}.log", "ab") as out:
        p = subprocess.Popen(
            [PY, "-c", _POISON, "client", str(fed.config), "--key", str(fed.key(i)),
             "--server", tree.client_server[i], "--retry-for", "60"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    tree.procs.append(p)
    return p


def test_an_edge_bounds_a_client_claiming_a_huge_weight(tmp_path: Path) -> None:
    rounds = 3
    kw: dict[str, Any] = {"clients": CLIENTS, "rounds": rounds, "tls": False,
                          "deploy": {"client_timeout": 60.0}}  # fmt: skip
    with tree_context(tmp_path / "tree", parents={"edge": "root"},
                      serves={"edge": list(range(CLIENTS))}, **kw) as tree:  # fmt: skip
        root = start_node(tree, "root")
        wait_node(tree, "root", root)
        edge = start_node(tree, "edge")
        clients = [_start_poisoned(tree, 0)]
        clients += [start_tree_client(tree, i) for i in range(1, CLIENTS)]
        finish(tree, root, [edge, *clients])
        fed = tree.fed
        got = np.asarray(fed.final().params, np.float64)
        with sqlite3.connect(fed.state / "state.db") as db:
            rows = db.execute("SELECT stats FROM rounds ORDER BY round").fetchall()
        stats = [json.loads(r[0]) for r in rows]
        edge_log = node_log(tree, "edge")
        for i in range(CLIENTS):
            assert "Traceback" not in read_log(fed, f"client-{i}.log")
        assert wait(edge, 1) == 0
    # the all-honest federation's model (simulated: deployed clients train as simulated ones)
    want = np.asarray(run_config(fed.cfg)[0].server.params, np.float64)
    init = np.asarray(build_federation(fed.cfg, tmp_path / "init").server0.params, np.float64)
    assert "Traceback" not in edge_log, edge_log
    assert len(stats) == rounds
    for r in stats:  # every round closed and applied, with all five (the attacker bounded)
        assert r["applied"] and set(r["participants"]) == set(range(CLIENTS)), r
    assert np.isfinite(got).all()
    moved = float(np.linalg.norm(want - init))  # how far honest training moves the model
    off = float(np.linalg.norm(got - want))
    # weight_cap x norm_cap: each round at most ~7 honest steps' worth of pull, always the same
    # way (~8x the honest run's whole movement over three rounds); unbounded, the attacker's
    # weight makes the model its own (~1e3 per coordinate per round: ~4e4x)
    assert off <= 15.0 * moved, (off, moved)
    assert off < 1e-2 * VALUE * math.sqrt(got.size), off
    assert "update from client '0' bounded" in edge_log, edge_log
