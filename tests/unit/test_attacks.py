"""fedagg.attacks: Byzantine attacks on flat update vectors, checked against their formulas."""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedagg import attacks as A
from fedagg import clients
from fedagg.clients import LocalSGD
from fedagg.data import ArrayDataset
from fedagg.errors import ConfigError
from fedagg.models import LogReg

DIRECTIONS = ("unit_vec", "sign", "std")
GAMMA0, TOL = 50.0, 1e-5

# --------------------------------------------------------------------------------------------
# Helpers: plain-numpy versions of the formulas
# --------------------------------------------------------------------------------------------


def direction(g: np.ndarray, direction: str) -> np.ndarray:
    mu = g.mean(axis=0)
    if direction == "unit_vec":
        norm = np.linalg.norm(mu)
        return mu / norm if norm > 0 else np.zeros_like(mu)
    if direction == "sign":
        return np.sign(mu)
    return g.std(axis=0)


def pairwise_sq(g: np.ndarray) -> np.ndarray:
    return ((g[:, None, :] - g[None, :, :]) ** 2).sum(axis=2)


def max_excess(g: np.ndarray, m: np.ndarray) -> float:
    """Min-Max's condition as ``lhs - rhs`` (<= 0 when it holds)."""
    return float(((g - m) ** 2).sum(axis=1).max() - pairwise_sq(g).max())


def sum_excess(g: np.ndarray, m: np.ndarray) -> float:
    """Min-Sum's condition as ``lhs - rhs``."""
    return float(((g - m) ** 2).sum() - pairwise_sq(g).sum(axis=1).min())


def slack(g: np.ndarray) -> float:
    """Round-off allowance for the conditions (their terms are at most ~1e4 here)."""
    return 1e-9 * (1.0 + float(pairwise_sq(g).sum()))


def min_max_bracket(g: np.ndarray, p: np.ndarray, eps: float) -> tuple[float, float]:
    """Exact boundary of Min-Max's condition with the bound moved by -eps and +eps.

    Row i's distance is ``a_i - 2 gamma b_i + gamma^2 c`` with ``a_i = |mu - g_i|^2``,
    ``b_i = <mu - g_i, p>``, ``c = |p|^2``; the condition holds up to the smallest upper root.
    """
    mu = g.mean(axis=0)
    a = ((mu - g) ** 2).sum(axis=1)
    b = (mu - g) @ p
    c = float(p @ p)
    bound = float(pairwise_sq(g).max())

    def root(bnd: float) -> float:
        disc = b**2 - c * (a - bnd)
        if (a > bnd).any():
            return 0.0
        return float(((b + np.sqrt(np.maximum(disc, 0.0))) / c).min())

    return root(bound - eps), root(bound + eps)


def min_sum_bracket(g: np.ndarray, p: np.ndarray, eps: float) -> tuple[float, float]:
    """Exact boundary of Min-Sum's condition: ``h gamma^2 |p|^2 <= T - S0`` (bound +- eps)."""
    mu = g.mean(axis=0)
    s0 = float(((mu - g) ** 2).sum())
    t = float(pairwise_sq(g).sum(axis=1).min())
    hc = g.shape[0] * float(p @ p)
    return math.sqrt(max(t - s0 - eps, 0.0) / hc), math.sqrt(max(t - s0 + eps, 0.0) / hc)


def reference_search(ok: Any, gamma0: float, tol: float) -> float:
    """The NDSS'21 code's search as the brief states it, written out independently."""
    gamma, step, succ = gamma0, gamma0 / 2, 0.0
    while step >= tol:
        if ok(gamma):
            succ = gamma
            gamma = gamma + step
        else:
            gamma = gamma - step
        step = step / 2
    return succ


