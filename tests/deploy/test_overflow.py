"""A finite but huge update must not brick the server (issue 14, finding 2).

Client 0 is a registered client whose every upload is finite but overflows the round's
float32 accumulator once weighted: all values 3e38 with weight 10, or 1e30 with weight 1e12.
In canonical fold order such an update used to be kept until the round closed, overflow the
fold there and kill the server; every restart replayed the logged update and died again.
Now the server refuses it on arrival, with a reason, the rounds close with the other two
clients, and a server SIGKILLed after a round closed (before its checkpoint) replays that
round, update included, to the model of an uninterrupted run.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.deploy.harness import (
    PY,
    Fed,
    _env,
    federation,
    read_log,
    start_client,
    start_server,
    wait,
    wait_listening,
)

ROUNDS, CLIENTS = 2, 3
CFG: dict[str, Any] = {
    "clients": CLIENTS,
    "rounds": ROUNDS,
    "deploy": {"order": "canonical", "client_timeout": 60.0},
}

# ``fedagg client`` whose every upload is replaced by all-VALUE with weight WEIGHT
_POISON = """
import os, sys
import numpy as np
from fedagg.deploy import _client

_push = _client.Client._push
VALUE, WEIGHT = (float(v) for v in os.environ["FEDAGG_TEST_POISON"].split(","))

async def _poisoned(self, t, delta, weight, metrics):
    return await _push(self, t, np.full_like(delta, VALUE), WEIGHT, metrics)

_client.Client._push = _poisoned
from fedagg.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start_poisoned(fed: Fed, i: int, value: float, weight: float) -> subprocess.Popen[bytes]:
    env = _env({"FEDAGG_TEST_POISON": f"{value!r},{weight!r}"})
    with open(fed.dir / f"client-{i}.log", "ab") as out:
        p = subprocess.Popen(
            [PY, "-c", _POISON, "client", str(fed.config), "--key", str(fed.key(i)),
             "--retry-for", "60"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    fed.procs.append(p)
    return p


Rounds = list[dict[str, Any]]


def _run(fed: Fed, value: float, weight: float, crash: bool) -> tuple[np.ndarray, Rounds]:
    """Run the federation with client 0 poisoned; with ``crash``, the server is SIGKILLed
    right after the first round closed (before its checkpoint) and restarted."""
    env = {"FEDAGG_CRASH_AT": "applied:1"} if crash else None
    server = start_server(fed, env=env)
    wait_listening(fed, server)
    clients = [_start_poisoned(fed, 0, value, weight)]
    clients += [start_client(fed, i, args=("--retry-for", "60")) for i in range(1, CLIENTS)]
    if crash:
        assert wait(server, 60) == -9, read_log(fed)  # killed at the crash point, not crashed
        server = start_server(fed)  # replays the first round, the huge update included
    assert wait(server, 60) == 0, read_log(fed)
    for i, c in enumerate(clients):
        assert wait(c, 30) == 0, read_log(fed, f"client-{i}.log")
    with sqlite3.connect(fed.state / "state.db") as db:
        rows = db.execute("SELECT stats FROM rounds ORDER BY round").fetchall()
    final = fed.final()
    assert final.version == ROUNDS
    return np.asarray(final.params), [json.loads(r[0]) for r in rows]


@pytest.mark.parametrize(("value", "weight"), [(3e38, 10.0), (1e30, 1e12)])
def test_a_huge_finite_update_is_refused_and_a_restart_replays_it(
    tmp_path: Path, value: float, weight: float
) -> None:
    with federation(tmp_path / "crash", **CFG) as fed:
        params, rounds = _run(fed, value, weight, crash=True)
        log = (fed.dir / "server.log").read_text(errors="replace")
    assert "Traceback" not in log, log
    # the reason, logged at the refusal and again when the restart replays it
    assert log.count("update from client '0' refused: weighted delta too large") >= 2, log
    assert len(rounds) == ROUNDS
    for r in rounds:  # each round: the two honest updates folded, client 0's refused
        assert (r["folded"], r["refused"], r["applied"]) == (CLIENTS - 1, 1, True), r
        assert sorted(r["participants"]) == [1, 2], r
    assert np.isfinite(params).all()
    if value == 3e38:  # the replayed run reaches the model of an uninterrupted one
        with federation(tmp_path / "ref", **CFG) as ref:
            want, _ = _run(ref, value, weight, crash=False)
        assert np.array_equal(params, want)
