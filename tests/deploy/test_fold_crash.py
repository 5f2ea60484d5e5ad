"""Fold on receive under SIGKILL, with real processes: the server folds uploads as they
arrive (``ingest = "fold"``, arrival order, mid-round checkpoints) and is killed at every
crash point in turn (mid-upload with a lease folding, queued, logged, about to fold, a
checkpoint written), restarted each time, until the federation ends.

The clients' deltas lie on a dyadic grid (``k / 4096``, ``|k| <= 64``) with integer weights,
so every sum the server forms is exact in float32 and the model does not depend on the order
in which updates arrived: the crashed run must end with the model of an uninterrupted run
(spooled, no crash) bit for bit, each update accepted and folded exactly once. A lease's
partial fold that a crash interrupted, or a replay that differed from the live folds, would
change it.
"""

from __future__ import annotations

import random
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np

from tests.deploy.harness import (
    federation,
    read_acks,
    read_log,
    run_all,
    start_client,
    start_server,
    wait,
    wait_listening,
)
from tests.deploy.test_faults import _crash_at, _supervise

TRAIN = '''
import numpy as np
from fedagg.clients import Result


def train(params, data, task):
    """A delta of multiples of 1/4096 (|k| <= 64) and an integer weight: exact sums."""
    rng = np.random.default_rng([task.seed, task.job, 20])
    delta = {k: (rng.integers(-64, 65, np.shape(v)) / 4096).astype(np.float32)
             for k, v in params.items()}
    return Result(delta, float(1 + task.job % 4), {"train_loss": 0.5})
'''

POINTS = ["upload", "fold", "logged", "upload-queued", "checkpoint"]


def _cfg(root: Path, rounds: int, clients: int, ingest: str) -> dict[str, Any]:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dyadic.py").write_text(TRAIN)
    return {
        "clients": clients,
        "rounds": rounds,
        "tls": False,
        "extra": {
            "model": {"name": "mlp", "hidden": [64]},
            "client": {"epochs": 1, "batch_size": 10, "lr": 0.05, "train": "dyadic:train"},
        },
        # 4 KiB chunks: a 19 KB update streams in 5 chunks (a lease folds some, then a kill)
        "deploy": {
            "chunk_mib": 4096 / 2**20,
            "client_timeout": 60.0,
            "ingest": ingest,
            "checkpoint_updates": 2,
            "bound_warmup": 1,
        },
    }


def test_server_sigkill_under_fold_on_receive_gives_the_uninterrupted_model(
    tmp_path: Path,
) -> None:
    rounds, clients = 8, 3
    with federation(tmp_path / "ref", **_cfg(tmp_path / "ref", rounds, clients, "spool")) as ref:
        run_all(ref, timeout=180)
        expect = np.asarray(ref.final().params)
    rng = random.Random(20261207)
    plan = list(POINTS)
    rng.shuffle(plan)
    root = tmp_path / "crash"
    with federation(root, **_cfg(root, rounds, clients, "fold")) as fed:
        crashes: list[str] = []
        server = start_server(fed, env=_crash_at(plan[0], rng.randint(1, 4)))
        wait_listening(fed, server)
        cl = [
            start_client(fed, i, args=("--retry-for", "120"), record_acks=True)
            for i in range(clients)
        ]
        deadline = time.monotonic() + 300
        while True:
            rc = _supervise(fed, server, max(1.0, deadline - time.monotonic()))
            if rc == 0:
                break
            assert rc == -9, f"server failed (rc {rc}):\n{read_log(fed)}"
            crashes.append(plan[len(crashes)])
            nxt = plan[len(crashes)] if len(crashes) < len(plan) else None
            server = start_server(fed, env=_crash_at(nxt, rng.randint(1, 4)) if nxt else None)
        for i, c in enumerate(cl):
            assert wait(c, 60) == 0, read_log(fed, f"client-{i}.log")
        final = fed.final()
        acked = [(c, t) for c, t, _ in read_acks(fed)]
        with sqlite3.connect(fed.state / "state.db") as db:
            uploads = db.execute("SELECT count(*), count(DISTINCT job) FROM uploads").fetchone()
            logged = {(c, j) for c, j in db.execute("SELECT client, job FROM uploads")}
            folded = [r[0] for r in db.execute("SELECT folded FROM rounds ORDER BY round")]
    assert len(crashes) >= 3, crashes
    assert final.version == rounds
    assert uploads == (rounds * clients, rounds * clients)
    assert len(acked) == len(set(acked)) and set(acked) == logged
    assert folded == [clients] * rounds
    assert np.array_equal(final.params, expect), np.abs(final.params - expect).max()