# Honest sets: h in 1..6 clients, d in 1..5 coordinates, multiples of 1/8 in [-10, 10].
honest_sets = st.tuples(
    st.integers(1, 6),
    st.integers(1, 5),
    st.sampled_from([np.float32, np.float64]),
    st.integers(0, 2**32 - 1),
).map(
    lambda t: (np.random.default_rng(t[3]).integers(-80, 81, size=(t[0], t[1])) / 8.0).astype(t[2])
)

# --------------------------------------------------------------------------------------------
# ALIE
# --------------------------------------------------------------------------------------------

Z_TABLE = [  # n, f, s, z (paper), z (KHJ code): spec §6.9
    (25, 5, 8, 0.4677, 0.2533),
    (20, 4, 7, 0.3853, 0.1573),
    (15, 3, 5, 0.4307, 0.2104),
    (10, 2, 4, 0.2533, 0.0),
]


@pytest.mark.parametrize(("n", "f", "s", "paper", "code"), Z_TABLE)
def test_alie_z_table(n: int, f: int, s: int, paper: float, code: float) -> None:
    assert math.floor(n / 2 + 1) - f == s
    assert A.alie_z(n, f, "paper") == pytest.approx(paper, abs=5e-5)
    assert A.alie_z(n, f, "code") == pytest.approx(code, abs=5e-5)
    assert A.alie_z(n, f) == A.alie_z(n, f, "paper")


def test_alie_formula_by_hand() -> None:
    g = np.array([[1.0, 2.0, -1.0], [3.0, 6.0, -1.0]], dtype=np.float32)
    # mu = (2, 4, -1), population std = (1, 2, 0)
    np.testing.assert_allclose(A.alie(g, 5, 1, z=0.5), [1.5, 3.0, -1.0])
    z = A.alie_z(5, 1, "code")
    np.testing.assert_allclose(A.alie(g, 5, 1, z="code"), [2 - z, 4 - 2 * z, -1.0], rtol=1e-6)
    # ddof = 1 (torch.std, as in the KHJ code): std = (sqrt 2, 2 sqrt 2, 0)
    r2 = math.sqrt(2.0)
    np.testing.assert_allclose(A.alie(g, 5, 1, z=1.0, ddof=1), [2 - r2, 4 - 2 * r2, -1.0])
    assert A.alie(g, 5, 1).dtype == np.float32


def test_alie_attack_records_z_and_sends_identical_rows() -> None:
    rng = np.random.default_rng(0)
    honest = rng.standard_normal((20, 7))
    own = rng.standard_normal((5, 7))
    out = A.attack("alie", z="code").craft(honest, own, 25, 5)
    assert out.info == {"z": A.alie_z(25, 5, "code")}
    assert out.rows.shape == (5, 7)
    np.testing.assert_array_equal(out.rows, np.tile(A.alie(honest, 25, 5, "code"), (5, 1)))
    assert A.attack("alie", z=0.21).craft(honest, own, 25, 5).info == {"z": 0.21}


# --------------------------------------------------------------------------------------------
# IPM, sign flip, Gaussian, random
# --------------------------------------------------------------------------------------------


def test_ipm_by_hand() -> None:
    g = np.array([[1.0, 2.0], [3.0, 4.0]])
    np.testing.assert_allclose(A.ipm(g, eps=0.5), [-1.0, -1.5])
    np.testing.assert_allclose(A.ipm(g), [-0.2, -0.3])


@settings(max_examples=50, deadline=None)
@given(honest_sets, st.floats(1e-3, 100.0))
def test_ipm_inner_product_with_the_mean_is_negative(g: np.ndarray, eps: float) -> None:
    mu = g.astype(np.float64).mean(axis=0)
    v = A.ipm(g, eps).astype(np.float64)
    assert v.dtype == np.float64 and A.ipm(g, eps).dtype == g.dtype
    if mu.any():
        assert float(v @ mu) < 0
    np.testing.assert_allclose(v, -eps * mu, rtol=1e-6, atol=1e-30)


