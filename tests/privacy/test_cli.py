"""``fedagg privacy plan``."""

from __future__ import annotations

import json

import pytest

from fedagg.cli import main
from fedagg.privacy import epsilon

PLAN = ["privacy", "plan", "--epsilon", "2", "--delta", "1e-5", "--rounds", "100"]
PLAN += ["--clients-per-round", "100", "--clients", "10000"]


def test_plan_prints_the_noise_multiplier(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*PLAN, "--accountant", "rdp"]) == 0
    out = capsys.readouterr().out
    assert "q=0.01" in out and "delta=1e-05" in out
    row = next(line for line in out.splitlines() if line.startswith("rdp"))
    sigma, spent = (float(v) for v in row.split()[1:])
    assert sigma == pytest.approx(0.827, abs=1e-3)
    assert spent <= 2.0
    assert epsilon(noise_multiplier=sigma, sample_rate=0.01, steps=100, delta=1e-5) <= 2.0001


def test_plan_json_and_default_delta(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["privacy", "plan", "--epsilon", "4", "--rounds", "20", "--clients-per-round"]
    argv += ["50", "--clients", "5000", "--accountant", "rdp", "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["delta"] == pytest.approx(1e-4) and result["sample_rate"] == 0.01
    (plan,) = result["plans"]
    assert plan["accountant"] == "rdp" and plan["epsilon"] <= 4.0


@pytest.mark.parametrize(
    "extra",
    [
        ["--epsilon", "-1", "--rounds", "10", "--clients-per-round", "1", "--clients", "10"],
        ["--epsilon", "1", "--delta", "2", "--rounds", "10", "--clients-per-round", "1",
         "--clients", "10"],
        ["--epsilon", "1", "--rounds", "10", "--clients-per-round", "20", "--clients", "10"],
    ],
)  # fmt: skip
def test_plan_refuses_bad_targets(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["privacy", "plan", *extra, "--accountant", "rdp"]) == 2
    assert "error" in capsys.readouterr().err
