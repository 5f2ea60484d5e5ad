"""Trees and shards of monoid states (fedagg.core.tree).

* ``Sharded`` equals the unsharded mean bit for bit (any shard count, any delta layout) and
  refuses atomically across shards; its worker helpers rebuild the same state;
* ``reduce_tree`` merges along a balanced tree and mutates only the group heads;
* float32 trees stay within ``tree_error_bound`` of the flat fold; float64 (compensated) trees
  equal it bit for bit wherever the exact mean is not within ``compensated_margin`` of a
  float32 rounding boundary (checked with exact rational arithmetic);
* the hierarchical forms of the non-monoid rules: leaf-then-mean (its documented meaning),
  RFA and centered clipping across a tree (equal to the spooled rules), SketchKrum (JL
  distances within eps, same selection as exact Krum on separated data).
"""

from __future__ import annotations

import itertools
import tracemalloc
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedagg
from fedagg.core import kernels
from tests import robust_ref as ref

A = fedagg.aggregators
T = fedagg.transforms


# -- helpers ----------------------------------------------------------------------------------


def spec_of(shapes: list[tuple[int, ...]], keyed: bool) -> fedagg.ParamSpec:
    arrays = [np.zeros(s, np.float32) for s in shapes]
    if keyed:
        return fedagg.ParamSpec.from_arrays({f"a{i}": a for i, a in enumerate(arrays)})
    return fedagg.ParamSpec.from_arrays(arrays)


def as_kind(spec: fedagg.ParamSpec, flat: np.ndarray, kind: str) -> Any:
    """The same delta as separate arrays, one flat array, views of one buffer, or bytes."""
    if kind == "flat":
        return flat.copy()
    if kind == "bytes":
        return flat.tobytes()
    views = spec.unflatten(flat.copy())
    if kind == "views":
        return views
    if spec.keyed:
        assert isinstance(views, dict)
        return {k: v.copy() for k, v in views.items()}
    return [v.copy() for v in views]


def make_updates(
    spec: fedagg.ParamSpec, n: int, seed: int, kinds: list[str] | None = None, wide: bool = True
) -> list[fedagg.Update]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x = rng.standard_normal(spec.size)
        if wide:
            x *= 10.0 ** rng.uniform(-6, 6, spec.size)
        kind = kinds[i % len(kinds)] if kinds else "arrays"
        out.append(
            fedagg.Update(
                as_kind(spec, x.astype(spec.dtype), kind),
                weight=float(rng.uniform(0.01, 100)),
                client_id=f"c{i}",
            )
        )
    return out


def fold(agg: Any, spec: fedagg.ParamSpec, ups: list[fedagg.Update], **kw: Any) -> Any:
    return agg.fold_many(agg.init(spec, **kw), ups)


def bits(x: np.ndarray) -> bytes:
    return np.ascontiguousarray(x).tobytes()


def flat_rows(spec: fedagg.ParamSpec, ups: list[fedagg.Update]) -> np.ndarray:
    return np.stack([spec.as_flat(u.delta).astype(np.float64) * u.scale for u in ups])


def split_leaves(items: list[Any], cuts: list[int]) -> list[list[Any]]:
    edges = [0, *sorted(set(c for c in cuts if 0 < c < len(items))), len(items)]
    return [items[a:b] for a, b in itertools.pairwise(edges)]


# -- shard_bounds -----------------------------------------------------------------------------


def test_shard_bounds_cover_the_model_in_aligned_ranges() -> None:
    assert fedagg.aggregators.Sharded(A.mean(), 3).bounds(spec_of([(100,)], False)) == [
        (0, 32),
        (32, 64),
        (64, 100),
    ]
    b = A.sharded(A.mean(), 5).bounds(spec_of([(3,)], False))
    assert b == [(0, 0), (0, 0), (0, 0), (0, 0), (0, 3)]  # more shards than cache lines


# -- Sharded: bit-identical to the unsharded mean ---------------------------------------------


@st.composite
def shard_cases(draw: st.DrawFn) -> tuple[fedagg.ParamSpec, list[fedagg.Update], int, int]:
    n_arrays = draw(st.integers(1, 3))
    shapes = [
        draw(st.sampled_from([(0,), (1,), (5,), (3, 4), (17,), (2, 3, 2), ()]))
        for _ in range(n_arrays)
    ]
    spec = spec_of(shapes, draw(st.booleans()))
    kinds = draw(st.lists(st.sampled_from(["arrays", "flat", "views", "bytes"]), min_size=1))
    ups = make_updates(spec, draw(st.integers(1, 9)), draw(st.integers(0, 2**32 - 1)), kinds)
    shards = draw(st.integers(1, spec.size + 4))  # includes S > size (empty shards)
    align = draw(st.sampled_from([1, 2, 16]))
    return spec, ups, shards, align