def test_sign_flip_by_hand() -> None:
    own = np.array([1.0, -2.0, 0.5], dtype=np.float32)
    out = A.sign_flip(own)
    np.testing.assert_array_equal(out, [-1.0, 2.0, -0.5])
    assert out.dtype == np.float32
    np.testing.assert_array_equal(A.sign_flip(own, scale=10), [-10.0, 20.0, -5.0])
    rows = A.attack("sign_flip", scale=2.0).malicious(np.zeros((3, 3)), own[None, :], 4, 1)
    np.testing.assert_array_equal(rows, [[-2.0, 4.0, -1.0]])
    assert A.attack("reverse") == A.SignFlip(scale=10.0)


def test_gaussian_std_is_sigma() -> None:
    v = A.gaussian(np.random.default_rng(7), 200_000, 2.5)
    assert v.dtype == np.float32 and v.shape == (200_000,)
    assert float(np.std(v)) == pytest.approx(2.5, rel=0.01)
    assert abs(float(np.mean(v))) < 0.02
    expected = (2.5 * np.random.default_rng(7).standard_normal(200_000)).astype(np.float32)
    np.testing.assert_array_equal(v, expected)
    assert A.gaussian(np.random.default_rng(7), 3, 1.0, dtype=np.float64).dtype == np.float64


def test_honest_std_pools_all_coordinates() -> None:
    g = np.array([[1.0, 2.0], [3.0, 10.0]])
    assert A.honest_std(g) == pytest.approx(float(np.std([1.0, 2.0, 3.0, 10.0])))
    assert A.honest_std(g[1]) == pytest.approx(3.5)  # one update: RFA's np.std(u)


def test_gaussian_attack_sigma_kinds() -> None:
    rng = np.random.default_rng(3)
    honest = rng.standard_normal((6, 50_000)).astype(np.float32) * 3.0
    own = np.stack([np.linspace(-1, 1, 50_000), np.linspace(-5, 5, 50_000)]).astype(np.float32)
    rows = A.attack("gaussian").malicious(honest, own, 8, 2, np.random.default_rng(1))
    assert rows.shape == (2, 50_000) and rows.dtype == np.float32
    for row, mine in zip(rows, own, strict=True):  # per attacker: the std of its own update
        assert float(np.std(row)) == pytest.approx(float(np.std(mine)), rel=0.02)
    out = A.attack("gaussian", sigma="honest").craft(honest, own, 8, 2, np.random.default_rng(1))
    assert out.info["sigma"] == pytest.approx(A.honest_std(honest))
    assert float(np.std(out.rows)) == pytest.approx(out.info["sigma"], rel=0.02)
    fixed = A.attack("gaussian", sigma=200).malicious(honest, own, 8, 2, np.random.default_rng(1))
    expected = 200.0 * np.random.default_rng(1).standard_normal((2, 50_000))
    np.testing.assert_array_equal(fixed, expected.astype(np.float32))
    assert not np.array_equal(fixed[0], fixed[1])


def test_random_uniform_in_unit_interval() -> None:
    v = A.random_uniform(np.random.default_rng(0), 100_000)
    assert v.dtype == np.float32 and v.shape == (100_000,)
    assert float(v.min()) >= 0.0 and float(v.max()) < 1.0
    assert float(v.mean()) == pytest.approx(0.5, abs=0.01)
    w = A.random_uniform(np.random.default_rng(0), 1000, low=-2.0, high=3.0, dtype=np.float64)
    np.testing.assert_array_equal(w, -2.0 + 5.0 * np.random.default_rng(0).random(1000))
    rows = A.attack("random").malicious(
        np.zeros((4, 10), np.float32), np.zeros((3, 10), np.float32), 7, 3, np.random.default_rng(1)
    )
    assert rows.shape == (3, 10) and rows.dtype == np.float32
    assert float(rows.min()) >= 0.0 and float(rows.max()) < 1.0
    assert len({r.tobytes() for r in rows}) == 3  # one draw per attacker


