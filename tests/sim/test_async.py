"""Asynchronous and participation-aware policies: FedBuff, FedAsync, FedFix, async FedAvg,
FedAU and FedAMD, on the engine and driven event by event."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import fedagg
from fedagg import clients, models, sim, staleness, strategies, weighting
from fedagg import data as fdata
from fedagg.errors import ConfigError
from tests.sim.fakes import FakeAlgorithm, FakeData, FakeModel

SIZES = [10, 20, 30, 40, 50, 60, 70, 80]


@pytest.fixture(scope="module")
def digits() -> Any:
    return fdata.load("digits", num_clients=12, partition="dirichlet", seed=0, alpha=1.0)


def real(
    fd: Any,
    make_policy: Any,
    *,
    strategy: fedagg.Strategy | None = None,
    seed: int = 0,
    alg: Any = None,
    **system: Any,
) -> sim.SimResult:
    st = strategy or strategies.fedavg()
    sysm = sim.SystemModel(
        len(fd.clients),
        seed=seed,
        compute=system.pop("compute", sim.Distribution("lognormal", 2000.0, 1.0)),
        **system,
    )
    model = models.LogReg(fd.num_features, fd.num_classes)
    alg = alg or clients.LocalSGD(epochs=1, batch_size=16, lr=0.1)
    return sim.Simulation(fd, model, alg, st, make_policy(st), sysm, seed=seed).run()


# -- the general form covers sync FedAvg, bit for bit ---------------------------------------------
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fedbuff_with_k_equal_participants_and_no_staleness_is_sync_fedavg(
    digits: Any, dropout: float
) -> None:
    """With sample-count weights (``weights="examples"``; the paper's default divides by K
    instead), K = C and restarts at each step, FedBuff is sync FedAvg."""
    sync = real(digits, lambda s: sim.SyncPolicy(s, rounds=6, clients_per_round=5), dropout=dropout)
    buff = real(
        digits,
        lambda s: sim.fedbuff(
            s, rounds=6, buffer=5, concurrency=5, restart="step", weights="examples"
        ),
        dropout=dropout,
    )
    general = real(digits, lambda s: sim.sync_fedavg(s, 6, 5), dropout=dropout)
    assert sync.server.params.tobytes() == buff.server.params.tobytes()
    assert sync.server.params.tobytes() == general.server.params.tobytes()
    assert [r.stats.participants for r in sync.records] == [
        r.stats.participants for r in buff.records
    ]
    assert all(r.stats.staleness_max == 0 for r in buff.records)
    # the omegas are FedAvg's n_i / sum n
    for a, b in zip(sync.records, buff.records, strict=True):
        assert a.stats.omega == pytest.approx(b.stats.omega)
        if a.stats.applied:
            assert math.fsum(a.stats.omega) == pytest.approx(1.0)


# -- every policy replays bit for bit ------------------------------------------------------------
POLICIES = {
    "fedbuff": lambda s: sim.fedbuff(s, rounds=12, buffer=3, concurrency=6),
    "fedbuff-unbiased": lambda s: sim.fedbuff(s, 12, 3, 6, weights="unbiased"),
    "fedasync": lambda s: sim.fedasync(s, rounds=15, alpha=0.6, staleness=staleness.hinge()),
    "fedfix": lambda s: sim.fedfix(s, rounds=10, window=0.3),
    "fedfix-identical": lambda s: sim.fedfix(s, rounds=10, window=0.3, weights="identical"),
    "async": lambda s: sim.async_fedavg(s, rounds=15),
    "async-unbiased": lambda s: sim.async_fedavg(s, rounds=15, weights="unbiased"),
    "fedau": lambda s: sim.SyncPolicy(s, 8, 12, weighting=weighting.fedau(5)),
}


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_replays_bit_identically_and_learns(digits: Any, name: str) -> None:
    kw: dict[str, Any] = {"dropout": 0.1, "jitter": 0.3}
    if name == "fedau":
        kw["availability"] = sim.Availability("bernoulli", p=0.5)
    a = real(digits, POLICIES[name], **kw)
    b = real(digits, POLICIES[name], **kw)
    c = real(digits, POLICIES[name], seed=1, **kw)
    assert a.server.params.tobytes() == b.server.params.tobytes()
    rows_a = [{**r.row(), "wall_time": 0} for r in a.records]
    assert rows_a == [{**r.row(), "wall_time": 0} for r in b.records]
    assert a.server.params.tobytes() != c.server.params.tobytes()
    assert a.final.test_accuracy > a.records[0].test_accuracy or a.final.test_accuracy > 0.5


def test_async_policies_record_staleness_against_the_version_trained_from(digits: Any) -> None:
    res = real(digits, POLICIES["async"])
    stale = [r.stats.staleness_max for r in res.records]
    assert max(stale) > 0  # with 12 clients in flight, most arrivals are stale
    for r in res.records:
        assert r.stats.version == r.stats.round + 1  # one step per arrival
        assert 0 <= r.stats.staleness_mean <= r.stats.staleness_max
    # fresh client (restarted right after the last step): staleness counts steps in between
    assert res.records[0].stats.staleness_max == 0


def test_staleness_is_stored_in_the_run_db(tmp_path: Any) -> None:
    cfg = {
        "rounds": 10,
        "data": {"name": "digits", "num_clients": 8, "partition": "iid"},
        "policy": {"kind": "fedbuff", "buffer": 2, "concurrency": 6},
    }
    with sim.RunDB(tmp_path / "runs.db") as db:
        result, run_id = sim.run_config(cfg, db=db)
        assert run_id is not None
        rows = db.rounds(run_id)
    assert len(rows) == 10
    assert [r["staleness_max"] for r in rows] == [rec.stats.staleness_max for rec in result.records]
    assert any(r["staleness_max"] > 0 for r in rows)
    assert [r["staleness_mean"] for r in rows] == pytest.approx(
        [rec.stats.staleness_mean for rec in result.records]
    )


def test_an_old_run_db_gains_the_new_columns(tmp_path: Any) -> None:
    import sqlite3

    path = tmp_path / "old.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE rounds (run_id INTEGER, round REAL, PRIMARY KEY (run_id, round))")
    con.commit()
    con.close()
    with sim.RunDB(path) as db:
        rid = db.start_run("x", 0, {})
        db.add_round(rid, {"round": 1, "staleness_max": 3})
        assert db.rounds(rid)[0]["staleness_max"] == 3


# -- FedBuff ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("weights", ["identical", "examples"])
def test_fedbuff_weights_follow_staleness(weights: str) -> None:
    data = FakeData(SIZES)
    st = strategies.fedavg()
    pol = sim.fedbuff(st, rounds=20, buffer=3, concurrency=8, weights=weights)  # type: ignore[arg-type]
    sysm = sim.SystemModel(8, seed=0, compute=sim.Distribution("lognormal", 100.0, 1.0))
    res = sim.Simulation(data, FakeModel(), FakeAlgorithm(), st, pol, sysm).run()
    for r in res.records:
        assert r.stats.folded == 3
        # omega_i = b_i s(tau_i) / sum_j b_j: the fresh ones sum to at most 1
        assert math.fsum(r.stats.omega) <= 1.0 + 1e-12
        if weights == "identical":  # b = 1: omega_i = s(tau_i) / K, s(tau) = 1/sqrt(1 + tau)
            taus = [1 / (3 * w) ** 2 - 1 for w in r.stats.omega]
            assert taus == pytest.approx([round(t) for t in taus], abs=1e-9)
            assert max(round(t) for t in taus) == r.stats.staleness_max
            assert np.mean(taus) == pytest.approx(r.stats.staleness_mean)
    assert any(math.fsum(r.stats.omega) < 0.999 for r in res.records)  # stale -> discounted


def test_fedbuff_composes_with_any_server_optimizer_and_pre_transform(digits: Any) -> None:
    st = strategies.fedadam(lr=0.02, pre=[fedagg.transforms.clip_norm(5.0)])
    res = real(digits, lambda s: sim.fedbuff(s, 20, 4, 8), strategy=st)
    assert res.server.opt.count == 20  # one optimizer step per buffer
    assert res.final.test_accuracy > 0.6


def test_max_staleness_drops_stale_updates_as_late(digits: Any) -> None:
    res = real(digits, lambda s: sim.fedbuff(s, 15, 2, 12, max_staleness=1))
    assert all(r.stats.staleness_max <= 1 for r in res.records)
    assert sum(r.stats.late for r in res.records) > 0


# -- FedAsync ------------------------------------------------------------------------------------
@dataclass
class Ctx:
    num_clients: int
    seed: int = 0

    def available(self, slot: int) -> np.ndarray:
        return np.arange(self.num_clients)


def arrival(job: int, client: int, delta: np.ndarray, base: int, now: float = 1.0) -> sim.Arrival:
    up = fedagg.Update({"w": delta}, weight=5.0, client_id=str(client), base_version=base)
    return sim.Arrival(now, client, job, up)


def test_fedasync_with_alpha_1_and_constant_staleness_replaces_the_model() -> None:
    st = strategies.fedavg()
    pol = sim.fedasync(st, rounds=5, alpha=1.0)
    ctx = Ctx(3)
    x0 = {"w": np.array([1.0, 2.0, 3.0], np.float32)}
    state = pol.init(st.init(x0), ctx)
    acts = pol.step(state, sim.Start(0.0), ctx)
    assert isinstance(acts[0], sim.Dispatch) and acts[0].clients == (0, 1, 2)
    d0 = np.array([0.5, -1.0, 0.25], np.float32)
    pol.step(state, arrival(0, 0, d0, base=0), ctx)
    assert state.server.params.tobytes() == (x0["w"] + d0).tobytes()
    # client 1 trained from x0 (stale by one step): the model becomes x0 + d1, its own model
    d1 = np.array([-3.0, 0.1, 7.0], np.float32)
    acts = pol.step(state, arrival(1, 1, d1, base=0, now=2.0), ctx)
    assert state.server.params.tobytes() == (x0["w"] + d1).tobytes()
    assert state.server.version == 2
    applied = [a for a in acts if isinstance(a, sim.Applied)]
    assert applied[0].stats.staleness_max == 1


def test_fedasync_mixes_with_alpha_times_staleness() -> None:
    st = strategies.fedavg()
    pol = sim.fedasync(st, rounds=5, alpha=0.5, staleness=staleness.polynomial(1.0))
    ctx = Ctx(2)
    x0 = np.array([0.0, 4.0], np.float32)
    state = pol.init(st.init({"w": x0}), ctx)
    pol.step(state, sim.Start(0.0), ctx)
    pol.step(state, arrival(0, 0, np.array([2.0, 0.0], np.float32), base=0), ctx)
    x1 = state.server.params.copy()  # 0.5 x0 + 0.5 (x0 + d) = [1, 4]
    assert x1.tolist() == [1.0, 4.0]
    pol.step(state, arrival(1, 1, np.array([0.0, -4.0], np.float32), base=0, now=2.0), ctx)
    a = 0.5 * (1 + 1) ** -1.0  # staleness 1
    want = (1 - a) * x1 + a * (x0 + np.array([0.0, -4.0], np.float32))
    assert state.server.params == pytest.approx(want)
    # version 0's model is released once nobody trains on it; the restarted clients' are kept
    assert sorted(state.bases) == sorted({j.version for j in state.jobs.values()}) == [1, 2]


def test_fedasync_keeps_at_most_one_model_per_version_in_flight(digits: Any) -> None:
    res = real(digits, POLICIES["fedasync"])
    state = res.policy_state
    assert len(state.bases) <= len({j.version for j in state.jobs.values()})
    assert set(state.bases) == {j.version for j in state.jobs.values()}


def test_fedasync_refuses_bad_updates_without_touching_the_model() -> None:
    st = strategies.fedavg()
    pol = sim.fedasync(st, rounds=5, alpha=0.6)
    ctx = Ctx(2)
    state = pol.init(st.init({"w": np.ones(2, np.float32)}), ctx)
    pol.step(state, sim.Start(0.0), ctx)
    before = state.server.params.tobytes()
    pol.step(state, arrival(0, 0, np.array([np.nan, 1.0], np.float32), base=0), ctx)
    pol.step(state, arrival(1, 1, np.ones(3, np.float32), base=0), ctx)
    assert state.server.params.tobytes() == before and state.server.version == 0
    assert state.refused == 2


def test_async_config_errors() -> None:
    st = strategies.fedavg()
    with pytest.raises(ConfigError, match="sgd strategy"):
        sim.fedasync(strategies.fedadam(), 5)
    with pytest.raises(ConfigError, match="mixing alpha"):
        sim.fedasync(st, 5, alpha=0.0)
    with pytest.raises(ConfigError, match="trigger"):
        sim.AsyncPolicy(st, 5, trigger="never")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="needs base='uniform'"):
        sim.AsyncPolicy(st, 5, normalize="clients")
    with pytest.raises(ConfigError, match="needs trigger='window'"):
        sim.AsyncPolicy(st, 5, correction="windows")
    with pytest.raises(ConfigError, match="weights must be"):
        sim.fedfix(st, 5, 0.5, weights="biased")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="window"):
        sim.fedfix(st, 5, 0.0)
    with pytest.raises(ConfigError, match="concurrency"):
        sim.fedbuff(st, 5, 2, concurrency=0)
    with pytest.raises(ConfigError, match="cutoff"):
        sim.AsyncPolicy(st, 5, cutoff=0)


def test_unknown_and_duplicate_jobs_are_late_not_folded() -> None:
    st = strategies.fedavg()
    pol = sim.fedbuff(st, rounds=5, buffer=2, concurrency=2)
    ctx = Ctx(2)
    state = pol.init(st.init({"w": np.zeros(2, np.float32)}), ctx)
    pol.step(state, sim.Start(0.0), ctx)
    pol.step(state, arrival(0, 0, np.ones(2, np.float32), base=0), ctx)
    pol.step(state, arrival(0, 0, np.ones(2, np.float32), base=0), ctx)  # the same job again
    pol.step(state, arrival(99, 1, np.ones(2, np.float32), base=0), ctx)  # never dispatched
    assert state.folded == 1 and state.late == 2 and state.server.version == 0


# -- FedFix -------------------------------------------------------------------------------------
def f80_system(m: int, seed: int = 0, jitter: float = 0.0) -> sim.SystemModel:
    tau = 1 - np.arange(m) * 0.8 / (m - 1)
    sysm = sim.SystemModel(
        m,
        seed=seed,
        downlink=sim.Distribution("constant", 1e18),
        uplink=sim.Distribution("constant", 1e18),
        latency=sim.Distribution("constant", 0.0),  # zero latency is allowed
        jitter=jitter,
    )
    return sysm.with_speeds(np.full(m, 10.0) / tau)  # FakeData clients of 10 examples


def test_fedfix_aggregates_each_client_every_ceil_tau_over_dt_windows() -> None:
    m, dt = 10, 0.5
    data = FakeData([10] * m)
    st = strategies.fedavg()
    res = sim.Simulation(
        data, FakeModel(), FakeAlgorithm(), st, sim.fedfix(st, 40, dt), f80_system(m)
    ).run()
    tau = 1 - np.arange(m) * 0.8 / (m - 1)
    every = np.ceil(tau / dt - 1e-12).astype(int)
    for r in res.records:
        k = r.stats.round + 1  # window k ends at k * dt
        want = tuple(int(c) for c in np.flatnonzero(k % every == 0))
        assert tuple(sorted(r.stats.participants)) == want, k
        # unbiased weight p_i * ceil(tau_i / dt), with p_i = 1/M
        got = dict(zip(r.stats.participants, r.stats.omega, strict=True))
        assert [got[c] for c in want] == pytest.approx([every[c] / m for c in want])
        assert r.stats.staleness_max <= 1


def test_fedfix_unbiased_weights_have_expectation_p_i_monte_carlo() -> None:
    """With random job durations (per-job jitter), sum_n omega_i(n) / #windows -> p_i."""
    m, dt, windows = 6, 0.3, 3000
    data = FakeData([10] * m)
    totals = {"unbiased": np.zeros(m), "identical": np.zeros(m)}
    for weights in totals:
        st = strategies.fedavg()
        pol = sim.fedfix(st, windows, dt, weights=weights)  # type: ignore[arg-type]
        sysm = f80_system(m, seed=3, jitter=0.5)
        sm = sim.Simulation(data, FakeModel(), FakeAlgorithm(), st, pol, sysm, eval_every=10**9)
        for r in sm.run().records:
            for c, w in zip(r.stats.participants, r.stats.omega, strict=True):
                totals[weights][c] += w
    p = 1 / m
    assert totals["unbiased"] / windows == pytest.approx(np.full(m, p), rel=0.05)
    # the identical variant is biased towards fast clients (client m-1 is the fastest)
    ident = totals["identical"] / windows
    assert ident[-1] > 2 * ident[0]


