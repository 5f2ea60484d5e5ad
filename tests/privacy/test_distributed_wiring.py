"""Distributed DP over SecAgg+: each client adds discrete Gaussian (or Skellam) noise to its
integer encoding before masking; the decoded noisy sum's error has the noise's variance
(measured), the noisy sum never wraps (headroom), the whole protocol in the simulator applies
the noisy mean, the accounting is the RDP functions' for the encoder's parameters, and what
cannot hold is refused."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

import fedagg
from fedagg import policy, privacy, sim
from fedagg.config import resolve_config
from fedagg.config._privacy import check_client_side, secure_noise
from fedagg.errors import ConfigError, SecAggError
from fedagg.secagg import Encoder, RoundParams
from tests.sim.fakes import FakeData, Result


def _sum(encs: Sequence[np.ndarray]) -> np.ndarray:
    """The sum modulo 2**32, as the masks' arithmetic leaves it."""
    t = np.zeros(encs[0].size, dtype=np.uint64)
    for e in encs:
        t += e
    return (t % (1 << 32)).astype(np.uint32)


@pytest.mark.parametrize(("kind", "bits", "z", "m"), [
    ("gaussian", 32, 1.0, 8), ("skellam", 32, 1.0, 8), ("gaussian", 20, 2.0, 5),
])  # fmt: skip
def test_decoded_error_has_the_noise_variance_and_never_wraps(
    kind: str, bits: int, z: float, m: int
) -> None:
    d, n, clip = 20_000, 10, 1.0
    enc = Encoder(clip, bits, n, None, kind, z, 8, d)
    top = (1 << (bits - enc.headroom)) - 1
    assert enc.levels + 2 * enc.bias <= top and enc.bias >= 10 * enc.noise_std
    rng = np.random.default_rng([1, m])
    xs = [rng.standard_normal(d) * (0.5 if i % 2 else 0.002) for i in range(m)]  # half clipped
    encs = [enc.encode(x, 1.0, rng=rng, sampler=privacy.integer_noise(kind)) for x in xs]
    total = _sum(encs)
    # no wrap: the integer sum (computed exactly) is what the uint32 sum holds
    exact = np.sum([e.astype(np.int64) for e in encs], axis=0)
    assert np.array_equal(exact, total.astype(np.int64))
    vec, w = enc.decode(total, m, d)
    assert w == m
    ref = sum(x * min(1.0, clip / np.linalg.norm(x)) for x in xs)
    err = vec - ref
    # per element: m s^2 steps^2 of noise + rounding <= m/4 steps^2 (s >> 1: negligible)
    want = math.sqrt(m) * enc.noise_std * enc.step
    assert abs(err.std() / want - 1) < 0.03, (err.std(), want)
    assert abs(err.mean()) < 5 * want / math.sqrt(d)
    # the noise in z C units: sqrt(m / n_e) z C (1 + 2 sqrt(d) / L)
    inflation = 1 + 2 * math.sqrt(d) / enc.levels
    assert want == pytest.approx(math.sqrt(m / 8) * z * clip * inflation, rel=1e-9)
    # the largest summed noise seen, in sigmas, is far from the headroom's 10 sqrt(m)
    noise = (exact[:-1] - m * enc.bias) - np.round((ref / enc.step) + m * enc.levels / 2)
    assert np.abs(noise).max() < 6 * math.sqrt(m) * enc.noise_std


