"""Staleness functions and participation weights (FedAU and its baselines): pure math."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedagg
from fedagg import staleness, weighting
from fedagg.errors import ConfigError, StateError


# -- staleness ---------------------------------------------------------------------------------
def test_staleness_functions_match_their_formulas() -> None:
    assert staleness.constant()(7) == 1.0
    assert staleness.polynomial(0.5)(3) == pytest.approx(0.5)
    assert staleness.fedbuff_staleness()(8) == pytest.approx(1 / 3)
    h = staleness.hinge(a=10, b=4)
    assert [h(t) for t in (0, 4)] == [1.0, 1.0]
    assert h(5) == pytest.approx(1 / 11)
    assert h(6) == pytest.approx(1 / 21)


@given(st.integers(0, 10_000), st.floats(0, 3), st.floats(0, 20), st.floats(0, 20))
def test_staleness_is_in_0_1_nonincreasing_and_1_when_fresh(
    tau: int, a: float, ha: float, hb: float
) -> None:
    for s in (staleness.polynomial(a), staleness.hinge(ha, hb), staleness.constant()):
        assert s(0) == 1.0
        assert 0 < s(tau + 1) <= s(tau) <= 1.0


def test_bad_staleness_parameters_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="staleness must be"):
        staleness.Staleness("exponential")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="a must be"):
        staleness.polynomial(-1)
    with pytest.raises(ConfigError, match="b must be"):
        staleness.hinge(1, math.nan)
    with pytest.raises(ValueError, match="negative"):
        staleness.constant()(-1)


# -- FedAU's interval estimator ----------------------------------------------------------------
def test_estimator_follows_the_reference_procedure_by_hand() -> None:
    est = weighting.IntervalEstimator(cutoff=3)
    s = est.init(2)
    # client 0 participates in rounds 0, 2, (3 misses -> censored 3), 7
    pattern = [[0], [], [0], [], [], [], [], [0]]
    seen = []
    for part in pattern:
        if part:
            seen.append(float(est.weights(s, [0])[0]))  # weight uses intervals before the round
        est.observe(s, part)
    # r0: first participation -> 1, records 1. r2: mean(1)=1, records 2.
    # r3..r5: counter 1,2,3 -> censored 3 recorded at r5; r6 counter 1; r7: mean(1,2,3)=2,
    # then records 2 -> mean 2.
    assert seen == [1.0, 1.0, 2.0]
    assert s.count[0] == 4 and s.mean[0] == pytest.approx(2.0)
    # client 1 never participates: censored intervals of length 3 only
    assert s.count[1] == 2 and s.mean[1] == 3.0
    assert float(est.weights(s, [1])[0]) == 3.0


@pytest.mark.parametrize(("p", "cutoff"), [(0.1, 100_000), (0.3, 100_000), (0.1, 5), (0.5, 2)])
def test_estimator_tends_to_the_closed_form_limit_under_bernoulli(p: float, cutoff: int) -> None:
    n, rounds = 400, 3000
    est = weighting.IntervalEstimator(cutoff)
    s = est.init(n)
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        est.observe(s, np.flatnonzero(rng.random(n) < p))
    limit = weighting.interval_limit(p, cutoff)
    if cutoff > 10_000:
        assert limit == pytest.approx(1 / p)
    got = est.weights(s, np.arange(n))
    # the average over clients of each client's sample mean: tight around E[min(G, K)]
    assert got.mean() == pytest.approx(limit, rel=0.02)
    # and each client alone is within a few standard errors
    assert np.median(np.abs(got - limit) / limit) < 0.1


def test_interval_limit_closed_form() -> None:
    assert weighting.interval_limit(1.0, 5) == 1.0
    assert weighting.interval_limit(0.5, 1) == 1.0
    assert weighting.interval_limit(0.5, 2) == pytest.approx(1.5)  # E[min(G,2)] = 1 + 1/2
    with pytest.raises(ConfigError):
        weighting.interval_limit(0.0, 5)


@settings(max_examples=50)
@given(st.lists(st.lists(st.integers(0, 4), max_size=5), min_size=1, max_size=40))
def test_estimator_weights_stay_in_1_to_cutoff(rounds: list[list[int]]) -> None:
    est = weighting.IntervalEstimator(cutoff=6)
    s = est.init(5)
    for part in rounds:
        est.observe(s, sorted(set(part)))
        w = est.weights(s, np.arange(5))
        assert np.all((w >= 1.0) & (w <= 6.0))
    s.check()


def test_estimator_state_checkpoints_and_rejects_tampering() -> None:
    est = weighting.IntervalEstimator(cutoff=4)
    s = est.init(3)
    est.observe(s, [1])
    back = fedagg.loads(fedagg.dumps(s))
    assert np.array_equal(back.mean, s.mean) and np.array_equal(back.counter, s.counter)
    s.count[0] = -1
    with pytest.raises(StateError):
        fedagg.loads(fedagg.dumps(s))


def test_bad_estimator_inputs_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="cutoff"):
        weighting.IntervalEstimator(0)
    with pytest.raises(ConfigError, match="num_clients"):
        weighting.IntervalEstimator().init(0)
    with pytest.raises(ConfigError, match="known probabilities"):
        weighting.known([0.5, 0.0])
    w = weighting.known([0.5, 0.25])
    with pytest.raises(ConfigError, match="for 2 clients"):
        w.init(3)


# -- weightings: the normaliser ------------------------------------------------------------------
def test_weightings_give_the_papers_sums() -> None:
    n_clients = 4
    cases = {
        "examples": (weighting.examples(), [10.0, 30.0], 1.0),
        "participating": (weighting.participating(), [1.0, 1.0], 1.0),
        "all": (weighting.all_clients(), [1.0, 1.0], 2 / 4),
        "known": (weighting.known([0.5, 0.25, 1.0, 1.0]), [2.0, 4.0], 6 / 4),
    }
    for name, (w, want_weights, want_mass) in cases.items():
        state = w.init(n_clients)
        got = [w.weight(state, c, ex) for c, ex in ((0, 10.0), (1, 30.0))]
        assert got == want_weights, name
        assert w.mass(state, got, n_clients) == pytest.approx(want_mass), name
    au = weighting.fedau()
    state = au.init(n_clients)
    assert au.weight(state, 0, 99.0) == 1.0  # first participation
    au.observe(state, [0])
    au.observe(state, [])
    au.observe(state, [0])  # interval 2 recorded
    assert au.weight(state, 0, 1.0) == pytest.approx(1.5)  # mean(1, 2)
    assert au.mass(state, [1.5, 1.0], n_clients) == pytest.approx(2.5 / 4)
