"""Krum, Multi-Krum and Bulyan pick the same updates on every machine.

Scores that tie in exact arithmetic (mutual nearest neighbours, symmetric configurations)
used to be decided by the last bit of a Gram matrix whose summation grouping depended on the
I/O block size and on the CPU's BLAS kernels. The data here are small multiples of 2**-10 on
a large offset with full float32 mantissas, so the reference (:mod:`tests.robust_ref`,
explicit differences) computes every squared distance and every score *exactly*: the
expected picks are the exact argmins,
ties going to the earliest update (job order). The library must reproduce them for every block
size, store, BLAS and numba thread count, and under rounding noise of the size that another
CPU's kernels would add.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

import fedagg
from fedagg import aggregators as A
from fedagg.core import robust
from tests import robust_ref as ref

D = 5003  # one full Gram chunk and a ragged one; not a multiple of any block width below


def tie_rows(seed: int, n: int, d: int = D) -> np.ndarray:
    """``n`` rows on a large common offset (multiples of ``2**-10``, so every squared distance
    is exact in float64), built from pairs ``c + v``,
    ``c - v`` (each is the other's mirror image: their distance multisets are equal, so
    their Krum scores tie exactly) and a few unpaired points; shuffled pair members keep
    their order so the earlier one of a pair is known."""
    rng = np.random.default_rng(seed)
    q = 2.0**-10  # every value a multiple of q below 2**12: exact in float32, full mantissas
    c = rng.integers(-(2**22), 2**22, size=d) * q
    rows: list[np.ndarray] = []
    while len(rows) + 2 <= n - 1:
        v = rng.integers(-3, 4, size=d) * (rng.random(d) < 0.1) * q
        rows += [c + v, c - v]
    while len(rows) < n:
        rows.append(c + rng.integers(-6, 7, size=d) * q)
    order = rng.permutation(len(rows))
    return np.array([rows[i] for i in order])


def folded(agg: Any, x: np.ndarray, dtype: Any = np.float32) -> Any:
    spec = fedagg.ParamSpec.from_arrays([np.zeros(x.shape[1], dtype)])
    ups = [fedagg.Update([r.astype(dtype)], 1.0, f"c{i}") for i, r in enumerate(x)]
    return agg.fold_many(agg.init(spec), ups)


def exact_krum(x: np.ndarray, f: int, m: int) -> list[int]:
    scores = ref.krum_scores(x, list(range(len(x))), f)
    return sorted(np.argsort(scores, kind="stable")[:m].tolist())


def exact_bulyan(x: np.ndarray, f: int) -> list[int]:
    alive, chosen = list(range(len(x))), []
    for _ in range(len(x) - 2 * f):
        ff = min(f, max(0, len(alive) - 3))
        scores = ref.krum_scores(x, alive, ff)
        pick = alive[int(np.argmin(scores))]  # exact scores: the first of a tie
        chosen.append(pick)
        alive.remove(pick)
    return sorted(chosen)


@contextmanager
def threads(blas: int, numba_threads: int) -> Iterator[None]:
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is a dependency
        numba = None
    old = numba.get_num_threads() if numba else 0
    try:
        if numba:
            numba.set_num_threads(min(numba_threads, numba.config.NUMBA_NUM_THREADS))
        with threadpool_limits(limits=blas, user_api="blas"):
            yield
    finally:
        if numba:
            numba.set_num_threads(old)


RULES = {
    "krum": (lambda **k: A.krum(2, **k), lambda x: exact_krum(x, 2, 1)),
    "multi_krum": (lambda **k: A.multi_krum(2, 5, **k), lambda x: exact_krum(x, 2, 5)),
    "bulyan": (lambda **k: A.bulyan(2, **k), lambda x: exact_bulyan(x, 2)),
}


def test_the_data_really_tie_exactly() -> None:
    """The construction does what the tests rely on: exact equal minimal scores."""
    x = tie_rows(0, 11)
    scores = np.array(ref.krum_scores(x, list(range(11)), 2))
    assert np.all(scores * 2.0**20 == np.round(scores * 2.0**20))  # exact multiples of q**2
    best = scores.min()
    assert (scores == best).sum() >= 2


@pytest.mark.parametrize("name", sorted(RULES))
@pytest.mark.parametrize("seed", range(6))
def test_picks_equal_the_exact_ones_for_every_block_store_and_thread_count(
    name: str, seed: int, tmp_path: Any
) -> None:
    make, exact = RULES[name]
    x = tie_rows(seed, 11)
    want = exact(x)
    results = []
    for kw in (
        {},
        {"block_bytes": 8 * 11 * 7},  # 7-coordinate blocks
        {"block_bytes": 8 * 11 * 4500},  # blocks straddling the Gram chunks
        {"spool": fedagg.spool.disk(tmp_path), "block_bytes": 8 * 11 * 300},
    ):
        for blas, nb in ((1, 1), (2, 2)):
            with threads(blas, nb):
                agg = make(**kw)
                state = folded(agg, x)
                assert agg.select(state) == want, (kw, blas, nb)
                results.append(agg.finalize_flat(state).tobytes())
    assert len(set(results)) == 1  # and so the aggregate is bit-identical


def test_float64_models_pick_the_same() -> None:
    x = tie_rows(3, 11)
    for name, (make, exact) in RULES.items():
        agg = make()
        assert agg.select(folded(agg, x, np.float64)) == exact(x), name


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from([0, 1, 2]))
def test_rounding_noise_of_another_cpu_does_not_change_the_picks(seed: int, f: int) -> None:
    """Perturb every squared distance by a relative 1e-13 of the distances' rounding scale
    (far more than BLAS kernels differ by) in a symmetric-breaking way: the picks stay."""
    x = tie_rows(seed, 9, d=300)
    g = robust.gram_sum([(0, x.shape[1], x)])
    d2, spread = g.sq_dists(), g.spread()
    n = len(x)
    want = robust.krum_pick(d2, range(n), f, n - f, spread)
    exact = ref.krum_scores(x, list(range(n)), f)
    assert want[0] == int(np.argmin(exact))
    noise = np.random.default_rng(seed).uniform(-1, 1, size=d2.shape) * 1e-13 * spread
    np.fill_diagonal(noise, 0.0)
    noisy = np.maximum(d2 + noise, 0.0)
    assert robust.krum_pick(noisy, range(n), f, n - f, spread) == want


def test_pick_best_breaks_ties_by_index_within_the_documented_tolerance() -> None:
    rtol = robust.TIE_RTOL
    # within rtol of the best: a tie, the earliest index wins
    assert robust.pick_best(np.array([1.0 + 0.5 * rtol, 1.0, 3.0]), 1) == [0]
    # beyond it: the strictly better one wins
    assert robust.pick_best(np.array([1.0 + 4 * rtol, 1.0, 3.0]), 1) == [1]
    # the scale widens the tolerance (rounding is relative to the norms, not the score)
    assert robust.pick_best(np.array([1e-9, 0.0, 3.0]), 1, scale=10.0) == [0]
    assert robust.pick_best(np.array([1e-9, 0.0, 3.0]), 1, scale=0.0) == [1]
    # m picks in pick order; each pick against what is left
    assert robust.pick_best(np.array([5.0, 2.0, 2.0, 1.0]), 3) == [3, 1, 2]
    assert robust.pick_best(np.array([2.0]), 4) == [0]
    # overflowed scores (NaN, inf) rank last and never crash the ranking
    assert robust.pick_best(np.array([np.nan, 3.0, np.inf, 1.0]), 4) == [3, 1, 0, 2]
    assert robust.pick_best(np.array([np.nan, np.nan]), 1, scale=np.nan) == [0]


def test_krum_scores_of_mirror_images_are_bit_equal() -> None:
    """The mechanism: distances from the centred Gram are exactly symmetric."""
    x = tie_rows(5, 7)
    g = robust.gram_sum([(0, D, x)])
    d2 = g.sq_dists()
    assert np.array_equal(d2, d2.T)
    assert np.all(np.diag(d2) == 0.0)


def test_gram_is_the_same_whatever_the_blocks() -> None:
    x = np.random.default_rng(1).normal(size=(6, 3 * robust.GRAM_CHUNK + 17))
    whole = robust.gram_sum([(0, x.shape[1], x)])
    for w in (1, 7, 1000, robust.GRAM_CHUNK, robust.GRAM_CHUNK + 3, 2 * robust.GRAM_CHUNK):
        blocks = [(c, min(c + w, x.shape[1]), x[:, c : c + w]) for c in range(0, x.shape[1], w)]
        g = robust.gram_sum(blocks)
        assert g.centred.tobytes() == whole.centred.tobytes(), w
        assert g.full().tobytes() == whole.full().tobytes(), w
    np.testing.assert_allclose(whole.full(), x @ x.T, rtol=1e-12)
    plain = robust.gram_sum([(0, x.shape[1], x)], centre=False)
    np.testing.assert_allclose(plain.full(), x @ x.T, rtol=1e-12)


def test_sketch_krum_ties_go_to_the_earliest_client() -> None:
    x = tie_rows(2, 9, d=400)
    rule = A.SketchKrum(2, m=1, k=64, seed=5)
    state = folded(rule, x)
    # sketches are linear: mirror images stay mirror images, so their scores tie; the
    # earliest of the tied best wins whatever the rounding of the sketch products
    d2 = rule.sketch_sq_dists(state)
    n = len(x)
    scores = np.array([np.sort(np.delete(d2[i], i))[: n - 4].sum() for i in range(n)])
    tied = np.flatnonzero(scores <= scores.min() * (1 + 1e-9))
    assert rule.select(state) == [f"c{tied[0]}"]