def test_empty_windows_leave_the_model_unchanged() -> None:
    data = FakeData([10, 10])
    st = strategies.fedavg()
    sysm = f80_system(2)  # jobs of 1.0 and 0.2
    res = sim.Simulation(
        data, FakeModel(), FakeAlgorithm(), st, sim.fedfix(st, 12, 0.1), sysm
    ).run()
    flags = [r.stats.applied for r in res.records]
    assert flags[0] is False and any(flags)  # nobody finishes within the first 0.1
    assert res.server.version == sum(flags)


# -- async FedAvg --------------------------------------------------------------------------------
def test_async_fedavg_unbiased_weights_correct_for_arrival_frequency() -> None:
    m = 6
    data = FakeData([10] * m)
    st = strategies.fedavg()
    pol = sim.async_fedavg(st, 3000, weights="unbiased")
    res = sim.Simulation(data, FakeModel(), FakeAlgorithm(), st, pol, f80_system(m)).run()
    total = np.zeros(m)
    count = np.zeros(m)
    for r in res.records:
        (c,) = r.stats.participants
        total[c] += r.stats.omega[0]
        count[c] += 1
    assert count[-1] > 3 * count[0]  # fast clients arrive more often...
    assert total / len(res.records) == pytest.approx(np.full(m, 1 / m), rel=0.1)  # ...same weight


