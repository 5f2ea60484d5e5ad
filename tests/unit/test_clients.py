"""fedagg.clients: LocalSGD (FedAvg), FedProx, SCAFFOLD; train_many == a loop of train."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

import fedagg
from fedagg.clients import FedProx, LocalSGD, Scaffold, TrainResult, scaffold_server_update
from fedagg.models import MLP, LogReg

#: train_many vs a loop of train: |a - b| <= RTOL * max|a| + ATOL, per array (float32
#: round-off of batched vs single matrix products, amplified a little by the SGD steps).
RTOL, ATOL = 1e-5, 1e-7


@dataclass(frozen=True)
class Data:
    """Examples in the shape fedagg.models.Examples describes."""

    x: Any
    y: Any
    num_classes: int = 3


Examples = Data  # what test_models imports


def blobs(n: int, seed: int, sep: float = 4.0, dim: int = 2) -> Data:
    """Three well-separated Gaussian blobs (linearly separable in practice)."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    centers = sep * np.array([[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]])
    x = centers[y, :2] + rng.standard_normal((n, 2))
    if dim > 2:
        x = np.concatenate([x, rng.standard_normal((n, dim - 2))], axis=1)
    return Data(x.astype(np.float32), y.astype(np.int64))


def close(a: Any, b: Any, what: str = "") -> None:
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype, what
    scale = float(np.abs(a).max()) if a.size else 0.0
    np.testing.assert_allclose(b, a, rtol=0, atol=RTOL * scale + ATOL, err_msg=what)


def rngs(k: int, base: int = 0) -> list[np.random.Generator]:
    return [np.random.default_rng((base, i)) for i in range(k)]


# --------------------------------------------------------------------------------------------
# LocalSGD (FedAvg's client)
# --------------------------------------------------------------------------------------------


def test_local_sgd_reduces_the_loss_on_a_separable_problem() -> None:
    model = LogReg(2, 3)
    data = blobs(200, 0)
    params = model.init(0)
    before, _ = model.evaluate(params, data.x, data.y)
    res, state = LocalSGD(epochs=3, batch_size=10, lr=0.1).train(
        model, params, data, np.random.default_rng(0)
    )
    assert state is None
    trained = {k: params[k] + res.delta[k] for k in params}
    after, acc = model.evaluate(trained, data.x, data.y)
    assert after < 0.25 * before and acc > 0.95
    assert res.num_examples == 200 and res.steps == 60
    assert 0 < res.metrics["train_loss"] < before
    assert not params["W"].any()  # the start params are not modified


def test_local_sgd_is_deterministic_given_the_rng() -> None:
    model, data = MLP(2, (6,), 3), blobs(57, 1)
    params = model.init(1)
    algo = LocalSGD(epochs=2, batch_size=8, lr=0.05)
    a, _ = algo.train(model, params, data, np.random.default_rng(5))
    b, _ = algo.train(model, params, data, np.random.default_rng(5))
    c, _ = algo.train(model, params, data, np.random.default_rng(6))
    assert all(np.array_equal(a.delta[k], b.delta[k]) for k in params)
    assert a.metrics == b.metrics
    assert any(not np.array_equal(a.delta[k], c.delta[k]) for k in params)


def test_one_step_is_plain_sgd() -> None:
    model, data = LogReg(2, 3), blobs(6, 2)
    params = model.init(0)
    res, _ = LocalSGD(epochs=1, batch_size=6, lr=0.3).train(
        model, params, data, np.random.default_rng(0)
    )
    _, grad = model.loss_and_grad(params, data.x, data.y)
    for k in params:
        np.testing.assert_allclose(res.delta[k], -np.float32(0.3) * grad[k], rtol=1e-6)


@pytest.mark.parametrize(("n", "batch"), [(1, 10), (10, 10), (23, 10), (50, 7), (5, 1)])
def test_epochs_override_sets_the_number_of_steps(n: int, batch: int) -> None:
    model, data = LogReg(2, 3), blobs(n, 3)
    algo = LocalSGD(epochs=3, batch_size=batch, lr=0.01)
    params = model.init(0)
    for epochs in (None, 0, 1, 2, 5):
        res, _ = algo.train(model, params, data, np.random.default_rng(0), epochs=epochs)
        e = 3 if epochs is None else epochs
        assert res.steps == e * math.ceil(n / batch)
        if e == 0:
            assert all(not v.any() for v in res.delta.values()) and res.metrics == {}


