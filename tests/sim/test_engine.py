"""The virtual-clock engine and the synchronous policy, on stand-in clients."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

import fedagg
from fedagg import sim
from tests.sim.fakes import FakeAlgorithm, FakeData, FakeModel

SIZES = [10, 20, 30, 40, 50, 60, 70, 80]


def make(
    rounds: int = 3,
    k: int = 4,
    *,
    sizes: list[int] | None = None,
    seed: int = 0,
    system: dict[str, Any] | None = None,
    **policy: Any,
) -> tuple[sim.Simulation, FakeAlgorithm]:
    data = FakeData(sizes or SIZES)
    alg = FakeAlgorithm()
    strategy = fedagg.strategies.fedavg()
    pol = sim.SyncPolicy(strategy=strategy, rounds=rounds, clients_per_round=k, **policy)
    sysm = sim.SystemModel(num_clients=len(data.clients), seed=seed, **(system or {}))
    s = sim.Simulation(data, FakeModel(), alg, strategy, pol, sysm, seed=seed)
    return s, alg


def test_one_round_is_the_weighted_mean_of_the_selected_clients() -> None:
    s, alg = make(rounds=1, k=8)
    res = s.run()
    assert res.final.stats.folded == 8
    n = np.array(SIZES, np.float64)
    assert res.server.params[0] == pytest.approx((n * n).sum() / n.sum(), rel=1e-6)
    assert res.server.params[3] == pytest.approx(1.0)
    assert res.server.version == 1
    assert alg.calls == [SIZES]  # one batched training call per dispatch


def test_virtual_time_is_the_modelled_time_not_the_wall_clock() -> None:
    system = {
        "compute": sim.Distribution("constant", 10.0),  # 10 examples per virtual second
        "downlink": sim.Distribution("constant", 16.0 / 2),  # model is 16 bytes: 2 s down
        "uplink": sim.Distribution("constant", 16.0 / 3),  # 3 s up
        "latency": sim.Distribution("constant", 0.5),
    }
    s, _ = make(rounds=1, k=8, system=system)
    res = s.run()
    slowest = max(SIZES) / 10.0 + 2.0 + 3.0 + 2 * 0.5
    assert res.final.stats.ended == pytest.approx(slowest)
    assert res.wall_time < slowest  # no waiting: virtual time is computed, not slept


def test_over_selection_folds_the_first_k_arrivals_only() -> None:
    system = {"compute": sim.Distribution("constant", 10.0)}
    s, _ = make(rounds=1, k=3, over_select=1.0, system=system)  # 6 dispatched, 3 needed
    res = s.run()
    st = res.final.stats
    assert (st.selected, st.dispatched, st.folded) == (6, 6, 3)
    # the three smallest of the six selected arrive first (compute time grows with size)
    sizes = sorted(SIZES[c] for c in st.participants)
    assert res.server.params[0] == pytest.approx(sum(x * x for x in sizes) / sum(sizes), rel=1e-6)
    assert max(sizes) <= sorted(SIZES)[-1]


def test_deadline_drops_slow_clients_and_min_updates_guards_the_model() -> None:
    system = {"compute": sim.Distribution("constant", 10.0)}
    # clients take size/10 s (+ small link time); a 3.5 s deadline admits sizes <= 30
    s, _ = make(rounds=1, k=8, deadline=3.5, system=system)
    st = s.run().final.stats
    assert st.folded == 3 and st.applied
    assert st.ended == pytest.approx(3.5)
    s2, _ = make(rounds=1, k=8, deadline=3.5, min_updates=4, system=system)
    res2 = s2.run()
    assert not res2.final.stats.applied
    assert res2.server.version == 0
    assert np.all(res2.server.params == 0)


def test_late_updates_of_a_closed_round_are_ignored() -> None:
    system = {"compute": sim.Distribution("constant", 10.0)}
    s, _ = make(rounds=2, k=8, deadline=3.5, system=system)
    res = s.run()
    assert res.records[0].stats.folded == 3
    assert res.records[1].stats.late >= 1  # round 1's slow clients arrive during round 2


def test_dropouts_never_arrive() -> None:
    s, _ = make(rounds=4, k=8, system={"dropout": 0.5}, seed=3)
    res = s.run()
    dropped = sum(r.stats.dropped for r in res.records)
    folded = sum(r.stats.folded for r in res.records)
    assert dropped > 0 and folded + dropped == 4 * 8


def test_stragglers_drop_or_do_partial_work_in_full_time() -> None:
    system = {"compute": sim.Distribution("constant", 10.0)}
    s, _ = make(rounds=1, k=8, stragglers=0.5, straggler_mode="drop", system=system)
    res = s.run()
    assert res.final.stats.dispatched == 4 and res.final.stats.folded == 4
    s2, alg = make(rounds=1, k=8, stragglers=0.5, straggler_mode="partial", system=system)
    alg.epochs = 5
    res2 = s2.run()
    assert res2.final.stats.folded == 8
    # the fake's delta[2] is the epochs each client ran: four at 5, four stragglers at 1..4
    epochs = sorted(round(float(e)) for e in alg.last_epochs)
    assert epochs[4:] == [5, 5, 5, 5] and all(1 <= e <= 4 for e in epochs[:4])
    # a straggler takes as long as a full job: the round lasts as long as without stragglers
    s3, alg3 = make(rounds=1, k=8, system=system)
    alg3.epochs = 5
    assert res2.final.stats.ended == pytest.approx(s3.run().final.stats.ended)


def test_empty_rounds_do_not_recurse() -> None:
    s, _ = make(rounds=3000, k=4, stragglers=1.0, straggler_mode="drop")
    res = s.run()
    assert len(res.records) == 3000
    assert not any(r.stats.applied for r in res.records)
    assert res.server.version == 0


def test_policy_and_simulation_must_share_the_strategy() -> None:
    s, _ = make(rounds=1)
    s.strategy = fedagg.strategies.fedadam()
    with pytest.raises(fedagg.ConfigError):
        s.run()


def test_same_seed_replays_bit_for_bit_and_seeds_matter() -> None:
    kwargs: dict[str, Any] = {
        "system": {"dropout": 0.2, "compute": sim.Distribution("lognormal", 50, 1)}
    }
    a = make(rounds=5, k=3, seed=7, **kwargs)[0].run()
    b = make(rounds=5, k=3, seed=7, **kwargs)[0].run()
    c = make(rounds=5, k=3, seed=8, **kwargs)[0].run()
    assert a.server.params.tobytes() == b.server.params.tobytes()
    assert [r.row()["virtual_time"] for r in a.records] == [
        r.row()["virtual_time"] for r in b.records
    ]
    assert a.server.params.tobytes() != c.server.params.tobytes()


def test_bytes_moved_are_counted() -> None:
    res = make(rounds=1, k=8)[0].run()
    model_bytes = 16
    assert res.final.bytes_down == 8 * model_bytes
    assert res.final.bytes_up == 8 * model_bytes


def test_availability_limits_selection() -> None:
    avail = sim.Availability("cyclic", p=0.25, period=4)
    s, _ = make(rounds=4, k=8, system={"availability": avail})
    res = s.run()
    # each client is on 1 slot in 4 (random phase): over 4 rounds, each is selected once
    assert sum(r.stats.selected for r in res.records) == 8
    picked = sorted(c for r in res.records for c in r.stats.participants)
    assert picked == list(range(8))


def test_bad_policy_settings_raise_config_error() -> None:
    strategy = fedagg.strategies.fedavg()
    for kwargs in ({"rounds": 0}, {"min_updates": 9}, {"stragglers": 1.5}, {"deadline": 0.0}):
        args: dict[str, Any] = {"rounds": 1, "clients_per_round": 4, **kwargs}
        with pytest.raises(fedagg.ConfigError):
            sim.SyncPolicy(strategy=strategy, **args)


# -- the system model ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bernoulli", "markov", "cyclic"])
def test_availability_patterns_have_the_stationary_rate(kind: str) -> None:
    m = sim.SystemModel(
        num_clients=400, seed=1, availability=sim.Availability(kind, p=0.2, period=50)
    )
    rate = np.mean([len(m.available_clients(t)) / 400 for t in range(200)])
    assert rate == pytest.approx(0.2, abs=0.03)
    again = sim.SystemModel(
        num_clients=400, seed=1, availability=sim.Availability(kind, p=0.2, period=50)
    )
    assert np.array_equal(m.available_clients(37), again.available_clients(37))
    assert all(m.available(c, 37) for c in m.available_clients(37))


def test_markov_availability_is_sticky() -> None:
    m = sim.SystemModel(
        num_clients=300, seed=2, availability=sim.Availability("markov", p=0.2, max_on=0.05)
    )
    masks = np.array([m._mask(t) for t in range(100)])
    switches = np.mean(masks[1:] != masks[:-1])
    b = sim.SystemModel(num_clients=300, seed=2, availability=sim.Availability("bernoulli", p=0.2))
    bm = np.array([b._mask(t) for t in range(100)])
    assert switches < 0.5 * np.mean(bm[1:] != bm[:-1])


def test_timing_and_distributions() -> None:
    m = sim.SystemModel(num_clients=3, compute=sim.Distribution("constant", 100.0))
    t = m.timing(0, 250, down_bytes=1_250_000, up_bytes=2_500_000)
    assert t.compute == pytest.approx(2.5)
    assert t.download == pytest.approx(0.05 + 1.0)
    assert t.upload == pytest.approx(0.05 + 2.0)
    assert t.total == pytest.approx(5.6)
    d = sim.Distribution("lognormal", mean=10.0, sigma=0.5).sample(
        np.random.default_rng(0), 200_000
    )
    assert d.mean() == pytest.approx(10.0, rel=0.02)
    with pytest.raises(fedagg.ConfigError):
        sim.Distribution("pareto")  # type: ignore[arg-type]
    with pytest.raises(fedagg.ConfigError):
        sim.SystemModel(num_clients=3, dropout=1.0)
    assert math.isfinite(m.timing(2, 0, 0, 0).total)


# -- config and run database ---------------------------------------------------------------------


def test_config_rejects_unknown_keys_and_fills_defaults(tmp_path: Any) -> None:
    cfg = sim.resolve_config({"rounds": 3, "policy": {"clients_per_round": 5}})
    assert cfg["rounds"] == 3 and cfg["policy"]["clients_per_round"] == 5
    assert cfg["policy"]["min_updates"] == 1
    with pytest.raises(fedagg.ConfigError, match="clients_per_rond"):
        sim.resolve_config({"policy": {"clients_per_rond": 5}})
    with pytest.raises(fedagg.ConfigError):
        sim.resolve_config({"data": 3})
    p = tmp_path / "c.toml"
    p.write_text('rounds = 2\n[data]\nname = "digits"\n')
    assert sim.load_config(p)["data"]["name"] == "digits"
    p.write_text("rounds = [")
    with pytest.raises(fedagg.ConfigError, match="TOML"):
        sim.load_config(p)


def test_run_db_round_trip(tmp_path: Any) -> None:
    with sim.RunDB(tmp_path / "runs.db") as db:
        s, _ = make(rounds=3, k=4)
        rid = db.start_run("t", 0, {"a": 1})
        s.on_round = lambda r: db.add_round(rid, r.row())
        res = s.run()
        db.finish_run(rid, "finished", {"final_accuracy": res.final.test_accuracy})
        rows = db.rounds(rid)
        assert [r["round"] for r in rows] == [1, 2, 3]
        assert rows[-1]["test_loss"] == pytest.approx(res.final.test_loss)
        info = db.run(rid)
        assert (info.status, info.config) == ("finished", {"a": 1})
        assert db.compare([rid])[0]["rounds"] == 3
    (tmp_path / "bad.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(fedagg.StateError):
        sim.RunDB(tmp_path / "bad.db")
