"""Known-answer tests for the server optimizers, both flavors, computed by hand.

Two coordinates, float64, x0 = (1, -2). Round 1 delta d1 = (0.5, 0.1); round 2 d2 = (-0.2, 0.1).
beta1 = 0.9, beta2 = 0.99, tau = 0.1, lr = 1 unless a test says otherwise. Each expected value
is written out as the arithmetic of the update rule (Reddi et al. 2021; Flower 1.42).
"""

from __future__ import annotations

from math import sqrt

import numpy as np
import pytest

import fedagg

X0 = np.array([1.0, -2.0])
D1 = np.array([0.5, 0.1])
D2 = np.array([-0.2, 0.1])


def two_steps(opt: fedagg.optimizers.ServerOptimizer) -> tuple[np.ndarray, np.ndarray]:
    state = opt.init([X0])
    (x1,), state = opt.step(state, [X0], [D1])
    (x2,), state = opt.step(state, [x1], [D2])
    return x1, x2


def test_fedavgm() -> None:
    x1, x2 = two_steps(fedagg.optimizers.momentum(lr=1.0, beta=0.9))
    # v1 = d1 = (0.5, 0.1); v2 = 0.9*v1 + d2 = (0.45-0.2, 0.09+0.1) = (0.25, 0.19)
    np.testing.assert_allclose(x1, [1.5, -1.9], rtol=1e-14)
    np.testing.assert_allclose(x2, [1.75, -1.71], rtol=1e-14)


def test_fedavgm_with_lr() -> None:
    x1, x2 = two_steps(fedagg.optimizers.momentum(lr=0.5, beta=0.5))
    # v1 = (0.5, 0.1); v2 = 0.5*v1 + d2 = (0.05, 0.15)
    np.testing.assert_allclose(x1, [1.25, -1.95], rtol=1e-14)
    np.testing.assert_allclose(x2, [1.275, -1.875], rtol=1e-14)


def test_fedavgm_flavors_agree() -> None:
    a = two_steps(fedagg.optimizers.momentum(1.0, 0.9, flavor="paper"))
    b = two_steps(fedagg.optimizers.momentum(1.0, 0.9, flavor="flower"))
    np.testing.assert_array_equal(a[1], b[1])


def test_fedadam_paper() -> None:
    x1, x2 = two_steps(fedagg.optimizers.adam(1.0, 0.9, 0.99, 0.1, flavor="paper"))
    # m1 = 0.1*d1 = (0.05, 0.01); v0 = tau^2 = 0.01
    # v1 = 0.99*0.01 + 0.01*d1^2 = (0.0099+0.0025, 0.0099+0.0001) = (0.0124, 0.01)
    e1 = X0 + np.array([0.05 / (sqrt(0.0124) + 0.1), 0.01 / (sqrt(0.01) + 0.1)])
    # m2 = 0.9*m1 + 0.1*d2 = (0.045-0.02, 0.009+0.01) = (0.025, 0.019)
    # v2 = 0.99*v1 + 0.01*d2^2 = (0.012276+0.0004, 0.0099+0.0001) = (0.012676, 0.01)
    e2 = e1 + np.array([0.025 / (sqrt(0.012676) + 0.1), 0.019 / (sqrt(0.01) + 0.1)])
    np.testing.assert_allclose(x1, e1, rtol=1e-13)
    np.testing.assert_allclose(x2, e2, rtol=1e-13)


def test_fedadam_flower() -> None:
    x1, x2 = two_steps(fedagg.optimizers.adam(1.0, 0.9, 0.99, 0.1, flavor="flower"))
    # v0 = 0: v1 = 0.01*d1^2 = (0.0025, 0.0001); m1 = (0.05, 0.01)
    # bias-corrected lr at round t=1: sqrt(1-0.99^2)/(1-0.9^2) = sqrt(0.0199)/0.19
    eta1 = sqrt(0.0199) / 0.19
    e1 = X0 + eta1 * np.array([0.05 / (0.05 + 0.1), 0.01 / (0.01 + 0.1)])
    # m2 = (0.025, 0.019); v2 = 0.99*v1 + 0.01*d2^2 = (0.002475+0.0004, 0.000099+0.0001)
    # round t=2: sqrt(1-0.99^3)/(1-0.9^3) = sqrt(0.029701)/0.271
    eta2 = sqrt(0.029701) / 0.271
    e2 = e1 + eta2 * np.array([0.025 / (sqrt(0.002875) + 0.1), 0.019 / (sqrt(0.000199) + 0.1)])
    np.testing.assert_allclose(x1, e1, rtol=1e-13)
    np.testing.assert_allclose(x2, e2, rtol=1e-13)


