"""A deployed client's train function from a config (``fedagg client``): your train function
gets the Task the client received; the built-in one takes the task's lr."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fedagg.clients import Task
from fedagg.config import resolve_config
from fedagg.deploy import config_trainer
from fedagg.errors import ConfigError
from tests.user.usercode import SOURCE

DIGITS = {"name": "digits", "num_clients": 3, "partition": "iid"}


def test_your_train_gets_the_clients_task(tmp_path: Path) -> None:
    (tmp_path / "mycode.py").write_text(SOURCE)
    log = tmp_path / "tasks.jsonl"
    cfg = {"code_path": str(tmp_path), "data": {"name": "none", "num_clients": 3},
           "model": {"factory": "mycode:make"}, "client": {"train": "mycode:train"}}  # fmt: skip
    train = config_trainer(cfg)
    params = {"w": np.zeros((64, 10), np.float32), "b": np.zeros(10, np.float32)}
    task = Task(job=5, version=2, epochs=1, seed=3, client_index=1, name="client-001",
                config={"lr": 0.25, "log": str(log), "clients": 3}, kind="train")  # fmt: skip
    res = train(params, task)
    seen = json.loads(log.read_text())
    assert (seen["job"], seen["version"], seen["name"], seen["none"]) == (5, 2, "client-001", True)
    assert seen["config"]["lr"] == 0.25
    assert res.delta["w"].dtype == np.float32 and res.num_examples > 0  # cast from float64


def test_the_builtin_client_takes_the_tasks_lr() -> None:
    train = config_trainer({"data": DIGITS, "client": {"lr": 0.05}})
    params = {"W": np.zeros((64, 10), np.float32), "b": np.zeros(10, np.float32)}

    def delta(config: dict[str, float]) -> np.ndarray:
        task = Task(job=1, version=0, epochs=1, seed=0, client_index=0, config=config)
        return np.asarray(train(params, task).delta["b"])

    small, large = delta({}), delta({"lr": 0.5})
    assert np.abs(large).sum() > 3 * np.abs(small).sum() > 0


def test_data_none_needs_your_train_function() -> None:
    cfg = resolve_config({"data": {"name": "none"}, "model": {"init": ""}})
    with pytest.raises(ConfigError, match=r"data.name = 'none'"):
        config_trainer(cfg)
