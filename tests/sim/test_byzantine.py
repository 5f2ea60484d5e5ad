"""Byzantine clients in the simulator: attacks replace their updates, robust rules resist."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fedagg
from fedagg import aggregators as A
from fedagg import attacks, sim
from tests.sim.fakes import FakeData, FakeModel


class Recorder:
    """A stand-in client: client c sends the delta (c, c, c, c); records nothing else."""

    epochs = 1
    batch_size = 1

    def train_many(self, model: Any, params: Any, datas: Any, rngs: Any, **kw: Any) -> Any:
        from tests.sim.fakes import Result

        return [
            (Result({"w": np.full(4, float(len(d)), np.float32)}, len(d), 1, {}, {}), None)
            for d in datas
        ]


def test_attack_replaces_exactly_the_byzantine_updates_with_the_formula() -> None:
    sizes = [1, 2, 3, 4, 5, 6]  # client c's delta is (n_c, ...) = (c + 1, ...)
    strategy = fedagg.strategies.fedavg(aggregator=A.median())
    policy = sim.SyncPolicy(strategy, 1, 6)
    res = sim.Simulation(
        FakeData(sizes), FakeModel(), Recorder(), strategy, policy, sim.SystemModel(6),
        byzantine=frozenset({0, 1}), attack=attacks.attack("ipm", eps=0.5),
    ).run()  # fmt: skip
    # honest rows: 3, 4, 5, 6 -> mean 4.5 -> IPM sends -2.25 from clients 0 and 1
    # median of {-2.25, -2.25, 3, 4, 5, 6} = (3 + 4) / 2 = 3.5
    assert res.server.params.tolist() == [3.5] * 4


@pytest.mark.parametrize("kind", ["sign_flip", "gaussian", "alie", "ipm", "min_max", "min_sum",
                                  "random", "none"])  # fmt: skip
def test_every_attack_runs_in_the_engine_and_replays(kind: str) -> None:
    cfg = {
        "rounds": 3,
        "data": {"name": "digits", "num_clients": 10, "partition": "iid"},
        "client": {"algorithm": "momentum", "lr": 0.1, "batch_size": 16, "beta": 0.9},
        "strategy": {"aggregator": "median"},
        "policy": {"clients_per_round": 10},
        "byzantine": {"clients": 2, "attack": kind},
    }
    a, _ = sim.run_config(cfg)
    b, _ = sim.run_config(cfg)
    assert a.server.params.tobytes() == b.server.params.tobytes()
    clean, _ = sim.run_config({**cfg, "byzantine": {"clients": 0}})
    if kind != "none":
        assert a.server.params.tobytes() != clean.server.params.tobytes()


def test_label_flipping_clients_train_on_flipped_labels() -> None:
    cfg: dict[str, Any] = {
        "rounds": 8,
        "data": {"name": "digits", "num_clients": 6, "partition": "iid"},
        "policy": {"clients_per_round": 6},
    }
    clean, _ = sim.run_config(cfg)
    flipped, _ = sim.run_config({**cfg, "byzantine": {"clients": 6, "attack": "label_flip"}})
    assert clean.final.test_accuracy > 0.8
    assert flipped.final.test_accuracy < 0.2  # everyone learns 9 - y


def test_ipm_breaks_median_and_krum_but_not_centered_clipping() -> None:
    """The centered-clipping paper's ordering under IPM (f = 11 of 25, eps = 0.1)."""
    base: dict[str, Any] = {
        "rounds": 60,
        "eval_every": 60,
        "data": {"name": "digits", "num_clients": 25, "partition": "iid"},
        "client": {"algorithm": "momentum", "lr": 0.2, "batch_size": 16, "beta": 0.0},
        "policy": {"clients_per_round": 25},
        "byzantine": {"clients": 11, "attack": "ipm", "eps": 0.1},
    }
    acc = {}
    for agg in ("median", "krum", "centered_clipping"):
        over = {"aggregator": agg, "f": 11, "tau_cc": 1.0}
        res, _ = sim.run_config({**base, "strategy": over})
        acc[agg] = res.final.test_accuracy
    assert acc["centered_clipping"] > 0.8
    assert acc["median"] < acc["centered_clipping"] - 0.2
    assert acc["krum"] < acc["centered_clipping"] - 0.2


def test_robust_configs_and_their_errors(tmp_path: Any) -> None:
    base: dict[str, Any] = {"rounds": 2, "data": {"name": "digits", "num_clients": 9}}
    for agg in ("median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geometric_median",
                "centered_clipping", "flag"):  # fmt: skip
        over = {"aggregator": agg, "f": 1, "keep": 3, "spool": str(tmp_path)}
        res, _ = sim.run_config({**base, "strategy": over, "policy": {"clients_per_round": 9}})
        assert res.server.version == 2, agg
    with pytest.raises(fedagg.ConfigError, match="unknown aggregator"):
        sim.build({**base, "strategy": {"aggregator": "mode"}})
    with pytest.raises(fedagg.ConfigError, match="unknown attack"):
        sim.build({**base, "byzantine": {"clients": 1, "attack": "bribe"}})
    with pytest.raises(fedagg.ConfigError, match=r"byzantine\.clients"):
        sim.build({**base, "byzantine": {"clients": 99, "attack": "ipm"}})


def test_a_diverged_federation_is_not_a_config_error_in_the_attack() -> None:
    """Honest NaN updates (a diverged model): the attack skips them, the rule refuses them."""

    class Diverged(Recorder):
        def train_many(self, model: Any, params: Any, datas: Any, rngs: Any, **kw: Any) -> Any:
            from tests.sim.fakes import Result

            return [
                (Result({"w": np.full(4, np.nan, np.float32)}, len(d), 1, {}, {}), None)
                for d in datas
            ]

    strategy = fedagg.strategies.fedavg()
    res = sim.Simulation(
        FakeData([3] * 6), FakeModel(), Diverged(), strategy, sim.SyncPolicy(strategy, 2, 6),
        sim.SystemModel(6), byzantine=frozenset({0, 1}), attack=attacks.attack("ipm"),
    ).run()  # fmt: skip
    assert [r.stats.applied for r in res.records] == [False, False]
    assert all(r.stats.refused == 6 for r in res.records)