def test_client_without_data_returns_a_zero_delta() -> None:
    model = LogReg(2, 3)
    empty = Data(np.zeros((0, 2), np.float32), np.zeros(0, np.int64))
    res, _ = LocalSGD().train(model, model.init(0), empty, np.random.default_rng(0))
    assert res.steps == 0 and res.num_examples == 0 and res.metrics == {}
    assert all(not v.any() for v in res.delta.values())


@pytest.mark.parametrize(
    "build",
    [
        lambda: LocalSGD(epochs=0),
        lambda: LocalSGD(batch_size=0),
        lambda: LocalSGD(lr=0.0),
        lambda: LocalSGD(lr=float("nan")),
        lambda: FedProx(mu=-1.0),
        lambda: FedProx(mu=float("inf")),
        lambda: Scaffold(epochs=1.5),  # type: ignore[arg-type]
    ],
)
def test_bad_hyperparameters_raise_config_error(build: Any) -> None:
    with pytest.raises(fedagg.ConfigError):
        build()


def test_bad_call_arguments_raise_config_error() -> None:
    model, data = LogReg(2, 3), blobs(10, 0)
    params = model.init(0)
    algo = LocalSGD()
    with pytest.raises(fedagg.ConfigError, match="epochs"):
        algo.train(model, params, data, np.random.default_rng(0), epochs=-1)
    with pytest.raises(fedagg.ConfigError, match="generators"):
        algo.train_many(model, params, [data, data], rngs(1))
    with pytest.raises(fedagg.ConfigError, match="features"):
        algo.train_many(model, params, [data, blobs(5, 1, dim=3)], rngs(2))
    with pytest.raises(fedagg.ConfigError, match="epoch counts"):
        algo.train_many(model, params, [data], rngs(1), epochs=[1, 2])
    with pytest.raises(fedagg.ConfigError, match="x and y"):
        algo.train(model, params, object(), np.random.default_rng(0))  # type: ignore[arg-type]
    with pytest.raises(fedagg.ConfigError, match="x \\(n, d\\)"):
        algo.train(model, params, Data(data.x, data.y[:5]), np.random.default_rng(0))
    with pytest.raises(fedagg.ConfigError, match="state"):
        Scaffold().train(
            model, params, data, np.random.default_rng(0), server_state={"W": params["W"]}
        )


# --------------------------------------------------------------------------------------------
# FedProx
# --------------------------------------------------------------------------------------------


def test_fedprox_with_mu_zero_is_local_sgd_exactly() -> None:
    model, data = MLP(2, (5,), 3), blobs(43, 4)
    params = model.init(2)
    a, _ = LocalSGD(epochs=2, batch_size=10, lr=0.1).train(
        model, params, data, np.random.default_rng(1)
    )
    b, _ = FedProx(mu=0.0, epochs=2, batch_size=10, lr=0.1).train(
        model, params, data, np.random.default_rng(1)
    )
    assert all(np.array_equal(a.delta[k], b.delta[k]) for k in params)
    assert a.steps == b.steps and a.metrics == b.metrics


@pytest.mark.parametrize("seed", range(6))
def test_fedprox_keeps_the_trained_model_closer_to_the_start(seed: int) -> None:
    """The proximal term pulls towards x_t: the distance travelled shrinks as mu grows."""
    model = LogReg(4, 3)
    data = blobs(80, seed, dim=4)
    params = perturbed_logreg(model, seed)

    def travelled(mu: float) -> float:
        algo = FedProx(mu=mu, epochs=5, batch_size=10, lr=0.1)
        res, _ = algo.train(model, params, data, np.random.default_rng(seed))
        return math.sqrt(sum(float(np.sum(d.astype(np.float64) ** 2)) for d in res.delta.values()))

    dist = [travelled(mu) for mu in (0.0, 0.1, 1.0, 5.0)]
    assert dist[0] > dist[1] > dist[2] > dist[3] > 0


