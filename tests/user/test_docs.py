"""The examples of docs/custom-code.md run as written."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedagg.sim import build
from tests.user.guide import guide_code


def test_the_numpy_example_learns(tmp_path: Path) -> None:
    (tmp_path / "mycode.py").write_text(guide_code("custom-code.md", '"""mycode.py'))
    cfg = {
        "rounds": 4, "code_path": str(tmp_path),
        "data": {"name": "digits", "num_clients": 8, "partition": "iid"},
        "model": {"factory": "mycode:make_model"},
        "client": {"train": "mycode:train", "evaluate": "mycode:evaluate",
                   "schedule": "mycode:schedule"},
        "policy": {"clients_per_round": 4},
    }  # fmt: skip
    records = build(cfg).simulation.run().records
    assert records[-1].test_accuracy > 0.8, [r.test_accuracy for r in records]


def test_the_torch_example_learns(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    (tmp_path / "mynet.py").write_text(guide_code("custom-code.md", '"""mynet.py'))
    cfg = {
        "rounds": 3, "code_path": str(tmp_path),
        "data": {"name": "digits", "num_clients": 8, "partition": "iid"},
        "model": {"factory": "mynet:make_model", "args": {"hidden": 16}},
        "client": {"lr": 0.1}, "policy": {"clients_per_round": 4},
    }  # fmt: skip
    records = build(cfg).simulation.run().records
    assert records[-1].test_accuracy > records[0].test_accuracy - 0.05
    assert records[-1].test_accuracy > 0.3
