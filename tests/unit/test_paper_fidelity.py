"""Defaults that follow the papers and reference code (issue 13, items 3, 4, 6 and 7).

Every expected value is worked out by hand in the comments, from the update rule the test
names:

* FedBuff (Nguyen et al., AISTATS 2022, Algorithm 1): ``x <- x + lr * sum_i s(tau_i) delta_i
  / K``, K the updates in the buffer. Not weighted by sample count.
* FedAMD (github.com/HarliWu/FedAMD, ``main_fmnist.py``): ``x <- x - lr * mean(D_i)`` over
  the miners, a plain mean. Its ``--pr`` is a probability, or for ``pr >= 2`` a period.
* FedAdagrad, paper flavor (Reddi et al., ICLR 2021): beta1 = 0.9 as for FedAdam and FedYogi.
  The flower flavor keeps Flower's FedAdagrad, whose beta1 is fixed at 0.
* SCAFFOLD: the server control variate c sent to the clients is a copy. A later server step
  must not change what was sent, and a client must not be able to change the server's c.
"""

from __future__ import annotations

from math import sqrt
from typing import Any

import numpy as np
import pytest

import fedagg
from fedagg import sim, strategies
from fedagg.errors import ConfigError
from tests.sim.test_async import Ctx
from tests.unit.test_known_answers import X0, two_steps

EXACT = fedagg.aggregators.mean("float64")


def arrival(
    job: int, client: int, delta: float, n: int, base: int = 0, **extra: Any
) -> sim.Arrival:
    up = fedagg.Update({"w": np.array([delta])}, weight=float(n), base_version=base)
    return sim.Arrival(1.0 + job, client, job, up, dict(extra))


def applied(actions: list[Any]) -> list[sim.Applied]:
    return [a for a in actions if isinstance(a, sim.Applied)]


# -- 3. FedBuff ------------------------------------------------------------------------------------
def fedbuff_two_steps(**kw: Any) -> tuple[float, float, tuple[float, ...]]:
    """Three clients train at once from x0 = 0, K = 2, restart on arrival, s(tau) =
    1/sqrt(1 + tau) (the default):

    * step 1 folds client 0 (n = 1, delta 1) and client 1 (n = 9, delta 0), both fresh;
    * step 2 folds client 2 (n = 4, delta 2), which trained from x0 (tau = 1), and client 1
      again (n = 9, delta 0), which restarted from x1 (tau = 0).

    Returns x1, x2 and step 2's effective weights."""
    st = strategies.fedavg(aggregator=EXACT)
    pol = sim.fedbuff(st, rounds=2, buffer=2, concurrency=3, **kw)
    ctx = Ctx(3)
    state = pol.init(st.init({"w": np.zeros(1)}), ctx)
    (start,) = pol.step(state, sim.Start(0.0), ctx)
    assert isinstance(start, sim.Dispatch) and start.clients == (0, 1, 2)  # jobs 0, 1, 2
    pol.step(state, arrival(0, 0, 1.0, 1), ctx)  # client 0 restarts at once: job 3, version 0
    pol.step(state, arrival(1, 1, 0.0, 9), ctx)  # buffer full: step 1; client 1 -> job 4
    x1 = float(state.server.params[0])
    assert state.server.version == 1 and state.jobs[4].client == 1
    pol.step(state, arrival(2, 2, 2.0, 4), ctx)  # trained from version 0: tau = 1
    (a,) = applied(pol.step(state, arrival(4, 1, 0.0, 9, base=1), ctx))
    assert a.stats.staleness_max == 1
    return x1, float(state.server.params[0]), a.stats.omega


def test_fedbuff_default_is_the_papers_mean_over_the_buffer() -> None:
    x1, x2, omega = fedbuff_two_steps()
    # step 1: (s(0)*1 + s(0)*0) / K = 1/2 (the sample counts 1 and 9 play no part)
    assert x1 == pytest.approx(0.5, rel=1e-15)
    # step 2: (s(1)*2 + s(0)*0) / 2 = 1/sqrt(2)
    assert x2 == pytest.approx(0.5 + 1 / sqrt(2), rel=1e-15)
    assert omega == pytest.approx((1 / sqrt(2) / 2, 1 / 2), rel=1e-15)


def test_fedbuff_sample_count_weighting_is_kept_as_weights_examples() -> None:
    x1, x2, omega = fedbuff_two_steps(weights="examples")
    # step 1: (1*1 + 9*0) / (1 + 9) = 0.1
    assert x1 == pytest.approx(0.1, rel=1e-15)
    # step 2: (4 * s(1) * 2 + 9 * 0) / (4 + 9) = 8 / (13 sqrt(2))
    assert x2 == pytest.approx(0.1 + 8 / (13 * sqrt(2)), rel=1e-15)
    assert omega == pytest.approx((4 / sqrt(2) / 13, 9 / 13), rel=1e-15)


