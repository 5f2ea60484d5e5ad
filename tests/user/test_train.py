"""Your train and evaluate functions in the simulator: the Task each job receives, the
per-task config (a schedule), float64 deltas cast to the model's dtype, worker processes,
held-out evaluation data; and the checks on what a train function returns."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedagg.clients import Result, Task, UserTrain, fit_delta
from fedagg.errors import ConfigError
from fedagg.sim import build
from tests.user.usercode import SOURCE

PARAMS = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}


# -- what a train function returns ------------------------------------------------------------
def test_float64_deltas_are_cast_to_the_models_dtype() -> None:
    d = fit_delta({"w": np.ones((3, 2)), "b": np.array([1, 2])}, PARAMS)
    assert d["w"].dtype == np.float32 and d["b"].dtype == np.float32
    flat = fit_delta(np.arange(8, dtype=np.float64), PARAMS)
    np.testing.assert_array_equal(flat["w"], np.arange(6).reshape(3, 2))
    np.testing.assert_array_equal(flat["b"], [6, 7])


def test_bad_deltas_name_the_parameter() -> None:
    with pytest.raises(ConfigError, match=r"missing \['b'\], unexpected \['bias'\]"):
        fit_delta({"w": np.ones((3, 2)), "bias": np.ones(2)}, PARAMS)
    want = r"parameter 'w' of shape \(2, 3\), the model's is \(3, 2\)"
    with pytest.raises(ConfigError, match=want):
        fit_delta({"w": np.ones((2, 3)), "b": np.ones(2)}, PARAMS)
    with pytest.raises(ConfigError, match=r"flat delta of shape \(7,\); the model has 8"):
        fit_delta(np.ones(7), PARAMS)
    with pytest.raises(ConfigError, match=r"parameter 'b' has dtype <U1, not a number"):
        fit_delta({"w": np.ones((3, 2)), "b": np.array(["a", "b"])}, PARAMS)
    with pytest.raises(ConfigError, match=r"expected a dict of arrays"):
        fit_delta(3.0, PARAMS)


def test_train_must_return_a_result() -> None:
    rng = np.random.default_rng(0)
    alg = UserTrain(lambda p, d, t: {"delta": p})
    with pytest.raises(ConfigError, match=r"must return fedagg.clients.Result"):
        alg.train(None, PARAMS, None, rng)
    alg = UserTrain(lambda p, d, t: Result({k: v for k, v in p.items()}, 0))
    with pytest.raises(ConfigError, match=r"num_examples = 0"):
        alg.train(None, PARAMS, None, rng)
    seen: list[Task] = []

    def train(p: dict[str, Any], d: Any, t: Task) -> Result:
        seen.append(t)
        assert not p["w"].flags.writeable  # the global model is read-only
        return Result(np.zeros(8), 2.0, {"m": 1})

    res, _ = UserTrain(train, epochs=3).train(None, PARAMS, None, rng)
    assert seen[0].epochs == 3 and res.num_examples == 2 and res.metrics == {"m": 1.0}


# -- in the simulator -------------------------------------------------------------------------
@pytest.fixture
def code(tmp_path: Path) -> Path:
    (tmp_path / "mycode.py").write_text(SOURCE)
    return tmp_path


def config(code: Path, **over: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "rounds": 3, "seed": 7, "code_path": str(code),
        "data": {"name": "digits", "num_clients": 6, "partition": "iid"},
        "model": {"factory": "mycode:make"},
        "client": {"train": "mycode:train", "evaluate": "mycode:evaluate",
                   "schedule": "mycode:lr_schedule", "epochs": 2,
                   "config": {"log": str(code / "tasks.jsonl")}},
        "policy": {"clients_per_round": 3},
    }  # fmt: skip
    for k, v in over.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def tasks(code: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (code / "tasks.jsonl").read_text().splitlines()]


def test_train_sees_the_task_and_its_scheduled_config(code: Path) -> None:
    result = build(config(code)).simulation.run()
    seen = tasks(code)
    assert [t["job"] for t in seen] == list(range(9))
    assert [t["version"] for t in seen] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for t in seen:
        assert t["config"]["lr"] == pytest.approx(0.5 / (1 + t["version"]))
        assert t["config"]["log"].endswith("tasks.jsonl")
        assert t["name"] == f"client-{t['client_index']}" and 0 <= t["client_index"] < 6
        assert (t["epochs"], t["seed"], t["none"]) == (2, 7, False)
        assert t["pid"] == os.getpid()
    # float64 deltas: nothing refused, and the model learns
    assert all(r.stats.refused == 0 and r.stats.folded == 3 for r in result.records)
    accs = [r.test_accuracy for r in result.records]
    assert accs[-1] > 0.6 and accs[-1] > accs[0] - 0.05, accs


def test_worker_processes_run_your_train_function(code: Path) -> None:
    local = build(config(code)).simulation.run()
    (code / "tasks.jsonl").unlink()
    procs = build(config(code, executor={"kind": "processes", "workers": 2})).simulation.run()
    seen = tasks(code)
    assert len(seen) == 9 and all(t["pid"] != os.getpid() for t in seen)
    versions = [t["version"] for t in sorted(seen, key=lambda t: t["job"])]
    assert versions == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    np.testing.assert_array_equal(procs.server.params, local.server.params)


def test_builtin_clients_take_the_lr_of_the_per_task_config(code: Path) -> None:
    base = {"rounds": 3, "code_path": str(code), "policy": {"clients_per_round": 3},
            "data": {"name": "digits", "num_clients": 6, "partition": "iid"}}  # fmt: skip
    plain = build(base).simulation.run()
    frozen = build({**base, "client": {"schedule": "mycode:frozen_after_first"}}).simulation.run()
    losses = [r.test_loss for r in frozen.records]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5) == pytest.approx(losses[2], rel=1e-5)
    assert plain.records[2].test_loss < plain.records[0].test_loss - 1e-3


def test_eval_data_and_your_evaluate_replace_the_test_split(code: Path) -> None:
    x = np.random.default_rng(0).random((50, 64))
    np.savez(code / "held.npz", x=x, y=np.zeros(50, np.int64))
    sim = build(config(code, rounds=1, eval_data="held.npz")).simulation
    assert len(sim.eval_data.y) == 50
    result = sim.run()
    rec = result.records[-1]
    # the model is arrays: its metrics come from your evaluate, on the held-out data only
    mine = sim.model.evaluate_fn.resolve()({"w": result.server.params[:640].reshape(64, 10),
                                            "b": result.server.params[640:]},
                                           sim.eval_data, None)  # fmt: skip
    assert (rec.test_loss, rec.test_accuracy) == (mine["loss"], mine["accuracy"])
    assert not math.isnan(rec.test_accuracy)
    sim = build(config(code, rounds=1, eval_data="mycode:held_out")).simulation
    assert len(sim.eval_data.y) == 300
    with pytest.raises(ConfigError, match=r"eval_data = 'nothing.npz': cannot read it"):
        build(config(code, eval_data="nothing.npz"))
    np.savez(code / "noy.npz", x=x)
    with pytest.raises(ConfigError, match=r"must hold arrays 'x' and 'y'"):
        build(config(code, eval_data="noy.npz"))


def test_data_none_is_refused_in_the_simulator(code: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.name = 'none' .* is for deployment only"):
        build(config(code, data={"name": "none"}))


def test_a_dict_model_without_your_train_is_refused(code: Path) -> None:
    cfg = config(code)
    cfg["client"] = {"train": ""}
    with pytest.raises(ConfigError, match=r"no built-in training: name your train function"):
        build(cfg)
