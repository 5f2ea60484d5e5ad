"""fedagg.models: exact gradients, the stacked (many-clients) path, and the PyTorch adapter."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import fedagg
from fedagg.models import MLP, LogReg, Model, StackedModel

F64_MODELS = {
    "logreg": LogReg(5, 3, dtype=np.float64),
    "mlp1-relu": MLP(5, (4,), 3, dtype=np.float64),
    "mlp2-relu": MLP(5, (6, 4), 3, dtype=np.float64),
    "mlp2-tanh": MLP(5, (6, 4), 3, activation="tanh", dtype=np.float64),
}


def perturbed(model: Any, seed: int, scale: float = 0.5) -> dict[str, Any]:
    """The model's initial parameters plus noise (LogReg's init is all zeros)."""
    rng = np.random.default_rng(seed)
    params = model.init(seed)
    return {
        k: v + (scale * rng.standard_normal(v.shape)).astype(v.dtype) for k, v in params.items()
    }


def top2_margin(logits: Any) -> float:
    """The smallest gap between a row's largest and second largest logit (an accuracy compared
    exactly across two computations of the logits must not depend on a near-tie)."""
    top = np.sort(np.asarray(logits, np.float64), axis=1)
    return float((top[:, -1] - top[:, -2]).min())


def finite_difference(model: Any, params: dict[str, Any], x: Any, y: Any, h: float = 1e-6) -> Any:
    out = {}
    for k, v in params.items():
        g = np.zeros_like(v)
        for i in np.ndindex(v.shape):
            old = v[i]
            v[i] = old + h
            up, _ = model.loss_and_grad(params, x, y)
            v[i] = old - h
            down, _ = model.loss_and_grad(params, x, y)
            v[i] = old
            g[i] = (up - down) / (2 * h)
        out[k] = g
    return out


# --------------------------------------------------------------------------------------------
# Exact gradients
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(F64_MODELS))
def test_gradient_matches_central_finite_differences_in_float64(name: str) -> None:
    model = F64_MODELS[name]
    rng = np.random.default_rng(1)
    params = perturbed(model, 2)
    x = rng.standard_normal((7, 5))
    y = rng.integers(0, 3, 7)
    loss, grad = model.loss_and_grad(params, x, y)
    assert np.isfinite(loss)
    numeric = finite_difference(model, params, x, y)
    assert set(grad) == set(params)
    for k in params:
        assert grad[k].shape == params[k].shape
        assert grad[k].dtype == np.float64
        np.testing.assert_allclose(grad[k], numeric[k], rtol=1e-6, atol=1e-8, err_msg=k)


def test_loss_is_mean_cross_entropy() -> None:
    model = LogReg(4, 3, dtype=np.float64)
    rng = np.random.default_rng(0)
    params = perturbed(model, 0)
    x, y = rng.standard_normal((6, 4)), rng.integers(0, 3, 6)
    logits = x @ params["W"] + params["b"]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    expected = -np.mean(np.log(p[np.arange(6), y]))
    loss, _ = model.loss_and_grad(params, x, y)
    assert loss == pytest.approx(expected, rel=1e-12)


def test_float32_throughout_and_stable_for_huge_logits() -> None:
    model = MLP(3, (8,), 4)
    params = model.init(0)
    assert all(v.dtype == np.float32 for v in params.values())
    x = np.array([[1e4, -1e4, 3e4], [0.0, 0.0, 0.0]], dtype=np.float32)
    y = np.array([1, 2])
    loss, grad = model.loss_and_grad(params, x, y)  # warnings (overflow) are errors here
    assert np.isfinite(loss)
    assert all(g.dtype == np.float32 and np.all(np.isfinite(g)) for g in grad.values())
    big, _ = LogReg(3, 4).loss_and_grad(
        {"W": np.eye(3, 4, dtype=np.float32) * 1e4, "b": np.zeros(4, np.float32)}, x, y
    )
    assert np.isfinite(big) and big > 1e3  # a confidently wrong prediction costs a lot


def test_init_is_deterministic_with_he_and_glorot_scales() -> None:
    model = MLP(200, (300, 50), 10)
    a, b, c = model.init(3), model.init(3), model.init(4)
    assert list(a) == ["W1", "b1", "W2", "b2", "W3", "b3"]
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["W1"], c["W1"])
    assert a["W1"].std() == pytest.approx(np.sqrt(2 / 200), rel=0.05)  # He normal
    assert np.abs(a["W3"]).max() <= np.sqrt(6 / 60)  # Glorot uniform output layer
    assert not a["b1"].any()
    zeros = LogReg(6, 3).init(9)
    assert zeros["W"].shape == (6, 3) and zeros["b"].shape == (3,) and not zeros["W"].any()


def test_evaluate_matches_loss_and_accuracy_whatever_the_batch() -> None:
    model = MLP(5, (7,), 3, activation="tanh")
    rng = np.random.default_rng(0)
    params = perturbed(model, 0)
    x = rng.standard_normal((50, 5)).astype(np.float32)
    y = rng.integers(0, 3, 50)
    loss, _ = model.loss_and_grad(params, x, y)
    w1, b1, w2, b2 = params["W1"], params["b1"], params["W2"], params["b2"]
    logits = np.tanh(x @ w1 + b1) @ w2 + b2
    pred = logits.argmax(axis=1)
    # Each batch size multiplies in another BLAS grouping (and tanh's last bit depends on the
    # CPU's SIMD): the exact accuracy is machine-free only if no prediction is a near-tie.
    assert top2_margin(logits) > 1e-3
    for batch in (1, 7, 50, 4096):
        ev_loss, acc = model.evaluate(params, x, y, batch=batch)
        assert ev_loss == pytest.approx(loss, rel=1e-5)
        assert acc == pytest.approx(np.mean(pred == y))


@pytest.mark.parametrize(
    "build",
    [
        lambda: LogReg(0, 3),
        lambda: LogReg(3, 3, dtype=np.int32),
        lambda: MLP(3, (), 2),
        lambda: MLP(3, (4, 0), 2),
        lambda: MLP(3, (4,), 2, activation="gelu"),  # type: ignore[arg-type]
    ],
)
def test_bad_model_arguments_raise_config_error(build: Any) -> None:
    with pytest.raises(fedagg.ConfigError):
        build()


def test_bad_batches_raise_config_error() -> None:
    model = LogReg(3, 2)
    params = model.init(0)
    x = np.zeros((2, 3), np.float32)
    for bad_x, bad_y in [
        (x, np.array([0, 2])),  # label out of range
        (x, np.array([0, -1])),  # negative label (would silently wrap)
        (x, np.array([0.0, 1.0])),  # float labels
        (np.zeros((2, 4), np.float32), np.array([0, 1])),  # wrong feature count
        (np.zeros((0, 3), np.float32), np.zeros(0, np.int64)),  # empty batch
    ]:
        with pytest.raises(fedagg.ConfigError):
            model.loss_and_grad(params, bad_x, bad_y)
    with pytest.raises(fedagg.ConfigError, match="missing"):
        model.loss_and_grad({"W": params["W"]}, x, np.array([0, 1]))
    with pytest.raises(fedagg.ConfigError, match="shape"):
        model.loss_and_grad({"W": params["W"].T, "b": params["b"]}, x, np.array([0, 1]))


def test_models_satisfy_the_protocols() -> None:
    for model in (LogReg(3, 2), MLP(3, (4,), 2)):
        assert isinstance(model, StackedModel)
        m: Model = model
        assert m.name in ("logreg", "mlp")


def test_importing_models_does_not_import_torch() -> None:
    code = "import sys, fedagg.models, fedagg.clients; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------
# Stacked: many clients at once
# --------------------------------------------------------------------------------------------

STACKABLE = {
    "logreg": LogReg(6, 4),
    "mlp1": MLP(6, (5,), 4),
    "mlp2-tanh": MLP(6, (5, 3), 4, activation="tanh"),
}


def stacked_case(model: Any, clients: int, batch: int, seed: int) -> tuple[Any, ...]:
    rng = np.random.default_rng(seed)
    per = [perturbed(model, seed + c) for c in range(clients)]
    stacked = {k: np.stack([p[k] for p in per]) for k in per[0]}
    xb = rng.standard_normal((clients, batch, 6)).astype(np.float32)
    yb = rng.integers(0, 4, (clients, batch))
    return per, stacked, xb, yb


@pytest.mark.parametrize("name", sorted(STACKABLE))
@given(
    clients=st.integers(1, 6),
    batch=st.integers(1, 12),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_stacked_gradients_equal_per_client_gradients(
    name: str, clients: int, batch: int, seed: int, data: st.DataObject
) -> None:
    model = STACKABLE[name]
    per, stacked, xb, yb = stacked_case(model, clients, batch, seed)
    mask = np.array(
        data.draw(
            st.lists(
                st.lists(st.booleans(), min_size=batch, max_size=batch),
                min_size=clients,
                max_size=clients,
            )
        )
    )
    losses, grads = model.loss_and_grad_stacked(stacked, xb, yb, mask)
    assert losses.shape == (clients,) and losses.dtype == np.float32
    for c in range(clients):
        if not mask[c].any():  # a client with no valid example: loss 0, gradient 0
            assert losses[c] == 0
            assert all(not g[c].any() for g in grads.values())
            continue
        loss, grad = model.loss_and_grad(per[c], xb[c][mask[c]], yb[c][mask[c]])
        # float32 round-off: a batched product may accumulate in another order than a single one
        assert losses[c] == pytest.approx(loss, rel=1e-5, abs=1e-6)
        for k in grad:
            assert grads[k].dtype == np.float32
            np.testing.assert_allclose(grads[k][c], grad[k], rtol=1e-5, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("name", sorted(STACKABLE))
def test_masked_examples_do_not_contribute(name: str) -> None:
    model = STACKABLE[name]
    _, stacked, xb, yb = stacked_case(model, 3, 8, 5)
    mask = np.ones((3, 8), dtype=bool)
    mask[0, 5:] = False
    mask[2, :] = False
    before = model.loss_and_grad_stacked(stacked, xb, yb, mask)
    xb2, yb2 = xb.copy(), yb.copy()
    xb2[~mask] = 1e3  # anything finite in the masked slots
    yb2[~mask] = 3
    after = model.loss_and_grad_stacked(stacked, xb2, yb2, mask)
    np.testing.assert_array_equal(before[0], after[0])
    for k in before[1]:
        np.testing.assert_array_equal(before[1][k], after[1][k])


def test_stacked_large_batch_path_matches_per_client() -> None:
    """Enough rows to take the column-loop reductions (the fast path for big stacks)."""
    model = LogReg(6, 4)
    per, stacked, xb, yb = stacked_case(model, 120, 10, 0)
    mask = np.ones((120, 10), dtype=bool)
    mask[::7, 4:] = False
    losses, grads = model.loss_and_grad_stacked(stacked, xb, yb, mask)
    for c in (0, 1, 7, 119):
        loss, grad = model.loss_and_grad(per[c], xb[c][mask[c]], yb[c][mask[c]])
        assert losses[c] == pytest.approx(loss, rel=1e-5, abs=1e-6)
        for k in grad:
            np.testing.assert_allclose(grads[k][c], grad[k], rtol=1e-5, atol=1e-6)


def test_stacked_shape_errors() -> None:
    model = LogReg(6, 4)
    _, stacked, xb, yb = stacked_case(model, 3, 5, 0)
    with pytest.raises(fedagg.ConfigError, match="mask"):
        model.loss_and_grad_stacked(stacked, xb, yb, np.ones((3, 4), dtype=bool))
    with pytest.raises(fedagg.ConfigError, match="clients"):
        model.loss_and_grad_stacked(stacked, xb[:2], yb[:2], np.ones((2, 5), dtype=bool))
    with pytest.raises(fedagg.ConfigError):
        model.loss_and_grad_stacked(stacked, xb[0], yb[0], np.ones(5, dtype=bool))


# --------------------------------------------------------------------------------------------
# PyTorch adapter
# --------------------------------------------------------------------------------------------


def test_torch_params_round_trip() -> None:
    torch = pytest.importorskip("torch")
    from fedagg.models.torch import load_params, to_params

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5), torch.nn.ReLU(), torch.nn.Linear(5, 2)
    )
    params = to_params(net)
    # Float parameters only, by their names; BatchNorm's buffers (running stats and the
    # integer num_batches_tracked) are not parameters.
    assert list(params) == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
    assert all(v.dtype == np.float32 for v in params.values())
    assert params["0.weight"].shape == (5, 4)
    new = {k: (v + 1).astype(np.float32) for k, v in params.items()}
    new["3.bias"].flags.writeable = False  # read-only input arrays are fine too
    load_params(net, new)
    back = to_params(net)
    for k in params:
        np.testing.assert_array_equal(back[k], new[k])
    back["0.weight"][:] = 0  # to_params copies: the module is untouched
    assert to_params(net)["0.weight"].any()
    with pytest.raises(fedagg.ConfigError, match="missing"):
        load_params(net, {k: v for k, v in new.items() if k != "0.bias"})
    with pytest.raises(fedagg.ConfigError, match="shape"):
        load_params(net, {**new, "0.weight": new["0.weight"].T})


def test_torch_gradient_agrees_with_numpy_logreg() -> None:
    torch = pytest.importorskip("torch")
    from fedagg.models.torch import TorchModel, to_params

    torch.manual_seed(1)
    linear = torch.nn.Linear(6, 4)
    model = TorchModel(linear)
    params = to_params(linear)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 6)).astype(np.float32)
    y = rng.integers(0, 4, 9)
    loss, grad = model.loss_and_grad(params, x, y)
    as_logreg = {"W": params["weight"].T.copy(), "b": params["bias"]}
    ref_loss, ref = LogReg(6, 4).loss_and_grad(as_logreg, x, y)
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    np.testing.assert_allclose(grad["weight"].T, ref["W"], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grad["bias"], ref["b"], rtol=1e-5, atol=1e-7)
    ev = model.evaluate(params, x, y, batch=4)
    ref_ev = LogReg(6, 4).evaluate(as_logreg, x, y)
    # torch and numpy multiply with different kernels: equal accuracies need no near-tie
    assert top2_margin(x @ as_logreg["W"] + as_logreg["b"]) > 1e-3
    assert ev[0] == pytest.approx(ref_ev[0], rel=1e-6) and ev[1] == ref_ev[1]
    a, b = model.init(7), model.init(7)
    assert all(np.array_equal(a[k], b[k]) for k in a) and model.name == "torch:Linear"


def test_fedavg_rounds_with_the_torch_adapter_reduce_the_loss() -> None:
    torch = pytest.importorskip("torch")
    from fedagg.clients import FedProx, LocalSGD, Scaffold
    from fedagg.models.torch import TorchModel
    from tests.unit.test_clients import Examples, blobs

    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    model = TorchModel(net)
    datas = [blobs(30 + 5 * c, seed=c) for c in range(4)]
    x = np.concatenate([d.x for d in datas])
    y = np.concatenate([d.y for d in datas])
    for algo in (
        LocalSGD(epochs=2, batch_size=8, lr=0.1),
        FedProx(0.1, 2, 8, 0.1),
        Scaffold(2, 8, 0.1),
    ):
        s = fedagg.strategies.fedavg()
        server = s.init(model.init(0))
        first, _ = model.evaluate(server.model, x, y)  # type: ignore[arg-type]
        states: list[Any] = [None] * len(datas)
        for rnd in range(3):
            rngs = [np.random.default_rng((rnd, c)) for c in range(len(datas))]
            results = algo.train_many(model, server.model, datas, rngs, states=states)  # type: ignore[arg-type]
            agg = s.begin(server)
            for c, (res, state) in enumerate(results):
                states[c] = state
                up = fedagg.Update(res.delta, res.num_examples, f"c{c}", server.version)
                agg = s.aggregator.fold(agg, up)
            server = s.apply(server, agg)
        last, acc = model.evaluate(server.model, x, y)  # type: ignore[arg-type]
        assert last < 0.8 * first, algo.name
        assert acc > 0.8
    assert isinstance(datas[0], Examples)