class _AlmostOne(np.random.Generator):
    """A generator whose ``random`` returns 1 - 2**-30, which rounds to 1.0 in float32."""

    def random(self, size: Any = None, dtype: Any = np.float64, out: Any = None) -> Any:
        return np.full(size, 1.0 - 2.0**-30)


def test_random_uniform_stays_below_high_after_rounding() -> None:
    rng = _AlmostOne(np.random.PCG64(0))
    v = A.random_uniform(rng, 4)
    assert v.dtype == np.float32 and (v < 1.0).all()
    assert v[0] == np.nextafter(np.float32(1.0), np.float32(0.0))
    rows = A.attack("random").malicious(np.zeros((1, 4), np.float32), np.zeros((2, 4)), 3, 2, rng)
    assert (rows < 1.0).all()


# --------------------------------------------------------------------------------------------
# Min-Max and Min-Sum
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dir_", DIRECTIONS)
def test_min_max_and_min_sum_by_hand(dir_: str) -> None:
    # g = (0, 0), (2, 0): mu = (1, 0) and p = (1, 0) for every direction.
    # Min-Max: max((1 - gamma)^2, (1 + gamma)^2) <= 4  ->  gamma* = 1.
    # Min-Sum: (1 - gamma)^2 + (1 + gamma)^2 = 2 + 2 gamma^2 <= 4  ->  gamma* = 1.
    g = np.array([[0.0, 0.0], [2.0, 0.0]])
    for gamma_fn, attack_fn in ((A.min_max_gamma, A.min_max), (A.min_sum_gamma, A.min_sum)):
        gamma = gamma_fn(g, dir_)
        assert 1.0 - 4 * TOL < gamma <= 1.0
        np.testing.assert_allclose(attack_fn(g, dir_), [1.0 - gamma, 0.0])


@pytest.mark.parametrize("dir_", DIRECTIONS)
def test_min_max_gamma_is_the_reference_search(dir_: str) -> None:
    g = np.random.default_rng(11).standard_normal((9, 20))
    mu, p = g.mean(axis=0), direction(g, dir_)
    gm = reference_search(lambda x: max_excess(g, mu - x * p) <= 0, GAMMA0, TOL)
    gs = reference_search(lambda x: sum_excess(g, mu - x * p) <= 0, GAMMA0, TOL)
    assert A.min_max_gamma(g, dir_) == pytest.approx(gm, abs=1e-12)
    assert A.min_sum_gamma(g, dir_) == pytest.approx(gs, abs=1e-12)
    np.testing.assert_allclose(A.min_max(g, dir_), mu - gm * p, rtol=1e-12)
    np.testing.assert_allclose(A.min_sum(g, dir_), mu - gs * p, rtol=1e-12)


@pytest.mark.parametrize("dir_", DIRECTIONS)
@settings(max_examples=40, deadline=None)
@given(g=honest_sets)
def test_min_max_gamma_is_the_largest_feasible(dir_: str, g: np.ndarray) -> None:
    gamma = A.min_max_gamma(g, dir_)
    g64 = g.astype(np.float64)
    mu, p = g64.mean(axis=0), direction(g64, dir_)
    m = A.min_max(g, dir_)
    assert m.dtype == g.dtype
    np.testing.assert_allclose(m, (mu - gamma * p).astype(g.dtype), rtol=1e-6, atol=1e-6)
    if not p.any():
        assert gamma == 0.0
        return
    eps = slack(g64)
    assert max_excess(g64, mu - gamma * p) <= eps  # the condition holds at gamma
    lo, hi = min_max_bracket(g64, p, eps)
    assert gamma <= hi
    assert gamma >= min(lo, 2 * GAMMA0) - 4 * TOL  # ... and fails within 4 tol above
    if lo < 2 * GAMMA0 - 8 * TOL:  # not at the end of the searched range [0, 2 gamma0)
        assert max_excess(g64, mu - (gamma + 4 * TOL) * p) > 0