@settings(max_examples=30)
@given(shard_cases(), st.sampled_from(["float32", "float64"]), st.data())
def test_sharded_mean_is_bit_identical_to_the_mean(case: Any, acc: str, data: Any) -> None:
    spec, ups, shards, align = case
    mean = A.mean(acc)  # type: ignore[arg-type]
    sh = A.sharded(mean, shards, align=align)
    want = mean.finalize_flat(fold(mean, spec, ups))
    state = fold(sh, spec, ups)
    assert sh.count(state) == len(ups)
    got = sh.finalize_flat(state)
    assert got.dtype == spec.dtype and bits(got) == bits(want)
    tree_out = sh.finalize(state)
    assert fedagg.ParamSpec.from_arrays(tree_out) == spec
    # one at a time, and merged halves, also to the bit (the halves as the unsharded merge)
    one = sh.init(spec)
    for u in ups:
        sh.fold(one, u)
    assert bits(sh.finalize_flat(one)) == bits(want)
    cut = data.draw(st.integers(0, len(ups)))
    left, right = fold(sh, spec, ups[:cut]), fold(sh, spec, ups[cut:])
    m_left, m_right = fold(mean, spec, ups[:cut]), fold(mean, spec, ups[cut:])
    merged = sh.merge(left, right)
    assert bits(sh.finalize_flat(merged)) == bits(mean.finalize_flat(mean.merge(m_left, m_right)))


@pytest.mark.parametrize("acc", ["float32", "float64"])
def test_sharded_mean_equals_compiled_unsharded_mean(acc: str) -> None:
    """A model large enough for the compiled kernels, cut into shards small enough for numpy:
    the per-coordinate operations, hence the bits, are the same."""
    spec = spec_of([(300, 230), (3,)], True)
    assert spec.size >= kernels.NUMBA_MIN_SIZE
    ups = make_updates(spec, 5, 7, ["arrays", "flat"])
    mean = A.mean(acc)  # type: ignore[arg-type]
    sh = A.sharded(mean, 7)
    assert all(hi - lo < kernels.NUMBA_MIN_SIZE for lo, hi in sh.bounds(spec))
    assert bits(sh.finalize_flat(fold(sh, spec, ups))) == bits(
        mean.finalize_flat(fold(mean, spec, ups))
    )


def test_sharded_clip_uses_the_whole_update_norm() -> None:
    spec = spec_of([(40,), (9,)], False)
    ups = make_updates(spec, 6, 3, wide=False)
    inner = A.compose(T.clip_norm(1.0), A.mean())
    sh = A.sharded(inner, 4, align=1)
    want = inner.finalize_flat(fold(inner, spec, ups))
    got = sh.finalize_flat(fold(sh, spec, ups))
    assert bits(got) == bits(want)
    plain = A.mean().finalize_flat(fold(A.mean(), spec, ups))
    assert np.abs(got).max() < 0.5 * np.abs(plain).max()  # clipping really happened


def test_sharded_weiszfeld_step_is_a_shardable_composition() -> None:
    spec = spec_of([(30,)], False)
    ups = make_updates(spec, 5, 4, wide=False)
    z = np.full(30, 0.25)
    step = A.weiszfeld_step(z)
    sh = A.sharded(step, 3, align=1)
    assert bits(sh.finalize_flat(fold(sh, spec, ups))) == bits(
        step.finalize_flat(fold(step, spec, ups))
    )


@pytest.mark.parametrize("acc", ["float32", "float64"])
@pytest.mark.parametrize("bad", ["nan-last-shard", "inf-middle", "overflow-last"])
def test_a_refusal_in_a_late_shard_leaves_every_shard_unchanged(acc: str, bad: str) -> None:
    spec = spec_of([(10,), (11,)], True)
    sh = A.sharded(A.mean(acc), 3, align=1)  # type: ignore[arg-type]
    state = fold(sh, spec, make_updates(spec, 3, 1, wide=False))
    before = fedagg.dumps(state)
    flat = np.ones(spec.size, np.float32)
    weight = 1.0
    if bad == "nan-last-shard":
        flat[-1] = np.nan
    elif bad == "inf-middle":
        flat[10] = -np.inf
    else:
        if acc == "float64":
            pytest.skip("float64 sums do not overflow at float32 max * 1e30")
        flat[-1], weight = np.finfo(np.float32).max, 1e30
    good = make_updates(spec, 70, 2, wide=False)
    mean = A.mean(acc)  # type: ignore[arg-type]
    with pytest.raises(fedagg.NonFiniteUpdate) as unsharded:
        mean.fold_many(fold(mean, spec, good[:1]), [*good, fedagg.Update(flat, weight, "bad")])
    with pytest.raises(fedagg.NonFiniteUpdate) as info:
        sh.fold_many(state, [*good, fedagg.Update(flat, weight, "bad"), *good[:2]])
    assert info.value.client_id == unsharded.value.client_id  # the same refusal
    if bad != "overflow-last":  # (an overflow names the first client of its kernel batch)
        assert info.value.client_id == "bad"
    assert fedagg.dumps(state) == before
    sh.fold_many(state, good[:2])
    assert sh.count(state) == 5


def test_merge_overflow_rolls_back_every_shard() -> None:
    spec = spec_of([(12,)], False)
    sh = A.sharded(A.mean("float32"), 3, align=1)
    big = np.zeros(12, np.float32)
    big[-1] = np.finfo(np.float32).max / 2
    a = fold(sh, spec, [fedagg.Update(big * 0 + 1, 1.0, "x"), fedagg.Update(big, 1.5, "y")])
    b = fold(sh, spec, [fedagg.Update(big, 1.5, "z")])
    before = fedagg.dumps(a)
    with pytest.raises(fedagg.StateError, match="overflow"):
        sh.merge(a, b)
    assert fedagg.dumps(a) == before


