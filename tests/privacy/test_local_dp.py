"""Local DP: the LocalDP client wrapper clips the whole update and adds N(0, (z C)^2) per
coordinate before it leaves the client (measured std), replays per generator seed, equals
train for train_many, reaches the server in a simulation; local epsilon; config refusals."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

import fedagg
from fedagg import policy, privacy, sim
from fedagg.clients import LocalDP
from fedagg.config import resolve_config
from fedagg.config._privacy import check_client_side, secure_noise, wrap_algorithm
from fedagg.errors import ConfigError
from tests.sim.fakes import FakeData, Result

D = 20_000


def _delta(c: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(c)
    return {
        "w": rng.standard_normal((D // 4, 2)).astype(np.float32) * 0.1,
        "b": rng.standard_normal(D // 2).astype(np.float32) * 0.1,
    }


class Fixed:
    """Client c's delta is _delta(len(data)), norm about 0.1 sqrt(D) ~ 14."""

    name = "fixed"
    epochs = 1
    batch_size = 1

    def train(self, model: Any, params: Any, data: Any, rng: Any, **kw: Any) -> tuple[Any, Any]:
        return Result(_delta(len(data)), len(data), 1, {"train_loss": 1.0}, {}), None

    def train_many(
        self, model: Any, params: Any, datas: Sequence[Any], rngs: Any, **kw: Any
    ) -> list[tuple[Any, Any]]:
        return [self.train(model, params, d, r) for d, r in zip(datas, rngs, strict=True)]