@pytest.mark.parametrize("dir_", DIRECTIONS)
@settings(max_examples=40, deadline=None)
@given(g=honest_sets)
def test_min_sum_gamma_is_the_largest_feasible(dir_: str, g: np.ndarray) -> None:
    gamma = A.min_sum_gamma(g, dir_)
    g64 = g.astype(np.float64)
    mu, p = g64.mean(axis=0), direction(g64, dir_)
    m = A.min_sum(g, dir_)
    assert m.dtype == g.dtype
    np.testing.assert_allclose(m, (mu - gamma * p).astype(g.dtype), rtol=1e-6, atol=1e-6)
    if not p.any():
        assert gamma == 0.0
        return
    eps = slack(g64)
    assert sum_excess(g64, mu - gamma * p) <= eps
    lo, hi = min_sum_bracket(g64, p, eps)  # the exact boundary is min_i |g_i - mu| / |p|
    exact = float(np.sqrt(((g64 - mu) ** 2).sum(axis=1).min() / (p @ p)))
    assert lo <= exact <= hi
    assert gamma <= hi
    assert gamma >= min(lo, 2 * GAMMA0) - 4 * TOL
    if lo > 1e-3 and lo < 2 * GAMMA0 - 8 * TOL:  # a boundary well clear of round-off
        assert sum_excess(g64, mu - (gamma + 4 * TOL) * p) > 0


def test_min_max_attack_records_gamma() -> None:
    rng = np.random.default_rng(5)
    honest = rng.standard_normal((10, 30)).astype(np.float32)
    own = rng.standard_normal((2, 30)).astype(np.float32)
    for kind, fn, gfn in (
        ("min_max", A.min_max, A.min_max_gamma),
        ("min_sum", A.min_sum, A.min_sum_gamma),
    ):
        out = A.attack(kind, direction="std").craft(honest, own, 12, 2)
        assert out.info == {"gamma": gfn(honest, "std")}
        assert out.rows.dtype == np.float32
        np.testing.assert_array_equal(out.rows, np.tile(fn(honest, "std"), (2, 1)))


def test_min_max_with_no_direction_sends_the_mean() -> None:
    same = np.ones((3, 4))
    assert A.min_max_gamma(same, "std") == 0.0
    np.testing.assert_array_equal(A.min_sum(same, "std"), np.ones(4))
    centered = np.array([[1.0, -1.0], [-1.0, 1.0]])
    assert A.min_max_gamma(centered, "unit_vec") == 0.0
    np.testing.assert_array_equal(A.min_max(centered, "sign"), [0.0, 0.0])


# --------------------------------------------------------------------------------------------
# Attack objects
# --------------------------------------------------------------------------------------------


def test_attack_objects_match_the_functions() -> None:
    rng = np.random.default_rng(9)
    honest = rng.standard_normal((8, 6))
    own = rng.standard_normal((2, 6))
    expect = {
        "none": own,
        "sign_flip": -own,
        "alie": np.tile(A.alie(honest, 10, 2), (2, 1)),
        "ipm": np.tile(A.ipm(honest), (2, 1)),
        "min_max": np.tile(A.min_max(honest), (2, 1)),
        "min_sum": np.tile(A.min_sum(honest), (2, 1)),
    }
    for kind, rows in expect.items():
        atk = A.attack(kind)
        assert atk.kind == kind
        assert atk.omniscient == (kind in ("alie", "ipm", "min_max", "min_sum"))
        np.testing.assert_array_equal(atk.malicious(honest, own, 10, 2), rows)
    assert set(A.ATTACK_KINDS) >= {
        "none", "sign_flip", "gaussian", "alie", "ipm", "min_max", "min_sum", "random",
    }  # fmt: skip


