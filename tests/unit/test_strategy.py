"""Strategies: recipes compose an aggregator and an optimizer; rounds advance the version."""

from __future__ import annotations

import numpy as np
import pytest

import fedagg
from tests.conftest import make_model


def test_fedavg_round_equals_weighted_mean_of_client_models() -> None:
    model = make_model("dict", np.float64)
    s = fedagg.strategies.fedavg()
    server = s.init(model)
    rng = np.random.default_rng(0)
    clients = [{k: v + rng.standard_normal(v.shape) for k, v in model.items()} for _ in range(3)]
    ns = [10, 30, 60]
    ups = [
        fedagg.Update({k: c[k] - model[k] for k in model}, n, f"c{i}", base_version=0)
        for i, (c, n) in enumerate(zip(clients, ns, strict=True))
    ]
    server = s.round(server, ups)
    assert server.version == 1
    for k in model:
        expected = sum(n * c[k] for c, n in zip(clients, ns, strict=True)) / 100
        np.testing.assert_allclose(server.model[k], expected, rtol=1e-12)


def test_stale_update_refused_by_round() -> None:
    s = fedagg.strategies.fedavg()
    server = s.init(make_model("list"))
    spec = server.spec
    agg = s.begin(server)
    good = fedagg.Update([np.zeros_like(a) for a in spec.unflatten(spec.zeros())], 1.0, "a", 0)
    s.aggregator.fold(agg, good)
    server = s.apply(server, agg)
    agg = s.begin(server)
    with pytest.raises(fedagg.StaleUpdate, match="version 0"):
        s.aggregator.fold(agg, good)  # trained from version 0, the round aggregates version 1


def test_swapping_parts_is_an_argument() -> None:
    clipped = fedagg.strategies.fedadam(lr=0.05, pre=[fedagg.transforms.clip_norm(1.0)])
    assert isinstance(clipped.aggregator, fedagg.aggregators.Composed)
    exact = fedagg.strategies.fedyogi(aggregator=fedagg.aggregators.mean("float64"))
    assert exact.aggregator == fedagg.aggregators.mean("float64")
    assert exact.optimizer.name == "yogi"


def test_clipping_bounds_each_clients_influence() -> None:
    model = [np.zeros(4, np.float32)]
    s = fedagg.strategies.fedavg(pre=[fedagg.transforms.clip_norm(1.0)])
    server = s.init(model)
    huge = fedagg.Update([np.full(4, 100.0, np.float32)], 1.0, "loud")
    small = fedagg.Update([np.full(4, 0.1, np.float32)], 1.0, "quiet")
    server = s.round(server, [huge, small])
    # huge is clipped to norm 1: each coordinate 0.5; mean with 0.1 -> 0.3
    np.testing.assert_allclose(server.model[0], np.full(4, 0.3), rtol=1e-6)
    norm = fedagg.transforms.update_norm(server.spec, huge)
    assert norm == pytest.approx(200.0)


def test_clip_refuses_nonfinite_and_bad_max_norm() -> None:
    spec = fedagg.ParamSpec.from_arrays([np.zeros(3, np.float32)])
    clip = fedagg.transforms.clip_norm(1.0)
    with pytest.raises(fedagg.NonFiniteUpdate):
        clip(spec, fedagg.Update([np.array([1, np.inf, 0], np.float32)], 1.0, "x"))
    with pytest.raises(fedagg.ConfigError):
        fedagg.transforms.clip_norm(0.0)
    with pytest.raises(fedagg.ConfigError):
        fedagg.aggregators.compose()
    with pytest.raises(fedagg.ConfigError):
        fedagg.aggregators.compose(fedagg.aggregators.mean(), fedagg.aggregators.mean())


def test_server_state_round_trips_through_save_and_load(tmp_path: object) -> None:
    s = fedagg.strategies.fedadam(lr=0.1)
    server = s.init(make_model("dict"))
    rng = np.random.default_rng(3)
    for _ in range(3):
        d = rng.standard_normal(server.spec.size).astype(np.float32)
        server = s.round(server, [fedagg.Update(d, 5.0, "c", server.version)])
    blob = fedagg.dumps(server)
    back = fedagg.loads(blob)
    assert back.version == 3
    assert back.params.tobytes() == server.params.tobytes()
    assert fedagg.dumps(back) == blob


@pytest.mark.parametrize("blob", [b"", b"not a zip", fedagg.dumps(1.5)[:-10]])
def test_corrupt_state_raises_state_error(blob: bytes) -> None:
    with pytest.raises(fedagg.StateError):
        fedagg.loads(blob)


def test_unregistered_types_are_not_saved() -> None:
    with pytest.raises(fedagg.StateError):
        fedagg.dumps(object())
