"""Clipping, rotation and stochastic rounding to uint32: bounds, unbiasedness, no wrap."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedagg.errors import ConfigError, SecAggError
from fedagg.secagg import Encoder, add_mask, mask
from fedagg.secagg._encode import _butterflies, _fwht

SLACK = 1 + 2**-19  # float64 rounding: at most ~2**-20 of a grid step


def clipped(x: np.ndarray, c: float) -> np.ndarray:
    n = float(np.linalg.norm(x))
    return x * min(1.0, c / n) if n > 0 else x


def test_grid_parameters() -> None:
    enc = Encoder(clip=2.0, bits=16, clients=100)
    assert enc.headroom == 7 and enc.levels == 2**9 - 1
    assert enc.step == pytest.approx(4.0 / 511)
    assert Encoder(1.0, 32, 1).levels == 2**32 - 1
    assert Encoder(1.0, 32, 2).headroom == 1 and Encoder(1.0, 32, 3).headroom == 2
    assert Encoder(1.0, rotation=0).length(5) == 9 and Encoder(1.0).length(5) == 6
    assert enc.error_bound(10, 3) == 3 * enc.step * math.sqrt(10) * (1 + 2**-19)


@pytest.mark.parametrize("rotation", [None, 7])
def test_rotation_is_orthogonal(rotation: int | None) -> None:
    enc = Encoder(1.0, rotation=rotation)
    rng = np.random.default_rng(1)
    for d in (1, 2, 5, 64, 1000):
        v = rng.standard_normal(d)
        y = enc.rotate(v)
        assert y.size == enc.padded(d)
        assert np.linalg.norm(y) == pytest.approx(np.linalg.norm(v), rel=1e-12)
        np.testing.assert_allclose(enc.unrotate(y, d), v, atol=1e-12)
    if rotation is not None:  # the rotation spreads a spike over every coordinate
        spike = enc.rotate(np.eye(1, 1024, 3)[0])
        np.testing.assert_allclose(np.abs(spike), 1 / 32)
        assert not np.array_equal(spike, Encoder(1.0, rotation=8).rotate(np.eye(1, 1024, 3)[0]))


@pytest.mark.parametrize("rotation", [None, 3])
def test_round_trip_within_the_deterministic_bound(rotation: int | None) -> None:
    enc = Encoder(clip=1.5, bits=12, clients=1, rotation=rotation)
    rng = np.random.default_rng(2)
    for trial in range(20):
        x = rng.standard_normal(37) * (0.05 if trial % 2 else 3.0)  # inside and outside clip
        w = float(rng.uniform(0.1, 1.0))
        code = enc.encode(x, w, rng=rng)
        assert code.dtype == np.uint32 and code.size == enc.length(37)
        assert int(code.max()) <= enc.levels
        vec, wsum = enc.decode(code, 1, 37)
        assert np.linalg.norm(vec - w * clipped(x, 1.5)) <= enc.error_bound(37) * SLACK
        assert abs(wsum - w) < 1 / enc.levels
        # per coordinate (no rotation): below one step
        if rotation is None:
            assert np.abs(vec - w * clipped(x, 1.5)).max() < enc.step * SLACK


def test_stochastic_rounding_is_unbiased() -> None:
    enc = Encoder(clip=1.0, bits=4, clients=1)  # 15 levels: step 2/15, big rounding errors
    x = np.array([0.01, -0.33, 0.5, 0.77, -0.99, 0.0]) / 2
    rng = np.random.default_rng(3)
    reps = 4000
    codes = np.stack([enc.encode(x, 0.37, rng=rng) for _ in range(reps)])
    decoded = codes[:, :-1] * enc.step - 1.0
    err = decoded.mean(axis=0) - 0.37 * x
    # each coordinate's error has std <= step / 2; its mean over reps is within 5 sigma of 0
    assert np.abs(err).max() < 5 * (enc.step / 2) / math.sqrt(reps)
    assert abs(codes[:, -1].mean() / enc.levels - 0.37) < 5 * 0.5 / enc.levels / math.sqrt(reps)
    # ... while the deterministic bound holds for every draw
    assert np.abs(decoded - 0.37 * x).max() < enc.step


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 9),
    bits=st.integers(8, 32),
    d=st.integers(1, 40),
    rotation=st.one_of(st.none(), st.integers(0, 2**64)),
    seed=st.integers(0, 2**32),
)
def test_sum_of_n_encodings_decodes_within_n_bounds(
    n: int, bits: int, d: int, rotation: int | None, seed: int
) -> None:
    enc = Encoder(clip=2.0, bits=bits, clients=n, rotation=rotation)
    rng = np.random.default_rng(seed)
    xs = [rng.standard_normal(d) * rng.uniform(0.01, 3) for _ in range(n)]
    ws = [float(rng.uniform(0.05, 1.0)) for _ in range(n)]
    total = np.zeros(enc.length(d), np.uint32)
    for x, w in zip(xs, ws, strict=True):
        np.add(total, enc.encode(x, w, rng=rng), out=total)
    vec, wsum = enc.decode(total, n, d)
    truth = sum(w * clipped(x, 2.0) for x, w in zip(xs, ws, strict=True))
    assert np.linalg.norm(vec - truth) <= enc.error_bound(d, n) * SLACK
    assert abs(wsum - sum(ws)) < n / enc.levels
    # the weighted mean within its documented bound
    e_v, e_w, big_w = enc.error_bound(d, n), n / enc.levels, sum(ws)
    if big_w > e_w:
        bound = (e_v + 2.0 * e_w) / (big_w - e_w)
        assert np.linalg.norm(enc.mean(total, n, d) - truth / big_w) <= bound * SLACK


@pytest.mark.parametrize(("bits", "n"), [(8, 5), (8, 8), (32, 4), (32, 3), (32, 1)])
def test_worst_case_sum_does_not_wrap(bits: int, n: int) -> None:
    """Every client at the top of the grid (weight 1, a spike of norm clip): the sum reaches
    n L <= 2**bits - 2**headroom, wrapping in neither Z_2**bits nor uint32."""
    enc = Encoder(clip=1.0, bits=bits, clients=n)
    top = np.array([1.0, 0.0, 0.0])
    bottom = np.array([0.0, -1.0, 0.0])
    rng = np.random.default_rng(4)
    total = np.zeros(enc.length(3), np.uint32)
    for _ in range(n):
        np.add(total, enc.encode(top, 1.0, rng=rng), out=total)
    assert int(total[0]) == n * enc.levels == int(total[-1])
    assert n * enc.levels < 2**bits
    vec, wsum = enc.decode(total, n, 3)
    np.testing.assert_allclose(vec, [n, 0, 0], atol=enc.error_bound(3, n))
    assert wsum == n
    low = np.zeros(enc.length(3), np.uint32)
    for _ in range(n):
        np.add(low, enc.encode(bottom, 1.0, rng=rng), out=low)
    assert int(low[1]) == 0
    np.testing.assert_allclose(enc.decode(low, n, 3)[0], [0, -n, 0], atol=enc.error_bound(3, n))


def test_masked_sum_decodes_like_the_plain_sum() -> None:
    enc = Encoder(clip=1.0, bits=32, clients=3, rotation=11)
    rng = np.random.default_rng(5)
    codes = [enc.encode(rng.standard_normal(100), 1.0, rng=rng) for _ in range(3)]
    seeds = [bytes([i]) * 32 for i in range(3)]
    total = np.zeros(enc.length(100), np.uint32)
    for code, seed in zip(codes, seeds, strict=True):
        masked = code.copy()
        add_mask(masked, seed, 0, +1)
        assert not np.array_equal(masked, code)
        np.add(total, masked, out=total)
    for seed in seeds:
        np.subtract(total, mask(seed, 0, total.size), out=total)
    np.testing.assert_array_equal(total, sum(c.astype(np.uint64) for c in codes))


def test_bad_parameters_and_inputs_are_refused() -> None:
    for kwargs, message in [
        ({"clip": 0.0}, "clip must be"),
        ({"clip": float("inf")}, "clip must be"),
        ({"clip": 1.0, "bits": 33}, "at most 32"),
        ({"clip": 1.0, "bits": 0}, "bits must be"),
        ({"clip": 1.0, "clients": 0}, "clients must be"),
        ({"clip": 1.0, "bits": 4, "clients": 9}, "no value bits"),
        ({"clip": 1.0, "rotation": -1}, "rotation must be"),
    ]:
        with pytest.raises(ConfigError, match=message):
            Encoder(**kwargs)  # type: ignore[arg-type]
    enc = Encoder(clip=1.0, bits=8, clients=2)
    with pytest.raises(SecAggError, match="NaN or Inf"):
        enc.encode([1.0, float("nan")])
    with pytest.raises(SecAggError, match="weight must be in"):
        enc.encode([1.0], 1.5)
    with pytest.raises(SecAggError, match="weight must be in"):
        enc.encode([1.0], 0.0)
    with pytest.raises(SecAggError, match="empty"):
        enc.encode([])
    code = enc.encode([0.5, 0.5])
    with pytest.raises(SecAggError, match="exceeds the 2 clients"):
        enc.decode(code, 3, 2)
    with pytest.raises(SecAggError, match="expected 6 encoded elements, got 3"):
        enc.decode(code, 1, 5)
    with pytest.raises(SecAggError, match="not a sum of 1 encodings"):
        enc.decode(np.full(3, 200, np.uint32), 1, 2)
    with pytest.raises(SecAggError, match="uint32"):
        enc.decode(code.astype(np.int64), 1, 2)


def sylvester(p: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < p:
        h = np.block([[h, h], [h, -h]])
    return h


@pytest.mark.parametrize("k", [0, 1, 2, 5, 10])
def test_butterflies_are_the_hadamard_matrix(k: int) -> None:
    v = np.random.default_rng(k).standard_normal(1 << k)
    y = v.copy()
    _butterflies(y, 1)
    np.testing.assert_allclose(y, sylvester(1 << k) @ v, atol=1e-9)


@pytest.mark.parametrize("k", [11, 12, 13, 16])
def test_transposed_transform_equals_the_butterflies(k: int) -> None:
    v = np.random.default_rng(k).standard_normal(1 << k)
    y, z = v.copy(), v.copy()
    _fwht(y)
    _butterflies(z, 1)
    np.testing.assert_allclose(y, z, atol=1e-9)