def test_fedbuff_weights_from_a_config() -> None:
    base: dict[str, Any] = {
        "data": {"name": "digits", "num_clients": 4, "partition": "iid"},
        "policy": {"kind": "fedbuff", "buffer": 2, "concurrency": 3},
    }
    paper = sim.build(base).simulation.policy
    assert (paper.base, paper.normalize, paper.correction) == ("uniform", "participants", "none")
    base["policy"]["weights"] = "examples"
    old = sim.build(base).simulation.policy
    assert (old.base, old.normalize, old.correction) == ("examples", "participants", "none")
    with pytest.raises(ConfigError, match="'examples'"):  # only FedBuff (and FedAMD) have it
        sim.build({**base, "policy": {"kind": "fedfix", "weights": "examples"}})


# -- 4. FedAMD -------------------------------------------------------------------------------------
def fedamd_round(**kw: Any) -> tuple[float, tuple[float, ...]]:
    """Two clients, both sampled, never anchors after the initial pass (anchor_prob = 0): the
    miners send delta 1 (n = 1) and delta 0 (n = 9) from x0 = 0, server lr 1."""
    st = strategies.fedavg(aggregator=EXACT)
    pol = sim.FedAMDPolicy(st, rounds=1, clients_per_round=2, anchor_prob=0.0, **kw)
    ctx = Ctx(2)
    state = pol.init(st.init({"w": np.zeros(1)}), ctx)
    (init,) = pol.step(state, sim.Start(0.0), ctx)
    assert isinstance(init, sim.Dispatch) and init.server_extra == {"role": "anchor"}
    pol.step(state, arrival(0, 0, 0.3, 1, role="anchor"), ctx)
    acts = pol.step(state, arrival(1, 1, 0.5, 9, role="anchor"), ctx)
    (miners,) = [a for a in acts if isinstance(a, sim.Dispatch)]
    assert miners.clients == (0, 1) and miners.server_extra["role"] == "miner"
    assert miners.server_extra["direction"]["w"] == pytest.approx([0.4])  # (0.3 + 0.5) / 2
    pol.step(state, arrival(2, 0, 1.0, 1, role="miner"), ctx)
    (a,) = applied(pol.step(state, arrival(3, 1, 0.0, 9, role="miner"), ctx))
    return float(state.server.params[0]), a.stats.omega


def test_fedamd_default_is_the_references_plain_mean_of_the_miners() -> None:
    x1, omega = fedamd_round()
    assert x1 == pytest.approx(0.5, rel=1e-15)  # (1 + 0) / 2
    assert omega == (0.5, 0.5)


def test_fedamd_sample_count_weighting_is_kept_as_weights_examples() -> None:
    x1, omega = fedamd_round(weights="examples")
    assert x1 == pytest.approx(0.1, rel=1e-15)  # (1*1 + 9*0) / (1 + 9)
    assert omega == pytest.approx((0.1, 0.9), rel=1e-15)


def test_fedamd_refuses_a_period_of_one_in_which_the_model_never_moves() -> None:
    st = strategies.fedavg()
    with pytest.raises(ConfigError, match="never move"):
        sim.FedAMDPolicy(st, 5, 2, anchor_prob=1)
    with pytest.raises(ConfigError, match="weights"):
        sim.FedAMDPolicy(st, 5, 2, weights="unbiased")  # type: ignore[arg-type]
    sim.FedAMDPolicy(st, 5, 2, anchor_prob=2)  # the reference's period form, P >= 2


def test_fedamd_weights_from_a_config() -> None:
    cfg: dict[str, Any] = {
        "data": {"name": "digits", "num_clients": 4, "partition": "iid"},
        "client": {"algorithm": "fedamd"},
        "policy": {"kind": "fedamd", "clients_per_round": 2},
    }
    assert sim.build(cfg).simulation.policy.weights == "identical"
    cfg["policy"]["weights"] = "examples"
    assert sim.build(cfg).simulation.policy.weights == "examples"
    cfg["policy"]["anchor_prob"] = 1.0
    with pytest.raises(ConfigError, match="never move"):
        sim.build(cfg)


# -- 6. FedAdagrad ---------------------------------------------------------------------------------
# two_steps: x0 = (1, -2), d1 = (0.5, 0.1), d2 = (-0.2, 0.1) (tests/unit/test_known_answers.py)


def test_fedadagrad_paper_flavor_defaults_to_beta1_0_9() -> None:
    x1, x2 = two_steps(fedagg.optimizers.adagrad(1.0, tau=0.1, flavor="paper"))
    # m1 = 0.1 d1 = (0.05, 0.01); v1 = tau^2 + d1^2 = (0.26, 0.02)
    e1 = X0 + np.array([0.05 / (sqrt(0.26) + 0.1), 0.01 / (sqrt(0.02) + 0.1)])
    # m2 = 0.9 m1 + 0.1 d2 = (0.045 - 0.02, 0.009 + 0.01) = (0.025, 0.019); v2 = (0.30, 0.03)
    e2 = e1 + np.array([0.025 / (sqrt(0.30) + 0.1), 0.019 / (sqrt(0.03) + 0.1)])
    np.testing.assert_allclose(x1, e1, rtol=1e-13)
    np.testing.assert_allclose(x2, e2, rtol=1e-13)