# -- FedAU in the sync policy ----------------------------------------------------------------------
def test_fedau_divides_by_n_with_estimated_inverse_probabilities() -> None:
    n = 8
    data = FakeData([10] * n)
    st = strategies.fedavg()
    pol = sim.SyncPolicy(st, 200, n, weighting=weighting.fedau())
    sysm = sim.SystemModel(n, seed=0, availability=sim.Availability("bernoulli", p=0.25))
    res = sim.Simulation(data, FakeModel(), FakeAlgorithm(), st, pol, sysm).run()
    late = res.records[100:]
    # omega_n = (estimate of 1/p_n) / N; after 100 rounds the estimate is near 4
    omegas = [w for r in late for w in r.stats.omega]
    assert np.mean(omegas) == pytest.approx(4 / n, rel=0.15)
    # the estimator state lives in the policy state, one counter per client
    assert res.policy_state.weighting.count.shape == (n,)


def test_known_probability_weighting_uses_1_over_p(digits: Any) -> None:
    p = np.linspace(0.2, 1.0, 12)
    res = real(
        digits,
        lambda s: sim.SyncPolicy(s, 3, 12, weighting=weighting.known(p)),
        availability=sim.Availability("bernoulli"),
    )
    for r in res.records:
        assert r.stats.omega == pytest.approx([1 / p[c] / 12 for c in r.stats.participants])


