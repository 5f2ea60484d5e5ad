"""The deployed root's memory at a round's close: two model-sized buffers (the old parameters,
and the round's sums that become the new ones; the update being folded is a map of its spool
file, not a copy), three while the checkpoint is written (its 16 MiB chunks: a model here),
measured with tracemalloc around the step that closes the round: deterministic, not timed.
And the versions it keeps: only those an open task still needs."""

from __future__ import annotations

import tracemalloc
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedagg import strategies
from fedagg.deploy import Federation
from fedagg.deploy._store import UploadRow, checksum
from fedagg.sim import SyncPolicy

N = 1 << 22  # 16 MiB of float32
MODEL = 4 * N
SLACK = 1 << 20  # Python objects, the event log's rows: far below a model


def _fed(d: Path, strategy: Any, *, per_round: int, over: float = 0.0) -> Federation:
    policy = SyncPolicy(strategy=strategy, rounds=2, clients_per_round=per_round, over_select=over)
    server = strategy.init([np.random.default_rng(0).standard_normal(N, dtype=np.float32)])
    return Federation(policy, server, num_clients=4, seed=1, directory=d)


def _arrival(fed: Federation, job: int) -> Any:
    t = fed.tasks[job]
    x = np.random.default_rng(job).standard_normal(N, dtype=np.float32)
    path = fed.spool / f"{job:012d}.upd"
    x.tofile(path)
    up = UploadRow(t.client, job, str(path), 1.0 + job, t.version, {}, MODEL, b"",
                   checksum(x.data.cast("B")))  # fmt: skip
    return ("arrival", 1.0 + job, t.client, job, None, up)


def _close_peak(fed: Federation, jobs: list[int]) -> tuple[int, int]:
    """Step the arrivals of ``jobs``; the traced peaks during the last one's step (it closes
    the round) before its checkpoint and during it, everything the process allocated since
    tracing began counted."""
    events = [_arrival(fed, j) for j in jobs]
    for ev in events[:-1]:
        fed.step([r for r in fed.log([ev]) if r])
    rows = [r for r in fed.log([events[-1]]) if r]
    peaks: list[int] = []
    write = fed._checkpoint

    def checkpoint() -> None:
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.reset_peak()
        write()

    fed._checkpoint = checkpoint  # type: ignore[method-assign]
    tracemalloc.reset_peak()
    fed.step(rows)
    del fed._checkpoint
    return peaks[0], tracemalloc.get_traced_memory()[1]


def _round(d: Path, strategy: Any) -> tuple[Federation, tuple[int, int]]:
    fed = _fed(d, strategy, per_round=3)
    fed.open()
    fed.step([r for r in fed.log([("start", 0.0, None, None, None, None)]) if r])
    return fed, _close_peak(fed, sorted(fed.tasks))


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam"])
def test_the_close_of_a_round_holds_two_models_three_with_its_checkpoint(
    tmp_path: Path, name: str
) -> None:
    strategy = {
        "fedavg": strategies.fedavg(),
        "fedavgm": strategies.fedavgm(),
        "fedadam": strategies.fedadam(lr=0.1),
    }[name]
    moments = {"fedavg": 0, "fedavgm": 1, "fedadam": 2}[name]  # optimizer state, on top
    _round(tmp_path / "warm", strategy)[0].close()  # modules and kernels loaded: not counted
    tracemalloc.start()
    try:
        fed, (peak, ckpt) = _round(tmp_path / "fed", strategy)
        assert fed.server.version == 1
        live = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert peak <= (2 + moments) * MODEL + SLACK, f"{peak / MODEL:.2f} models"
    assert ckpt <= (3 + moments) * MODEL + SLACK, f"{ckpt / MODEL:.2f} models"
    # after it: the new parameters and the next round's sums (+ the optimizer's state)
    assert live <= (2 + moments) * MODEL + SLACK, f"{live / MODEL:.2f} models"
    assert fed.models == {}
    assert fed.model(1) is fed.server.params and fed.model(0) is None
    fed.close()


def test_a_version_an_open_task_needs_is_kept_until_it_resolves(tmp_path: Path) -> None:
    fed = _fed(tmp_path, strategies.fedavg(), per_round=2, over=1.0)  # 4 dispatched, 2 needed
    fed.open()
    fed.step([r for r in fed.log([("start", 0.0, None, None, None, None)]) if r])
    jobs = sorted(fed.tasks)
    assert len(jobs) == 4 and fed.models == {}  # the current version: the server's own
    v0 = fed.model(0)
    assert v0 is fed.server.params
    want = v0.copy()
    for j in jobs[:2]:
        fed.step([r for r in fed.log([_arrival(fed, j)]) if r])
    assert fed.server.version == 1
    kept = fed.model(0)  # two stragglers of version 0 are still open: it is still served
    assert kept is v0 and np.array_equal(kept, want)
    for j in jobs[2:]:
        fed.step([r for r in fed.log([("dropout", 9.0, fed.tasks[j].client, j, None, None)]) if r])
    assert fed.model(0) is None and 0 not in fed.models
    fed.close()
    again = _fed(tmp_path, strategies.fedavg(), per_round=2, over=1.0)  # replay: the same
    again.open()
    assert again.server.version == 1 and again.models == {}
    assert np.array_equal(again.server.params, fed.server.params)
    again.close()