def test_fedadagrad_flower_flavor_keeps_flowers_beta1_0() -> None:
    x1, x2 = two_steps(fedagg.optimizers.adagrad(1.0, tau=0.1, flavor="flower"))
    # m = d; v0 = 0: v1 = d1^2 = (0.25, 0.01), v2 = (0.29, 0.02)
    e1 = X0 + np.array([0.5 / (0.5 + 0.1), 0.1 / (0.1 + 0.1)])
    e2 = e1 + np.array([-0.2 / (sqrt(0.29) + 0.1), 0.1 / (sqrt(0.02) + 0.1)])
    np.testing.assert_allclose(x1, e1, rtol=1e-13)
    np.testing.assert_allclose(x2, e2, rtol=1e-13)


@pytest.mark.parametrize(("flavor", "beta1"), [("paper", 0.9), ("flower", 0.0)])
def test_fedadagrad_strategy_and_config_defaults(flavor: str, beta1: float) -> None:
    s = strategies.fedadagrad(flavor=flavor)  # type: ignore[arg-type]
    assert s.optimizer.hyperparams["beta1"] == beta1
    cfg = {"strategy": {"name": "fedadagrad", "flavor": flavor}}
    built = sim.build({**cfg, "data": {"name": "digits", "num_clients": 4, "partition": "iid"}})
    assert built.simulation.strategy.optimizer.hyperparams["beta1"] == beta1


def test_fedadagrad_config_beta1_is_used_by_the_paper_flavor_only() -> None:
    data = {"name": "digits", "num_clients": 4, "partition": "iid"}
    s = {"name": "fedadagrad", "beta1": 0.5}
    built = sim.build({"strategy": s, "data": data})
    assert built.simulation.strategy.optimizer.hyperparams["beta1"] == 0.5
    with pytest.raises(ConfigError, match="Flower"):
        sim.build({"strategy": {**s, "flavor": "flower"}, "data": data})


# -- 7. SCAFFOLD's server control variate ----------------------------------------------------------
def scaffold_round0() -> tuple[sim.SyncPolicy, sim.SyncState, Ctx, dict[str, np.ndarray]]:
    """N = 2, both clients every round, x0 = c0 = 0: round 0 dispatched, its c returned."""
    st = strategies.fedavg(aggregator=EXACT)
    pol = sim.SyncPolicy(st, rounds=2, clients_per_round=2, scaffold=True)
    ctx = Ctx(2)
    state = pol.init(st.init({"w": np.zeros(2)}), ctx)
    (d0,) = pol.step(state, sim.Start(0.0), ctx)
    assert isinstance(d0, sim.Dispatch) and d0.server_extra is not None
    assert d0.server_extra["w"].tolist() == [0.0, 0.0]
    return pol, state, ctx, d0.server_extra


def scaffold_arrival(job: int, client: int, dc: list[float]) -> sim.Arrival:
    up = fedagg.Update({"w": np.zeros(2)}, weight=1.0, base_version=0)
    return sim.Arrival(1.0 + job, client, job, up, {"delta_c": {"w": np.array(dc)}})


def test_scaffold_client_writing_into_its_c_does_not_change_the_servers() -> None:
    pol, state, ctx, sent = scaffold_round0()
    sent["w"] += 100.0
    assert state.control is not None and state.control["w"].tolist() == [0.0, 0.0]
    # round 0's clients send delta_c (1, 2) and (3, 4): c1 = ((1, 2) + (3, 4)) / N = (2, 3)
    pol.step(state, scaffold_arrival(0, 0, [1.0, 2.0]), ctx)
    pol.step(state, scaffold_arrival(1, 1, [3.0, 4.0]), ctx)
    assert state.control["w"].tolist() == [2.0, 3.0]


def test_scaffold_server_step_does_not_change_the_c_already_sent() -> None:
    pol, state, ctx, sent = scaffold_round0()
    pol.step(state, scaffold_arrival(0, 0, [1.0, 2.0]), ctx)
    acts = pol.step(state, scaffold_arrival(1, 1, [3.0, 4.0]), ctx)
    assert state.control is not None and state.control["w"].tolist() == [2.0, 3.0]
    assert sent["w"].tolist() == [0.0, 0.0]  # what round 0's clients were sent
    (d1,) = [a for a in acts if isinstance(a, sim.Dispatch)]  # round 1's clients: the new c
    assert d1.server_extra is not None and d1.server_extra["w"].tolist() == [2.0, 3.0]
    assert d1.server_extra["w"] is not state.control["w"]
