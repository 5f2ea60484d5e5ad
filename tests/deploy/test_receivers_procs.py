"""``[deploy] receivers`` in real processes: ``fedagg server`` (its receiver processes) and
``fedagg client`` s over gRPC on loopback.

The final model is compared, bit for bit, with an in-process replay of the same event log (a
copy of the state directory opened with ``receivers = 0``: checkpoints only every 100 rounds, so
the log and the spool files hold the whole federation); a receiver killed with SIGKILL stops the
server with :class:`~fedagg.plane.AggregatorFailed`, and a restart finishes the federation with
every accepted upload folded exactly once.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np

from fedagg.deploy._app import build_federation
from fedagg.plane import SHM_PREFIX
from tests.deploy.harness import (
    Fed,
    federation,
    read_acks,
    run_all,
    start_client,
    start_server,
    wait,
    wait_after_server,
    wait_listening,
)

ROUNDS = 2
CLIENTS = 3
DEPLOY = {"receivers": 2, "checkpoint_every": 100, "fsync": False}


def _segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIX)}


def _server_log(fed: Fed) -> str:
    return (fed.dir / "server.log").read_text(errors="replace")


def _replayed(fed: Fed, tmp: Path) -> np.ndarray:
    """The model an in-process engine (no receivers) replays from a copy of the state."""
    copy = tmp / "replay"
    shutil.copytree(fed.state, copy)
    cfg: dict[str, Any] = {k: v for k, v in fed.cfg.items()}
    cfg["deploy"] = {**fed.cfg["deploy"], "receivers": 0, "state": str(copy)}
    fx = build_federation(cfg, copy)
    try:
        fx.open()
        assert fx.finished and fx.replayed > 0
        return np.array(fx.server.params, copy=True)
    finally:
        fx.close()


def _uploads(fed: Fed) -> list[tuple[int, int]]:
    with closing(sqlite3.connect(fed.state / "state.db")) as db:
        return [(int(c), int(j)) for c, j in db.execute("SELECT client, job FROM uploads")]


def _folded(fed: Fed) -> int:
    with closing(sqlite3.connect(fed.state / "state.db")) as db:
        return sum(int(f) for (f,) in db.execute("SELECT folded FROM rounds"))


def test_a_server_with_receivers_folds_the_bits_of_the_in_process_replay(tmp_path: Path) -> None:
    before = _segments()
    with federation(tmp_path / "fed", clients=CLIENTS, rounds=ROUNDS, tls=False,
                    deploy=DEPLOY) as fed:  # fmt: skip
        run_all(fed)
        assert re.search(r"2 receiver processes fold the uploads \(pids \d+, \d+\)",
                         _server_log(fed))  # fmt: skip
        final = fed.final().params
        assert _folded(fed) == CLIENTS * ROUNDS
        assert sorted(_uploads(fed)) == sorted(set(_uploads(fed)))  # each once
        assert final.tobytes() == _replayed(fed, tmp_path).tobytes()
    assert _segments() - before == set()


def test_a_killed_receiver_stops_the_server_and_a_restart_finishes(tmp_path: Path) -> None:
    before = _segments()
    rounds = 3
    with federation(tmp_path / "fed", clients=CLIENTS, rounds=rounds, tls=False,
                    deploy={**DEPLOY, "client_timeout": 60.0}) as fed:  # fmt: skip
        server = start_server(fed)
        wait_listening(fed, server)
        clients = [start_client(fed, i, record_acks=True) for i in range(CLIENTS)]
        deadline = time.monotonic() + 60
        pids: list[int] = []
        while not pids or len(read_acks(fed)) < CLIENTS + 1:  # round 2 under way
            assert time.monotonic() < deadline, _server_log(fed)
            assert server.poll() is None, _server_log(fed)
            m = re.search(r"receiver processes fold the uploads \(pids ([\d, ]+)\)",
                          _server_log(fed))  # fmt: skip
            pids = [int(p) for p in m.group(1).split(", ")] if m else []
            time.sleep(0.02)
        os.kill(pids[0], signal.SIGKILL)
        assert wait(server, 60) != 0
        assert "AggregatorFailed" in _server_log(fed)
        server = start_server(fed)  # the clients retry meanwhile
        assert wait(server, 120) == 0, _server_log(fed)
        for i, c in enumerate(clients):  # one retrying the killed server may miss the end
            # (rounds are quick: the federation may be over by the kill): it is stopped once
            # its retry finds no server (-9, with UNAVAILABLE logged), not waited out
            assert wait_after_server(fed, i, c, 60) in (0, -9)
        assert _folded(fed) == CLIENTS * rounds  # every accepted upload folded exactly once
        assert sorted(_uploads(fed)) == sorted(set(_uploads(fed)))
        acked = {(c, t) for c, t, _ in read_acks(fed)}
        assert len(acked) == CLIENTS * rounds
        final = fed.final().params
        assert final.tobytes() == _replayed(fed, tmp_path).tobytes()
    assert _segments() - before == set()
