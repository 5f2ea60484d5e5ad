"""The DP mechanisms: seekable Gaussian noise, clipping, local DP, adaptive clipping and the
integer samplers of distributed DP."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedagg.errors import ConfigError
from fedagg.privacy import (
    adaptive_clip,
    add_gaussian_noise,
    clip_l2,
    combined_noise_multiplier,
    discrete_gaussian,
    gaussian_noise,
    local_dp,
    noised_unclipped_fraction,
    update_noise_multiplier,
)

pytest.importorskip("cryptography")  # the ChaCha20 PRG of fedagg.secagg

SEED = bytes(range(32))


def test_noise_is_seekable_and_chunking_does_not_matter() -> None:
    whole = gaussian_noise(SEED, 0, 1001)
    for offset, count in [(0, 1), (1, 1), (7, 300), (500, 501), (1000, 1)]:
        np.testing.assert_array_equal(gaussian_noise(SEED, offset, count), whole[offset:][:count])
    acc = np.zeros(1001)
    add_gaussian_noise(acc, SEED, 2.5, chunk=37)
    np.testing.assert_allclose(acc, 2.5 * whole, rtol=0, atol=1e-12)
    part = np.zeros((10, 10), dtype=np.float32)
    add_gaussian_noise(part, SEED, 1.0, offset=301, chunk=8)
    single = gaussian_noise(SEED, 0, 1001, dtype=np.float32)
    np.testing.assert_array_equal(part.ravel(), single[301:401])
    for workers in (1, 3):  # threads noise disjoint chunks: the same bits
        again = np.zeros((10, 10), dtype=np.float32)
        add_gaussian_noise(again, SEED, 1.0, offset=301, chunk=8, workers=workers)
        np.testing.assert_array_equal(again, part)
    np.testing.assert_allclose(single, whole, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(gaussian_noise(bytes(32), 0, 10), whole[:10])


def test_noise_is_standard_normal() -> None:
    z = gaussian_noise(SEED, 12345, 400_000)
    assert abs(z.mean()) < 0.01 and abs(z.var() - 1) < 0.01
    for x in (-2.0, -1.0, 0.0, 0.5, 1.5, 3.0):  # the empirical CDF against Phi
        phi = 0.5 * math.erfc(-x / math.sqrt(2))
        assert abs(float(np.mean(z <= x)) - phi) < 0.003
    assert np.abs(z).max() < 8.6
    assert gaussian_noise(SEED, 3, 5, std=0.0).tolist() == [0.0] * 5


def test_clip_and_local_dp() -> None:
    x = np.array([3.0, 4.0])
    clipped, within = clip_l2(x, 1.0)
    np.testing.assert_allclose(clipped, [0.6, 0.8])
    assert not within
    same, within = clip_l2(x, 5.0)
    assert within and np.array_equal(same, x) and same is not x
    rng = np.random.default_rng(0)
    noisy = np.stack([local_dp(x, 1.0, 2.0, rng) for _ in range(4000)])
    np.testing.assert_allclose(noisy.mean(0), [0.6, 0.8], atol=0.1)
    np.testing.assert_allclose(noisy.std(0), [2.0, 2.0], rtol=0.05)


def test_adaptive_clipping_moves_towards_the_target_quantile() -> None:
    assert adaptive_clip(1.0, 0.9, 0.5, 0.2) == pytest.approx(math.exp(-0.08))  # too loose
    assert adaptive_clip(1.0, 0.1, 0.5, 0.2) == pytest.approx(math.exp(0.08))  # too tight
    assert adaptive_clip(2.0, 0.5, 0.5) == 2.0
    # the clip converges to the target quantile of a fixed norm distribution
    norms = np.random.default_rng(1).lognormal(0.0, 1.0, 1000)
    clip = 0.01
    for _ in range(400):
        clip = adaptive_clip(clip, float(np.mean(norms <= clip)), 0.5, 0.2)
    assert clip == pytest.approx(float(np.median(norms)), rel=0.1)


def test_noised_unclipped_fraction() -> None:
    rng = np.random.default_rng(2)
    assert noised_unclipped_fraction(30, 60.0, 0.0, rng, folded=60) == 0.5
    draws = [noised_unclipped_fraction(30, 60.0, 3.0, rng, folded=60) for _ in range(4000)]
    assert np.mean(draws) == pytest.approx(0.5, abs=0.01)
    assert np.std(draws) == pytest.approx(3.0 / 60, rel=0.05)
    with pytest.raises(ConfigError, match="exceeds"):
        noised_unclipped_fraction(5, 10.0, 0.0, rng, folded=4)


def test_noised_unclipped_fraction_has_sensitivity_one_half() -> None:
    # Andrew et al.'s centred count: adding or removing one client (clipped or not) moves the
    # released statistic, before noise and times m, by exactly 1/2 (what the accounting of
    # combined_noise_multiplier assumes), not 1 as the raw count would
    rng = np.random.default_rng(0)
    m = 40.0
    for n in range(30):
        for u in range(n + 1):
            base = noised_unclipped_fraction(u, m, 0.0, rng, folded=n) * m
            add_in = noised_unclipped_fraction(u + 1, m, 0.0, rng, folded=n + 1) * m
            add_out = noised_unclipped_fraction(u, m, 0.0, rng, folded=n + 1) * m
            assert abs(add_in - base) == pytest.approx(0.5)
            assert abs(add_out - base) == pytest.approx(0.5)


def test_adaptive_clip_with_the_noised_centred_count_converges() -> None:
    # the policy's loop: a Poisson cohort around m, the centred noised fraction, the clip update
    rng = np.random.default_rng(3)
    m, clip = 100.0, 0.01
    for _ in range(600):
        norms = rng.lognormal(0.0, 1.0, rng.poisson(m))
        b = noised_unclipped_fraction(int(np.sum(norms <= clip)), m, m / 20, rng, folded=len(norms))
        clip = adaptive_clip(clip, b, 0.5, 0.2)
    assert clip == pytest.approx(1.0, rel=0.2)  # the lognormal(0, 1) median


def test_combined_noise_multiplier_inverts_update_noise_multiplier() -> None:
    z = combined_noise_multiplier(1.2, 5.0)
    assert z < 1.2
    assert update_noise_multiplier(z, 5.0) == pytest.approx(1.2, rel=1e-12)
    # Andrew et al.: sigma_b = m / 20 with m = 100 costs little: z_update barely above z
    assert 1.0 < update_noise_multiplier(1.0, 5.0) < 1.03
    with pytest.raises(ConfigError, match="count_stddev"):
        update_noise_multiplier(1.0, 0.5)


def test_discrete_gaussian_matches_its_pmf() -> None:
    sigma = 1.5
    x = discrete_gaussian(sigma, 200_000, np.random.default_rng(3))
    assert x.dtype == np.int64
    support = np.arange(-12, 13)
    w = np.exp(-(support**2) / (2 * sigma**2))
    pmf = w / w.sum()
    freq = np.array([np.mean(x == k) for k in support])
    np.testing.assert_allclose(freq, pmf, atol=0.004)
    assert discrete_gaussian(0.3, (4, 5), np.random.default_rng(4)).shape == (4, 5)
    big = discrete_gaussian(50.0, 100_000, np.random.default_rng(5))
    assert big.var() == pytest.approx(2500, rel=0.03) and abs(big.mean()) < 0.5


def test_skellam_variance() -> None:
    from fedagg.privacy import skellam

    x = skellam(16.0, 100_000, np.random.default_rng(6))
    assert x.dtype == np.int64 and x.var() == pytest.approx(16.0, rel=0.03)


@pytest.mark.parametrize(
    "call",
    [
        lambda: gaussian_noise(b"short", 0, 4),
        lambda: gaussian_noise(SEED, -1, 4),
        lambda: gaussian_noise(SEED, 0, 4, std=-1.0),
        lambda: gaussian_noise(SEED, 0, 4, dtype=np.int32),  # type: ignore[arg-type]
        lambda: add_gaussian_noise(np.zeros(4, dtype=np.int64), SEED, 1.0),
        lambda: add_gaussian_noise(np.zeros((4, 4))[:, 0], SEED, 1.0),
        lambda: add_gaussian_noise(np.zeros(4), SEED, 1.0, workers=0),
        lambda: clip_l2(np.array([1.0, np.nan]), 1.0),
        lambda: clip_l2(np.ones(3), 0.0),
        lambda: adaptive_clip(1.0, 0.5, 1.5),
        lambda: adaptive_clip(-1.0, 0.5, 0.5),
        lambda: noised_unclipped_fraction(-1, 10.0, 1.0, np.random.default_rng(), folded=1),
        lambda: discrete_gaussian(0.0, 3, np.random.default_rng()),
        lambda: discrete_gaussian(1.0, -3, np.random.default_rng()),
        lambda: combined_noise_multiplier(1.0, math.inf),
    ],
)
def test_bad_input_is_a_config_error(call: object) -> None:
    with pytest.raises(ConfigError):
        call()  # type: ignore[operator]