def _flat(d: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([d["w"].reshape(-1), d["b"]]).astype(np.float64)


def test_noise_std_is_z_times_clip_and_the_update_is_clipped_first() -> None:
    clip, z = 2.0, 0.5
    alg = LocalDP(Fixed(), clip, z)
    res, _ = alg.train(None, None, [0] * 7, np.random.default_rng(3))
    x = _flat(_delta(7))
    clipped = x * min(1.0, clip / np.linalg.norm(x))
    noise = _flat(res.delta) - clipped
    assert res.delta["w"].shape == (D // 4, 2) and res.delta["w"].dtype == np.float32
    # std of D draws: relative standard error 1/sqrt(2D) = 0.5%; float32 storage ~1e-7
    assert abs(noise.std() / (z * clip) - 1) < 0.03, noise.std()
    assert abs(noise.mean()) < 5 * z * clip / math.sqrt(D)
    assert res.num_examples == 7 and res.metrics == {"train_loss": 1.0}


def test_by_default_the_noise_is_secret_even_to_whoever_knows_the_seed() -> None:
    alg = LocalDP(Fixed(), 1.0, 1.0)  # a deployment's: the server knows (seed, job)
    a, _ = alg.train(None, None, [0] * 5, np.random.default_rng([9, 1]))
    b, _ = alg.train(None, None, [0] * 5, np.random.default_rng([9, 1]))
    seeded, _ = LocalDP(Fixed(), 1.0, 1.0, seeded=True).train(
        None, None, [0] * 5, np.random.default_rng([9, 1])
    )
    assert not np.array_equal(a.delta["w"], b.delta["w"])
    assert not np.array_equal(a.delta["w"], seeded.delta["w"])
    x = _flat(_delta(5))
    noise = _flat(a.delta) - x * min(1.0, 1.0 / np.linalg.norm(x))
    assert abs(noise.std() - 1.0) < 0.03


def test_seeded_by_the_generator_and_train_many_equals_train() -> None:
    alg = LocalDP(Fixed(), 1.0, 1.0, seeded=True)
    a, _ = alg.train(None, None, [0] * 5, np.random.default_rng([9, 1]))
    b, _ = alg.train(None, None, [0] * 5, np.random.default_rng([9, 1]))
    c, _ = alg.train(None, None, [0] * 5, np.random.default_rng([9, 2]))
    assert np.array_equal(a.delta["b"], b.delta["b"])
    assert not np.array_equal(a.delta["b"], c.delta["b"])
    many = alg.train_many(None, None, [[0] * 5, [0] * 6], [np.random.default_rng([9, 1]),
                                                          np.random.default_rng(4)])  # fmt: skip
    assert np.array_equal(many[0][0].delta["w"], a.delta["w"])


def test_in_a_simulation_the_server_sees_only_noisy_updates() -> None:
    n, clip, z = 8, 1.0, 0.3
    strategy = fedagg.strategies.fedavg(1.0)
    sizes = [10 + c for c in range(n)]

    class Model:
        def init(self, seed: int) -> dict[str, np.ndarray]:
            return {k: np.zeros_like(v) for k, v in _delta(0).items()}

        def evaluate(self, params: Any, x: Any, y: Any) -> tuple[float, float]:
            return 0.0, 0.0

    s = sim.Simulation(
        FakeData(sizes), Model(), LocalDP(Fixed(), clip, z, seeded=True), strategy,
        policy.SyncPolicy(strategy, 1, n), sim.SystemModel(n, seed=1), seed=1,
    )  # fmt: skip
    res = s.run()
    st = res.records[0].stats
    w = np.array([sizes[c] for c in st.participants], dtype=np.float64)
    xs = [_flat(_delta(sizes[c])) for c in st.participants]
    ref = sum(wi * x * min(1.0, clip / np.linalg.norm(x)) for wi, x in zip(w, xs, strict=True))
    ref = ref / w.sum()
    p = res.server.spec.unflatten(res.server.params)
    got = np.concatenate([np.asarray(p["w"]).reshape(-1), np.asarray(p["b"])])
    want_std = z * clip * math.sqrt((w**2).sum()) / w.sum()  # weighted mean of the noises
    assert abs((got - ref).std() / want_std - 1) < 0.05
    again = sim.Simulation(
        FakeData(sizes), Model(), LocalDP(Fixed(), clip, z, seeded=True), strategy,
        policy.SyncPolicy(strategy, 1, n), sim.SystemModel(n, seed=1), seed=1,
    ).run()  # fmt: skip
    assert np.array_equal(again.server.params, res.server.params)  # seeded per (seed, job)


def test_local_epsilon_is_the_gaussian_mechanism_at_half_z_composed() -> None:
    assert privacy.local_epsilon(4.0, 0, 1e-5) == 0.0
    e1 = privacy.local_epsilon(4.0, 1, 1e-5)
    assert e1 == privacy.gaussian_epsilon(1e-5, 2.0, 1)
    e9 = privacy.local_epsilon(4.0, 9, 1e-5)
    assert e9 == pytest.approx(privacy.gaussian_epsilon(1e-5, 2.0 / 3.0, 1), rel=1e-9)
    assert e9 > e1
    with pytest.raises(ConfigError):
        privacy.local_epsilon(4.0, -1, 1e-5)


def test_bad_input_and_refusals() -> None:
    with pytest.raises(ConfigError, match="clip"):
        LocalDP(Fixed(), 0.0, 1.0)
    with pytest.raises(ConfigError, match="noise_multiplier"):
        LocalDP(Fixed(), 1.0, math.inf)
    with pytest.raises(ConfigError, match="train"):
        LocalDP(object(), 1.0, 1.0)

    class Extra(Fixed):
        def train(self, *a: Any, **kw: Any) -> tuple[Any, Any]:
            r, s = super().train(*a, **kw)
            return Result(r.delta, r.num_examples, 1, {}, {"delta_c": 1}), s

    with pytest.raises(ConfigError, match="extra payload"):
        LocalDP(Extra(), 1.0, 1.0).train(None, None, [0], np.random.default_rng(0))


def test_config_wraps_the_algorithm_and_refuses_what_cannot_hold() -> None:
    cfg = resolve_config({"privacy": {"mechanism": "local", "clip": 0.5, "noise_multiplier": 2}})
    alg = wrap_algorithm(cfg, Fixed())
    assert isinstance(alg, LocalDP) and (alg.clip, alg.noise_multiplier) == (0.5, 2.0)
    assert secure_noise(cfg) == {}
    assert wrap_algorithm(resolve_config({}), Fixed()).__class__ is Fixed
    bad = [
        ({"noise_multiplier": 0}, "no noise"),
        ({"target_quantile": 0.5}, "adaptive"),
    ]
    for extra, why in bad:
        c = resolve_config({"privacy": {"mechanism": "local", **extra}})
        with pytest.raises(ConfigError, match=why):
            check_client_side(c)
    c = resolve_config({"privacy": {"mechanism": "local"}, "client": {"algorithm": "scaffold"}})
    with pytest.raises(ConfigError, match="scaffold"):
        wrap_algorithm(c, Fixed())


def test_local_epsilon_per_round_is_the_most_used_clients_and_max_epsilon_stops() -> None:
    n, z = 6, 3.0
    strategy = fedagg.strategies.fedavg(1.0)

    class Small(Fixed):
        def train(self, *a: Any, **kw: Any) -> tuple[Any, Any]:
            return Result({"w": np.ones(4, np.float32)}, 1, 1, {}, {}), None

    class Model:
        def init(self, seed: int) -> dict[str, np.ndarray]:
            return {"w": np.zeros(4, np.float32)}

        def evaluate(self, params: Any, x: Any, y: Any) -> tuple[float, float]:
            return 0.0, 0.0

    def run(cpr: int, rounds: int, max_eps: float = math.inf) -> sim.SimResult:
        p = policy.ClientDPPolicy(policy.SyncPolicy(strategy, rounds, cpr), "local", z,
                                  delta=1e-5, max_epsilon=max_eps)  # fmt: skip
        return sim.Simulation(
            FakeData([5] * n), Model(), LocalDP(Small(), 1.0, z), strategy, p,
            sim.SystemModel(n, seed=4), seed=4,
        ).run()  # fmt: skip

    res = run(3, 4)
    taken = [0] * n
    for r in res.records:
        for c in r.stats.participants:
            taken[c] += 1
        assert r.stats.epsilon == privacy.local_epsilon(z, max(taken), 1e-5)
    cap = (privacy.local_epsilon(z, 2, 1e-5) + privacy.local_epsilon(z, 3, 1e-5)) / 2
    stopped = run(n, 5, cap)  # every client every round: the third round would exceed
    assert [r.stats.epsilon for r in stopped.records] == [
        privacy.local_epsilon(z, k, 1e-5) for k in (1, 2)
    ]