# -- FedAMD --------------------------------------------------------------------------------------
def test_fedamd_running_sum_equals_the_mean_of_the_clients_stored_anchors() -> None:
    fd = fdata.load("digits", num_clients=10, partition="dirichlet", seed=0, alpha=0.5)
    st = strategies.fedavg()
    pol = sim.FedAMDPolicy(st, rounds=15, clients_per_round=5, anchor_prob=0.4)
    model = models.LogReg(fd.num_features, fd.num_classes)
    sysm = sim.SystemModel(10, seed=0, dropout=0.1)
    eng = sim.Simulation(fd, model, clients.FedAMD(steps=5, batch_size=16, lr=0.05), st, pol, sysm)
    res = eng.run()
    spec = res.server.spec
    states = eng.client_states
    stored = [spec.as_flat(states[c]).astype(np.float64) for c in sorted(states)]
    explicit = np.sum(stored, axis=0) / 10
    got = pol.direction(res.policy_state, 10).astype(np.float64)
    assert got == pytest.approx(explicit, rel=1e-5, abs=1e-6)
    # anchors were refreshed during the run (not only the initial pass), some rounds had
    # no miner... and the server never held more than the sum
    assert res.policy_state.anchor_sum.shape == (spec.size,)
    assert res.final.test_accuracy > 0.5


