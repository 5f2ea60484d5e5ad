"""Secure aggregation (SecAgg+) deployed: real ``fedagg server`` / ``fedagg client`` processes
on loopback, configured by a TOML with ``[secure_aggregation] kind = "secagg+"``.

Every client trains with a test train function that also writes its (plaintext) delta and
weight outside the state directory, so each round's plaintext weighted mean of the clients
whose masked uploads were accepted can be computed here and compared with what the server
applied (FedAvg, server learning rate 1: the model moves by the mean), within the encoding's
documented quantisation bound. Dropouts are real: client processes SIGKILL themselves at a
protocol stage (``client-secure-s`` crash points); the server is SIGKILLed at each stage
(``secure-s``) and restarted. The state directory is scanned for the plaintext bytes.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedagg.deploy._app import build_federation
from fedagg.secagg import Encoder
from tests.deploy.harness import (
    Fed,
    federation,
    read_log,
    start_client,
    start_server,
    wait,
    wait_listening,
)
from tests.hierarchy.tree_harness import (
    finish,
    start_node,
    tree_context,
    wait_node,
)

CLIP = 10.0
MAX_WEIGHT = 100.0

TRAIN = '''
import os
import numpy as np
from fedagg.clients import Result

HERE = os.path.dirname(os.path.abspath(__file__))


def train(params, data, task):
    """A random delta of norm ~0.3 and a weight in 5..11: the same for a job in any run."""
    rng = np.random.default_rng([task.seed, task.job, 18])
    delta = {k: (rng.standard_normal(np.shape(v)) * 0.01).astype(np.float32)
             for k, v in params.items()}
    w = float(5 + task.job % 7)
    flat = np.concatenate([delta[k].ravel() for k in sorted(delta)])
    np.save(os.path.join(HERE, "deltas", f"{task.job}.npy"), flat)
    with open(os.path.join(HERE, "deltas", f"{task.job}.w"), "w") as f:
        f.write(repr(w))
    return Result(delta, w, {"train_loss": 0.5})
'''


def _secure_kw(root: Path, clients: int, rounds: int, timeout: float,
               deploy: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """The config of a federation of ``clients`` with secure aggregation (and its train
    module); ``timeout``: the stages' and the clients' (a dead client drops out after it)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "sectrain.py").write_text(TRAIN)
    (root / "deltas").mkdir()
    return dict(
        clients=clients, rounds=rounds, tls=False,
        deploy={"client_timeout": timeout, "heartbeat": 1.0, **deploy},
        extra={
            "client": {"epochs": 1, "batch_size": 10, "lr": 0.05, "train": "sectrain:train"},
            "secure_aggregation": {"kind": "secagg+", "clip": CLIP, "max_weight": MAX_WEIGHT,
                                   "stage_timeout": timeout},
        },
    )  # fmt: skip


def _secure_fed(root: Path, clients: int, rounds: int, timeout: float = 2.0,
                **deploy: Any) -> Any:  # fmt: skip
    return federation(root, **_secure_kw(root, clients, rounds, timeout, deploy))


def _rounds(fed: Fed) -> tuple[list[dict[str, Any]], dict[int, list[int]]]:
    """The rounds the server recorded, and the jobs of each model version it accepted."""
    with sqlite3.connect(fed.state / "state.db") as db:
        rounds = [json.loads(s) for (s,) in db.execute("SELECT stats FROM rounds ORDER BY round")]
        jobs: dict[int, list[int]] = {}
        for job, version in db.execute("SELECT job, version FROM uploads ORDER BY job"):
            jobs.setdefault(int(version), []).append(int(job))
    return rounds, jobs


def _expected(fed: Fed, clients: int) -> tuple[np.ndarray, float, list[int]]:
    """The plaintext result: the initial model plus each applied round's weighted mean of the
    deltas of the jobs accepted in it, with the sum of the rounds' error bounds
    ((E_v + C E_w) / (W - E_w), Encoder docs) and the survivors per round."""
    init = np.asarray(build_federation(fed.cfg, fed.dir / "init").server0.params, np.float64)
    rounds, jobs = _rounds(fed)
    enc = Encoder(CLIP, 32, clients)
    x, bound, counts = init.copy(), 0.0, []
    for r in rounds:
        if not r["applied"]:
            counts.append(0)
            continue
        js = jobs[int(r["version"])]
        ds = [np.load(fed.dir / "deltas" / f"{j}.npy").astype(np.float64) for j in js]
        ws = [float((fed.dir / "deltas" / f"{j}.w").read_text()) for j in js]
        x += sum(w * d for w, d in zip(ws, ds, strict=True)) / sum(ws)
        m, w_sum = len(js), sum(min(w, MAX_WEIGHT) / MAX_WEIGHT for w in ws)
        e_v, e_w = enc.error_bound(init.size, m), m / enc.levels
        bound += (e_v + CLIP * e_w) / (w_sum - e_w)
        counts.append(m)
    return x, bound, counts


