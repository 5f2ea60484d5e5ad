"""Evaluation in a real deployment: ``fedagg server`` and three ``fedagg client`` processes
on loopback, with server-side evaluation every round and federated evaluation every model
version. The deployment is recorded in the run database (``[output] db``), with its rounds,
test accuracy and client metrics; ``fedagg runs`` lists it; the server's state database holds
no run tables."""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from fedagg.runs import RunDB
from tests.deploy.harness import (
    PY,
    _env,
    federation,
    read_log,
    run_all,
    start_client,
    start_server,
    wait,
    wait_listening,
)


def test_a_deployment_evaluates_and_is_recorded_in_the_run_database(tmp_path: Path) -> None:
    with federation(
        tmp_path / "fed", clients=3, rounds=2, tls=False,
        deploy={"fed_eval_every": 1, "eval_timeout": 30.0},
        extra={"eval_every": 1, "name": "deployed-digits"},
    ) as fed:  # fmt: skip
        run_all(fed, timeout=120)
        db = fed.dir / "runs.db"
        with RunDB(db) as runs:
            (info,) = runs.runs()
            rows = runs.rounds(info.id)
        assert (info.name, info.status, info.kind) == ("deployed-digits", "finished", "deploy")
        assert info.config["deploy"]["fed_eval_every"] == 1
        assert info.summary["rounds"] == 2
        assert [r["round"] for r in rows] == [1, 2]
        for r in rows:
            assert 0.0 <= r["test_accuracy"] <= 1.0 and r["test_loss"] > 0  # the server's
            assert 0.0 <= r["client_accuracy"] <= 1.0 and r["client_loss"] > 0  # the clients'
            assert r["folded"] == 3 and r["dropped"] == 0 and r["refused"] == 0
            assert r["bytes_up"] > 0 and r["bytes_down"] > 0
            assert r["virtual_time"] > 0 and r["wall_time"] > 0
        assert rows[-1]["test_accuracy"] == info.summary["final_accuracy"]
        # `fedagg runs` lists the deployment
        out = subprocess.run(
            [PY, "-m", "fedagg.cli", "runs", "--db", str(db)], capture_output=True, text=True,
            env=_env(None), timeout=60,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        (line,) = [ln for ln in out.stdout.splitlines() if "deployed-digits" in ln]
        assert "finished" in line and f"{rows[-1]['test_accuracy']:.2%}" in line
        # the state database holds the federation's state only
        state = sqlite3.connect(fed.state / "state.db")
        try:
            tables = {r[0] for r in state.execute("SELECT name FROM sqlite_master")}
        finally:
            state.close()
        assert "runs" not in tables and "meta" in tables
        # the clients evaluated: each reported the metrics of both versions
        for i in range(3):
            log = (fed.dir / f"client-{i}.log").read_text()
            assert "error" not in log.lower(), log


def test_a_server_killed_and_restarted_continues_its_run(tmp_path: Path) -> None:
    with federation(
        tmp_path / "fed", clients=2, rounds=3, tls=False, extra={"eval_every": 1},
    ) as fed:  # fmt: skip
        # SIGKILLed right after round 2's checkpoint (the first is the initial one): round 2
        # is in the state, not yet in the run database
        server = start_server(fed, env={"FEDAGG_CRASH_AT": "checkpoint:3"})
        wait_listening(fed, server)
        clients = [start_client(fed, i) for i in range(2)]
        assert wait(server, 60) == -9, read_log(fed)
        server = start_server(fed)
        assert wait(server, 120) == 0, read_log(fed)
        for i, c in enumerate(clients):
            assert wait(c, 30) == 0, read_log(fed, f"client-{i}.log")
        with RunDB(fed.dir / "runs.db") as runs:
            (info,) = runs.runs()  # the same run, continued
            rows = runs.rounds(info.id)
        assert info.status == "finished"
        assert [r["round"] for r in rows] == [1, 2, 3]
        assert [r["folded"] for r in rows] == [2, 2, 2]
        assert rows[2]["test_accuracy"] is not None  # evaluated after the restart
        assert rows[1]["virtual_time"] is not None  # round 2: from the state's record
        state = sqlite3.connect(fed.state / "state.db")
        try:
            meta = dict(state.execute("SELECT key, value FROM meta").fetchall())
        finally:
            state.close()
        assert meta["run_id"] == str(info.id)
        assert "continuing run" in read_log(fed)


def test_a_server_stopped_with_ctrl_c_leaves_an_interrupted_run(tmp_path: Path) -> None:
    with federation(tmp_path / "fed", clients=2, rounds=2, tls=False) as fed:
        server = start_server(fed)  # no client comes: it waits for them
        wait_listening(fed, server)
        deadline = time.monotonic() + 30
        while "recording the deployment" not in read_log(fed) and time.monotonic() < deadline:
            time.sleep(0.05)
        server.send_signal(signal.SIGINT)
        wait(server, 30)
        with RunDB(fed.dir / "runs.db") as runs:
            (info,) = runs.runs()
        assert info.status == "interrupted", read_log(fed)
        assert info.summary["rounds"] == 0
