"""Your model and code through the CLI, in real processes: ``fedagg simulate`` with a numpy
model, train and evaluate of your own, and with a torch module from a factory; ``fedagg
server``/``fedagg client`` with no dataset (your code loads its data) and with the torch
example served through ``[model] factory``."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedagg.runs import RunDB
from tests.deploy.harness import (
    PY,
    federation,
    read_log,
    start_client,
    start_server,
    wait,
    wait_listening,
)
from tests.user.guide import ROOT, cli, toml
from tests.user.usercode import SOURCE


def simulate(tmp_path: Path, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    (tmp_path / "mycode.py").write_text(SOURCE)
    cfg = {**cfg, "output": {"db": "runs.db", "plots": ""}}
    (tmp_path / "run.toml").write_text(toml(cfg))
    # code_path "" and relative paths: the working directory, where the config and code are
    p = cli(["simulate", "run.toml", "--quiet", "--no-plots"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    db = RunDB(tmp_path / "runs.db")
    return db.rounds(db.runs()[-1].id)


DATA = {"name": "digits", "num_clients": 8, "partition": "iid"}


def test_simulate_your_numpy_model_train_and_evaluate(tmp_path: Path) -> None:
    rows = simulate(tmp_path, {
        "rounds": 5, "data": DATA, "model": {"factory": "mycode:make"},
        "client": {"train": "mycode:train", "evaluate": "mycode:evaluate"},
        "policy": {"clients_per_round": 4},
    })  # fmt: skip
    accs = [r["test_accuracy"] for r in rows]
    assert len(rows) == 5 and accs[-1] > 0.8 and accs[-1] > accs[0], accs
    assert all(r["refused"] == 0 and r["folded"] == 4 for r in rows)  # float64 deltas folded


def test_simulate_a_torch_module_from_a_factory(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    rows = simulate(tmp_path, {
        "rounds": 4, "data": DATA, "model": {"factory": "mycode:torch_mlp", "args": {"hidden": 16}},
        "client": {"lr": 0.1, "epochs": 2}, "policy": {"clients_per_round": 4},
    })  # fmt: skip
    accs = [r["test_accuracy"] for r in rows]
    assert accs[-1] > 0.5 and accs[-1] > accs[0], accs


def test_simulate_refuses_data_none_with_a_clear_message(tmp_path: Path) -> None:
    (tmp_path / "mycode.py").write_text(SOURCE)
    cfg = {"data": {"name": "none"}, "model": {"factory": "mycode:make"},
           "client": {"train": "mycode:train"}}  # fmt: skip
    (tmp_path / "run.toml").write_text(toml(cfg))
    p = cli(["simulate", "run.toml", "--quiet", "--no-plots"], tmp_path)
    assert p.returncode != 0
    assert "data.name = 'none'" in p.stderr and "deployment only" in p.stderr, p.stderr


def test_deploy_your_train_with_no_dataset(tmp_path: Path) -> None:
    code = tmp_path / "code"
    code.mkdir()
    (code / "mycode.py").write_text(SOURCE)
    log = tmp_path / "tasks.jsonl"
    extra = {
        "code_path": str(code),
        "model": {"factory": "mycode:make"},
        "client": {"train": "mycode:train", "config": {"clients": 3}},
    }
    env = {"USER_TASK_LOG": str(log)}
    with federation(tmp_path / "fed", clients=3, rounds=2, tls=False, data={"name": "none"},
                    extra=extra) as fed:  # fmt: skip
        server = start_server(fed, args=("--insecure",))
        wait_listening(fed, server)
        clients = [start_client(fed, i, args=("--insecure",), env=env) for i in range(3)]
        assert wait(server, 120) == 0, read_log(fed)
        for i, c in enumerate(clients):
            assert wait(c, 30) == 0, read_log(fed, f"client-{i}.log")
        final = fed.final()
    import json

    seen = [json.loads(line) for line in log.read_text().splitlines()]
    assert final.version == 2 and len(seen) == 6
    assert all(t["none"] for t in seen)  # no [data]: the function loaded its own
    assert sorted(t["client_index"] for t in seen) == [0, 0, 1, 1, 2, 2]
    assert {t["version"] for t in seen} == {0, 1}
    assert np.isfinite(final.params).all() and np.abs(final.params).max() > 0


def test_deploy_the_torch_example_served_through_a_factory(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    extra = {"code_path": str(ROOT / "examples"),
             "model": {"factory": "deploy_torch:make_model", "args": {"hidden": 8}}}  # fmt: skip
    with federation(tmp_path, clients=2, rounds=2, tls=False, extra=extra) as fed:
        server = start_server(fed, args=("--insecure",))
        wait_listening(fed, server)
        procs = [
            subprocess.Popen(
                [
                    PY,
                    str(ROOT / "examples" / "deploy_torch.py"),
                    "--key",
                    str(fed.key(i)),
                    "--clients",
                    "2",
                    "--hidden",
                    "8",
                    "--server",
                    fed.address,
                    "--insecure",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            for i in range(2)
        ]
        fed.procs += procs
        assert wait(server, 120) == 0, read_log(fed)
        for p in procs:
            out = p.communicate(timeout=30)[0].decode()
            assert p.returncode == 0 and "2 updates sent" in out, out
        final = fed.final()
    assert final.version == 2
    assert final.spec.names == ("0.weight", "0.bias", "2.weight", "2.bias")