def test_attack_with_no_attacker_returns_no_row() -> None:
    honest = np.ones((3, 4), np.float32)
    for kind in A.ATTACK_KINDS:
        rows = A.attack(kind).malicious(honest, np.zeros((0, 4), np.float32), 3, 0, RNG)
        assert rows.shape == (0, 4) and rows.dtype == np.float32


def test_non_omniscient_attacks_need_no_honest_update() -> None:
    own = np.array([[1.0, 2.0]])
    rows = A.attack("sign_flip").malicious(np.zeros((0, 2)), own, 1, 1)
    np.testing.assert_array_equal(rows, -own)


# --------------------------------------------------------------------------------------------
# Label flipping
# --------------------------------------------------------------------------------------------


def test_flip_labels() -> None:
    y = np.array([0, 1, 9, 5], dtype=np.int64)
    np.testing.assert_array_equal(A.flip_labels(y, 10), [9, 8, 0, 4])
    np.testing.assert_array_equal(A.flip_labels(np.array([0, 1, 2], np.uint8), 3), [2, 1, 0])
    assert A.flip_labels(np.array([0, 1, 2], np.uint8), 3).dtype == np.uint8
    np.testing.assert_array_equal(y, [0, 1, 9, 5])
    for bad_y, k in (([0, 10], 10), ([-1], 3), ([0.0], 3)):
        with pytest.raises(ConfigError):
            A.flip_labels(np.array(bad_y), k)
    with pytest.raises(ConfigError):
        A.flip_labels(np.array([0]), 1)


@dataclass(frozen=True)
class Data:
    x: Any
    y: Any
    num_classes: int = 3


def _tiny(seed: int, n: int = 17) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    return ArrayDataset(rng.standard_normal((n, 4)), rng.integers(0, 3, n), 3)


def _same_results(a: Any, b: Any) -> None:
    assert a[0].num_examples == b[0].num_examples and a[0].steps == b[0].steps
    assert a[0].metrics == b[0].metrics
    for k in a[0].delta:
        np.testing.assert_array_equal(a[0].delta[k], b[0].delta[k])


def test_label_flip_trains_the_inner_algorithm_on_flipped_labels() -> None:
    model = LogReg(4, 3)
    params = model.init(0)
    inner = LocalSGD(epochs=2, batch_size=5, lr=0.1)
    flip = A.LabelFlip(inner, 3)
    assert (flip.name, flip.epochs, flip.batch_size) == (inner.name, 2, 5)
    datas = [_tiny(1), _tiny(2, 9)]
    manual = [ArrayDataset(d.x, 2 - d.y, 3) for d in datas]
    y_before = [d.y.copy() for d in datas]

    got = flip.train(model, params, datas[0], np.random.default_rng(4))
    want = inner.train(model, params, manual[0], np.random.default_rng(4))
    _same_results(got, want)
    honest = inner.train(model, params, datas[0], np.random.default_rng(4))
    assert not np.array_equal(got[0].delta["W"], honest[0].delta["W"])

    rngs = lambda: [np.random.default_rng(s) for s in (5, 6)]  # noqa: E731
    got_many = flip.train_many(model, params, datas, rngs(), epochs=[1, 2])
    want_many = inner.train_many(model, params, manual, rngs(), epochs=[1, 2])
    for a, b in zip(got_many, want_many, strict=True):
        _same_results(a, b)
    for d, y in zip(datas, y_before, strict=True):
        np.testing.assert_array_equal(d.y, y)  # the client's data is not modified


def test_label_flip_on_plain_objects_and_dataclasses() -> None:
    model = LogReg(4, 3)
    params = model.init(0)
    inner = LocalSGD(epochs=1, batch_size=4, lr=0.1)
    d = _tiny(3, 8)
    want = inner.train(model, params, Data(d.x, 2 - d.y), np.random.default_rng(0))
    for data in (SimpleNamespace(x=d.x, y=d.y), Data(d.x, d.y)):
        got = A.LabelFlip(inner, 3).train(model, params, data, np.random.default_rng(0))
        _same_results(got, want)
    with pytest.raises(ConfigError):
        A.LabelFlip(object(), 3)
    with pytest.raises(ConfigError):
        A.LabelFlip(inner, 1)
    with pytest.raises(ConfigError):
        A.LabelFlip(inner, 3).train(model, params, object(), np.random.default_rng(0))


