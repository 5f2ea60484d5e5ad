"""Property tests (hypothesis) of the monoid laws for decomposable aggregators.

* a random merge tree, the flat fold and any permutation agree within 1e-6 relative;
* merging the identity changes nothing;
* float64 accumulation of 10,000 updates is within 1e-12 relative of ``math.fsum``.

"Relative" for the float32 accumulator is relative to the condition scale of each coordinate,
``sum_i w_i |x_i| / sum_i w_i``: a sum that cancels to ~0 has no meaningful relative error.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import fedagg

finite32 = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
weights = st.floats(0.01, 1e3, allow_nan=False, allow_infinity=False)


@st.composite
def update_sets(draw: st.DrawFn, max_n: int = 12) -> tuple[fedagg.ParamSpec, list[fedagg.Update]]:
    dim = draw(st.integers(1, 40))
    n = draw(st.integers(1, max_n))
    spec = fedagg.ParamSpec.from_arrays([np.zeros(dim, np.float32)])
    ups = []
    for i in range(n):
        vals = draw(st.lists(finite32, min_size=dim, max_size=dim))
        ups.append(
            fedagg.Update(
                delta=[np.array(vals, np.float32)], weight=draw(weights), client_id=str(i)
            )
        )
    return spec, ups


def reduce_tree(agg: Any, spec: fedagg.ParamSpec, ups: list[fedagg.Update], data: Any) -> Any:
    """Reduce ``ups`` along a random binary tree (random split points, random leaf batches)."""
    if len(ups) <= 2 or data.draw(st.booleans()):
        return agg.fold_many(agg.init(spec), ups)
    cut = data.draw(st.integers(1, len(ups) - 1))
    left = reduce_tree(agg, spec, ups[:cut], data)
    right = reduce_tree(agg, spec, ups[cut:], data)
    return agg.merge(left, right) if data.draw(st.booleans()) else agg.merge(right, left)


def scale_of(ups: list[fedagg.Update]) -> np.ndarray:
    num = sum(u.weight * np.abs(np.asarray(u.delta[0], np.float64)) for u in ups)  # type: ignore[index]
    return np.asarray(num) / sum(u.weight for u in ups)


@settings(max_examples=60)
@given(update_sets(), st.data())
def test_tree_flat_and_permutation_agree_float32(case: Any, data: Any) -> None:
    spec, ups = case
    agg = fedagg.aggregators.mean("float32")
    flat = agg.finalize_flat(agg.fold_many(agg.init(spec), ups))
    perm = data.draw(st.permutations(ups))
    permuted = agg.finalize_flat(agg.fold_many(agg.init(spec), perm))
    tree = agg.finalize_flat(reduce_tree(agg, spec, perm, data))
    tol = 1e-6 * scale_of(ups) + 1e-30
    assert np.all(np.abs(permuted - flat) <= tol)
    assert np.all(np.abs(tree - flat) <= tol)


@settings(max_examples=40)
@given(update_sets(), st.data())
def test_tree_flat_and_permutation_agree_float64(case: Any, data: Any) -> None:
    spec, ups = case
    agg = fedagg.aggregators.mean("float64")
    flat = agg.finalize_flat(agg.fold_many(agg.init(spec), ups))
    perm = data.draw(st.permutations(ups))
    tree = agg.finalize_flat(reduce_tree(agg, spec, perm, data))
    # compensated float64 sums, then one rounding to float32: equal to the last float32 bit
    # except where the exact mean sits on a rounding boundary
    np.testing.assert_allclose(tree, flat, rtol=1.2e-7, atol=1e-30)


@given(update_sets(max_n=6))
def test_merging_identity_changes_nothing(case: Any) -> None:
    spec, ups = case
    for acc in ("float32", "float64"):
        agg = fedagg.aggregators.mean(acc)  # type: ignore[arg-type]
        state = agg.fold_many(agg.init(spec), ups)
        before = fedagg.dumps(state)
        assert fedagg.dumps(agg.merge(state, agg.init(spec))) == before
        other = agg.merge(agg.init(spec), state)
        assert agg.finalize_flat(other).tobytes() == agg.finalize_flat(state).tobytes()


@st.composite
def long_streams(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray]:
    seed = draw(st.integers(0, 2**32 - 1))
    dim = draw(st.integers(1, 4))
    rng = np.random.default_rng(seed)
    mode = draw(st.sampled_from(["normal", "positive", "wide", "shifted"]))
    n = 10_000
    if mode == "normal":
        x = rng.standard_normal((n, dim))
    elif mode == "positive":
        x = rng.uniform(0, 1, (n, dim))
    elif mode == "wide":  # magnitudes across 16 orders
        x = rng.standard_normal((n, dim)) * 10.0 ** rng.uniform(-8, 8, (n, dim))
    else:  # large common offset, small signal
        x = 1e6 + rng.standard_normal((n, dim))
    w = rng.integers(1, 1000, n).astype(np.float64)
    return x, w


def fsum_mean(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    wsum = math.fsum(w)
    return np.array([math.fsum(w * x[:, j]) / wsum for j in range(x.shape[1])])


@settings(max_examples=12)
@given(long_streams())
def test_float64_accumulation_of_10000_updates_matches_fsum(stream: Any) -> None:
    x, w = stream
    spec = fedagg.ParamSpec.from_arrays([np.zeros(x.shape[1])])
    agg = fedagg.aggregators.mean("float64")
    state = agg.fold_many(
        agg.init(spec), [fedagg.Update(delta=x[i], weight=w[i]) for i in range(len(w))]
    )
    ref = fsum_mean(x, w)
    got = agg.finalize_flat(state)
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)


def test_the_fsum_check_can_fail() -> None:
    """The 1e-12 bound is a real requirement: a plain float32 accumulator misses it."""
    rng = np.random.default_rng(0)
    x = (1e6 + rng.standard_normal((10_000, 2))).astype(np.float32)
    w = rng.integers(1, 1000, 10_000).astype(np.float64)
    spec = fedagg.ParamSpec.from_arrays([np.zeros(2, np.float32)])
    agg = fedagg.aggregators.mean("float32")
    state = agg.fold_many(agg.init(spec), [fedagg.Update(x[i], w[i]) for i in range(10_000)])
    err = np.abs(agg.finalize_flat(state) - fsum_mean(x.astype(np.float64), w))
    assert np.all(err / np.abs(fsum_mean(x.astype(np.float64), w)) > 1e-12)
