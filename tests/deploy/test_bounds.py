"""One client's claimed weight and values cannot set the global model (issue 14, finding 6).

Real processes, the DEFAULT ``[deploy]`` bounds: client 0 of 5 is registered and follows the
protocol, but every upload claims 1e12 examples and carries values 1e30 (finite in float32).
Its first round finds no reference yet, so the server keeps that round's updates until the
close and bounds them against the round's own median; later rounds bound them against the
recent rounds' claims (canonical order keeps every round until its close). The model must
end near the one an all-honest federation reaches (simulated), every round applied with the
four honest updates, and the attacker bounded (``clip``: folded scaled down, or refused where
it would overflow) or refused (``reject``), in either fold order.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedagg.deploy._app import build_federation
from fedagg.sim import run_config
from tests.deploy.harness import (
    Fed,
    federation,
    read_log,
    start_client,
    start_server,
    wait,
    wait_listening,
)
from tests.deploy.test_overflow import _start_poisoned

CLIENTS, ROUNDS = 5, 3
VALUE, WEIGHT = 1e30, 1e12


def _cfg(order: str, **deploy: Any) -> dict[str, Any]:
    return {"clients": CLIENTS, "rounds": ROUNDS, "tls": False,
            "deploy": {"order": order, "client_timeout": 60.0, **deploy}}  # fmt: skip


def _run_poisoned(fed: Fed, value: float) -> list[dict[str, Any]]:
    server = start_server(fed)
    wait_listening(fed, server)
    clients = [_start_poisoned(fed, 0, value, WEIGHT)]
    clients += [start_client(fed, i, args=("--retry-for", "60")) for i in range(1, CLIENTS)]
    assert wait(server, 60) == 0, read_log(fed)
    for i, c in enumerate(clients):
        assert wait(c, 30) == 0, read_log(fed, f"client-{i}.log")
    with sqlite3.connect(fed.state / "state.db") as db:
        rows = db.execute("SELECT stats FROM rounds ORDER BY round").fetchall()
    return [json.loads(r[0]) for r in rows]


@pytest.mark.parametrize(
    ("order", "mode", "value"),
    [
        ("arrival", "clip", VALUE),
        ("canonical", "clip", VALUE),  # refused: it could overflow the round's close
        ("canonical", "clip", 1e3),  # kept, then capped and clipped at the close
        ("arrival", "reject", 1e3),
    ],
)
def test_a_huge_claimed_weight_and_huge_values_do_not_set_the_model(
    tmp_path: Path, order: str, mode: str, value: float
) -> None:
    deploy = {} if mode == "clip" else {"norm_mode": mode}  # clip is the default
    with federation(tmp_path / "bad", **_cfg(order, **deploy)) as fed:
        rounds = _run_poisoned(fed, value)
        got = np.asarray(fed.final().params, np.float64)
        log = (fed.dir / "server.log").read_text(errors="replace")
        init = np.asarray(build_federation(fed.cfg, tmp_path / "init").server0.params, np.float64)
    # the all-honest federation's model: the simulator's run of the same config (the deployed
    # clients train exactly as simulated ones do)
    want = np.asarray(run_config(fed.cfg)[0].server.params, np.float64)
    assert "Traceback" not in log, log
    assert len(rounds) == ROUNDS
    for r in rounds:  # the honest four always folded, every round applied
        assert r["applied"] and {1, 2, 3, 4} <= set(r["participants"]), r
        assert r["folded"] + r["refused"] == CLIENTS, r
    assert np.isfinite(got).all()
    moved = float(np.linalg.norm(want - init))  # how far honest training moves the model
    off = float(np.linalg.norm(got - want))
    attacker = value * np.sqrt(got.size)
    # weight_cap x norm_cap: each round, at most ~7 honest steps' worth of pull; unbounded,
    # the first round alone would move the model by ~1e30 per coordinate
    assert off <= 10.0 * moved, (off, moved)
    assert off < 1e-2 * attacker
    if mode == "reject":
        assert all(r["refused"] == 1 and 0 not in r["participants"] for r in rounds), rounds
        assert "update from client '0' refused: update norm" in log, log
    elif order == "arrival" or value < 1e30:  # folded, clipped and capped
        assert any(0 in r["participants"] for r in rounds), rounds
        assert "update from client '0' bounded" in log, log