def test_sharded_refuses_what_is_not_coordinate_wise() -> None:
    for inner in [
        A.median(),
        A.krum(0),
        A.clip_step(np.zeros(3)),
        A.compose(T.clip_norm(1.0), A.trimmed_mean(1)),
        A.sharded(A.mean(), 2),
    ]:
        with pytest.raises(fedagg.ConfigError, match="coordinate-wise"):
            A.sharded(inner, 2)  # type: ignore[arg-type]
    for shards in [0, -1, True, 2.5]:
        with pytest.raises(fedagg.ConfigError, match="shards"):
            A.sharded(A.mean(), shards)  # type: ignore[arg-type]
    with pytest.raises(fedagg.ConfigError, match="align"):
        A.sharded(A.mean(), 2, align=0)
    spec = spec_of([(4,)], False)
    with pytest.raises(fedagg.ConfigError, match="shard index"):
        A.sharded(A.mean(), 2).shard_spec(spec, 2)


def test_merge_refuses_states_sharded_differently() -> None:
    spec = spec_of([(40,)], False)
    with pytest.raises(fedagg.StateError, match="sharded differently"):
        A.sharded(A.mean(), 2, align=1).merge(
            A.sharded(A.mean(), 2, align=1).init(spec), A.sharded(A.mean(), 3, align=1).init(spec)
        )


# -- Sharded: one shard per worker, assembled at the root -------------------------------------


@pytest.mark.parametrize("acc", ["float32", "float64"])
def test_workers_folding_their_slices_assemble_to_the_same_state(acc: str) -> None:
    spec = spec_of([(6, 5), (7,)], True)
    ups = make_updates(spec, 6, 11, ["arrays", "flat", "bytes"])
    sh = A.sharded(A.compose(T.clip_norm(50.0), A.mean(acc)), 4, align=1)  # type: ignore[arg-type]
    workers = [sh.init_shard(spec, i, version=2) for i in range(4)]
    for u in ups:
        for w, part in zip(workers, sh.split(spec, u, version=2), strict=True):
            assert isinstance(part.delta, (np.ndarray, list))
            sh.mean.fold(w, part)
    whole = fold(sh, spec, ups, version=2)
    assembled = sh.assemble(spec, workers)
    assert sh.shard_state(assembled, 1) is workers[1]
    assert fedagg.dumps(assembled) == fedagg.dumps(whole)
    assert bits(sh.finalize_flat(assembled)) == bits(sh.finalize_flat(whole))


def test_split_gives_views_and_validates_the_whole_update() -> None:
    spec = spec_of([(64,)], False)
    sh = A.sharded(A.mean(), 4)
    buf = np.arange(64, dtype=np.float32)
    parts = sh.split(spec, fedagg.Update(buf, 2.0, "a"))
    assert [p.weight for p in parts] == [2.0] * 4
    for p, (lo, hi) in zip(parts, sh.bounds(spec), strict=True):
        assert isinstance(p.delta, np.ndarray) and np.shares_memory(p.delta, buf)
        np.testing.assert_array_equal(p.delta, buf[lo:hi])
    bad = buf.copy()
    bad[-1] = np.nan
    with pytest.raises(fedagg.NonFiniteUpdate):
        sh.split(spec, fedagg.Update(bad, 1.0, "b"))
    with pytest.raises(fedagg.StaleUpdate):
        sh.split(spec, fedagg.Update(buf, 1.0, "c", base_version=1), version=2)


def test_assemble_refuses_mismatched_shard_states() -> None:
    spec = spec_of([(40,)], False)
    sh = A.sharded(A.mean(), 3, align=1)
    ups = make_updates(spec, 3, 5)

    def workers(ups: list[fedagg.Update], version: int | None = None) -> list[Any]:
        ws = [sh.init_shard(spec, i, version=version) for i in range(3)]
        for u in ups:
            for w, p in zip(ws, sh.split(spec, u, version=version), strict=True):
                sh.mean.fold(w, p)
        return ws

    good = workers(ups)
    sh.assemble(spec, good)  # fine
    with pytest.raises(fedagg.StateError, match="expected 3"):
        sh.assemble(spec, good[:2])
    with pytest.raises(fedagg.StateError, match="slice"):
        sh.assemble(spec, [good[1], good[0], good[2]])
    with pytest.raises(fedagg.StateError, match="same updates"):
        sh.assemble(spec, [*workers(ups[:2])[:2], good[2]])  # one update fewer
    other = make_updates(spec, 3, 6)  # same count, other clients
    with pytest.raises(fedagg.StateError, match="same updates"):
        sh.assemble(spec, [good[0], good[1], workers(other)[2]])
    with pytest.raises(fedagg.StateError, match="version"):
        sh.assemble(spec, [good[0], good[1], workers(ups, version=4)[2]])
    f64 = A.sharded(A.mean("float64"), 3, align=1)
    with pytest.raises(fedagg.StateError, match="accumulator"):
        f64.assemble(spec, good)


