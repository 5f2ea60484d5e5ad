"""End-to-end simulations with real data, models and client algorithms; the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedagg
from fedagg import sim
from fedagg.cli import main

SMALL: dict[str, Any] = {
    "name": "small",
    "rounds": 4,
    "data": {"name": "digits", "num_clients": 12, "partition": "dirichlet", "alpha": 1.0},
    "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "policy": {"clients_per_round": 6},
}


def cfg(**over: Any) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in SMALL.items()}
    for k, v in over.items():
        if isinstance(v, dict):
            out[k] = {**out.get(k, {}), **v}
        else:
            out[k] = v
    return out


def test_a_small_federation_learns() -> None:
    result, run_id = sim.run_config(cfg(rounds=10))
    assert run_id is None
    accs = [r.test_accuracy for r in result.records]
    assert accs[-1] > 0.7
    assert accs[-1] > accs[0]
    assert result.client_updates == 60


def test_same_seed_gives_the_bit_identical_model() -> None:
    a, _ = sim.run_config(cfg(system={"dropout": 0.2}))
    b, _ = sim.run_config(cfg(system={"dropout": 0.2}))
    c, _ = sim.run_config(cfg(seed=1, system={"dropout": 0.2}))
    assert a.server.params.tobytes() == b.server.params.tobytes()
    assert a.server.params.tobytes() != c.server.params.tobytes()


@pytest.mark.parametrize("algorithm", ["fedprox", "scaffold"])
def test_client_algorithms_run_in_the_engine(algorithm: str) -> None:
    result, _ = sim.run_config(cfg(rounds=6, client={"algorithm": algorithm, "mu": 0.1}))
    assert result.final.test_accuracy > 0.5
    factor = 2 if algorithm == "scaffold" else 1  # control variates travel both ways
    assert result.final.bytes_up == factor * 6 * result.server.spec.nbytes
    assert result.final.bytes_down == factor * 6 * result.server.spec.nbytes


@pytest.mark.parametrize("over_select", [0.0, 1.0])
def test_scaffold_server_control_variate_stays_the_mean_of_client_variates(
    over_select: float,
) -> None:
    # invariant: c = (1/N) sum_i c_i, where only applied updates change c_i (late ones don't)
    built = sim.build(
        cfg(rounds=3, client={"algorithm": "scaffold"}, policy={"over_select": over_select})
    )
    res = built.simulation.run()
    states = built.simulation.client_states
    assert 0 < len(states) <= 12
    c = res.policy_state.control
    for k, v in c.items():
        expected = sum(np.asarray(st[k], np.float64) for st in states.values()) / 12
        np.testing.assert_allclose(v, expected, rtol=1e-4, atol=1e-6)


def test_fedprox_stragglers_partial_beat_dropping_them() -> None:
    base = {
        "rounds": 15,
        "data": {"name": "synthetic", "num_clients": 30, "partition": "natural", "alpha": 1.0,
                 "beta": 1.0},
        "client": {"epochs": 5, "batch_size": 10, "lr": 0.01},
        "policy": {"clients_per_round": 10, "stragglers": 0.9},
        "eval_train": True,
    }  # fmt: skip
    drop, _ = sim.run_config(
        cfg(
            **{
                **base,
                "client": {**base["client"], "algorithm": "fedavg"},
                "policy": {**base["policy"], "straggler_mode": "drop"},
            }
        )
    )
    keep, _ = sim.run_config(
        cfg(
            **{
                **base,
                "client": {**base["client"], "algorithm": "fedprox", "mu": 1.0},
                "policy": {**base["policy"], "straggler_mode": "partial"},
            }
        )
    )
    assert keep.final.train_loss < drop.final.train_loss


def test_cli_simulate_runs_and_compare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    conf = tmp_path / "small.toml"
    conf.write_text(
        'name = "cli"\nrounds = 3\n[data]\nname = "digits"\nnum_clients = 10\n'
        "[policy]\nclients_per_round = 5\n"
    )
    db = tmp_path / "runs.db"
    plots = tmp_path / "plots"
    assert main(["simulate", str(conf), "--db", str(db), "--plots", str(plots), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "test acc" in out and "final test accuracy" in out
    assert len(list(plots.glob("*.png"))) == 2
    assert main(["simulate", str(conf), "--db", str(db), "--no-plots", "--seed", "3"]) == 0
    capsys.readouterr()
    assert main(["runs", "--db", str(db)]) == 0
    listing = capsys.readouterr().out
    assert listing.count("finished") == 2
    assert main(["runs", "1", "2", "--db", str(db)]) == 0
    assert "final_accuracy" in capsys.readouterr().out
    with sim.RunDB(db) as d:
        assert [len(d.rounds(r.id)) for r in d.runs()] == [3, 3]
        assert d.run(2).seed == 3


def test_cli_reports_bad_configs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[policy]\nclients_per_rond = 5\n")
    assert main(["simulate", str(bad), "--db", str(tmp_path / "x.db"), "--no-plots"]) == 2
    assert "clients_per_rond" in capsys.readouterr().err
    assert main(["simulate", str(tmp_path / "missing.toml")]) == 2
    typo = tmp_path / "typo.toml"
    typo.write_text('rounds = "x"\n')
    assert main(["simulate", str(typo), "--db", str(tmp_path / "y.db"), "--no-plots"]) == 2
    assert main(["runs", "--db", str(tmp_path / "none.db")]) == 1
    with pytest.raises(fedagg.ConfigError):
        sim.build(cfg(strategy={"name": "fedsgd"}))
    with pytest.raises(fedagg.ConfigError):
        sim.build(cfg(model={"name": "resnet"}))


def test_ray_executor_gives_identical_results() -> None:
    pytest.importorskip("ray")
    local, _ = sim.run_config(cfg(rounds=2))
    remote, _ = sim.run_config(cfg(rounds=2, executor={"kind": "ray", "workers": 2}))
    assert np.array_equal(local.server.params, remote.server.params)
    assert [r.row()["virtual_time"] for r in local.records] == [
        r.row()["virtual_time"] for r in remote.records
    ]


def test_process_executor_gives_identical_results() -> None:
    synth = {"name": "synthetic", "num_clients": 40, "partition": "natural"}
    local, _ = sim.run_config(cfg(rounds=2, data=synth, policy={"clients_per_round": 20}))
    procs, _ = sim.run_config(
        cfg(rounds=2, data=synth, policy={"clients_per_round": 20},
            executor={"kind": "processes", "workers": 2})
    )  # fmt: skip
    assert np.array_equal(local.server.params, procs.server.params)