def test_fedamd_anchor_rounds_do_not_move_the_model() -> None:
    fd = fdata.load("digits", num_clients=6, partition="iid", seed=0)
    st = strategies.fedavg()
    pol = sim.FedAMDPolicy(st, rounds=4, clients_per_round=3, anchor_prob=2)  # anchors every 2nd
    model = models.LogReg(fd.num_features, fd.num_classes)
    res = sim.Simulation(
        fd, model, clients.FedAMD(steps=3), st, pol, sim.SystemModel(6, seed=0)
    ).run()
    assert [r.stats.applied for r in res.records] == [False, True, False, True]
    assert res.server.version == 2


def test_fedamd_miner_is_the_recursive_variance_reduced_estimator() -> None:
    """One miner step by hand: y1 = x - lr d; g1 = d + grad(y1; B) - grad(x; B)."""
    model = models.LogReg(3, 2)
    x = model.init(0)
    rng = np.random.default_rng(0)
    data = fdata.ArrayDataset(rng.normal(size=(4, 3)).astype(np.float32), np.array([0, 1, 1, 0]), 2)
    d = {k: np.full_like(v, 0.1) for k, v in x.items()}
    alg = clients.FedAMD(steps=2, batch_size=4, lr=0.5)
    res, state = alg.train(
        model, x, data, np.random.default_rng(1), server_state={"role": "miner", "direction": d}
    )
    assert state is None and res.extra == {"role": "miner"}
    y1 = {k: x[k] - np.float32(0.5) * d[k] for k in x}
    _, ga = model.loss_and_grad(y1, data.x, data.y)
    _, gb = model.loss_and_grad(x, data.x, data.y)
    g1 = {k: d[k] + ga[k] - gb[k] for k in x}
    y2 = {k: y1[k] - np.float32(0.5) * g1[k] for k in x}
    for k in x:
        assert res.delta[k] == pytest.approx(y2[k] - x[k], rel=1e-5, abs=1e-6)
    # an anchor sends v - v_old and keeps v
    anchor = {"role": "anchor"}
    res_a, v = alg.train(model, x, data, np.random.default_rng(1), server_state=anchor)
    assert res_a.extra == anchor and res_a.steps == 0
    _, g = model.loss_and_grad(x, data.x, data.y)
    assert all(np.array_equal(v[k], g[k]) for k in x)
    res_b, _ = alg.train(model, y2, data, np.random.default_rng(1), state=v, server_state=anchor)
    _, g2 = model.loss_and_grad(y2, data.x, data.y)
    for k in x:
        assert res_b.delta[k] == pytest.approx(g2[k] - g[k], abs=1e-6)
    with pytest.raises(ConfigError, match="role"):
        alg.train(model, x, data, np.random.default_rng(1), server_state=None)


