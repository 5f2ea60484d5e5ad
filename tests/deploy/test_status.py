"""``fedagg status STATE_DIR [--json]`` with real processes: on a running server, on one
stopped cleanly and on one killed (its committed tail still in state.db-wal), strictly
read-only: no file of the state directory changes (bytes and mtime), none appears."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fedagg.deploy import make_keys
from tests.deploy.harness import (
    Fed,
    _env,
    federation,
    kill,
    read_log,
    start_client,
    start_server,
    wait,
    wait_listening,
)


def _status(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedagg.cli", "status", str(path), *args],
        capture_output=True, text=True, env=_env(None), timeout=60,
    )  # fmt: skip


def _json(fed: Fed) -> dict[str, Any]:
    r = _status(fed.state, "--json")
    assert r.returncode == 0, r.stderr
    out: dict[str, Any] = json.loads(r.stdout)
    return out


def _files(d: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in d.rglob("*") if p.is_file()}


def _until(what: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_status_of_a_running_then_a_stopped_server_writes_nothing(tmp_path: Path) -> None:
    with federation(tmp_path, clients=2, rounds=2, tls=False) as fed:
        server = start_server(fed)
        wait_listening(fed, server)
        c0 = start_client(fed, 0)
        # a stranger's key: refused (and counted by reason in status.json)
        make_keys(fed.dir / "other", ["mallory"])
        stranger = subprocess.run(
            [sys.executable, "-m", "fedagg.cli", "client", str(fed.config), "--key",
             str(fed.dir / "other" / "mallory.key")],
            capture_output=True, text=True, env=_env(None), timeout=60,
        )  # fmt: skip
        assert stranger.returncode == 1, stranger.stderr
        _until(lambda: (fed.state / "status.json").exists() and _json(fed)["clients"]["connected"])
        names = {p.name for p in fed.state.iterdir()}
        s = _json(fed)
        assert s["server"]["running"] and s["server"]["pid"] == server.pid, s["server"]
        assert s["round"] == 1 and s["rounds_closed"] == 0 and s["version"] == 0, s
        assert s["clients"]["registered"] == 2 and s["clients"]["connected"] == 1, s["clients"]
        rows = {c["name"]: c for c in s["clients"]["list"]}
        assert rows["client-000"]["connected"] and rows["client-000"]["last_seen"] > 0
        assert rows["client-001"]["last_seen"] is None
        _until(lambda: _json(fed)["uploads"]["refused_requests"])  # status.json: within ~1 s
        refused = _json(fed)["uploads"]["refused_requests"]
        assert refused["Hello UNAUTHENTICATED"]["count"] >= 1, refused
        text = _status(fed.state)
        assert text.returncode == 0, text.stderr
        assert f"server      running (pid {server.pid} on {fed.cfg['deploy']['listen']} " \
               "(insecure)" in text.stdout, text.stdout  # fmt: skip
        assert "clients     2 registered, 1 connected, 1 seen" in text.stdout, text.stdout
        assert "x Hello UNAUTHENTICATED" in text.stdout, text.stdout
        # reading a running server's state created nothing (no journal, no second -shm)
        assert {p.name for p in fed.state.iterdir()} == names
        c1 = start_client(fed, 1)
        assert wait(server, 60) == 0, read_log(fed)
        assert wait(c0, 30) == 0 and wait(c1, 30) == 0
        before = _files(fed.state)
        assert not any(n.endswith(("-wal", "-shm", "-journal")) for n in before), sorted(before)
        s = _json(fed)
        text = _status(fed.state)
        assert _files(fed.state) == before  # every byte and every mtime, and no new file
        assert not s["server"]["running"] and s["server"]["note"] == "stopped cleanly"
        assert s["finished"] and s["rounds_closed"] == 2 and s["version"] == 2, s
        assert s["uploads"]["accepted"] == 4 and s["uploads"]["duplicate"] == 0, s["uploads"]
        assert s["uploads"]["refused"] >= 1
        assert s["checkpoint"]["version"] == 2 and s["checkpoint"]["time"] > 0, s["checkpoint"]
        assert s["clients"]["connected"] == 0 and s["clients"]["seen"] == 2
        assert "round       2 (2 closed, finished)" in text.stdout, text.stdout
        assert "model       version 2" in text.stdout
        assert "uploads     4 accepted, 0 duplicate," in text.stdout
        assert "not running (stopped cleanly" in text.stdout


def test_status_of_a_killed_server_reads_its_wal_without_touching_it(tmp_path: Path) -> None:
    with federation(tmp_path, clients=2, rounds=3, tls=False) as fed:
        server = start_server(fed, args=("--crash-at", "fold:5"))  # in round 3
        wait_listening(fed, server)
        clients = [start_client(fed, i, args=("--retry-for", "5")) for i in range(2)]
        wait(server, 60)
        assert server.returncode == -9, read_log(fed)
        for c in clients:
            kill(c)
        assert (fed.state / "state.db-wal").exists()  # the committed tail, not checkpointed
        before = _files(fed.state)
        s = _json(fed)
        text = _status(fed.state)
        assert _files(fed.state) == before
        assert not s["server"]["running"], s["server"]
        assert "without a clean stop" in s["server"]["note"], s["server"]
        assert s["rounds_closed"] == 2 and s["round"] == 3 and s["version"] == 2, s
        assert s["uploads"]["accepted"] == 5, s["uploads"]  # the 5th was logged, then the kill
        assert "killed or crashed" in text.stdout, text.stdout


def test_status_of_what_is_not_a_state_directory(tmp_path: Path) -> None:
    r = _status(tmp_path / "nowhere")
    assert r.returncode == 3 and "is not a directory" in r.stderr, r.stderr
    r = _status(tmp_path)
    assert r.returncode == 3 and "holds no state.db" in r.stderr, r.stderr
    assert os.listdir(tmp_path) == []
