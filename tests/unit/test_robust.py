"""Byzantine-robust rules: known answers by hand, spooled == in memory, bounded blocks, the
Flag Aggregator's guards, centered clipping's carried centre and the per-iteration monoids."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedagg
from fedagg import aggregators as A
from tests import robust_ref as ref

SPEC3 = fedagg.ParamSpec.from_arrays([np.zeros(3, np.float32)])


def run(agg: Any, rows: list[list[float]], weights: list[float] | None = None) -> np.ndarray:
    spec = fedagg.ParamSpec.from_arrays([np.zeros(len(rows[0]), np.float32)])
    state = agg.init(spec)
    for i, r in enumerate(rows):
        w = 1.0 if weights is None else weights[i]
        agg.fold(state, fedagg.Update([np.array(r, np.float32)], w, f"c{i}"))
    out: np.ndarray = agg.finalize_flat(state)
    return out


# -- known answers, by hand ----------------------------------------------------------------------
def test_median_by_hand_including_the_even_rule() -> None:
    assert run(A.median(), [[1, 5], [2, 4], [100, -3]]).tolist() == [2, 4]
    # even n: the mean of the two middle values (numpy's rule, documented)
    assert run(A.median(), [[1, 0], [2, 0], [3, 8], [100, 9]]).tolist() == [2.5, 4.0]


def test_trimmed_mean_by_hand() -> None:
    rows = [[1.0], [2.0], [3.0], [4.0], [100.0]]
    assert run(A.trimmed_mean(1), rows).tolist() == [3.0]  # mean of 2, 3, 4
    assert run(A.trimmed_mean(beta=0.2), rows).tolist() == [3.0]  # int(0.2 * 5) = 1
    # b larger than allowed is lowered to (n - 1) // 2 = 2: the median
    assert run(A.trimmed_mean(4), rows).tolist() == [3.0]


def test_krum_by_hand() -> None:
    # n = 5, f = 1: each score sums the n - f - 2 = 2 smallest squared distances
    rows = [[0.0], [1.0], [2.0], [3.0], [50.0]]
    # scores: 0: 1+4=5; 1: 1+1=2; 2: 1+1=2; 3: 1+4=5; 4: 47^2+48^2 -> best is 1 (first of ties)
    assert run(A.krum(1), rows).tolist() == [1.0]
    # Multi-Krum m = 3: the mean of clients 1, 2 and 0 (scores 2, 2, 5; 0 before 3)
    assert run(A.multi_krum(1, 3), rows).tolist() == [1.0]


def test_bulyan_by_hand() -> None:
    # n = 7, f = 1: theta = 5 picks by repeated Krum (drops the outliers), beta = 3 closest
    # to the median of the picks, averaged
    rows = [[0.0], [1.0], [2.0], [3.0], [4.0], [60.0], [-70.0]]
    # picks: 0..4; their median 2; the 3 closest: 1, 2, 3 -> 2
    assert run(A.bulyan(1), rows).tolist() == [2.0]


def test_geometric_median_by_hand() -> None:
    # three points on a line with weights 1,1,1: the geometric median is the middle one;
    # smoothed Weiszfeld converges towards it from the mean 1 (= (0 + 0 + 3) / 3)
    got = run(A.geometric_median(maxiter=200, ftol=0.0), [[0.0], [0.0], [3.0]])
    assert got[0] == pytest.approx(0.0, abs=1e-4)
    # one Weiszfeld step by hand from z0 = mean = 1: beta = (1/1, 1/1, 1/2) -> z1 = 1.5/2.5
    one = run(A.geometric_median(maxiter=1, ftol=0.0, weighted=False), [[0.0], [0.0], [3.0]])
    assert one[0] == pytest.approx(0.6)


def test_centered_clipping_by_hand() -> None:
    # v0 = 0, tau = 1: x = (3, 0) is clipped to (1, 0), (0, 0.5) is kept -> v = (0.5, 0.25)
    got = run(A.centered_clipping(1.0, 1), [[3.0, 0.0], [0.0, 0.5]])
    assert got.tolist() == pytest.approx([0.5, 0.25])


def test_flag_aggregator_by_hand() -> None:
    # two orthogonal unit directions and m = 1: the top principal direction of {e1, e1, e2}
    # is e1; (1/m) Y Y^T sum g_i = 2 e1, whatever the updates' norms ("unit")
    got = run(A.flag_aggregator(1, iters=1), [[5.0, 0.0], [0.3, 0.0], [0.0, 2.0]])
    assert got.tolist() == pytest.approx([2.0, 0.0], abs=1e-6)
    # m >= rank: Y Y^T is the identity on the span, so the result is (1/m) sum g_i
    got = run(A.flag_aggregator(2), [[5.0, 0.0], [0.3, 0.0], [0.0, 2.0]])
    assert got.tolist() == pytest.approx([1.0, 0.5], abs=1e-6)
    # "median" rescales by the median norm (2.0 here)
    got = run(A.flag_aggregator(2, norm="median"), [[5.0, 0.0], [0.3, 0.0], [0.0, 2.0]])
    assert got.tolist() == pytest.approx([2.0, 1.0], abs=1e-6)


def test_flag_aggregator_ignores_zero_updates_and_never_returns_a_random_start() -> None:
    rows = [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]]
    got = run(A.flag_aggregator(1), rows)
    assert np.all(np.isfinite(got))
    want = ref.flag(np.array(rows, np.float64), 1)  # the zero row is left out
    assert got == pytest.approx(want, abs=1e-6)
    assert run(A.flag_aggregator(1), [[0.0, 0.0, 0.0]]).tolist() == [0.0, 0.0, 0.0]
    # deterministic: the same inputs give the same bits (no random initial subspace)
    assert run(A.flag_aggregator(1), rows).tobytes() == got.tobytes()


@settings(max_examples=25, deadline=None)
@given(st.integers(3, 9), st.integers(1, 4), st.floats(0.0, 8.0), st.integers(0, 10_000))
def test_flag_aggregator_matches_explicit_irls(p: int, m: int, lam: float, seed: int) -> None:
    x = np.random.default_rng(seed).normal(size=(p, 12))
    got = run(A.flag_aggregator(m, lam), x.astype(np.float32).tolist())
    want = ref.flag(x.astype(np.float32).astype(np.float64), m, lam=lam)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def _flag64(agg: Any, x: np.ndarray) -> np.ndarray:
    """The aggregate of float64 rows (a float64 model: no rounding of the inputs)."""
    spec = fedagg.ParamSpec.from_arrays([np.zeros(x.shape[1], np.float64)])
    ups = [fedagg.Update([r], 1.0, f"c{i}") for i, r in enumerate(x)]
    out: np.ndarray = agg.finalize_flat(agg.fold_many(agg.init(spec), ups))
    return out


def test_flag_lambda_acts_from_the_first_irls_step() -> None:
    """The reference starts from a random subspace Y0, whose first weights in high dimension
    are a = (1 + eps)^-1/4, b = lam / (p (p - 1)) (1 + eps)^-1/4: lam shapes the first step."""
    rng = np.random.default_rng(0)
    p, n, m = 7, 4000, 4
    x = rng.normal(size=(p, n)) + 2.0 * rng.normal(size=n)  # correlated: angles differ
    one0 = _flag64(A.flag_aggregator(m, 0.0, iters=1), x)
    one64 = _flag64(A.flag_aggregator(m, 64.0, iters=1), x)
    assert np.linalg.norm(one64 - one0) > 1e-3 * np.linalg.norm(one0)
    np.testing.assert_allclose(one64, ref.flag(x, m, lam=64.0, iters=1), rtol=1e-9, atol=1e-12)
    # against a real random start, as the reference draws it: equal up to ||Y0^T g||^2 ~ m/n
    y0, _ = np.linalg.qr(np.random.default_rng(1).uniform(-0.5, 0.5, size=(n, m)))
    rand = ref.flag(x, m, lam=64.0, iters=1, start=y0)
    assert np.linalg.norm(one64 - rand) < 0.05 * np.linalg.norm(one64 - one0)


def test_flag_lambda_is_not_dropped_by_more_iterations() -> None:
    """With the default 3 IRLS steps, lam = 64 never returns the lam-free first step."""
    for seed in range(10):
        rng = np.random.default_rng(seed)
        x = rng.normal(size=(7, 300)) + rng.normal(size=300)
        free = _flag64(A.flag_aggregator(4, 0.0, iters=1), x)
        lam = _flag64(A.flag_aggregator(4, 64.0), x)
        assert np.linalg.norm(lam - free) > 1e-6 * np.linalg.norm(free), seed
        np.testing.assert_allclose(lam, ref.flag(x, 4, lam=64.0), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_flag_leaves_out_an_all_zero_update_exactly(dtype: Any) -> None:
    """A zero update has no direction: the aggregate is what the others give. (Its squared
    norm used to come out of the centred Gram as ~1e-15 and pass ``norms > 0``.)"""
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(6, 500)) + 30.0 * rng.normal(size=500)).astype(dtype)
    spec = fedagg.ParamSpec.from_arrays([np.zeros(500, dtype)])

    def agg(rows: np.ndarray) -> np.ndarray:
        a = A.flag_aggregator(iters=2)
        st_ = a.init(spec)
        for i, r in enumerate(rows):
            a.fold(st_, fedagg.Update([r], 1.0, f"c{i}"))
        out: np.ndarray = a.finalize_flat(st_)
        return out

    without = agg(x)
    with_zero = agg(np.vstack([x[:3], np.zeros((1, 500), dtype), x[3:]]))
    # The zero row changes the shape of the Gram product (7 x 7 instead of 6 x 6), which on
    # some BLAS kernels (OpenBLAS's Nehalem ones) moves its last bits; this ill-conditioned
    # data (a 30x common component) amplifies that to ~4e-10. The old bug moved it by ~100%.
    np.testing.assert_allclose(with_zero, without, rtol=1e-5 if dtype == np.float32 else 1e-8)


def test_flag_keeps_the_direction_of_a_tiny_update() -> None:
    """Normalisation needs each inner product to its own relative precision: an update
    scaled by 1e-30 has the same direction, so the ("unit") aggregate does not change."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(5, 400)) + 5.0 * rng.normal(size=400)
    tiny = x.copy()
    tiny[2] *= 1e-30
    got = _flag64(A.flag_aggregator(3, 1.0), tiny)
    np.testing.assert_allclose(got, _flag64(A.flag_aggregator(3, 1.0), x), rtol=1e-9)


