"""The conformance suite every server optimizer passes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import fedagg
from tests.conftest import make_model

OPTIMIZERS: dict[str, Callable[[], fedagg.optimizers.ServerOptimizer]] = {
    "sgd": lambda: fedagg.optimizers.sgd(0.5),
    "momentum": lambda: fedagg.optimizers.momentum(1.0, 0.9),
    "adam-paper": lambda: fedagg.optimizers.adam(0.1, flavor="paper"),
    "adam-flower": lambda: fedagg.optimizers.adam(0.1, 0.9, 0.99, 1e-9, flavor="flower"),
    "yogi-paper": lambda: fedagg.optimizers.yogi(0.01, flavor="paper"),
    "yogi-flower": lambda: fedagg.optimizers.yogi(0.01, flavor="flower"),
    "adagrad-paper": lambda: fedagg.optimizers.adagrad(0.1, flavor="paper"),
    "adagrad-flower": lambda: fedagg.optimizers.adagrad(0.1, tau=1e-9, flavor="flower"),
}


@pytest.fixture(params=sorted(OPTIMIZERS))
def opt(request: pytest.FixtureRequest) -> fedagg.optimizers.ServerOptimizer:
    return OPTIMIZERS[request.param]()


def deltas(spec: fedagg.ParamSpec, n: int, seed: int = 0) -> list[Any]:
    rng = np.random.default_rng(seed)
    return [spec.unflatten(rng.standard_normal(spec.size).astype(spec.dtype)) for _ in range(n)]


def run(opt: fedagg.optimizers.ServerOptimizer, params: Any, ds: list[Any]) -> tuple[Any, Any]:
    state = opt.init(params)
    for d in ds:
        params, state = opt.step(state, params, d)
    return params, state


@pytest.mark.parametrize("kind", ["dict", "list"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_keeps_structure_shapes_and_dtype(opt: Any, kind: str, dtype: Any) -> None:
    params = make_model(kind, dtype)
    spec = fedagg.ParamSpec.from_arrays(params)
    out, state = run(opt, params, deltas(spec, 3))
    assert type(out) is type(params)
    assert fedagg.ParamSpec.from_arrays(out) == spec
    assert state.count == 3


def test_flat_params_work(opt: Any) -> None:
    params = np.linspace(-1, 1, 11, dtype=np.float32)
    state = opt.init(params)
    new, state = opt.step(state, params, np.full(11, 0.1, np.float32))
    assert isinstance(new, np.ndarray)
    assert new.shape == params.shape
    assert new.dtype == params.dtype


def test_moves_params_along_a_positive_delta(opt: Any) -> None:
    params = [np.zeros(5, np.float32)]
    out, _ = run(opt, params, [[np.full(5, 0.3, np.float32)]])
    assert np.all(out[0] > 0), "delta = client - global: a positive delta must raise the params"


def test_zero_delta_from_rest_keeps_params(opt: Any) -> None:
    params = make_model("list")
    out, _ = run(opt, params, [[np.zeros_like(p) for p in params]])
    for a, b in zip(out, params, strict=True):
        np.testing.assert_array_equal(a, b)


def test_does_not_mutate_inputs(opt: Any) -> None:
    params = make_model("dict")
    spec = fedagg.ParamSpec.from_arrays(params)
    p_copy = {k: v.copy() for k, v in params.items()}
    d = deltas(spec, 1)[0]
    d_copy = {k: v.copy() for k, v in d.items()}
    state = opt.init(params)
    opt.step(state, params, d)
    for k in params:
        np.testing.assert_array_equal(params[k], p_copy[k])
        np.testing.assert_array_equal(d[k], d_copy[k])


def test_deterministic(opt: Any) -> None:
    params = make_model("dict")
    spec = fedagg.ParamSpec.from_arrays(params)
    a, _ = run(opt, params, deltas(spec, 5, seed=2))
    b, _ = run(opt, params, deltas(spec, 5, seed=2))
    assert spec.as_flat(a).tobytes() == spec.as_flat(b).tobytes()


def test_state_save_load_continues_bit_exactly(opt: Any, tmp_path: Any) -> None:
    params = make_model("dict")
    spec = fedagg.ParamSpec.from_arrays(params)
    ds = deltas(spec, 6, seed=7)
    p, state = run(opt, params, ds[:3])
    fedagg.save(tmp_path / "opt.npz", state)
    loaded = fedagg.load(tmp_path / "opt.npz")
    pa, pb = p, p
    for d in ds[3:]:
        pa, state = opt.step(state, pa, d)
        pb, loaded = opt.step(loaded, pb, d)
    assert spec.as_flat(pa).tobytes() == spec.as_flat(pb).tobytes()


def test_refuses_params_of_another_spec(opt: Any) -> None:
    params = make_model("dict")
    state = opt.init(params)
    wrong = {k: v.astype(np.float64) for k, v in params.items()}
    with pytest.raises(fedagg.SpecError):
        opt.step(state, wrong, wrong)
    with pytest.raises(fedagg.SpecError):
        opt.step(state, params, [np.zeros(3, np.float32)])


@pytest.mark.parametrize(
    "make",
    [
        lambda: fedagg.optimizers.sgd(0.0),
        lambda: fedagg.optimizers.sgd(float("nan")),
        lambda: fedagg.optimizers.momentum(1.0, 1.0),
        lambda: fedagg.optimizers.momentum(1.0, -0.1),
        lambda: fedagg.optimizers.adam(0.1, beta1=1.5),
        lambda: fedagg.optimizers.adam(0.1, tau=0.0),
        lambda: fedagg.optimizers.yogi(0.1, flavor="tf"),  # type: ignore[arg-type]
        lambda: fedagg.optimizers.adagrad(-1.0),
    ],
)
def test_bad_hyperparameters_raise_config_error(make: Callable[[], Any]) -> None:
    with pytest.raises(fedagg.ConfigError):
        make()
