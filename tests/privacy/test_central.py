"""Central DP-FedAvg (fedagg.policy.PrivatePolicy, DPSum): clipping, the noise's measured std,
adaptive clipping's convergence, Poisson sampling, epsilon per round (policy, run database,
CLI), max_epsilon, the composition refusals."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedagg
from fedagg import privacy
from fedagg.cli import main
from fedagg.config import build_policy, build_strategy, resolve_config
from fedagg.core.aggregate import mean
from fedagg.core.spec import ParamSpec
from fedagg.core.update import Update
from fedagg.errors import ConfigError
from fedagg.policy import (
    AllAvailable,
    Applied,
    Arrival,
    Dispatch,
    DPSum,
    Finish,
    PrivatePolicy,
    Start,
    SyncPolicy,
    dp_strategy,
)
from fedagg.runs import RunDB
from fedagg.strategies import fedavg

D = 8


def _private(n: int, per_round: int, rounds: int, **kw: Any) -> tuple[PrivatePolicy, Any]:
    strategy = dp_strategy(fedavg(1.0), kw.get("clip", 1.0))
    inner = SyncPolicy(strategy, rounds=rounds, clients_per_round=per_round, sampling="poisson")
    policy = PrivatePolicy(inner, **kw)
    return policy, strategy.init([np.zeros(D, np.float32)])


def _drive(
    policy: PrivatePolicy, server: Any, n: int, norm: Any, seed: int = 3
) -> tuple[Any, list[Applied], bool]:
    """Run the policy to its end: each dispatched client uploads a random direction of
    norm ``norm(rng)``. Returns the state, the Applied actions, whether it finished."""
    ctx = AllAvailable(n, seed)
    state = policy.init(server, ctx)
    rng = np.random.default_rng(seed)
    applied: list[Applied] = []
    queue = policy.step(state, Start(0.0), ctx)
    t = 0.0
    while queue:
        a = queue.pop(0)
        if isinstance(a, Applied):
            applied.append(a)
        elif isinstance(a, Finish):
            return state, applied, True
        elif isinstance(a, Dispatch):
            job0 = state.inner.next_job - len(a.clients)
            for j, c in enumerate(a.clients):
                t += 1.0
                d = rng.standard_normal(D)
                d *= norm(rng) / np.linalg.norm(d)
                up = Update(d.astype(np.float32), weight=5.0, client_id=str(c), base_version=None)
                queue += policy.step(state, Arrival(t, c, job0 + j, up), ctx)
    return state, applied, False


def test_clipping_weights_one_and_divides_by_the_expected_cohort() -> None:
    agg = DPSum(mean(), clip=1.0)
    spec = ParamSpec.from_arrays([np.zeros(4, np.float32)])
    st = agg.init(spec, version=None)
    big = np.array([3.0, 4.0, 0, 0], np.float32)  # norm 5: scaled to 1
    small = np.array([0, 0, 0.6, 0], np.float32)  # within the clip
    agg.fold(st, Update(big, weight=100.0))
    agg.fold(st, Update(small, weight=1.0))
    assert st.unclipped == 1
    st.expected = 4.0  # q * N: the sum divided by it, not by the 2 clients
    got = agg.finalize_flat(st)
    np.testing.assert_allclose(got, [0.6 / 4, 0.8 / 4, 0.6 / 4, 0.0], rtol=1e-6)
    with pytest.raises(fedagg.NonFiniteUpdate):
        agg.fold(st, Update(np.array([np.nan, 0, 0, 0], np.float32)))
    # a large update (the compiled norm): clipped to exactly C, in float64 to 1e-6
    x = np.random.default_rng(1).standard_normal(300_001).astype(np.float32)
    spec = ParamSpec.from_arrays([x])
    st = agg.init(spec, version=None)
    agg.fold(st, Update(x, weight=7.0))
    st.expected = 1.0
    assert st.unclipped == 0
    assert float(np.linalg.norm(agg.finalize_flat(st).astype(np.float64))) == pytest.approx(
        1.0, abs=1e-6
    )


def test_noise_std_is_z_times_clip_on_the_sum() -> None:
    agg = DPSum(mean(), clip=2.0)
    spec = ParamSpec.from_arrays([np.zeros(200_000, np.float32)])
    parts = []
    for _ in (0, 1):  # an edge's partial aggregate merges: the noise is added once
        st = agg.init(spec, version=None)
        agg.fold(st, Update(np.zeros(200_000, np.float32)))
        parts.append(st)
    root = agg.merge(parts[0], parts[1])
    root.std, root.expected, root.seed = 1.3 * 2.0, 10.0, bytes(range(32)).hex()
    noise = agg.finalize_flat(root) * 10.0
    assert abs(float(noise.mean())) < 0.02
    assert float(noise.std()) == pytest.approx(2.6, rel=0.01)
    assert agg.count(root) == 2


def test_epsilon_per_round_matches_the_accountant_and_adaptive_clip_converges() -> None:
    n, m, z = 1000, 100, 1.0
    # update norms uniform on [0, 2]: the median is 1.0; the clip starts at 0.1
    kw = {"clip": 0.1, "target_quantile": 0.5, "clip_learning_rate": 0.5}
    policy, server = _private(n, m, 60, noise_multiplier=z, **kw)
    state, applied, finished = _drive(policy, server, n, lambda r: r.uniform(0, 2))
    assert finished and len(applied) == 60  # the inner's own end
    d = 1 / n**1.1
    for t in (1, 30, 60):
        want = privacy.epsilon(noise_multiplier=z, sample_rate=m / n, steps=t, delta=d)
        assert applied[t - 1].stats.epsilon == pytest.approx(want, rel=1e-12)
    assert state.clips[0] == 0.1
    assert np.mean(state.clips[-30:]) == pytest.approx(1.0, rel=0.05)
    assert max(abs(c - 1.0) for c in state.clips[-30:]) < 0.15
    sizes = [a.stats.dispatched for a in applied]  # Poisson: q * N on average, varying
    assert np.mean(sizes) == pytest.approx(m, rel=0.05) and len(set(sizes)) > 5
    assert all(a.stats.omega[0] == pytest.approx(1 / m) for a in applied if a.stats.applied)


def test_max_epsilon_stops_before_it_is_exceeded() -> None:
    n, m, z = 200, 20, 0.8
    d = 1 / n**1.1
    eps = [privacy.epsilon(noise_multiplier=z, sample_rate=0.1, steps=t, delta=d) for t in (3, 4)]
    cap = (eps[0] + eps[1]) / 2
    policy, server = _private(n, m, 50, noise_multiplier=z, max_epsilon=cap)
    state, applied, finished = _drive(policy, server, n, lambda r: 2.0)
    assert finished and len(applied) == 3
    assert applied[-1].stats.epsilon == pytest.approx(eps[0]) and eps[0] <= cap < eps[1]
    assert state.finished and not state.inner.open
    back = fedagg.loads(fedagg.dumps(state))  # a checkpointable state
    assert back.steps == 3 and back.epsilon == state.epsilon and back.finished
    assert policy.step(state, Start(9.0), AllAvailable(n, 3)) == []
    # a budget below one round: Finish at the start, nothing dispatched
    policy, server = _private(n, m, 50, noise_multiplier=z, max_epsilon=eps[0] / 100)
    _, applied, finished = _drive(policy, server, n, lambda r: 2.0)
    assert finished and applied == []


def test_poisson_sampling_includes_each_client_with_q() -> None:
    n, m, rounds = 50, 10, 400
    policy = SyncPolicy(fedavg(1.0), rounds=rounds, clients_per_round=m, sampling="poisson")
    ctx = AllAvailable(n, 11)
    counts = np.zeros(n)
    state = policy.init(fedavg(1.0).init([np.zeros(2, np.float32)]), ctx)
    for r in range(rounds):
        state.round = r
        d = policy._open(state, 0.0, ctx)
        if d is not None:
            counts[list(d.clients)] += 1
    freq = counts / rounds
    assert freq.mean() == pytest.approx(0.2, rel=0.03)
    assert np.all(np.abs(freq - 0.2) < 0.1)
    with pytest.raises(ConfigError, match="over_select"):
        SyncPolicy(fedavg(1.0), rounds=1, clients_per_round=1, sampling="poisson", over_select=1)


SMALL = """
rounds = 3
[data]
name = "digits"
num_clients = 40
partition = "iid"
[client]
epochs = 1
batch_size = 16
lr = 0.1
[policy]
clients_per_round = 8
[privacy]
mechanism = "central"
noise_multiplier = 0.7
clip = 0.5
"""


def test_simulate_the_run_database_and_runs_show_epsilon(tmp_path: Path, capsys: Any) -> None:
    db_path = tmp_path / "runs.db"
    (tmp_path / "dp.toml").write_text(SMALL)
    argv = ["simulate", str(tmp_path / "dp.toml"), "--db", str(db_path), "--no-plots"]
    assert main([*argv, "--quiet"]) == 0
    out = capsys.readouterr().out
    with RunDB(db_path) as db:
        (run,) = db.runs()
        rows = db.rounds(run.id)
        assert db.compare([run.id])[0]["epsilon"] == rows[-1]["epsilon"]
    for t, row in enumerate(rows, 1):
        want = privacy.epsilon(noise_multiplier=0.7, sample_rate=0.2, steps=t, delta=1 / 40**1.1)
        assert row["epsilon"] == pytest.approx(want, rel=1e-12)
    assert f"privacy: epsilon {rows[-1]['epsilon']:.4g} at delta" in out
    assert main(["runs", "--db", str(db_path)]) == 0
    out = capsys.readouterr().out
    assert "epsilon" in out and f"{rows[-1]['epsilon']:8.3g}" in out


def test_config_refusals() -> None:
    bad = [
        ({"secure_aggregation": {"kind": "secagg+"}}, "cannot clip what it cannot see"),
        ({"policy": {"kind": "fedbuff"}}, "DP-FTRL"),
        ({"strategy": {"aggregator": "median"}}, "robust rule"),
        ({"policy": {"weighting": "fedau"}}, "weighs every client 1"),
        ({"client": {"algorithm": "scaffold"}}, "scaffold"),
        ({"privacy": {"mechanism": "central", "sampling": "fixed"}}, "no accountant"),
        ({"deploy": {"edges": "edges.pub"}}, "relay"),
        ({"privacy": {"mechanism": "central", "target_quantile": 0.5, "count_stddev": 0.1}},
         "count_stddev"),
    ]  # fmt: skip
    for over, msg in bad:
        cfg = resolve_config({"privacy": {"mechanism": "central"}, **over})
        with pytest.raises(ConfigError, match=msg):
            build_policy(cfg, build_strategy(cfg))
    with pytest.raises(ConfigError, match="Poisson"):
        PrivatePolicy(SyncPolicy(dp_strategy(fedavg()), 1, 1), noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="dp_strategy"):
        PrivatePolicy(SyncPolicy(fedavg(), 1, 1, sampling="poisson"), noise_multiplier=1.0)
    with pytest.raises(ConfigError, match="robust"):
        DPSum(fedagg.aggregators.median())
    with pytest.raises(ConfigError, match="noise_multiplier"):
        PrivatePolicy(SyncPolicy(dp_strategy(fedavg()), 1, 1, sampling="poisson"), math.nan)


def test_accounting_only_mode_for_distributed_dp() -> None:
    """``rdp_curve``: the clients noise (distributed DP); the wrapper accounts and enforces."""
    orders = privacy.DISTRIBUTED_ORDERS
    one = privacy.rdp_subsampled_gaussian(1.0, 0.1, orders)  # a stand-in per-round curve
    curve = tuple(zip(map(float, orders), map(float, one), strict=True))
    d = 1e-4
    eps = [float(privacy.rdp_to_epsilon(orders, one * t, d)[0]) for t in (1, 2, 3)]
    inner = SyncPolicy(fedavg(1.0), rounds=10, clients_per_round=10, sampling="poisson")
    cap = (eps[1] + eps[2]) / 2
    policy = PrivatePolicy(inner, 0.0, delta=d, max_epsilon=cap, rdp_curve=curve)
    _, applied, finished = _drive(
        policy, fedavg(1.0).init([np.zeros(D, np.float32)]), 100, lambda r: 1.0
    )
    assert finished and [a.stats.epsilon for a in applied] == pytest.approx(eps[:2], rel=1e-12)
    secure = fedagg.policy.SecurePolicy(inner)
    assert PrivatePolicy(secure, 0.0, rdp_curve=curve).clients_per_round == 10
    with pytest.raises(ConfigError, match="adaptive"):
        PrivatePolicy(inner, 1.0, target_quantile=0.5, rdp_curve=curve)


def test_the_simulate_header_names_the_privacy_mechanism() -> None:
    from fedagg.cli._simulate import header
    from fedagg.config import resolve_config

    assert "privacy" not in header(resolve_config({}))
    dp = {"mechanism": "central", "noise_multiplier": 0.8, "target_quantile": 0.5}
    cfg = resolve_config({"privacy": {**dp, "max_epsilon": 3.0}})
    line = next(x for x in header(cfg).splitlines() if x.lstrip().startswith("privacy"))
    assert "central DP (noise multiplier 0.8, adaptive clip from 1 to quantile 0.5" in line
    assert "rdp accountant, max epsilon 3)" in line