@pytest.mark.parametrize(("p", "m"), [(7, 4), (15, 8), (8, 4)])
def test_flag_defaults_match_the_reference(p: int, m: int) -> None:
    """Defaults: m = ceil(p / 2) (the reference's scripts: p = 7 -> 4, p = 15 -> 8), lam = 0,
    3 IRLS steps, unit norm."""
    x = np.random.default_rng(p).normal(size=(p, 60))
    got = _flag64(A.flag_aggregator(), x)
    np.testing.assert_allclose(got, ref.flag(x, m, lam=0.0, iters=3), rtol=1e-8, atol=1e-10)
    assert not np.allclose(got, ref.flag(x, m - 1, lam=0.0, iters=3), rtol=1e-4)


# -- spooled (disk, tiny blocks) == in memory, bit for bit, every rule --------------------------
RULES = {
    "median": lambda **k: A.median(**k),
    "trimmed": lambda **k: A.trimmed_mean(2, **k),
    "krum": lambda **k: A.krum(2, **k),
    "multi_krum": lambda **k: A.multi_krum(2, 4, **k),
    "bulyan": lambda **k: A.bulyan(1, **k),
    "rfa": lambda **k: A.geometric_median(**k),
    "cc": lambda **k: A.centered_clipping(3.0, 2, **k),
    "flag": lambda **k: A.flag_aggregator(3, 1.0, **k),
}


