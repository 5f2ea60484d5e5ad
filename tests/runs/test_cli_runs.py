"""``fedagg simulate`` and ``fedagg runs`` in real processes: header, list, --diff, --csv,
--plot, errors, and a run interrupted by SIGINT or SIGTERM."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fedagg.runs import ROUND_COLUMNS, TEXT_COLUMNS, RunDB

SRC = Path(__file__).resolve().parents[2] / "src"

SYNC = """name = "sync-run"
rounds = 4
eval_every = 2
[data]
name = "digits"
num_clients = 8
partition = "iid"
[policy]
clients_per_round = 4
"""
FEDBUFF = """name = "fedbuff-krum"
rounds = 4
[data]
name = "digits"
num_clients = 8
partition = "iid"
[policy]
kind = "fedbuff"
buffer = 5
concurrency = 6
[strategy]
aggregator = "krum"
f = 1
"""


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(SRC), e.get("PYTHONPATH", "")])
    e.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    return e


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedagg.cli", *args],
        cwd=cwd, env=env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str]]:
    d = tmp_path_factory.mktemp("cli")
    (d / "sync.toml").write_text(SYNC)
    (d / "fedbuff.toml").write_text(FEDBUFF)
    db = d / "runs.db"
    outs = []
    for conf in ("sync.toml", "fedbuff.toml"):
        p = cli("simulate", conf, "--db", str(db), "--no-plots", cwd=d)
        assert p.returncode == 0, p.stderr
        outs.append(p.stdout)
    return d, db, outs


def test_simulate_headers_tell_the_policy_and_the_strategy(two_runs: Any) -> None:
    _, _, (sync_out, buff_out) = two_runs
    assert "policy    sync: 4 clients per round" in sync_out
    assert "strategy  mean + fedavg(lr=1)" in sync_out
    assert "data      digits, 8 clients, iid" in sync_out
    assert "policy    fedbuff: buffer 5, concurrency 6" in buff_out
    assert "per round" not in buff_out
    assert "strategy  krum(f=1) + fedavg(lr=1)" in buff_out
    table = sync_out.split("round  test acc")[1].split("\n\n")[0]
    assert [int(line.split()[0]) for line in table.splitlines()[1:]] == [2, 4]


def test_runs_lists_kind_status_and_rounds(two_runs: Any) -> None:
    d, db, _ = two_runs
    p = cli("runs", "--db", str(db), cwd=d)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert "kind" in lines[0] and "status" in lines[0]
    assert lines[1].split()[:5] == ["1", "simulate", "sync-run", "finished", "4"]
    assert lines[2].split()[:5] == ["2", "simulate", "fedbuff-krum", "finished", "4"]


def test_runs_diff_prints_the_config_keys_that_differ(two_runs: Any) -> None:
    d, db, _ = two_runs
    p = cli("runs", "1", "2", "--db", str(db), "--diff", cwd=d)
    assert p.returncode == 0, p.stderr
    rows = {line.split()[0]: line.split()[1:] for line in p.stdout.splitlines()[1:]}
    assert p.stdout.splitlines()[0].split() == ["key", "run", "1", "run", "2"]
    assert rows["policy.kind"] == ["sync", "fedbuff"]
    assert rows["strategy.aggregator"] == ["mean", "krum"]
    assert rows["policy.buffer"] == ["10", "5"]
    assert rows["name"] == ["sync-run", "fedbuff-krum"]
    assert "seed" not in rows and "data.name" not in rows  # equal: not shown
    same = cli("runs", "1", "1", "--db", str(db), "--diff", cwd=d)
    assert same.returncode == 0 and "identical" in same.stdout


def test_runs_csv_writes_every_round_of_the_runs(two_runs: Any) -> None:
    d, db, _ = two_runs
    p = cli("runs", "1", "2", "--db", str(db), "--csv", cwd=d)
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    assert list(rows[0]) == ["run_id", *ROUND_COLUMNS, *TEXT_COLUMNS]
    assert [(r["run_id"], r["round"]) for r in rows] == [
        (str(i), str(k)) for i in (1, 2) for k in range(1, 5)
    ]
    assert rows[1]["test_accuracy"] != "" and rows[0]["test_accuracy"] == ""  # eval_every 2
    after = cli("runs", "--db", str(db), "--csv", "1", "2", cwd=d)  # ids after --csv
    assert after.returncode == 0 and after.stdout == p.stdout
    assert not (d / "1").exists()
    out = d / "one.csv"
    p = cli("runs", "2", "--db", str(db), "--csv", str(out), cwd=d)
    assert p.returncode == 0, p.stderr
    with out.open() as f:
        assert len(list(csv.DictReader(f))) == 4


def test_runs_plot_writes_a_png(two_runs: Any) -> None:
    d, db, _ = two_runs
    out = d / "plots" / "cmp.png"
    p = cli("runs", "1", "2", "--db", str(db), "--plot", str(out), cwd=d)
    assert p.returncode == 0, p.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_runs_errors_exit_non_zero_with_a_message(two_runs: Any, tmp_path: Path) -> None:
    d, db, _ = two_runs
    p = cli("runs", "1", "9", "--db", str(db), "--diff", cwd=d)
    assert p.returncode == 1 and "no run 9" in p.stderr
    p = cli("runs", "--db", str(tmp_path / "missing.db"), cwd=d)
    assert p.returncode == 1 and "no run database" in p.stderr
    from fedagg.deploy._store import Store

    state = tmp_path / "state.db"
    Store(state).close()
    before = hashlib.sha256(state.read_bytes()).hexdigest()
    p = cli("runs", "--db", str(state), cwd=d)
    assert p.returncode == 1 and "not a fedagg run database" in p.stderr
    assert hashlib.sha256(state.read_bytes()).hexdigest() == before
    assert sorted(os.listdir(tmp_path)) == ["state.db"]


def stored_rounds(db: Path) -> int:
    if not db.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return int(con.execute("SELECT COUNT(*) FROM rounds").fetchone()[0])
        finally:
            con.close()
    except sqlite3.Error:
        return 0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_simulation_is_stored_as_interrupted(tmp_path: Path, sig: int) -> None:
    conf = tmp_path / "long.toml"
    long = SYNC.replace("rounds = 4", "rounds = 100000").replace("eval_every = 2", "eval_every = 5")
    conf.write_text(long)
    db = tmp_path / "runs.db"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedagg.cli", "simulate", str(conf), "--db", str(db),
         "--no-plots"],
        cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while stored_rounds(db) < 6 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert stored_rounds(db) >= 6
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "stored rounds" in err
    with RunDB(db) as rdb:
        (run,) = rdb.runs()
        n = rdb.round_count(run.id)
    assert run.status == "interrupted"
    assert n >= 6 and run.summary["rounds"] == n
    assert isinstance(run.summary["final_accuracy"], float)
    p = cli("runs", "--db", str(db), cwd=tmp_path)
    assert p.stdout.splitlines()[1].split()[3:5] == ["interrupted", str(n)]


NAN_TRAIN = '''
import numpy as np
from fedagg.clients import Result


def train(params, data, task):
    """A custom client whose training diverged: every delta holds NaN."""
    delta = {k: np.full(v.shape, np.nan, np.float32) for k, v in params.items()}
    return Result(delta, float(len(data.y)), {"train_loss": 1.0})
'''


def user_train_supported() -> bool:
    """Whether ``[client] train`` is wired into the simulator (issue 16's user-code part):
    naming a module that does not exist must then fail the build."""
    import fedagg.config

    cfg = fedagg.config.resolve_config({"client": {"train": "no_such_module_nan:train"}})
    try:
        fedagg.config.build_algorithm(cfg)
    except fedagg.ConfigError:
        return True
    return False


def test_a_custom_client_sees_its_refusal_reason_in_progress_and_rounds(tmp_path: Path) -> None:
    if not user_train_supported():
        pytest.skip("[client] train is not wired into the simulator on this branch")
    (tmp_path / "nantrain.py").write_text(NAN_TRAIN)
    conf = tmp_path / "nan.toml"
    conf.write_text(SYNC + '[client]\ntrain = "nantrain:train"\n')
    db = tmp_path / "runs.db"
    p = cli("simulate", str(conf), "--db", str(db), "--no-plots", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "refused (16): non-finite values: 16" in p.stderr  # 4 rounds x 4 clients
    assert "refused updates (16): non-finite values: 16" in p.stdout
    with RunDB(db) as rdb:
        rows = rdb.rounds(1)
    assert [r["refusals"] for r in rows] == ["non-finite values: 4"] * 4
    assert [r["refused"] for r in rows] == [4] * 4