def test_a_tampered_sharded_state_does_not_load() -> None:
    spec = spec_of([(40,)], False)
    sh = A.sharded(A.mean(), 3, align=1)
    state = fold(sh, spec, make_updates(spec, 2, 5))
    assert fedagg.dumps(fedagg.loads(fedagg.dumps(state))) == fedagg.dumps(state)
    state.shards[2].count = 7
    with pytest.raises(fedagg.StateError, match="different numbers"):
        fedagg.loads(fedagg.dumps(state))
    state.shards[2].count = 2
    state.bounds = [(0, 13), (14, 27), (27, 40)]
    with pytest.raises(fedagg.StateError, match="contiguous"):
        fedagg.loads(fedagg.dumps(state))


# -- reduce_tree ------------------------------------------------------------------------------


class ListMonoid:
    """The free monoid on strings: merge concatenates (order shows the tree's grouping)."""

    def merge(self, state: list[str], other: list[str]) -> list[str]:
        state.extend(other)
        state.append(")")
        return state


@pytest.mark.parametrize(("n", "fanout"), [(1, 2), (7, 2), (9, 3), (10, 4), (5, 8), (28, 3)])
def test_reduce_tree_groups_consecutively_and_mutates_only_group_heads(n: int, fanout: int) -> None:
    states = [[f"x{i}"] for i in range(n)]
    copies = [list(s) for s in states]
    root = A.reduce_tree(ListMonoid(), states, fanout)
    assert root is states[0]
    assert [t for t in root if t != ")"] == [f"x{i}" for i in range(n)]  # order kept
    assert sum(t == ")" for t in root) == n - 1  # one merge per edge of the tree
    levels = range(1, 8)
    heads = {
        i for i in range(n) for lv in levels if i % fanout**lv == 0 and i + fanout ** (lv - 1) < n
    }
    for i in range(1, n):
        assert (states[i] != copies[i]) == (i in heads)  # only the documented heads change


@pytest.mark.parametrize(
    ("n", "fanout", "levels", "into_root"),
    [(8, 2, 3, 3), (9, 2, 4, 4), (27, 3, 3, 6), (28, 3, 4, 7), (1, 2, 0, 0), (5, 9, 1, 4)],
)
def test_reduce_tree_is_balanced(n: int, fanout: int, levels: int, into_root: int) -> None:
    """ceil(log_fanout n) levels: the root is the head of the first group at every level, so
    it receives ``min(fanout, len(level)) - 1`` merges per level; no leaf's content moves more
    than ``levels`` times."""

    class Hops:
        def merge(self, a: dict[int, int], b: dict[int, int]) -> dict[int, int]:
            a.update({leaf: hops + 1 for leaf, hops in b.items() if leaf >= 0})
            a[-1] = a.get(-1, 0) + 1  # merges received by this state (-1 is not a leaf)
            return a

    root = A.reduce_tree(Hops(), [{i: 0} for i in range(n)], fanout)
    received = root.pop(-1, 0)
    assert sorted(root) == list(range(n))
    assert received == into_root
    assert max(root.values()) <= levels


def test_reduce_tree_bad_input() -> None:
    for fanout in [1, 0, True, 2.0]:
        with pytest.raises(fedagg.ConfigError, match="fanout"):
            A.reduce_tree(ListMonoid(), [["a"], ["b"]], fanout)  # type: ignore[arg-type]
    with pytest.raises(fedagg.ConfigError, match="at least one"):
        A.reduce_tree(ListMonoid(), [], 2)


# -- tree vs flat: the documented bound -------------------------------------------------------

finite32 = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
weights = st.floats(0.01, 1e3, allow_nan=False, allow_infinity=False)


@st.composite
def tree_cases(draw: st.DrawFn, max_n: int = 16) -> Any:
    dim = draw(st.integers(1, 12))
    n = draw(st.integers(1, max_n))
    xs = [
        np.array(draw(st.lists(finite32, min_size=dim, max_size=dim)), np.float32) for _ in range(n)
    ]
    ws = [draw(weights) for _ in range(n)]
    order = draw(st.permutations(range(n)))
    cuts = draw(st.lists(st.integers(1, max(1, n - 1)), max_size=n))
    fanout = draw(st.integers(2, 5))
    spec = fedagg.ParamSpec.from_arrays([np.zeros(dim, np.float32)])
    ups = [fedagg.Update([x], w, str(i)) for i, (x, w) in enumerate(zip(xs, ws, strict=True))]
    return spec, ups, [ups[i] for i in order], cuts, fanout


def tree_and_flat(acc: str, case: Any) -> tuple[np.ndarray, np.ndarray]:
    spec, ups, perm, cuts, fanout = case
    agg = A.mean(acc)  # type: ignore[arg-type]
    flat = agg.finalize_flat(fold(agg, spec, ups))
    leaves = [fold(agg, spec, leaf) for leaf in split_leaves(perm, cuts)]
    tree = agg.finalize_flat(A.reduce_tree(agg, leaves, fanout))
    return tree, flat