@pytest.mark.parametrize("name", sorted(RULES))
def test_spooled_and_blocked_execution_equals_in_memory(name: str, tmp_path: Any) -> None:
    rng = np.random.default_rng(7)
    spec = fedagg.ParamSpec.from_arrays([np.zeros((40, 25), np.float32), np.zeros(9, np.float32)])
    ups = [
        fedagg.Update(
            [rng.normal(size=(40, 25)).astype(np.float32), rng.normal(size=9).astype(np.float32)],
            float(rng.integers(1, 9)),
            f"c{i}",
            scale=float(rng.uniform(0.5, 1.0)),
        )
        for i in range(9)
    ]

    def result(**kw: Any) -> np.ndarray:
        agg = RULES[name](**kw)
        out: np.ndarray = agg.finalize_flat(agg.fold_many(agg.init(spec), ups))
        return out

    memory = result()
    for kw in (
        {"spool": fedagg.spool.disk(tmp_path)},
        {"spool": fedagg.spool.disk(tmp_path), "block_bytes": 8 * 9 * 7},  # 7-coordinate blocks
    ):
        other = result(**kw)
        # the Gram matrix is summed over fixed coordinate chunks whatever the blocks: the same
        # float64 operations on this machine, so the same bits
        assert other.tobytes() == memory.tobytes(), kw
    # disk spools leave no file behind once closed
    assert list(tmp_path.iterdir()) == []