def test_fedamd_needs_its_client_in_configs() -> None:
    with pytest.raises(ConfigError, match="go together"):
        sim.build({"policy": {"kind": "fedamd"}, "data": {"name": "digits", "num_clients": 4}})
    with pytest.raises(ConfigError, match="anchor_prob"):
        sim.FedAMDPolicy(strategies.fedavg(), 5, 2, anchor_prob=1.5)


# -- configs and the CLI -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kind", "extra"),
    [
        ("fedbuff", {"buffer": 3, "concurrency": 6}),
        ("fedasync", {"alpha": 0.5, "staleness": "hinge", "staleness_a": 10.0}),
        ("fedfix", {"window": 0.5, "weights": "unbiased"}),
        ("async", {"weights": "unbiased"}),
        ("sync", {"weighting": "fedau", "clients_per_round": 8}),
        ("fedamd", {"anchor_prob": 0.3, "clients_per_round": 4}),
    ],
)
def test_every_policy_runs_from_a_config(kind: str, extra: dict[str, Any]) -> None:
    rounds = 30 if kind in ("fedasync", "async") else 6  # one arrival per step
    cfg = {
        "rounds": rounds,
        "data": {"name": "digits", "num_clients": 8, "partition": "iid"},
        "client": {"algorithm": "fedamd" if kind == "fedamd" else "fedavg", "steps": 4},
        "policy": {"kind": kind, **extra},
        "system": {"jitter": 0.2},
    }
    result, _ = sim.run_config(cfg)
    assert len(result.records) == rounds
    assert result.final.test_accuracy > 0.3


def test_max_time_is_an_equal_virtual_time_budget() -> None:
    cfg = {
        "rounds": 10_000,
        "max_time": 2.0,
        "eval_every": 1000,
        "data": {"name": "digits", "num_clients": 8, "partition": "iid"},
        "policy": {"kind": "async"},
    }
    result, _ = sim.run_config(cfg)
    assert result.final.stats.ended <= 2.0
    assert 10 < len(result.records) < 10_000
    assert not math.isnan(result.final.test_accuracy)  # the final model is evaluated