def test_a_sum_beyond_the_headroom_is_refused_not_decoded() -> None:
    d, n = 100, 4
    enc = Encoder(1.0, 16, n, None, "gaussian", 1.0, 4, d)
    cap = 4 * (enc.levels + 2 * enc.bias)
    total = np.full(d + 1, cap // 2, dtype=np.uint32)
    total[-1] = 4 * enc.levels
    enc.decode(total, 4, d)  # in range: decodes
    total[3] = cap + 1
    with pytest.raises(SecAggError, match="headroom"):
        enc.decode(total, 4, d)
    total[3] = (1 << 32) - 5  # a (simulated) wrap below zero
    with pytest.raises(SecAggError):
        enc.decode(total, 4, d)


def test_encoder_and_round_params_checks() -> None:
    with pytest.raises(ConfigError, match="raise bits"):
        Encoder(1.0, 8, 100, None, "gaussian", 50.0, 1, 1000)
    with pytest.raises(ConfigError, match="noise must be"):
        Encoder(1.0, 32, 4, None, "laplace", 1.0, 4, 10)
    with pytest.raises(ConfigError, match="noise_multiplier"):
        Encoder(1.0, 32, 4, None, "gaussian", 0.0, 4, 10)
    enc = Encoder(1.0, 32, 4, None, "gaussian", 1.0, 4, 10)
    with pytest.raises(SecAggError, match="sampler"):
        enc.encode(np.ones(10), 1.0)
    with pytest.raises(SecAggError, match="weight is 1"):
        enc.encode(np.ones(10), 0.5, sampler=privacy.integer_noise("gaussian"))
    with pytest.raises(ConfigError):
        privacy.integer_noise("laplace")
    p = RoundParams.make(7, (1, 2, 3), 10, b"g", clip=1.0, noise="skellam",
                         noise_multiplier=1.5, noise_clients=3)  # fmt: skip
    q = RoundParams.from_bytes(p.to_bytes())
    assert (q.noise, q.noise_multiplier, q.noise_clients) == ("skellam", 1.5, 3)
    assert q.encoder() == p.encoder() and q.weight(40.0) == 1.0
    plain = RoundParams.make(7, (1, 2, 3), 10, b"g", clip=1.0)
    assert RoundParams.from_bytes(plain.to_bytes()).noise == ""
    with pytest.raises(SecAggError):
        RoundParams.from_bytes(p.to_bytes() + b"x")


def test_accounting_is_the_rdp_of_the_encoders_parameters() -> None:
    d = 1000
    enc = Encoder(1.0, 32, 16, None, "gaussian", 1.2, 10, d)
    orders = privacy.DISTRIBUTED_ORDERS
    one = privacy.distributed_rdp(enc, 0.01, neighbours="add_remove")  # third parties
    ref = privacy.rdp_distributed_discrete_gaussian(
        l2_sensitivity=enc.levels / 2 + math.sqrt(d), local_stddev=enc.noise_std, clients=10,
        dim=d, sample_rate=0.01,
    )  # fmt: skip
    assert np.array_equal(one, ref)
    for t in (1, 10, 100):
        want, _ = privacy.rdp_to_epsilon(orders, t * ref, 1e-5)
        assert privacy.distributed_epsilon(one, t, 1e-5) == want
    # against the server: replacement (sensitivity 2S), no amplification (q = 1)
    server = privacy.distributed_rdp(enc)
    ref_server = privacy.rdp_distributed_discrete_gaussian(
        l2_sensitivity=2 * (enc.levels / 2 + math.sqrt(d)), local_stddev=enc.noise_std,
        clients=10, dim=d, sample_rate=1.0,
    )  # fmt: skip
    assert np.array_equal(server, ref_server)
    with pytest.raises(ConfigError, match="amplification"):
        privacy.distributed_rdp(enc, 0.01)
    with pytest.raises(ConfigError, match="neighbours"):
        privacy.distributed_rdp(enc, neighbours="add")
    # ... the Gaussian mechanism's a / (2 (z/2)^2) (s >> 1: tau ~ 0), 4x add/remove at q = 1
    full = privacy.distributed_rdp(enc, 1.0, orders=[2, 8])
    assert full == pytest.approx([2 / (2 * 0.6**2), 8 / (2 * 0.6**2)], rel=1e-9)
    half = privacy.distributed_rdp(enc, 1.0, orders=[2, 8], neighbours="add_remove")
    assert half == pytest.approx([2 / (2 * 1.2**2), 8 / (2 * 1.2**2)], rel=1e-9)
    # fewer survivors than expected: less noise, a larger epsilon
    assert privacy.distributed_rdp(enc, 1.0, clients=5, orders=[2])[0] > full[0]
    sk = Encoder(1.0, 32, 16, None, "skellam", 1.2, 10, d)
    ref_sk = privacy.rdp_skellam(l2_sensitivity=sk.sensitivity, variance=10 * sk.noise_std**2,
                                 dim=d, sample_rate=0.01)  # fmt: skip
    assert np.array_equal(privacy.distributed_rdp(sk, 0.01, neighbours="add_remove"), ref_sk)
    ref_sk = privacy.rdp_skellam(l2_sensitivity=2 * sk.sensitivity,
                                 variance=10 * sk.noise_std**2, dim=d)  # fmt: skip
    assert np.array_equal(privacy.distributed_rdp(sk), ref_sk)
    e = [privacy.distributed_epsilon(one, t, 1e-5) for t in (1, 10, 100)]
    assert 0 < e[0] < e[1] < e[2]


# -- the protocol in the simulator ---------------------------------------------------------------
D, CLIP, Z = 3000, 2.0, 0.8


def _delta(size: int) -> np.ndarray:
    return (np.random.default_rng(size).standard_normal(D) * 0.05).astype(np.float32)


class VecModel:
    def init(self, seed: int) -> dict[str, np.ndarray]:
        return {"w": np.zeros(D, dtype=np.float32)}

    def evaluate(self, params: Any, x: Any, y: Any) -> tuple[float, float]:
        return 0.0, 0.0


class VecClient:
    epochs = 1
    batch_size = 1

    def train_many(
        self, model: Any, params: Any, datas: Sequence[Any], rngs: Any, **kw: Any
    ) -> list[tuple[Result, Any]]:
        return [(Result({"w": _delta(len(d))}, len(d), 1, {}, {}), None) for d in datas]


def _run(n: int, kind: str, seed: int, dropout: float = 0.0, least: int = 0) -> sim.SimResult:
    strategy = fedagg.strategies.fedavg(1.0)
    inner = policy.SyncPolicy(strategy, 1, n)
    secure = policy.SecurePolicy(inner, clip=CLIP, bits=32, stage_timeout=5.0, noise=kind,
                                 noise_multiplier=Z, noise_clients=least)  # fmt: skip
    sizes = [10 + 3 * c for c in range(n)]
    return sim.Simulation(
        FakeData(sizes), VecModel(), VecClient(), strategy, secure, sim.SystemModel(n, seed=seed),
        seed=seed, secure_dropout=dropout,
    ).run()  # fmt: skip


@pytest.mark.parametrize(("kind", "dropout"), [("gaussian", 0.0), ("skellam", 0.2)])
def test_simulated_round_applies_the_uniform_mean_plus_the_summed_noise(
    kind: str, dropout: float
) -> None:
    n = 10
    res = _run(n, kind, seed=3, dropout=dropout)
    st = res.records[0].stats
    assert st.applied
    m = st.folded
    ref = np.mean([_delta(10 + 3 * c).astype(np.float64) for c in st.participants], axis=0)
    got = res.server.params.astype(np.float64)
    enc = policy.SecurePolicy(policy.SyncPolicy(fedagg.strategies.fedavg(1.0), 1, n), clip=CLIP,
                              noise=kind, noise_multiplier=Z).dp_encoder(D, n)  # fmt: skip
    want = math.sqrt(m) * enc.noise_std * enc.step / m  # the mean of m noisy encodings
    assert enc.noise_clients == 5  # min_survivors: half the cohort
    assert want == pytest.approx(Z * CLIP / math.sqrt(5 * m), rel=1e-3)
    assert abs((got - ref).std() / want - 1) < 0.08, ((got - ref).std(), want)
    again = _run(n, kind, seed=3, dropout=dropout)
    assert np.array_equal(again.server.params, res.server.params)  # seeded per (seed, job)


def test_too_few_survivors_are_never_unmasked() -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedagg.secagg import ConsistencyRequest, SecureClient

    ok = _run(10, "gaussian", seed=2, dropout=0.1, least=8)
    assert ok.records[0].stats.applied and 8 <= ok.records[0].stats.folded < 10
    res = _run(10, "gaussian", seed=2, dropout=0.1, least=10)  # the same dropouts: too few
    st = res.records[0].stats
    assert not st.applied and st.folded == 0
    assert [why for why, _ in st.refusals] == ["secure aggregation abandoned at stage 2"]
    p = RoundParams.make(1, (1, 2, 3, 4), 8, b"g", clip=1.0, noise="gaussian",
                         noise_multiplier=1.0, noise_clients=3)  # fmt: skip
    keys = {u: Ed25519PrivateKey.generate() for u in p.ids}
    c = SecureClient(p, 1, keys[1], {u: k.public_key() for u, k in keys.items()})
    c.handle(p)
    with pytest.raises(SecAggError, match="fewer than the 3"):
        c.handle(ConsistencyRequest(1, frozenset({1, 2})))
    assert c.aborted


def test_config_refuses_distributed_without_secagg_plus() -> None:
    for sa in ({}, {"secure_aggregation": {"kind": "none"}}):
        cfg = resolve_config({"privacy": {"mechanism": "distributed"}, **sa})
        with pytest.raises(ConfigError, match="secagg\\+"):
            check_client_side(cfg)
        with pytest.raises(ConfigError, match="secagg\\+"):
            secure_noise(cfg)
    cfg = resolve_config({"privacy": {"mechanism": "distributed", "clip": 3.0,
                                      "noise_multiplier": 0.7},
                          "secure_aggregation": {"kind": "secagg+"}})  # fmt: skip
    assert secure_noise(cfg) == {"noise": "gaussian", "noise_multiplier": 0.7, "clip": 3.0}
    with pytest.raises(ConfigError, match="noise"):
        policy.SecurePolicy(policy.SyncPolicy(fedagg.strategies.fedavg(1.0), 1, 4),
                            noise="laplace", noise_multiplier=1.0)  # fmt: skip
    with pytest.raises(ConfigError, match="raise bits"):
        policy.SecurePolicy(policy.SyncPolicy(fedagg.strategies.fedavg(1.0), 1, 40), bits=10,
                            noise="gaussian", noise_multiplier=30.0)  # fmt: skip


# -- the accountant: epsilon per round, max_epsilon, the config -----------------------------------
def _dist_policy(n: int, cpr: int, rounds: int, max_eps: float = math.inf) -> Any:
    strategy = fedagg.strategies.fedavg(1.0)
    inner = policy.SyncPolicy(strategy, rounds, cpr, sampling="poisson")
    secure = policy.SecurePolicy(inner, clip=CLIP, stage_timeout=5.0, noise="gaussian",
                                 noise_multiplier=Z)  # fmt: skip
    return policy.ClientDPPolicy(secure, "distributed", Z, delta=1e-5, max_epsilon=max_eps)


def _sim(p: Any, n: int, seed: int = 2) -> sim.SimResult:
    return sim.Simulation(
        FakeData([10 + 3 * c for c in range(n)]), VecModel(), VecClient(), p.strategy, p,
        sim.SystemModel(n, seed=seed), seed=seed,
    ).run()  # fmt: skip


def test_distributed_epsilon_per_round_is_the_accountants_and_max_epsilon_stops() -> None:
    n, cpr = 10, 5
    p = _dist_policy(n, cpr, 3)
    res = _sim(p, n)
    one = privacy.distributed_rdp(p.inner.dp_encoder(D, cpr))  # against the server: q = 1
    eps = [r.stats.epsilon for r in res.records]
    assert len(eps) == 3 and any(r.stats.applied for r in res.records)
    assert eps == [privacy.distributed_epsilon(one, t, 1e-5) for t in (1, 2, 3)]
    assert 0 < eps[0] < eps[1] < eps[2] < math.inf
    # the amplified add/remove figure holds only against third parties who do not see the
    # sample: reported separately, smaller, never what max_epsilon enforces
    st = policy.ClientDPState(None, cpr / n, 1e-5)
    third = p.third_party_epsilon(st, 3, D)
    add_remove = privacy.distributed_rdp(
        p.inner.dp_encoder(D, cpr), cpr / n, neighbours="add_remove"
    )
    assert third == privacy.distributed_epsilon(add_remove, 3, 1e-5) < eps[2]
    stopped = _sim(_dist_policy(n, cpr, 5, max_eps=(eps[1] + eps[2]) / 2), n)
    assert [r.stats.epsilon for r in stopped.records] == eps[:2]  # the third would exceed


def test_config_builds_the_distributed_and_local_policies() -> None:
    from fedagg.config import build_algorithm, build_policy, build_strategy

    over = {"privacy": {"mechanism": "distributed", "clip": 3.0, "noise_multiplier": 0.7},
            "secure_aggregation": {"kind": "secagg+"}}  # fmt: skip
    cfg = resolve_config(over)
    p = build_policy(cfg, build_strategy(cfg))
    assert isinstance(p, policy.ClientDPPolicy) and p.mechanism == "distributed"
    assert (p.inner.noise, p.inner.noise_multiplier, p.inner.clip) == ("gaussian", 0.7, 3.0)
    assert p.inner.inner.sampling == "poisson"
    cfg = resolve_config({"privacy": {"mechanism": "local", "noise_multiplier": 2.0}})
    p = build_policy(cfg, build_strategy(cfg))
    assert isinstance(p, policy.ClientDPPolicy) and isinstance(p.inner, policy.SyncPolicy)
    assert type(build_algorithm(cfg)).__name__ == "LocalDP"
    with pytest.raises(ConfigError, match="secagg\\+"):
        c = resolve_config({"privacy": {"mechanism": "distributed"}})
        build_policy(c, build_strategy(c))
    with pytest.raises(ConfigError, match="sync rounds"):
        c = resolve_config({"privacy": {"mechanism": "local"}, "policy": {"kind": "fedbuff"}})
        build_policy(c, build_strategy(c))