def abs_sum(ups: list[fedagg.Update]) -> np.ndarray:
    return sum(u.weight * np.abs(np.asarray(u.delta[0], np.float64)) for u in ups)  # type: ignore[index,return-value]


@settings(max_examples=40)
@given(tree_cases())
def test_float32_trees_stay_within_the_bound(case: Any) -> None:
    _, ups, *_ = case
    tree, flat = tree_and_flat("float32", case)
    total = sum(u.weight for u in ups)
    bound = A.tree_error_bound(abs_sum(ups), total, len(ups), "float32")
    diff = np.abs(tree.astype(np.float64) - flat.astype(np.float64))
    assert np.all(diff <= bound)
    # the bound is tight enough to mean something: a few float32 ulps of the scale
    assert np.all(bound <= (2 * len(ups) + 4) * 2.0**-24 * abs_sum(ups) / total + 2.0**-148)


def test_float32_tree_differs_from_flat_within_the_bound() -> None:
    """A known case where the order matters: 1 + e + e = 1 (ties to even) but (e + e) + 1 > 1."""
    e = np.float32(2.0**-24)
    spec = fedagg.ParamSpec.from_arrays([np.zeros(1, np.float32)])
    ups = [fedagg.Update([np.array([x], np.float32)], 1.0, str(i)) for i, x in enumerate([1, e, e])]
    agg = A.mean("float32")
    flat = agg.finalize_flat(fold(agg, spec, ups))
    tree = agg.finalize_flat(
        A.reduce_tree(agg, [fold(agg, spec, ups[1:]), fold(agg, spec, ups[:1])], 2)
    )
    assert tree[0] != flat[0]
    bound = A.tree_error_bound(abs_sum(ups), 3.0, 3, "float32")
    assert abs(float(tree[0]) - float(flat[0])) <= bound[0]


def exact_mean(ups: list[fedagg.Update]) -> list[Fraction]:
    """The exact mean of the float64 products ``fl(w x)`` that the compensated fold adds."""
    total = sum(Fraction(u.weight) for u in ups)
    dim = len(ups[0].delta[0])  # type: ignore[index]
    out = []
    for j in range(dim):
        s = sum(Fraction(float(np.float64(u.weight) * np.float64(u.delta[0][j]))) for u in ups)  # type: ignore[index]
        out.append(s / total)
    return out


def certified_rounding(q: Fraction, margin: float) -> np.float32 | None:
    """The float32 nearest to ``q`` if no float32 rounding boundary lies within ``margin``."""
    c = np.float32(float(q))
    lo = np.nextafter(c, np.float32(-np.inf))
    hi = np.nextafter(c, np.float32(np.inf))
    for m in (
        (Fraction(float(c)) + Fraction(float(lo))) / 2,
        (Fraction(float(c)) + Fraction(float(hi))) / 2,
    ):
        if abs(q - m) <= Fraction(margin):
            return None
    return c


@settings(max_examples=25)
@given(tree_cases(max_n=12))
def test_float64_trees_equal_the_flat_fold_bit_for_bit(case: Any) -> None:
    _, ups, *_ = case
    tree, flat = tree_and_flat("float64", case)
    total = sum(u.weight for u in ups)
    a = abs_sum(ups)
    margin = A.compensated_margin(a, total, len(ups))
    for j, q in enumerate(exact_mean(ups)):
        want = certified_rounding(q, float(margin[j]))
        if want is not None:  # the usual case: both are the correctly rounded exact mean
            assert bits(tree[j : j + 1]) == bits(flat[j : j + 1]) == bits(np.array([want]))
        else:  # a rounding boundary within the margin: at most the documented bound apart
            bound = A.tree_error_bound(a[j : j + 1], total, len(ups), "float64")
            assert abs(float(tree[j]) - float(flat[j])) <= bound[0]


def test_float64_trees_are_certified_almost_everywhere() -> None:
    """On ordinary data the certificate applies to (nearly) every coordinate, so the exact
    comparison above is what is tested, not the fallback."""
    rng = np.random.default_rng(0)
    spec = fedagg.ParamSpec.from_arrays([np.zeros(300, np.float32)])
    ups = [
        fedagg.Update(
            [rng.standard_normal(300).astype(np.float32)], float(rng.uniform(0.1, 9)), str(i)
        )
        for i in range(40)
    ]
    case = (spec, ups, list(reversed(ups)), [3, 9, 10, 25], 3)
    tree, flat = tree_and_flat("float64", case)
    margin = A.compensated_margin(abs_sum(ups), sum(u.weight for u in ups), 40)
    certified = 0
    for j, q in enumerate(exact_mean(ups)):
        want = certified_rounding(q, float(margin[j]))
        if want is not None:
            certified += 1
            assert tree[j] == flat[j] == want
    assert certified >= 299


def test_error_bound_bad_input() -> None:
    with pytest.raises(fedagg.ConfigError, match="total_weight"):
        A.tree_error_bound([1.0], 0.0, 3)
    with pytest.raises(fedagg.ConfigError, match="n must"):
        A.tree_error_bound([1.0], 1.0, -1)
    with pytest.raises(fedagg.ConfigError, match="accumulator"):
        A.tree_error_bound([1.0], 1.0, 3, "float16")  # type: ignore[arg-type]
    # known answer: n = 1 leaves only the final rounding; the bound grows with n
    b1, b9 = A.tree_error_bound([3.0], 3.0, 1)[0], A.tree_error_bound([3.0], 3.0, 9)[0]
    assert 2 * 2.0**-24 <= b1 < 2.1 * 2.0**-24 and b9 > b1 + 15 * 2.0**-24