# --------------------------------------------------------------------------------------------
# Bad inputs, and inputs left untouched
# --------------------------------------------------------------------------------------------

G = np.arange(12.0).reshape(4, 3)
OWN = np.ones((2, 3))
RNG = np.random.default_rng(0)

BAD_CALLS: list[tuple[str, Any]] = [
    ("alie n <= 2f", lambda: A.alie(G, 4, 2)),
    ("alie_z n <= 2f", lambda: A.alie_z(10, 5, "code")),
    ("alie_z n too small", lambda: A.alie_z(2, 0)),
    ("alie unknown z", lambda: A.alie(G, 6, 2, z="median")),  # type: ignore[arg-type]
    ("alie non-finite z", lambda: A.alie(G, 6, 2, z=math.inf)),
    ("alie bad ddof", lambda: A.alie(G, 6, 2, ddof=2)),
    ("alie ddof 1 one row", lambda: A.alie(G[:1], 6, 2, ddof=1)),
    ("alie f > n", lambda: A.alie(G, 2, 3)),
    ("ipm eps 0", lambda: A.ipm(G, 0.0)),
    ("ipm eps < 0", lambda: A.ipm(G, -0.1)),
    ("ipm empty", lambda: A.ipm(np.zeros((0, 3)))),
    ("ipm 1-D", lambda: A.ipm(G[0])),
    ("ipm ints", lambda: A.ipm(np.ones((2, 3), dtype=np.int64))),
    ("ipm NaN", lambda: A.ipm(np.array([[1.0, np.nan]]))),
    ("ipm Inf", lambda: A.ipm(np.array([[1.0, np.inf]]))),
    ("ipm d = 0", lambda: A.ipm(np.zeros((2, 0)))),
    ("min_max direction", lambda: A.min_max(G, "up")),  # type: ignore[arg-type]
    ("min_sum direction", lambda: A.min_sum_gamma(G, "median")),  # type: ignore[arg-type]
    ("min_max gamma0", lambda: A.min_max(G, gamma0=0.0)),
    ("min_max tol", lambda: A.min_max(G, tol=-1.0)),
    ("min_max tol >= gamma0", lambda: A.min_max(G, gamma0=1.0, tol=1.0)),
    ("min_max empty", lambda: A.min_max_gamma(np.zeros((0, 3)))),
    ("sign_flip scale", lambda: A.sign_flip(G[0], 0.0)),
    ("sign_flip 2-D", lambda: A.sign_flip(G)),
    ("sign_flip overflow", lambda: A.sign_flip(np.ones(2, np.float32), 1e39)),
    ("sign_flip overflow64", lambda: A.sign_flip(np.array([1e300]), 1e10)),
    ("ipm overflow64", lambda: A.ipm(np.array([[1e300]]), 1e300)),
    ("attack overflow", lambda: A.attack("sign_flip", scale=1e300).malicious(G, OWN * 1e300, 6, 2)),
    ("random overflow", lambda: A.random_uniform(RNG, 3, -1e308, 1e308, dtype=np.float64)),
    ("gaussian sigma", lambda: A.gaussian(RNG, 3, -1.0)),
    ("gaussian d", lambda: A.gaussian(RNG, 0, 1.0)),
    ("gaussian dtype", lambda: A.gaussian(RNG, 3, 1.0, dtype=np.int32)),
    ("gaussian rng", lambda: A.gaussian(0, 3, 1.0)),  # type: ignore[arg-type]
    ("random range", lambda: A.random_uniform(RNG, 3, 1.0, 1.0)),
    ("honest_std empty", lambda: A.honest_std(np.zeros((0, 3)))),
    ("kind", lambda: A.attack("lie")),
    ("kind param", lambda: A.attack("ipm", epsilon=0.1)),
    ("kind eps", lambda: A.attack("ipm", eps=0)),
    ("kind z", lambda: A.attack("alie", z="scipy")),
    ("kind direction", lambda: A.attack("min_sum", direction="unit")),
    ("kind sigma", lambda: A.attack("gaussian", sigma="all")),
    ("kind scale", lambda: A.attack("sign_flip", scale=-1)),
    ("kind bool", lambda: A.attack("ipm", eps=True)),
    ("kind low high", lambda: A.attack("random", low=2.0, high=1.0)),
    ("attack n <= 2f", lambda: A.attack("alie").malicious(G, OWN, 4, 2)),
    ("attack own shape", lambda: A.attack("ipm").malicious(G, OWN, 6, 3)),
    ("attack own d", lambda: A.attack("ipm").malicious(G, np.ones((2, 4)), 6, 2)),
    ("attack empty", lambda: A.attack("min_max").malicious(np.zeros((0, 3)), OWN, 2, 2)),
    ("attack NaN own", lambda: A.attack("none").malicious(G, OWN * np.nan, 6, 2)),
    ("attack rng", lambda: A.attack("gaussian").malicious(G, OWN, 6, 2, None)),
    ("attack rng random", lambda: A.attack("random").malicious(G, OWN, 6, 2, None)),
    ("attack n", lambda: A.attack("ipm").malicious(G, OWN, 0, 2)),
    ("attack sigma honest", lambda: A.attack("gaussian", sigma="honest").malicious(
        np.zeros((0, 3)), OWN, 2, 2, RNG)),
]  # fmt: skip