def _no_plaintext(fed: Fed, state: Path | None = None) -> None:
    """No file of the state directory holds any client's delta: 16 of its bytes anywhere."""
    blobs = [p.read_bytes() for p in (state or fed.state).rglob("*") if p.is_file()]
    assert blobs
    for f in (fed.dir / "deltas").glob("*.npy"):
        raw = np.load(f).tobytes()
        probe = raw[len(raw) // 2 : len(raw) // 2 + 16]
        assert not any(probe in b for b in blobs), f"plaintext of {f.name} in the state"


def _check_model(fed: Fed, clients: int) -> list[int]:
    got = np.asarray(fed.final().params, np.float64)
    want, bound, counts = _expected(fed, clients)
    err = float(np.linalg.norm(got - want))
    slack = 1e-6 * float(np.linalg.norm(want))  # the float32 model's own rounding
    assert err <= bound + slack, (err, bound, counts)
    _no_plaintext(fed)
    return counts


def _crash(spec: str) -> Mapping[str, str]:
    return {"FEDAGG_CRASH_AT": spec}


def test_secure_rounds_with_0_10_30_percent_dropouts_equal_the_plaintext_mean(
    tmp_path: Path,
) -> None:
    """10 clients, 3 rounds of all of them, clients 0-2 behind an edge aggregator: round 1
    without dropouts; in round 2 a client dies after advertising its keys (10%); in round 3
    that one is gone, another dies before its masked upload and a third while unmasking
    (30%). Every round applies the exact survivors' weighted mean, within the quantisation
    bound. The edge relays stage requests down and its clients' replies up (signed for them,
    with their own signatures), and folds their masked uploads into one masked partial
    (wrap-around uint32 adds) that the root unmasks with the rest: it never sees a plaintext
    update, and neither its state nor the root's holds one."""
    n = 10
    kw = _secure_kw(tmp_path, n, 3, 3.0, {"wait_for": n})
    with tree_context(tmp_path, parents={"e1": "root"}, serves={"e1": [0, 1, 2]}, **kw) as tree:
        fed = tree.fed
        root = start_node(tree, "root")
        wait_node(tree, "root", root)
        edge = start_node(tree, "e1")
        wait_node(tree, "e1", edge)
        dies = {9: "client-secure-1:2", 8: "client-secure-2:3", 7: "client-secure-4:3"}
        procs = [
            start_client(fed, i, env=_crash(dies[i]) if i in dies else None,
                         args=("--server", tree.client_server.get(i, fed.address)))
            for i in range(n)
        ]  # fmt: skip
        finish(tree, root, [edge] + [p for i, p in enumerate(procs) if i not in dies], 90)
        for i in dies:
            assert wait(procs[i], 30) == -9, read_log(fed, f"client-{i}.log")
        counts = _check_model(fed, n)
        # round 3: client 7's masked input counts (it died after uploading it)
        assert counts == [10, 9, 8], counts
        rounds, _ = _rounds(fed)
        assert [r["dropped"] for r in rounds] == [0, 1, 2], rounds
        edge_log = (tmp_path / "e1.log").read_text()
        assert "(a partial aggregate)" in edge_log and "(a relayed update)" not in edge_log
        _no_plaintext(fed, tmp_path / "state-e1")


def test_a_server_killed_at_each_secure_stage_resumes_the_round(tmp_path: Path) -> None:
    """SIGKILL the server at a reply of stage 0, restart it, kill it at a reply of stage 1,
    ... stage 4 (each logged, not yet stepped), then let it finish: each restart replays the
    log into the rebuilt secure round and resumes it, the clients answering re-sent requests
    with their cached replies. Every round applies, every upload counts once, and the model
    is the plaintext mean's."""
    n, rounds = 4, 5
    with _secure_fed(tmp_path, n, rounds, timeout=15.0, wait_for=n) as fed:  # time to restart
        server = start_server(fed, env=_crash(f"secure-0:{n + 2}"))  # mid-stage, round 2
        wait_listening(fed, server)
        procs = [start_client(fed, i) for i in range(n)]
        for stage in range(1, 6):
            assert wait(server, 60) == -9, read_log(fed)
            env = _crash(f"secure-{stage}:2") if stage < 5 else None
            server = start_server(fed, env=env)
        assert wait(server, 60) == 0, read_log(fed)
        if "resumed at the end (finished)" in read_log(fed):  # the log held the whole run: the
            procs = []  # server ends before the clients are back to hear it (as in plaintext)
        for i, p in enumerate(procs):
            assert wait(p, 30) == 0, read_log(fed, f"client-{i}.log")
        assert (fed.dir / "server.log").read_text().count("resumed at round") == 5
        assert _check_model(fed, n) == [n] * rounds