# -- leaf-then-mean -----------------------------------------------------------------------------


def leaf_updates(values: list[list[float]], dim: int = 3) -> list[list[fedagg.Update]]:
    return [
        [
            fedagg.Update(np.full(dim, v, np.float32), 1.0 + (k % 3), f"l{i}c{k}")
            for k, v in enumerate(leaf)
        ]
        for i, leaf in enumerate(values)
    ]


def test_leaf_then_mean_is_the_count_weighted_mean_of_leaf_results() -> None:
    rng = np.random.default_rng(2)
    spec = fedagg.ParamSpec.from_arrays([np.zeros(20, np.float32)])
    leaves = [
        [
            fedagg.Update(
                rng.standard_normal(20).astype(np.float32), float(rng.integers(1, 9)), f"{i}{k}"
            )
            for k in range(nk)
        ]
        for i, nk in enumerate([5, 3, 8])
    ]
    rule = A.leaf_then_mean(A.median())
    got = rule.aggregate(leaves, spec, fanout=2)
    meds = [ref.median(flat_rows(spec, leaf)) for leaf in leaves]
    want = sum(len(leaf) * m for leaf, m in zip(leaves, meds, strict=True)) / 16
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    by_w = A.leaf_then_mean(A.median(), by="weight").aggregate(leaves, spec)
    ws = [sum(u.weight for u in leaf) for leaf in leaves]
    want_w = sum(w * m for w, m in zip(ws, meds, strict=True)) / sum(ws)
    np.testing.assert_allclose(by_w, want_w, rtol=1e-6, atol=1e-7)
    # sealed partials merge like any mean: a manual tree gives the same
    sealed = [rule.seal(fold(rule.leaf, spec, leaf)) for leaf in leaves]
    assert [s.weight for s in sealed] == [5.0, 3.0, 8.0]
    root = rule.merge(rule.merge(sealed[2], sealed[0]), sealed[1])
    assert rule.count(root) == 3
    np.testing.assert_allclose(rule.finalize_flat(root), got, rtol=1e-7)