def test_disk_spool_bounds_resident_memory(tmp_path: Any) -> None:
    """Rows live in the file; reading them maps and releases one block at a time."""
    store = fedagg.spool.disk(tmp_path)(1000, np.dtype(np.float32))
    rows = np.arange(7000, dtype=np.float32).reshape(7, 1000)
    for r in rows:
        store.append([r[:300], r[300:]])  # segments of a row are written back to back
    assert store.rows == 7 and store.nbytes == 7 * 1000 * 4
    out = np.empty((3, 10), np.float32)
    store.read(500, 510, out, [6, 0, 3])
    assert np.array_equal(out, rows[[6, 0, 3], 500:510])
    with pytest.raises(ValueError, match="width"):
        store.append([np.zeros(999, np.float32)])
    store.close()
    with pytest.raises(fedagg.ConfigError, match="does not exist"):
        fedagg.spool.disk(tmp_path / "missing")


def test_spooled_state_saves_and_loads_into_memory(tmp_path: Any) -> None:
    agg = A.krum(0, spool=fedagg.spool.disk(tmp_path))
    state = agg.init(SPEC3, version=2)
    for i in range(4):
        agg.fold(state, fedagg.Update([np.full(3, i, np.float32)], 1.0, f"c{i}", base_version=2))
    loaded = fedagg.loads(fedagg.dumps(state))
    assert isinstance(loaded.store, A.MemoryStore)
    assert loaded.clients == ["c0", "c1", "c2", "c3"] and loaded.version == 2
    assert agg.finalize_flat(loaded).tobytes() == agg.finalize_flat(state).tobytes()


# -- too few updates, bad configs ---------------------------------------------------------------
def test_too_few_updates_for_the_rule_is_a_typed_error() -> None:
    with pytest.raises(fedagg.TooFewUpdates, match="at least 5"):
        run(A.krum(1), [[0.0], [1.0], [2.0], [3.0]])
    with pytest.raises(fedagg.TooFewUpdates, match="at least 7"):
        run(A.bulyan(1), [[0.0]] * 6)
    assert issubclass(fedagg.TooFewUpdates, fedagg.EmptyAggregate)


def test_a_policy_skips_a_round_its_rule_cannot_finalize() -> None:
    from fedagg import sim
    from tests.sim.fakes import FakeAlgorithm, FakeData, FakeModel

    st_ = fedagg.strategies.fedavg(aggregator=A.krum(2))  # needs 7 updates
    pol = sim.SyncPolicy(st_, rounds=2, clients_per_round=4)
    res = sim.Simulation(
        FakeData([10] * 8), FakeModel(), FakeAlgorithm(), st_, pol, sim.SystemModel(8)
    ).run()
    assert [r.stats.applied for r in res.records] == [False, False]
    assert res.server.version == 0


