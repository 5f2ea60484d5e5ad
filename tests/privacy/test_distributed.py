"""Accounting of distributed DP: the distributed discrete Gaussian, Skellam, and Poisson
subsampling of an RDP curve, checked against the Gaussian mechanism they approach."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedagg.errors import ConfigError
from fedagg.privacy import (
    rdp_distributed_discrete_gaussian,
    rdp_poisson_subsampled,
    rdp_skellam,
    rdp_subsampled_gaussian,
    rdp_to_epsilon,
)

ORDERS = [2, 3, 5, 10, 32, 64]


def test_one_client_discrete_gaussian_is_the_gaussian_rdp() -> None:
    # n = 1: tau = 0, RDP = a * l2^2 / (2 s^2), that of the continuous Gaussian
    rdp = rdp_distributed_discrete_gaussian(
        l2_sensitivity=3.0, local_stddev=6.0, clients=1, dim=1000, orders=ORDERS
    )
    np.testing.assert_allclose(rdp, np.array(ORDERS) * 9 / 72)


def test_many_clients_pay_tau_and_approach_the_central_gaussian() -> None:
    kw = {"l2_sensitivity": 10.0, "clients": 100, "dim": 1000, "orders": ORDERS}
    a = np.array(ORDERS, dtype=np.float64)
    # s = 2: tau ~ 1e-16, the central Gaussian's a l2^2 / (2 n s^2)
    rdp = rdp_distributed_discrete_gaussian(local_stddev=2.0, **kw)
    np.testing.assert_allclose(rdp, a * 100 / (2 * 100 * 4), rtol=1e-12)
    # s = 1: tau ~ 5.4e-4; the second bound, a/2 (S2^2 + 2 S1 tau + tau^2 d), is the least
    tau = 10 * sum(math.exp(-2 * math.pi**2 * k / (k + 1)) for k in range(1, 100))
    s1 = 10 * min(math.sqrt(1000), 10) / 10  # l1 = l2 min(sqrt(d), l2), over sqrt(n) s
    rdp = rdp_distributed_discrete_gaussian(local_stddev=1.0, **kw)
    np.testing.assert_allclose(rdp, a / 2 * (1 + 2 * s1 * tau + tau**2 * 1000), rtol=1e-12)
    # n = 2, s = 0.5: tau = 10 exp(-pi^2 / 4) is large enough to show in the first term
    tau = 10 * math.exp(-2 * (math.pi * 0.5) ** 2 / 2)
    small = rdp_distributed_discrete_gaussian(
        l2_sensitivity=1.0, local_stddev=0.5, clients=2, dim=1, orders=[2]
    )
    s2 = 1.0 / (math.sqrt(2) * 0.5)
    assert small[0] == pytest.approx(min(s2**2 + tau, s2**2 + 2 * s2 * tau + tau**2))


def test_skellam_approaches_the_gaussian_with_the_same_variance() -> None:
    for mu in (10.0, 1e4):
        rdp = rdp_skellam(l2_sensitivity=2.0, variance=mu, dim=100, orders=ORDERS)
        gauss = np.array(ORDERS) * 4 / (2 * mu)
        assert np.all(rdp > gauss)
    assert np.all(rdp <= gauss * 1.01)


def test_subsampling_bound_is_above_the_exact_subsampled_gaussian() -> None:
    sigma, q = 1.5, 0.05
    general = rdp_poisson_subsampled(lambda a: a / (2 * sigma**2), q, ORDERS)
    exact = rdp_subsampled_gaussian(sigma, q, ORDERS)
    assert np.all(general >= exact * (1 - 1e-12))
    assert np.all(general <= np.array(ORDERS) / (2 * sigma**2))
    assert general[0] < 0.1 * ORDERS[0] / (2 * sigma**2)  # amplification at low orders
    eps = rdp_to_epsilon(ORDERS, general * 500, 1e-5)[0]
    assert rdp_to_epsilon(ORDERS, exact * 500, 1e-5)[0] <= eps < math.inf


def test_bad_input_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        rdp_skellam(l2_sensitivity=1.0, variance=0.0, dim=1)
    with pytest.raises(ConfigError):
        rdp_distributed_discrete_gaussian(l2_sensitivity=1.0, local_stddev=1.0, clients=0, dim=1)
    with pytest.raises(ConfigError):
        rdp_poisson_subsampled(lambda a: 0.1, 0.0, [2])
    with pytest.raises(ConfigError):
        rdp_skellam(l2_sensitivity=1.0, variance=1.0, dim=1, orders=[1.5])