def test_fedprox_step_formula() -> None:
    model, data = LogReg(2, 3), blobs(4, 5)
    params = perturbed_logreg(model, 0)
    algo = FedProx(mu=0.7, epochs=2, batch_size=4, lr=0.2)
    res, _ = algo.train(model, params, data, np.random.default_rng(0))
    w = {k: v.copy() for k, v in params.items()}
    for _ in range(2):  # full batches: the order does not matter
        _, g = model.loss_and_grad(w, data.x, data.y)
        for k in w:
            w[k] = w[k] - np.float32(0.2) * (g[k] + np.float32(0.7) * (w[k] - params[k]))
    for k in params:
        np.testing.assert_allclose(res.delta[k], w[k] - params[k], rtol=1e-5, atol=1e-7)


def perturbed_logreg(model: LogReg, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed + 100)
    return {
        k: (0.3 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in model.init(0).items()
    }


# --------------------------------------------------------------------------------------------
# SCAFFOLD
# --------------------------------------------------------------------------------------------


def test_scaffold_one_step_by_hand() -> None:
    """One full-batch step from zeros on a 2-feature, 2-class logistic regression.

    At W = 0, b = 0 the softmax is (1/2, 1/2); for x = (1, 2), y = 1 the gradient is
    dlogits = (1/2, -1/2), so gW = x^T dlogits = [[.5, -.5], [1, -1]] and gb = (.5, -.5).
    """
    model = LogReg(2, 2)
    data = Data(np.array([[1.0, 2.0]], np.float32), np.array([1]), 2)
    params = model.init(0)
    c = {
        "W": np.array([[0.1, 0.2], [0.3, 0.4]], np.float32),
        "b": np.array([1.0, -1.0], np.float32),
    }
    ci = {
        "W": np.array([[0.5, 0.0], [0.0, 0.5]], np.float32),
        "b": np.array([0.0, 2.0], np.float32),
    }
    lr = 0.1
    res, new_ci = Scaffold(epochs=1, batch_size=1, lr=lr).train(
        model, params, data, np.random.default_rng(0), state=ci, server_state=c
    )
    g = {"W": np.array([[0.5, -0.5], [1.0, -1.0]]), "b": np.array([0.5, -0.5])}
    for k in params:
        # y = x - lr (g - c_i + c)
        np.testing.assert_allclose(res.delta[k], -lr * (g[k] - ci[k] + c[k]), rtol=1e-6, atol=1e-7)
        # option II with K = 1: c_i+ = c_i - c + (x - y) / lr = g(x)
        np.testing.assert_allclose(new_ci[k], g[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res.extra["delta_c"][k], g[k] - ci[k], rtol=1e-5, atol=1e-6)
    assert res.steps == 1


def test_scaffold_option_two_after_several_steps() -> None:
    model, data = MLP(2, (4,), 3), blobs(37, 6)
    params = model.init(0)
    rng = np.random.default_rng(9)
    c = {k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in params.items()}
    ci = {k: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in params.items()}
    lr = 0.05
    res, new = Scaffold(epochs=2, batch_size=10, lr=lr).train(
        model, params, data, np.random.default_rng(0), state=ci, server_state=c
    )
    k_steps = res.steps
    assert k_steps == 8
    for k in params:
        expected = ci[k] - c[k] + (-res.delta[k]) / (k_steps * lr)
        np.testing.assert_allclose(new[k], expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(res.extra["delta_c"][k], new[k] - ci[k], rtol=1e-5, atol=1e-6)
        assert new[k].dtype == np.float32


def test_scaffold_with_zero_control_variates_is_local_sgd() -> None:
    model, data = MLP(2, (5,), 3), blobs(33, 7)
    params = model.init(3)
    ref, _ = LocalSGD(epochs=2, batch_size=10, lr=0.1).train(
        model, params, data, np.random.default_rng(2)
    )
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    for state, server in [(None, None), (zeros, zeros), (None, zeros)]:
        res, _ = Scaffold(epochs=2, batch_size=10, lr=0.1).train(
            model, params, data, np.random.default_rng(2), state=state, server_state=server
        )
        assert all(np.array_equal(ref.delta[k], res.delta[k]) for k in params)


def test_scaffold_without_steps_keeps_its_control_variate() -> None:
    model, data = LogReg(2, 3), blobs(20, 0)
    params = model.init(0)
    ci = {k: np.full_like(v, 0.5) for k, v in params.items()}
    res, new = Scaffold().train(model, params, data, np.random.default_rng(0), epochs=0, state=ci)
    assert res.steps == 0
    for k in params:
        np.testing.assert_array_equal(new[k], ci[k])
        assert not res.extra["delta_c"][k].any()
    new["W"][:] = 7  # the new state is the client's own copy
    assert ci["W"][0, 0] == 0.5
    start = {k: np.full_like(v, 3.0) for k, v in params.items()}
    empty = Data(np.zeros((0, 2), np.float32), np.zeros(0, np.int64))
    for algo_many in (False, True):  # no c_i yet and no step: c_i+ stays zero
        if algo_many:
            res, new = Scaffold().train_many(model, start, [empty], rngs(1))[0]
        else:
            res, new = Scaffold().train(model, start, empty, np.random.default_rng(0))
        assert res.steps == 0
        assert all(not new[k].any() and not res.extra["delta_c"][k].any() for k in params)


def test_scaffold_server_update_divides_by_the_total_number_of_clients() -> None:
    c = {"w": np.ones((2, 2), np.float32), "b": np.zeros(3, np.float32)}
    total = {"w": np.full((2, 2), 2.0, np.float32), "b": np.array([4.0, -8.0, 0.0], np.float32)}
    new = scaffold_server_update(c, total, 4)  # e.g. 2 of the 4 clients took part
    np.testing.assert_array_equal(new["w"], np.full((2, 2), 1.5))
    np.testing.assert_array_equal(new["b"], [1.0, -2.0, 0.0])
    assert new["w"].dtype == np.float32
    np.testing.assert_array_equal(c["w"], 1.0)  # pure: c is unchanged
    from_none = scaffold_server_update(None, total, 2)
    np.testing.assert_array_equal(from_none["b"], [2.0, -4.0, 0.0])
    for bad in (0, -3, 2.5, True):
        with pytest.raises(fedagg.ConfigError):
            scaffold_server_update(c, total, bad)  # type: ignore[arg-type]
    with pytest.raises(fedagg.ConfigError):
        scaffold_server_update(c, {"w": total["w"]}, 4)


def test_scaffold_rounds_converge_with_the_server_update() -> None:
    """Two heterogeneous clients, full participation: SCAFFOLD rounds reduce the loss."""
    model = LogReg(2, 3)
    datas = [blobs(40, 0), Data(blobs(40, 1).x, np.zeros(40, np.int64))]
    x = np.concatenate([d.x for d in datas])
    y = np.concatenate([d.y for d in datas])
    s = fedagg.strategies.fedavg()
    server = s.init(model.init(0))
    algo = Scaffold(epochs=1, batch_size=10, lr=0.1)
    c: dict[str, Any] | None = None
    states: list[Any] = [None, None]
    first, _ = model.evaluate(server.model, x, y)  # type: ignore[arg-type]
    for rnd in range(5):
        results = algo.train_many(
            model, server.model, datas, rngs(2, rnd), states=states, server_state=c
        )  # type: ignore[arg-type]
        agg = s.begin(server)
        total = {k: np.zeros_like(v) for k, v in results[0][0].delta.items()}
        for i, (res, st) in enumerate(results):
            states[i] = st
            agg = s.aggregator.fold(agg, fedagg.Update(res.delta, 1.0, f"c{i}", server.version))
            for k in total:
                total[k] += res.extra["delta_c"][k]
        server = s.apply(server, agg)
        c = scaffold_server_update(c, total, num_clients_total=2)
    last, _ = model.evaluate(server.model, x, y)  # type: ignore[arg-type]
    assert last < 0.7 * first


# --------------------------------------------------------------------------------------------
# train_many == a loop of train
# --------------------------------------------------------------------------------------------

SIZES = [0, 1, 7, 10, 23, 40, 3, 55, 19, 10]
EPOCHS = [1, 2, 3, 1, 0, 2, 1, 3, 2, 2]
MODELS = {"logreg": LogReg(5, 3), "mlp2-tanh": MLP(5, (6, 4), 3, activation="tanh")}
ALGOS = {
    "local_sgd": LocalSGD(epochs=2, batch_size=4, lr=0.1),
    "fedprox": FedProx(mu=0.5, epochs=2, batch_size=4, lr=0.1),
    "scaffold": Scaffold(epochs=2, batch_size=4, lr=0.1),
    "local_sgd-steps": LocalSGD(batch_size=4, lr=0.1, steps=7),
    "scaffold-steps": Scaffold(batch_size=4, lr=0.1, steps=5),
}


def ragged_clients(seed: int = 0) -> list[Data]:
    return [blobs(n, seed + i, dim=5) for i, n in enumerate(SIZES)]


def scaffold_inputs(params: dict[str, Any], k: int) -> tuple[Any, list[Any]]:
    rng = np.random.default_rng(42)

    def noise() -> dict[str, Any]:
        return {
            n: (0.1 * rng.standard_normal(v.shape)).astype(np.float32) for n, v in params.items()
        }

    return noise(), [None if i % 3 == 0 else noise() for i in range(k)]


def assert_same(one: tuple[TrainResult, Any], many: tuple[TrainResult, Any], what: str) -> None:
    (r1, s1), (r2, s2) = one, many
    assert (r1.steps, r1.num_examples) == (r2.steps, r2.num_examples), what
    assert r1.metrics.keys() == r2.metrics.keys(), what
    if r1.metrics:
        assert r2.metrics["train_loss"] == pytest.approx(r1.metrics["train_loss"], rel=RTOL)
    assert list(r1.delta) == list(r2.delta)
    for k in r1.delta:
        close(r1.delta[k], r2.delta[k], f"{what} delta {k}")
    assert r1.extra.keys() == r2.extra.keys()
    if "delta_c" in r1.extra:
        for k in r1.delta:
            close(r1.extra["delta_c"][k], r2.extra["delta_c"][k], f"{what} delta_c {k}")
            close(s1[k], s2[k], f"{what} state {k}")
    else:
        assert s1 is None and s2 is None


@pytest.mark.parametrize("algo_name", sorted(ALGOS))
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_train_many_equals_a_loop_of_train(model_name: str, algo_name: str) -> None:
    model, algo = MODELS[model_name], ALGOS[algo_name]
    params = {k: v + np.float32(0.1) for k, v in model.init(0).items()}
    datas = ragged_clients()
    kw: dict[str, Any] = {}
    states: list[Any] = [None] * len(datas)
    if algo_name.startswith("scaffold"):
        kw["server_state"], states = scaffold_inputs(params, len(datas))
    many = algo.train_many(
        model, params, datas, rngs(len(datas)), epochs=EPOCHS, states=states, **kw
    )
    assert len(many) == len(datas)
    for i, (d, r) in enumerate(zip(datas, rngs(len(datas)), strict=True)):
        one = algo.train(model, params, d, r, epochs=EPOCHS[i], state=states[i], **kw)
        assert_same(one, many[i], f"client {i}")
    assert many[4][0].steps == 0 and many[0][0].steps == 0  # no epochs / no data


def test_train_many_default_epochs_and_no_states() -> None:
    model, algo = LogReg(5, 3), LocalSGD(epochs=2, batch_size=4, lr=0.1)
    params = model.init(0)
    datas = ragged_clients(1)
    many = algo.train_many(model, params, datas, rngs(len(datas)))
    for i, d in enumerate(datas):
        assert_same(algo.train(model, params, d, rngs(len(datas))[i]), many[i], f"client {i}")


def test_train_many_result_does_not_depend_on_the_other_clients() -> None:
    model, algo = MLP(5, (6,), 3), FedProx(mu=0.1, epochs=2, batch_size=4, lr=0.1)
    params = model.init(0)
    datas = ragged_clients(2)
    full = algo.train_many(model, params, datas, rngs(len(datas)))
    some = [1, 5, 8]
    part = algo.train_many(
        model, params, [datas[i] for i in some], [rngs(len(datas))[i] for i in some]
    )
    for j, i in enumerate(some):
        assert_same(full[i], part[j], f"client {i}")


def test_train_many_with_many_clients_in_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small groups and windows force several groups and several windows per group."""
    from fedagg.clients import _engine

    monkeypatch.setattr(_engine, "GROUP_CLIENTS", 7)
    monkeypatch.setattr(_engine, "WINDOW_BYTES", 4 * 10 * 5 * 4)  # four batches a window
    model, algo = LogReg(5, 3), LocalSGD(epochs=1, batch_size=10, lr=0.05)
    params = model.init(0)
    rng = np.random.default_rng(0)
    datas = [blobs(int(n), i, dim=5) for i, n in enumerate(rng.integers(1, 120, 40))]
    epochs = [int(e) for e in rng.integers(1, 4, 40)]
    many = algo.train_many(model, params, datas, rngs(40), epochs=epochs)
    for i, d in enumerate(datas):
        one = algo.train(model, params, d, rngs(40)[i], epochs=epochs[i])
        assert_same(one, many[i], f"client {i}")


def test_train_many_deltas_are_one_flat_row_per_client() -> None:
    """The aggregator can take a stacked client's delta without copying it."""
    model = MLP(5, (6,), 3)
    params = model.init(0)
    datas = ragged_clients()
    results = LocalSGD().train_many(model, params, datas, rngs(len(datas)))
    spec = fedagg.ParamSpec.from_arrays(params)
    res = results[2][0]
    flat = spec.as_flat(res.delta)
    assert all(np.shares_memory(flat, v) for v in res.delta.values())


def test_train_many_falls_back_to_a_loop_for_unstacked_models() -> None:
    class Plain:
        """Only the Model protocol (no loss_and_grad_stacked)."""

        def __init__(self) -> None:
            self.inner = LogReg(5, 3)
            self.name = "plain"

        def init(self, seed: int) -> Any:
            return self.inner.init(seed)

        def loss_and_grad(self, params: Any, x: Any, y: Any) -> Any:
            return self.inner.loss_and_grad(params, x, y)

        def evaluate(self, params: Any, x: Any, y: Any, batch: int = 4096) -> Any:
            return self.inner.evaluate(params, x, y, batch)

    model = Plain()
    algo = Scaffold(epochs=2, batch_size=4, lr=0.1)
    params = model.init(0)
    datas = ragged_clients()
    c, states = scaffold_inputs(params, len(datas))
    many = algo.train_many(model, params, datas, rngs(len(datas)), states=states, server_state=c)
    for i, d in enumerate(datas):
        one = algo.train(model, params, d, rngs(len(datas))[i], state=states[i], server_state=c)
        for k in params:  # the same code path: bit for bit
            np.testing.assert_array_equal(one[0].delta[k], many[i][0].delta[k])


def test_fedavg_rounds_with_train_many_reduce_the_loss() -> None:
    model = MLP(2, (8,), 3)
    datas = [blobs(20 + 10 * i, i) for i in range(8)]
    x = np.concatenate([d.x for d in datas])
    y = np.concatenate([d.y for d in datas])
    s = fedagg.strategies.fedavg()
    server = s.init(model.init(0))
    first, _ = model.evaluate(server.model, x, y)  # type: ignore[arg-type]
    algo = LocalSGD(epochs=1, batch_size=10, lr=0.1)
    for rnd in range(5):
        agg = s.begin(server)
        for i, (res, _) in enumerate(algo.train_many(model, server.model, datas, rngs(8, rnd))):  # type: ignore[arg-type]
            agg = s.aggregator.fold(
                agg, fedagg.Update(res.delta, res.num_examples, f"c{i}", server.version)
            )
        server = s.apply(server, agg)
    last, acc = model.evaluate(server.model, x, y)  # type: ignore[arg-type]
    assert last < 0.5 * first and acc > 0.9


@pytest.mark.parametrize("n", [1, 3, 8, 50])
def test_fixed_local_steps_take_exactly_k_steps_whatever_the_data_size(n: int) -> None:
    model = LogReg(2, 3)
    algo = LocalSGD(batch_size=4, lr=0.1, steps=6)
    res, _ = algo.train(model, model.init(0), blobs(n, 0), np.random.default_rng(0))
    assert res.steps == 6
    # what a simulator charges compute time for: the examples the 6 batches held
    per = -(-n // 4)
    assert res.work == (6 // per) * n + min((6 % per) * 4, n)
    assert res.work == {1: 6, 3: 18, 8: 24, 50: 24}[n]
    # and the steps follow the epoch permutations: with n = 8 and B = 4, steps 1-2 are the
    # first epoch, 3-4 the second... exactly what 3 epochs without a cap would do
    if n == 8:
        three, _ = LocalSGD(epochs=3, batch_size=4, lr=0.1).train(
            model, model.init(0), blobs(n, 0), np.random.default_rng(0)
        )
        assert all(np.array_equal(three.delta[k], res.delta[k]) for k in res.delta)
        assert three.work is None


def test_bad_fixed_steps_are_config_errors() -> None:
    for bad in (0, -1, 2.5, True):
        with pytest.raises(fedagg.ConfigError, match="steps"):
            LocalSGD(steps=bad)  # type: ignore[arg-type]
