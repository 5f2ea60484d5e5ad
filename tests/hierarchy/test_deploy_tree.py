"""Aggregation trees of real processes on loopback: root <- intermediate <- edges <- clients."""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

import fedagg
from fedagg.config import build_data, build_model, build_strategy, load_config, resolve_config
from fedagg.deploy import TaskContext, config_trainer, make_certs
from tests.deploy.harness import (
    federation,
    kill,
    run_all,
)
from tests.hierarchy import netns
from tests.hierarchy.tree_harness import (
    finish,
    node_log,
    start_node,
    start_tree_client,
    tree_context,
    wait_node,
)

CLIENTS = 4
THREE_LEVELS = {"mid": "root", "edge-a": "mid", "edge-b": "mid"}
SERVES = {"mid": [0, 1, 2, 3], "edge-a": [0, 1], "edge-b": [2, 3]}


def _kw(accumulator: str, rounds: int = 2) -> dict[str, object]:
    return {
        "clients": CLIENTS,
        "rounds": rounds,
        "extra": {"strategy": {"accumulator": accumulator}},
        "deploy": {"client_timeout": 60.0},
    }


def _flat(root: Path, accumulator: str, rounds: int = 2) -> np.ndarray:
    with federation(root, **_kw(accumulator, rounds)) as fed:  # type: ignore[arg-type]
        run_all(fed, timeout=180)
        return np.asarray(fed.final().params)


