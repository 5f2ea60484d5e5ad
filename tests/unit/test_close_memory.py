"""A round's close in place: the donated aggregate becomes the delta, the step and the new
parameters (one model-sized buffer for the whole close), with the bits of the copying path."""

from __future__ import annotations

import tracemalloc
from typing import Any

import numpy as np
import pytest

import fedagg
from fedagg.core.aggregate import MeanState, donate
from fedagg.core.optim import adagrad, adam, momentum, sgd, yogi
from fedagg.errors import StateError

OPTIMIZERS = {
    "fedavg": lambda: fedagg.strategies.fedavg(),
    "sgd-lr": lambda: fedagg.strategies.fedavg(lr=0.3),
    "fedavgm": lambda: fedagg.strategies.fedavgm(lr=0.7, momentum=0.9),
    "fedadam": lambda: fedagg.strategies.fedadam(lr=0.1),
    "fedadam-flower": lambda: fedagg.strategies.fedadam(lr=0.1, flavor="flower"),
    "fedyogi": lambda: fedagg.strategies.fedyogi(),
    "fedadagrad": lambda: fedagg.strategies.fedadagrad(flavor="flower"),
    "f64-acc": lambda: fedagg.strategies.fedadam(aggregator=fedagg.aggregators.mean("float64")),
    "clip": lambda: fedagg.strategies.fedavg(pre=[fedagg.transforms.clip_norm(3.0)]),
}


def _updates(n: int, size: int, seed: int) -> list[fedagg.Update]:
    rng = np.random.default_rng(seed)
    return [
        fedagg.Update(
            [(rng.standard_normal(size) * 10.0 ** rng.integers(-3, 2)).astype(np.float32)],
            float(rng.integers(1, 50)),
            f"c{i}",
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("size", [1000, 200_003])  # numpy kernels; numba (streaming) kernels
def test_a_donated_close_gives_the_bits_of_a_copying_one(name: str, size: int) -> None:
    runs = []
    for donated in (False, True):
        s = OPTIMIZERS[name]()
        rng = np.random.default_rng(1)
        server = s.init([rng.standard_normal(size).astype(np.float32)])
        for r in range(3):
            agg = s.begin(server)
            for u in _updates(4, size, 10 * r):
                s.aggregator.fold(agg, u)
            old = server.params.copy()
            held = server.params
            server = s.apply(server, agg, scale=0.9 if r == 1 else 1.0, donate=donated)
            assert np.array_equal(held, old)  # the old parameters are never written
        runs.append((server.params, fedagg.dumps(server.opt)))
    assert np.array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]  # the optimizer state too, to the bit


def test_a_donated_state_is_spent() -> None:
    s = fedagg.strategies.fedavg()
    server = s.init([np.zeros(10, np.float32)])
    agg = s.begin(server)
    s.aggregator.fold(agg, fedagg.Update([np.ones(10, np.float32)], 1.0, "a", 0))
    s.apply(server, agg, donate=True)
    assert isinstance(agg, MeanState) and agg.acc.size == 0
    with pytest.raises(StateError, match="finalized in place"):
        s.aggregator.fold(agg, fedagg.Update([np.ones(10, np.float32)], 1.0, "b", 0))
    with pytest.raises(StateError, match="finalized in place"):
        s.aggregator.finalize_flat(agg)
    other = s.begin(server)
    with pytest.raises(StateError, match="finalized in place"):
        s.aggregator.merge(other, agg)


def test_a_donated_empty_state_raises_empty_and_stays_usable() -> None:
    s = fedagg.strategies.fedavg()
    server = s.init([np.zeros(10, np.float32)])
    agg = s.begin(server)
    donate(agg)
    with pytest.raises(fedagg.EmptyAggregate):
        s.apply(server, agg, donate=True)
    s.aggregator.fold(agg, fedagg.Update([np.ones(10, np.float32)], 2.0, "a", 0))
    assert s.apply(server, agg, donate=True).params.tolist() == [1.0] * 10


@pytest.mark.parametrize("opt", [sgd(0.5), momentum(0.5), adam(), yogi(), adagrad()])
@pytest.mark.parametrize("form", ["flat", "list", "view"])
def test_an_optimizer_step_leaves_the_callers_delta_alone(opt: Any, form: str) -> None:
    rng = np.random.default_rng(3)
    params = rng.standard_normal(100).astype(np.float32)
    flat = rng.standard_normal(100).astype(np.float32)
    delta: Any = flat
    if form == "list":
        delta = [flat[:40].copy(), flat[40:].copy()]
        params_t: Any = [params[:40].copy(), params[40:].copy()]
    elif form == "view":  # a list of consecutive views of one buffer: as_flat returns it
        delta = [flat[:40], flat[40:]]
        params_t = [params[:40].copy(), params[40:].copy()]
    else:
        params_t = params
    before = flat.copy()
    state = opt.init(params_t)
    new, _ = opt.step(state, params_t, delta)
    assert np.array_equal(flat, before)
    if form == "list":
        assert [a.tolist() for a in delta] == [before[:40].tolist(), before[40:].tolist()]
    ref_state = opt.init(params)
    want, _ = opt.step(ref_state, params, before.copy(), donate=True)
    got = np.concatenate(new) if isinstance(new, list) else new
    assert np.array_equal(got, want)


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam"])
def test_a_donated_close_allocates_nothing_model_sized(name: str) -> None:
    n = 1 << 21  # 8 MiB of float32
    s = OPTIMIZERS[name]()
    server = s.init([np.full(n, 0.5, np.float32)])
    agg = s.begin(server)
    for u in _updates(2, n, 5):
        s.aggregator.fold(agg, u)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        server = s.apply(server, agg, donate=True)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < n * 4 // 8, f"{peak / (n * 4):.2f} models allocated by the close"