def test_fedyogi_paper() -> None:
    x1, x2 = two_steps(fedagg.optimizers.yogi(1.0, 0.9, 0.99, 0.1, flavor="paper"))
    # v0 = 0.01; d1^2 = (0.25, 0.01); sign(v0 - d1^2) = (-1, 0)
    # v1 = v0 - 0.01*d1^2*sign = (0.01 + 0.0025, 0.01) = (0.0125, 0.01)
    e1 = X0 + np.array([0.05 / (sqrt(0.0125) + 0.1), 0.01 / (sqrt(0.01) + 0.1)])
    # d2^2 = (0.04, 0.01); sign(v1 - d2^2) = (-1, 0); v2 = (0.0125 + 0.0004, 0.01)
    e2 = e1 + np.array([0.025 / (sqrt(0.0129) + 0.1), 0.019 / (sqrt(0.01) + 0.1)])
    np.testing.assert_allclose(x1, e1, rtol=1e-13)
    np.testing.assert_allclose(x2, e2, rtol=1e-13)


def test_fedyogi_flower() -> None:
    x1, x2 = two_steps(fedagg.optimizers.yogi(1.0, 0.9, 0.99, 0.1, flavor="flower"))
    # v0 = 0; sign(0 - d1^2) = -1: v1 = 0.01*d1^2 = (0.0025, 0.0001); no bias correction
    e1 = X0 + np.array([0.05 / (0.05 + 0.1), 0.01 / (0.01 + 0.1)])
    # sign(v1 - d2^2) = (sign(0.0025-0.04), sign(0.0001-0.01)) = (-1, -1)
    # v2 = v1 + 0.01*d2^2 = (0.0025+0.0004, 0.0001+0.0001) = (0.0029, 0.0002)
    e2 = e1 + np.array([0.025 / (sqrt(0.0029) + 0.1), 0.019 / (sqrt(0.0002) + 0.1)])
    np.testing.assert_allclose(x1, e1, rtol=1e-13)
    np.testing.assert_allclose(x2, e2, rtol=1e-13)


def test_fedadagrad_paper() -> None:
    x1, x2 = two_steps(fedagg.optimizers.adagrad(1.0, beta1=0.0, tau=0.1, flavor="paper"))
    # beta1 = 0: m = d. v0 = 0.01; v1 = 0.01 + d1^2 = (0.26, 0.02)
    e1 = X0 + np.array([0.5 / (sqrt(0.26) + 0.1), 0.1 / (sqrt(0.02) + 0.1)])
    # v2 = v1 + d2^2 = (0.30, 0.03)
    e2 = e1 + np.array([-0.2 / (sqrt(0.30) + 0.1), 0.1 / (sqrt(0.03) + 0.1)])
    np.testing.assert_allclose(x1, e1, rtol=1e-13)
    np.testing.assert_allclose(x2, e2, rtol=1e-13)


def test_fedadagrad_flower() -> None:
    x1, x2 = two_steps(fedagg.optimizers.adagrad(1.0, beta1=0.0, tau=0.1, flavor="flower"))
    # v0 = 0; v1 = d1^2 = (0.25, 0.01); v2 = (0.29, 0.02)
    e1 = X0 + np.array([0.5 / (0.5 + 0.1), 0.1 / (0.1 + 0.1)])
    e2 = e1 + np.array([-0.2 / (sqrt(0.29) + 0.1), 0.1 / (sqrt(0.02) + 0.1)])
    np.testing.assert_allclose(x1, e1, rtol=1e-13)
    np.testing.assert_allclose(x2, e2, rtol=1e-13)


def test_sgd_is_fedavg_with_server_lr() -> None:
    x1, x2 = two_steps(fedagg.optimizers.sgd(0.5))
    np.testing.assert_allclose(x1, [1.25, -1.95], rtol=1e-14)
    np.testing.assert_allclose(x2, [1.15, -1.9], rtol=1e-14)


@pytest.mark.parametrize("flavor", ["paper", "flower"])
def test_adam_lr_scales_the_step(flavor: str) -> None:
    x1a, _ = two_steps(fedagg.optimizers.adam(1.0, 0.9, 0.99, 0.1, flavor=flavor))  # type: ignore[arg-type]
    x1b, _ = two_steps(fedagg.optimizers.adam(0.25, 0.9, 0.99, 0.1, flavor=flavor))  # type: ignore[arg-type]
    np.testing.assert_allclose(x1b - X0, 0.25 * (x1a - X0), rtol=1e-13)