@pytest.fixture(scope="module")
def flat64(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    return _flat(tmp_path_factory.mktemp("flat64"), "float64")


#: where each node runs in the multi-host test: one network namespace per host
PLACEMENT = {"root": "host-1", "mid": "host-2", "edge-a": "host-2", "edge-b": "host-3"}
LEAF = {0: "edge-a", 1: "edge-a", 2: "edge-b", 3: "edge-b"}


def _run_tree(
    root: Path, accumulator: str, rounds: int = 2,
    hosts: dict[str, tuple[str, str]] | None = None,
) -> tuple[np.ndarray, str, Path]:  # fmt: skip
    where = {n: hosts[h] for n, h in PLACEMENT.items()} if hosts else {}
    with tree_context(root, parents=THREE_LEVELS, serves=SERVES,
                      hosts={n: ip for n, (_, ip) in where.items()},
                      **_kw(accumulator, rounds)) as tree:  # type: ignore[arg-type]  # fmt: skip
        if hosts:  # the servers' certificate must name the hosts' addresses
            make_certs(
                tree.fed.dir / "certs", ("localhost", *sorted(ip for _, ip in where.values()))
            )
        ns = {n: w[0] for n, w in where.items()}
        r = start_node(tree, "root", netns=ns.get("root"))
        wait_node(tree, "root", r)
        edges = [start_node(tree, n, netns=ns.get(n)) for n in ("mid", "edge-a", "edge-b")]
        clients = [start_tree_client(tree, i, netns=ns.get(LEAF[i])) for i in range(CLIENTS)]
        for p, n in zip([r, *edges], ["root", "mid", "edge-a", "edge-b"], strict=True):
            if n in ns:  # each node really runs in its host's namespace
                got = subprocess.run(["ip", "netns", "identify", str(p.pid)],
                                     capture_output=True, text=True, timeout=10)  # fmt: skip
                assert got.stdout.strip() == ns[n], (n, got.stdout, got.stderr)
        finish(tree, r, edges + clients)
        logs = "\n".join(node_log(tree, n) for n in ("root", "mid", "edge-a", "edge-b"))
        return np.asarray(tree.fed.final().params), logs, tree.fed.config


def test_three_level_tree_equals_the_flat_fold_bitwise_with_float64(
    tmp_path: Path, flat64: np.ndarray
) -> None:
    """Across three hosts (network namespaces on a bridge) where the machine allows it (root),
    else across processes on loopback."""
    with contextlib.ExitStack() as stack:
        hosts = stack.enter_context(netns.hosts(["host-1", "host-2", "host-3"])) if (
            netns.available()
        ) else None  # fmt: skip
        tree, logs, _ = _run_tree(tmp_path / "tree", "float64", hosts=hosts)
    # the edges really merged their clients' updates, and the intermediate its edges' partials
    sizes = [int(n) for n in re.findall(r"forwarded (\d+) jobs", logs)]
    assert max(sizes) >= 2 and sum(sizes) >= 2 * 2 * CLIENTS  # edges' and mid's forwards
    assert np.array_equal(tree, flat64), np.max(np.abs(tree - flat64))


def test_three_level_tree_with_float32_is_within_the_documented_bound(tmp_path: Path) -> None:
    """One round, float32 sums: the tree's model and a flat fold of the same four updates (done
    here, in job order, by the config's own strategy) differ by at most the recursive-summation
    bound of each, 2 * gamma_{n-1} * sum|w x| / W per coordinate (plus the final roundings),
    computed from the clients' actual updates (training is deterministic per job)."""
    tree, _, config = _run_tree(tmp_path / "tree", "float32", rounds=1)
    cfg = resolve_config(load_config(config))
    fd = build_data(cfg, 0)
    strategy = build_strategy(cfg)
    x0 = strategy.init(build_model(cfg, fd).init(0))
    train = config_trainer(cfg)
    spec = x0.spec
    agg = strategy.begin(x0)
    abs_sum, weight = np.zeros(spec.size), 0.0
    for i in range(CLIENTS):  # round 0: all 4 clients, sorted, get jobs 0..3
        r = train(spec.unflatten(x0.params.copy()), TaskContext(i, 0, 1, 0, i, f"c{i}"))
        delta = spec.as_flat(r.delta)
        strategy.aggregator.fold(agg, fedagg.Update(delta=delta, weight=r.num_examples,
                                                    base_version=0))  # fmt: skip
        abs_sum += r.num_examples * np.abs(delta.astype(np.float64))
        weight += r.num_examples
    flat = np.asarray(strategy.apply(x0, agg).params)
    u = 2.0**-24
    gamma = (CLIENTS - 1) * u / (1 - (CLIENTS - 1) * u)
    bound = 2 * gamma * abs_sum / weight + 4 * u * (np.abs(flat) + np.abs(tree))
    diff = np.abs(tree.astype(np.float64) - flat.astype(np.float64))
    assert np.all(diff <= bound)
    assert not np.array_equal(tree, x0.params)  # a round was applied


def test_a_tree_killed_everywhere_mid_round_loses_nothing_and_counts_everything_once(
    tmp_path: Path, flat64: np.ndarray
) -> None:
    """The root and both edges are SIGKILLed in the first round, each at its own point, and
    restarted:

    * edge-a right after logging its first client upload (accepted, its acknowledgement
      maybe not sent, not forwarded): on restart it must re-fold it from its own spool and
      forward it (the client's retry is acknowledged as a duplicate);
    * edge-b right after its parent acknowledged its first partial, before it recorded that:
      on restart it re-sends the partial, and the root must not count it twice;
    * the root right after logging its second batch of events (a partial, not yet
      acknowledged): the edge keeps retrying it while the root is down, and the restarted
      root replays its log.
    """
    with tree_context(tmp_path / "tree", parents={"edge-a": "root", "edge-b": "root"},
                      serves={"edge-a": [0, 1], "edge-b": [2, 3]},
                      **_kw("float64")) as tree:  # type: ignore[arg-type]  # fmt: skip
        crash = {"root": "logged:2", "edge-a": "edge-logged:1", "edge-b": "edge-forwarded:1"}
        procs = {"root": start_node(tree, "root", env={"FEDAGG_CRASH_AT": crash["root"]})}
        wait_node(tree, "root", procs["root"])
        for name in ("edge-a", "edge-b"):
            procs[name] = start_node(tree, name, env={"FEDAGG_CRASH_AT": crash[name]})
        clients = [start_tree_client(tree, i) for i in range(CLIENTS)]
        again: dict[str, subprocess.Popen[bytes]] = {}
        deadline = time.monotonic() + 150
        while len(again) < 3 and time.monotonic() < deadline:
            for name, p in procs.items():
                if name not in again and p.poll() is not None:
                    assert p.returncode == -9, node_log(tree, name)
                    again[name] = start_node(tree, name)
            time.sleep(0.1)
        assert len(again) == 3, {n: p.poll() for n, p in procs.items()}
        finish(tree, again["root"], [again["edge-a"], again["edge-b"], *clients])
        model = np.asarray(tree.fed.final().params)
        with sqlite3.connect(tree.fed.state / "state.db") as con:
            uploads = con.execute("SELECT count(*) FROM uploads").fetchone()[0]
            folded = [row[0] for row in con.execute("SELECT folded FROM rounds ORDER BY round")]
        logs = {n: node_log(tree, n) for n in ("root", "edge-a", "edge-b")}
    assert uploads == 2 * CLIENTS  # every update accepted exactly once
    assert folded == [CLIENTS] * 2
    assert re.search(r"[1-9]\d* events replayed", logs["edge-a"]), logs["edge-a"]
    assert "(duplicate)" in logs["edge-b"], logs["edge-b"]  # re-sent, not counted again
    assert re.search(r"[1-9]\d* events replayed", logs["root"]), logs["root"]
    assert np.array_equal(model, flat64)


def test_a_dead_edge_is_dropped_after_client_timeout_and_the_rounds_go_on(tmp_path: Path) -> None:
    """An edge that dies for good mid-federation (with its clients) does not stall the root:
    after client_timeout its subtree's open jobs are dropped and the next rounds go on."""
    kw = _kw("float64", rounds=2)
    kw["deploy"] = {"client_timeout": 3.0}
    kw["policy"] = {"clients_per_round": CLIENTS, "min_updates": 1}
    with tree_context(tmp_path / "tree", parents={"edge-a": "root", "edge-b": "root"},
                      serves={"edge-a": [0, 1], "edge-b": [2, 3]},
                      **kw) as tree:  # type: ignore[arg-type]  # fmt: skip
        r = start_node(tree, "root")
        wait_node(tree, "root", r)
        a = start_node(tree, "edge-a", env={"FEDAGG_CRASH_AT": "edge-forwarded:1"})
        b = start_node(tree, "edge-b")
        clients = [start_tree_client(tree, i) for i in range(CLIENTS)]
        deadline = time.monotonic() + 120
        while a.poll() is None and time.monotonic() < deadline:  # dies after round 1's ack
            time.sleep(0.1)
        kill(clients[0])  # edge-a and its clients never come back
        kill(clients[1])
        finish(tree, r, [b, clients[2], clients[3]], timeout=120)
        with sqlite3.connect(tree.fed.state / "state.db") as con:
            stats = [json.loads(s) for (s,) in con.execute("SELECT stats FROM rounds")]
    assert a.returncode == -9
    assert [s["folded"] for s in stats] == [4, 2]
    assert [s["dropped"] for s in stats] == [0, 2]
    assert all(s["applied"] for s in stats)


def test_fedbuff_through_relaying_edges_measures_staleness_at_the_root(tmp_path: Path) -> None:
    """Async through the tree: the edges relay each update unchanged (``edge_mode`` auto), so
    the root's FedBuff sees every update's base version; staleness is measured there."""
    kw = _kw("float32", rounds=4)
    kw["policy"] = {"kind": "fedbuff", "buffer": 2, "concurrency": 3}
    with tree_context(tmp_path / "tree", parents={"edge-a": "root", "edge-b": "root"},
                      serves={"edge-a": [0, 1], "edge-b": [2, 3]},
                      **kw) as tree:  # type: ignore[arg-type]  # fmt: skip
        r = start_node(tree, "root")
        wait_node(tree, "root", r)
        # the edges run the root's own config file, their role given on the command line
        edges = [start_node(tree, n, flags=True) for n in ("edge-a", "edge-b")]
        clients = [start_tree_client(tree, i) for i in range(CLIENTS)]
        finish(tree, r, edges + clients)
        with sqlite3.connect(tree.fed.state / "state.db") as con:
            stats = [json.loads(s) for (s,) in con.execute("SELECT stats FROM rounds")]
            uploads = con.execute("SELECT count(*) FROM uploads").fetchone()[0]
            kinds = {k for (k,) in con.execute("SELECT DISTINCT kind FROM events")}
        edge_logs = node_log(tree, "edge-a") + node_log(tree, "edge-b")
    assert len(stats) == 4 and all(s["folded"] == 2 for s in stats)
    assert "partial" not in kinds  # relayed, not merged: one arrival per update
    assert uploads >= sum(s["folded"] for s in stats)
    assert all(np.isfinite(s["staleness_mean"]) for s in stats)
    assert any(s["staleness_mean"] > 0 for s in stats)  # restarts on arrival make stale ones
    sizes = {int(n) for n in re.findall(r"forwarded (\d+) jobs", edge_logs)}
    assert sizes == {1}