def test_bad_policy_configs_name_the_valid_choices() -> None:
    base = {"data": {"name": "digits", "num_clients": 4}}
    with pytest.raises(ConfigError, match="valid: sync, fedbuff"):
        sim.build({**base, "policy": {"kind": "fedsgd"}})
    with pytest.raises(ConfigError, match="unknown weighting"):
        sim.build({**base, "policy": {"weighting": "magic"}})
    with pytest.raises(ConfigError, match="SCAFFOLD"):
        sim.build({**base, "policy": {"kind": "fedbuff"}, "client": {"algorithm": "scaffold"}})
    with pytest.raises(ConfigError, match="steps"):
        sim.build({**base, "client": {"steps": -2}})


def test_cli_simulates_an_async_policy(tmp_path: Any, capsys: Any) -> None:
    from fedagg.cli import main

    cfg = tmp_path / "fedbuff.toml"
    cfg.write_text(
        'rounds = 5\n[data]\nname = "digits"\nnum_clients = 8\npartition = "iid"\n'
        '[policy]\nkind = "fedbuff"\nbuffer = 2\nconcurrency = 4\n'
    )
    db = tmp_path / "runs.db"
    assert main(["simulate", str(cfg), "--db", str(db), "--no-plots", "--quiet"]) == 0
    with sim.RunDB(db) as rdb:
        (run,) = rdb.runs()
        assert run.config["policy"]["kind"] == "fedbuff"
        assert len(rdb.rounds(run.id)) == 5


@pytest.mark.parametrize("name", ["fedamd", "fedasync", "fedau", "fedbuff", "fedfix"])
def test_example_configs_run_from_the_cli(name: str, tmp_path: Any) -> None:
    from pathlib import Path

    from fedagg.cli import main

    path = Path(__file__).parents[2] / "examples" / "configs" / f"{name}.toml"
    db = tmp_path / "runs.db"
    assert (
        main(["simulate", str(path), "--rounds", "3", "--db", str(db), "--no-plots", "--quiet"])
        == 0
    )
    with sim.RunDB(db) as rdb:
        (run,) = rdb.runs()
        assert run.status == "finished" and len(rdb.rounds(run.id)) == 3


def test_async_policy_gives_identical_results_in_worker_processes() -> None:
    base = {
        "rounds": 8,
        "data": {"name": "digits", "num_clients": 10, "partition": "iid"},
        "policy": {"kind": "fedbuff", "buffer": 3, "concurrency": 6},
        "system": {"jitter": 0.3},
    }
    local, _ = sim.run_config(base)
    procs, _ = sim.run_config({**base, "executor": {"kind": "processes", "workers": 2}})
    assert local.server.params.tobytes() == procs.server.params.tobytes()


def test_fedfix_counts_a_job_of_exactly_whole_windows_in_the_window_it_ends() -> None:
    """tau = 0.2 computed as work / speed lands a hair after 0.2: still in the first window."""
    m = 10
    data = FakeData([640] * m)
    tau = 1 - np.arange(m) * 0.8 / (m - 1)
    sysm = sim.SystemModel(
        m,
        downlink=sim.Distribution("constant", 1e18),
        uplink=sim.Distribution("constant", 1e18),
        latency=sim.Distribution("constant", 0.0),
    ).with_speeds(640 / tau)
    st = strategies.fedavg()
    res = sim.Simulation(
        data, FakeModel(), FakeAlgorithm(), st, sim.fedfix(st, 20, 0.2), sysm
    ).run()
    fastest = sum(m - 1 in r.stats.participants for r in res.records)
    assert fastest == 20  # every window, not every other one


def test_stop_when_ends_the_run_at_a_target() -> None:
    built = sim.build(
        {"rounds": 50, "data": {"name": "digits", "num_clients": 8, "partition": "iid"}}
    )
    built.simulation.stop_when = lambda r: r.test_accuracy >= 0.8
    res = built.simulation.run()
    assert res.final.test_accuracy >= 0.8
    assert len(res.records) < 50
    assert all(r.test_accuracy < 0.8 for r in res.records[:-1])