@pytest.mark.parametrize(("what", "call"), BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_bad_inputs_raise_config_error(what: str, call: Any) -> None:
    with pytest.raises(ConfigError):
        call()


def test_inputs_are_not_modified() -> None:
    rng = np.random.default_rng(2)
    honest = rng.standard_normal((7, 5)).astype(np.float32)
    own = rng.standard_normal((3, 5)).astype(np.float32)
    h0, o0 = honest.copy(), own.copy()
    outs = [
        A.sign_flip(own[0]),
        A.alie(honest, 10, 3),
        A.ipm(honest),
        *(fn(honest, d) for fn in (A.min_max, A.min_sum) for d in DIRECTIONS),
        *(
            A.attack(kind).malicious(honest, own, 10, 3, np.random.default_rng(0))
            for kind in A.ATTACK_KINDS
        ),
    ]
    A.honest_std(honest)
    np.testing.assert_array_equal(honest, h0)
    np.testing.assert_array_equal(own, o0)
    for out in outs:
        assert not np.shares_memory(out, honest) and not np.shares_memory(out, own)
        out[...] = 0  # results are writable and independent of the inputs
    np.testing.assert_array_equal(honest, h0)
    np.testing.assert_array_equal(own, o0)


def test_public_namespace_reexports_the_attack_modules() -> None:
    import importlib
    import pkgutil

    import fedagg.core

    # every public name comes from one of the package's modules, or is the LabelFlip client
    # (with flip_labels); the pure core holds no attack
    names = {m.name for m in pkgutil.iter_modules(A.__path__)}
    assert names == {"_checks", "_kinds", "_search", "_vectors"}
    homes = [importlib.import_module(f"fedagg.attacks.{n}") for n in sorted(names)]
    homes.append(importlib.import_module("fedagg.clients._label_flip"))
    for name in A.__all__:
        assert any(getattr(m, name, None) is getattr(A, name) for m in homes), name
    assert A.LabelFlip is clients.LabelFlip
    assert "attacks" not in {m.name for m in pkgutil.iter_modules(fedagg.core.__path__)}