def test_leaf_then_mean_dilutes_but_does_not_remove_a_corrupted_leaf() -> None:
    """Each leaf tolerates a Byzantine minority of its own clients; a leaf with a Byzantine
    majority outputs their value, which enters the mean with weight n_l / N."""
    spec = fedagg.ParamSpec.from_arrays([np.zeros(3, np.float32)])
    rule = A.leaf_then_mean(A.median())
    minority = leaf_updates([[0, 0, 0, 1000, 1000], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(rule.aggregate(minority, spec), 0.0)
    majority = leaf_updates([[0, 0, 1000, 1000, 1000], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_allclose(rule.aggregate(majority, spec), 1000 * 5 / 15, rtol=1e-6)
    # the flat median over all 15 would have removed them
    flat = A.median()
    np.testing.assert_array_equal(
        flat.finalize_flat(fold(flat, spec, [u for leaf in majority for u in leaf])), 0.0
    )


def test_leaf_then_mean_bad_input() -> None:
    spec = fedagg.ParamSpec.from_arrays([np.zeros(3, np.float32)])
    rule = A.leaf_then_mean(A.krum(1))  # needs 5 per leaf
    with pytest.raises(fedagg.TooFewUpdates):
        rule.aggregate(leaf_updates([[0, 0, 0, 0, 0], [1, 1, 1]]), spec)
    with pytest.raises(fedagg.EmptyAggregate):
        rule.aggregate([[], []], spec)
    with pytest.raises(fedagg.EmptyAggregate):
        rule.seal(rule.leaf.init(spec))
    with pytest.raises(fedagg.ConfigError):
        A.LeafThenMean(A.median(), A.mean(), "votes")  # type: ignore[arg-type]


# -- RFA and centered clipping across a tree ----------------------------------------------------


def robust_case(seed: int, n: int = 9, d: int = 30) -> tuple[fedagg.ParamSpec, list[fedagg.Update]]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[: n // 4] += 8.0  # a few outliers
    w = rng.integers(1, 5, n).astype(float)
    spec = fedagg.ParamSpec.from_arrays([np.zeros(d, np.float32)])
    ups = [fedagg.Update([r], wi, f"c{i}") for i, (r, wi) in enumerate(zip(x, w, strict=True))]
    return spec, ups


@pytest.mark.parametrize(
    ("seed", "cuts", "fanout", "kw"),
    [
        (3, [3, 6], 2, {}),
        (4, [1, 2, 5, 7], 3, {"maxiter": 3, "ftol": 0.0}),
        (5, [4], 2, {"weighted": False, "maxiter": 6}),
        (6, [2, 3, 4, 5, 6, 7, 8], 4, {"nu": 0.5, "maxiter": 10, "ftol": 1e-3}),
    ],
)
def test_tree_rfa_reproduces_the_spooled_geometric_median(
    seed: int, cuts: list[int], fanout: int, kw: dict[str, Any]
) -> None:
    spec, ups = robust_case(seed)
    got = A.tree_rfa(split_leaves(ups, cuts), spec, fanout=fanout, **kw)
    flat = A.geometric_median(**kw)
    want = flat.finalize_flat(fold(flat, spec, ups))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)  # existing test: 1e-5
    naive = ref.geometric_median(
        flat_rows(spec, ups),
        [u.weight if kw.get("weighted", True) else 1.0 for u in ups],
        **{k: v for k, v in kw.items() if k != "weighted"},
    )
    np.testing.assert_allclose(got, naive, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("tau", "iters", "with_v0"), [(1.5, 2, False), (100.0, 1, False), (0.3, 5, True)]
)
def test_tree_centered_clipping_reproduces_the_spooled_rule(
    tau: float, iters: int, with_v0: bool
) -> None:
    spec, ups = robust_case(7, n=11)
    v0 = np.linspace(-1, 1, spec.size).astype(np.float32) if with_v0 else None
    got = A.tree_centered_clipping(split_leaves(ups, [2, 3, 8]), spec, tau, iters, v0, fanout=2)
    cc = A.centered_clipping(tau, iters)
    state = fold(cc, spec, ups)
    state.center = v0
    want = cc.finalize_flat(state)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    naive = ref.centered_clipping(flat_rows(spec, ups), tau, iters, v0)
    np.testing.assert_allclose(got, naive, rtol=1e-5, atol=1e-6)


def test_tree_drivers_bad_input() -> None:
    spec, ups = robust_case(1)
    with pytest.raises(fedagg.ConfigError):
        A.tree_rfa([ups], spec, maxiter=0)
    with pytest.raises(fedagg.ConfigError):
        A.tree_centered_clipping([ups], spec, tau=-1.0)
    with pytest.raises(fedagg.ConfigError, match="v0"):
        A.tree_centered_clipping([ups], spec, 1.0, 1, np.zeros(3))
    with pytest.raises(fedagg.EmptyAggregate):
        A.tree_rfa([[], []], spec)
    bad = np.zeros(30, np.float32)
    bad[4] = np.nan
    with pytest.raises(fedagg.NonFiniteUpdate):
        A.tree_centered_clipping([ups, [fedagg.Update([bad], 1.0, "bad")]], spec, 1.0)


# -- SketchKrum -----------------------------------------------------------------------------------


def test_jl_dim_known_answer() -> None:
    # 2 (2 ln 10 + ln 1000) / (0.125 - 0.125/3) = 276.3...
    assert A.jl_dim(10, 0.5, 1e-3) == 277
    assert A.jl_dim(100, 0.2) > A.jl_dim(100, 0.5) > A.jl_dim(10, 0.5)
    with pytest.raises(fedagg.ConfigError):
        A.jl_dim(10, 1.5)


@settings(max_examples=4)
@given(st.integers(0, 2**31 - 1), st.sampled_from([0.3, 0.5]))
def test_sketch_distances_are_within_eps(seed: int, eps: float) -> None:
    n, d = 10, 1500
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((n, d)) * rng.uniform(0.1, 10, (n, 1))).astype(np.float32)
    spec = fedagg.ParamSpec.from_arrays([np.zeros(d, np.float32)])
    rule = A.SketchKrum(f=0, k=A.jl_dim(n, eps, 1e-3), seed=seed, block=512)
    state = fold(rule, spec, [fedagg.Update(r, 1.0, str(i)) for i, r in enumerate(x)])
    exact = ref.sq_dists(x.astype(np.float64))
    approx = rule.sketch_sq_dists(state)
    off = ~np.eye(n, dtype=bool)
    ratio = approx[off] / exact[off]
    assert np.all(np.abs(ratio - 1) <= eps)


def separated(
    seed: int, n: int, f: int, d: int = 400
) -> tuple[fedagg.ParamSpec, list[fedagg.Update]]:
    """Honest clients around a centre (one of them exactly at it), Byzantine ones far off."""
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal(d)
    honest = centre + rng.standard_normal((n - f, d)) / np.sqrt(d)
    honest[3] = centre
    byz = centre + 20 + rng.standard_normal((f, d))
    x = np.concatenate([honest[:2], byz, honest[2:]]).astype(np.float32)
    spec = fedagg.ParamSpec.from_arrays({"w": np.zeros((d // 4, 4), np.float32)})
    ups = [
        fedagg.Update(spec.unflatten(r.copy()), float(rng.integers(1, 5)), f"c{i}")
        for i, r in enumerate(x)
    ]
    return spec, ups


@pytest.mark.parametrize(
    ("seed", "n", "f", "m"), [(0, 12, 3, 1), (1, 12, 3, 9), (2, 15, 4, 11), (3, 9, 3, 1)]
)
def test_sketch_krum_selects_as_exact_krum_on_separated_data(
    seed: int, n: int, f: int, m: int
) -> None:
    spec, ups = separated(seed, n, f)
    rows = flat_rows(spec, ups)
    scores = ref.krum_scores(rows, list(range(n)), f)
    want_idx = sorted(np.argsort(scores, kind="stable")[:m].tolist())
    exact = A.krum(f) if m == 1 else A.multi_krum(f, m)
    assert exact.select(fold(exact, spec, ups)) == want_idx
    rule = A.SketchKrum(f, m, k=64, seed=seed)
    leaves = split_leaves(ups, [2, 5, 6, 10])
    firsts = [fold(rule, spec, leaf) for leaf in leaves]
    root = A.reduce_tree(rule, firsts, 3)
    assert rule.select(root) == [f"c{i}" for i in want_idx]
    got = A.sketch_krum(leaves, spec, f, m, k=64, seed=seed, fanout=3)
    np.testing.assert_allclose(got, ref.multi_krum(rows, f, m), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        got, exact.finalize_flat(fold(exact, spec, ups)), rtol=1e-6, atol=1e-7
    )


def test_sketches_do_not_depend_on_layout_batching_or_tree() -> None:
    spec = spec_of([(7, 9), (5,), (40,)], True)
    ups = make_updates(spec, 6, 8, ["arrays", "flat", "bytes", "views"], wide=False)
    rule = A.SketchKrum(1, k=16, seed=3, block=10)  # blocks straddle the arrays
    batch = fold(rule, spec, ups)
    one = rule.init(spec)
    for u in ups:
        rule.fold(one, u)
    same_flat = fold(
        rule,
        spec,
        [fedagg.Update(spec.as_flat(u.delta).copy(), u.weight, u.client_id) for u in ups],
    )
    tree = A.reduce_tree(rule, [fold(rule, spec, ups[:2]), fold(rule, spec, ups[2:])], 2)
    for other in (one, same_flat, tree):  # equal up to the float64 rounding of the products
        np.testing.assert_allclose(
            np.array(other.rows), np.array(batch.rows), rtol=1e-12, atol=1e-13
        )
    # and it is the linear map S x / sqrt(k), with the scale applied
    doubled = fold(rule, spec, [fedagg.Update(ups[0].delta, 1.0, "d", scale=2.0)])
    np.testing.assert_allclose(doubled.rows[0], 2 * batch.rows[0], rtol=1e-12)
    assert fedagg.dumps(fedagg.loads(fedagg.dumps(batch))) == fedagg.dumps(batch)


def test_sketch_memory_is_bounded_by_blocks_not_k_times_d() -> None:
    d, k = 100_000, 32
    spec = fedagg.ParamSpec.from_arrays([np.zeros(d, np.float32)])
    ups = [fedagg.Update(np.ones(d, np.float32), 1.0, str(i)) for i in range(3)]
    rule = A.SketchKrum(0, k=k, block=4096)
    tracemalloc.start()
    try:
        fold(rule, spec, ups)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < k * d * 8 / 8  # a k x d float64 matrix would be 25.6 MB; blocks are ~1 MB


def test_sketch_krum_bad_input_and_atomic_fold() -> None:
    spec = fedagg.ParamSpec.from_arrays([np.zeros(8, np.float32)])
    rule = A.SketchKrum(1, k=8)
    with pytest.raises(fedagg.ConfigError):
        A.SketchKrum(-1)
    with pytest.raises(fedagg.ConfigError):
        A.SketchKrum(0, k=0)
    state = fold(
        rule, spec, [fedagg.Update(np.ones(8, np.float32), 1.0, f"c{i}") for i in range(4)]
    )
    with pytest.raises(fedagg.TooFewUpdates):
        rule.select(state)
    with pytest.raises(fedagg.EmptyAggregate):
        rule.select(rule.init(spec))
    before = fedagg.dumps(state)
    bad = np.ones(8, np.float32)
    bad[7] = np.inf
    with pytest.raises(fedagg.NonFiniteUpdate) as info:
        rule.fold_many(
            state,
            [fedagg.Update(np.ones(8, np.float32), 1.0, "ok"), fedagg.Update(bad, 1.0, "bad")],
        )
    assert info.value.client_id == "bad" and fedagg.dumps(state) == before
    with pytest.raises(fedagg.StateError, match="seed"):
        rule.merge(state, A.SketchKrum(1, k=8, seed=9).init(spec))
    rule.fold(state, fedagg.Update(np.ones(8, np.float32), 1.0, "c0"))
    with pytest.raises(fedagg.StateError, match="unique"):
        rule.select(state)


def test_masked_mean_folds_only_selected_clients() -> None:
    spec = fedagg.ParamSpec.from_arrays([np.zeros(2, np.float32)])
    masked = A.MaskedMean(frozenset({"a", "c"}))
    state = fold(
        masked,
        spec,
        [
            fedagg.Update(np.array([1, 2], np.float32), 5.0, "a"),
            fedagg.Update(np.array([np.nan, 0], np.float32), 0.0, "b"),  # skipped unread
            fedagg.Update(np.array([3, 4], np.float32), 1.0, "c"),
        ],
    )
    assert masked.count(state) == 2
    np.testing.assert_array_equal(masked.finalize_flat(state), [2, 3])  # one vote each
    with pytest.raises(fedagg.InvalidWeight):
        masked.fold(state, fedagg.Update(np.zeros(2, np.float32), -1.0, "a"))