@pytest.mark.parametrize(
    "make",
    [
        lambda: A.krum(-1),
        lambda: A.multi_krum(1, 0),
        lambda: A.trimmed_mean(),
        lambda: A.trimmed_mean(1, beta=0.1),
        lambda: A.trimmed_mean(beta=0.5),
        lambda: A.geometric_median(maxiter=0),
        lambda: A.centered_clipping(0.0),
        lambda: A.flag_aggregator(0),
        lambda: A.flag_aggregator(2, -1.0),
        lambda: A.flag_aggregator(norm="max"),  # type: ignore[arg-type]
        lambda: A.weiszfeld_step(np.zeros(3), 0.0),
        lambda: A.clip_step(np.zeros(3), -1.0),
    ],
)
def test_bad_robust_configs_are_config_errors(make: Any) -> None:
    with pytest.raises(fedagg.ConfigError):
        make()


# -- centered clipping carries its centre across rounds -----------------------------------------
def test_centered_clipping_starts_from_the_previous_aggregate() -> None:
    strategy = fedagg.strategies.fedavg(aggregator=A.centered_clipping(1.0, 1))
    server = strategy.init([np.zeros(2, np.float32)])
    assert server.carry is None
    rows = [np.array([3.0, 0.0], np.float32), np.array([0.0, 0.5], np.float32)]
    server = strategy.round(server, [fedagg.Update([r]) for r in rows])
    v1 = ref.centered_clipping(np.array(rows, np.float64), 1.0, 1)
    assert server.carry is not None and server.carry == pytest.approx(v1)
    server = strategy.round(server, [fedagg.Update([r]) for r in rows])
    v2 = ref.centered_clipping(np.array(rows, np.float64), 1.0, 1, v0=v1)
    assert server.carry == pytest.approx(v2)
    assert server.params == pytest.approx(v1 + v2, rel=1e-6)
    again = fedagg.loads(fedagg.dumps(server))  # the carry is part of the saved state
    assert again.carry is not None and again.carry.tobytes() == server.carry.tobytes()


# -- per-iteration monoids: the same iterates, merged along any tree -----------------------------
def test_weiszfeld_and_clip_steps_iterate_to_the_spooled_rules() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(8, 30)).astype(np.float32)
    w = rng.integers(1, 5, 8).astype(float)
    spec = fedagg.ParamSpec.from_arrays([np.zeros(30, np.float32)])
    ups = [fedagg.Update([r], wi, f"c{i}") for i, (r, wi) in enumerate(zip(x, w, strict=True))]

    def tree(agg: Any) -> np.ndarray:  # ((0..2) + (3..5)) + (6, 7), merged
        parts = [agg.fold_many(agg.init(spec), ups[a:b]) for a, b in ((0, 3), (3, 6), (6, 8))]
        out: np.ndarray = agg.finalize_flat(agg.merge(agg.merge(parts[0], parts[1]), parts[2]))
        return out

    z = (w @ x.astype(np.float64)) / w.sum()  # RFA's z0
    for _ in range(3):
        z = tree(A.weiszfeld_step(z)).astype(np.float64)
    want = A.geometric_median(maxiter=3, ftol=0.0)
    np.testing.assert_allclose(
        z, want.finalize_flat(want.fold_many(want.init(spec), ups)), rtol=1e-5
    )
    v = np.zeros(30)
    for _ in range(2):
        v = tree(A.clip_step(v, 1.5)).astype(np.float64)
    cc = A.centered_clipping(1.5, 2)
    np.testing.assert_allclose(v, cc.finalize_flat(cc.fold_many(cc.init(spec), ups)), rtol=1e-5)
    assert A.clip_step(np.zeros(30)).decomposable and A.weiszfeld_step(np.zeros(30)).decomposable
