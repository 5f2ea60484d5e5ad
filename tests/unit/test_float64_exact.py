"""The float64 ("exact") weighted mean: error-free products, the documented bound, and the
compensation carried through every merge (in process, the edges' partials and the root).

* Each product ``w*x`` enters the compensated sum exactly (Dekker's TwoProduct), so the
  issue-13 example ``(0.1*3 - 0.3*1) / 0.4`` is the correctly rounded exact mean, not twice it.
* Hypothesis: flat folds and random merge trees stay within the bound documented on
  :class:`fedagg.core.aggregate.Mean`, ``3u|q| + 5(n^2+1)u^2 A/W``, against exact
  :class:`~fractions.Fraction` arithmetic, on data built to cancel.
* The numba kernels and the numpy fallback give the same bits (serial and parallel drivers,
  float32 and float64 inputs, factors too large for a plain Veltkamp split).
* A merge that drops the compensation (of the other state, or of the addition itself), in
  either backend, breaks the flat == tree equality on ``[1e16, 1, -1e16]``; so does a root
  (or an edge) that reads a partial's sums but not its compensation buffer.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedagg
from fedagg.core import kernels
from fedagg.core.spec import ParamSpec
from fedagg.core.tree import reduce_tree
from fedagg.core.update import Update
from fedagg.deploy import Federation
from fedagg.deploy._partial import load_partial, partial_buffers, partial_info
from fedagg.deploy._store import PartialRows, UploadRow
from fedagg.sim import SyncPolicy

U = Fraction(1, 2**53)
BACKENDS = ["numba", "numpy"] if kernels.HAVE_NUMBA else ["numpy"]
#: a model this long goes through the compiled kernels (shorter ones fold in numpy)
BIG = kernels.NUMBA_MIN_SIZE
#: ... and merges this long through the parallel numba merge
MERGE_BIG = kernels.PARALLEL_MIN_WORK // 2


def _mean(backend: str) -> Any:
    return fedagg.aggregators.mean("float64", backend=backend)  # type: ignore[arg-type]


def _spec(size: int, dtype: Any = np.float64) -> ParamSpec:
    return ParamSpec.from_arrays([np.zeros(size, dtype)])


def _padded(values: list[float], size: int, dtype: Any = np.float64) -> np.ndarray:
    out = np.zeros(size, dtype)
    out[: len(values)] = values
    return out


def _quotient(state: Any) -> np.ndarray:
    """The float64 quotient ``(acc + comp) / (weight + weight_comp)`` that finalize casts."""
    q: np.ndarray = (state.acc.astype(np.float64) + state.comp) / (state.weight + state.weight_comp)
    return q


def _bits(a: np.ndarray) -> bytes:
    return np.ascontiguousarray(a).tobytes()


# -- the example ---------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [1, BIG])
def test_non_integer_weights_with_cancellation_give_the_correctly_rounded_mean(
    backend: str, size: int
) -> None:
    """weights 0.1 and 0.3, values 3 and -1: a rounded product 0.1*3 would double the mean."""
    exact_sum = Fraction(0.1) * 3 - Fraction(0.3)
    exact = exact_sum / (Fraction(0.1) + Fraction(0.3))
    want = float(exact)
    assert want == 6.938893903907228e-17
    agg = _mean(backend)
    spec = _spec(size)
    ups = [Update([_padded([3.0], size)], 0.1), Update([_padded([-1.0], size)], 0.3)]
    flat = agg.fold_many(agg.init(spec), ups)
    one_by_one = agg.fold(agg.fold(agg.init(spec), ups[0]), ups[1])
    for order in (ups, ups[::-1]):  # merged leaf states, both ways round
        tree = agg.merge(agg.fold(agg.init(spec), order[0]), agg.fold(agg.init(spec), order[1]))
        assert agg.finalize_flat(tree)[0] == want
    assert agg.finalize_flat(flat)[0] == want
    assert agg.finalize_flat(one_by_one)[0] == want
    # the sum itself is exact: the rounded product's error sits in the compensation
    assert Fraction(float(flat.acc[0])) + Fraction(float(flat.comp[0])) == exact_sum
    # a float32 model: the same exact mean, rounded once more
    spec32 = _spec(size, np.float32)
    ups32 = [Update([u.delta[0].astype(np.float32)], u.weight) for u in ups]  # type: ignore[index]
    got32 = agg.finalize_flat(agg.fold_many(agg.init(spec32), ups32))[0]
    assert got32 == np.float32(want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_single_product_is_kept_exactly(backend: str) -> None:
    """One update: ``acc + comp`` is ``w*x`` exactly, for any w and x whose product does not
    underflow, including factors too large for a plain Veltkamp split (``|a| > 2**996``)."""
    rng = np.random.default_rng(5)
    size = BIG + 7
    agg = _mean(backend)

    def check(x: np.ndarray, w: float, coords: list[int]) -> None:
        state = agg.fold(agg.init(_spec(size, x.dtype)), Update([x], w))
        for j in coords:
            exact = Fraction(w) * Fraction(float(x[j]))
            assert Fraction(float(state.acc[j])) + Fraction(float(state.comp[j])) == exact, (w, j)

    x = rng.standard_normal(size) * 10.0 ** rng.integers(-200, 200, size)
    special = [0.1, -0.3, 1 / 3, math.pi * 1e199, 0.0, -0.0, 5e-280]
    x[: len(special)] = special
    sample = list(range(len(special))) + [int(j) for j in rng.integers(0, size, 200)]
    for w in (1e-8, 0.1, 1 / 3, 7.0):
        check(x, w, sample)
    # values beyond 2**996 (small weights keep |w x| under the overflow guard's 1e300)
    huge = [1.7e308, -1.7e308, 2.0**996, float(np.nextafter(2.0**996, 1.0)), -(2.0**997),
            1e300, math.pi * 1e299]  # fmt: skip
    x[: len(huge)] = huge
    for w in (1e-9, 1e-8 / 3):
        check(x, w, list(range(len(huge))) + sample[len(special) :])
    # weights too large for a plain split (the values are small enough)
    small = rng.standard_normal(size) * 1e-10
    small[:3] = [1e-10 / 3, 1e-11, 5e-320]
    for w in (1.7e308, 2.0**997 + 2.0**970):
        check(small, w, [0, 1, 2] + [int(j) for j in rng.integers(3, size, 100)])
    # float32 values (24 bits: no split of x needed), with ordinary and huge weights
    x32 = (rng.standard_normal(size) * 1e-6).astype(np.float32)
    x32[:3] = [np.float32(1e-7), np.float32(1e-6 / 3), np.float32(1e-45)]
    for w in (0.1, 1 / 3, 1e305 / 3):
        check(x32, w, [0, 1, 2] + [int(j) for j in rng.integers(3, size, 100)])


# -- the documented bound, against exact arithmetic ------------------------------------------
_decimals = st.sampled_from([0.1, 0.2, 0.3, 0.7, 1 / 3, 2 / 3, 0.01, 1.1, 3.0, 1e-3, 12.5])
_values = st.one_of(
    _decimals,
    _decimals.map(lambda v: -v),
    st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False).filter(
        lambda v: v == 0 or abs(v) > 1e-200
    ),
)
_weights = st.one_of(_decimals, st.floats(1e-3, 1e3, allow_nan=False, allow_infinity=False))


@st.composite
def cancelling_cases(draw: st.DrawFn) -> tuple[list[list[float]], list[float], Any]:
    """Updates whose weighted sum cancels (often to far below ``sum |w x|``)."""
    n = draw(st.integers(1, 8))
    dim = draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    xs = [[draw(_values) for _ in range(dim)] for _ in range(n)]
    ws = [draw(_weights) for _ in range(n)]
    if n >= 2 and draw(st.booleans()):  # the last update cancels the others' rounded sum
        for j in range(dim):
            rest = math.fsum(w * x[j] for w, x in zip(ws[:-1], xs[:-1], strict=True))
            xs[-1][j] = -rest / ws[-1]
    xs = [[float(dtype(v)) for v in x] for x in xs]  # what the model's dtype holds
    return xs, ws, dtype


def _bound_holds(q_got: float, xs: list[list[float]], ws: list[float], j: int) -> None:
    n = len(ws)
    w = [Fraction(v) for v in ws]
    prods = [wi * Fraction(x[j]) for wi, x in zip(w, xs, strict=True)]
    total = sum(w)
    q = sum(prods) / total
    a = sum(abs(p) for p in prods)
    bound = 3 * U * abs(q) + 5 * (n * n + 1) * U * U * a / total
    err = abs(Fraction(q_got) - q)
    assert err <= bound, (q_got, float(q), float(err), float(bound))


@settings(max_examples=150)
@given(cancelling_cases(), st.data())
def test_flat_folds_and_merge_trees_meet_the_documented_bound(case: Any, data: Any) -> None:
    xs, ws, dtype = case
    size = data.draw(st.sampled_from([len(xs[0]), BIG]), label="size")
    spec = _spec(size, dtype)
    ups = [
        Update([_padded(x, size, dtype)], w, str(i))
        for i, (x, w) in enumerate(zip(xs, ws, strict=True))
    ]
    results = {}
    for backend in BACKENDS:
        agg = _mean(backend)
        flat = agg.fold_many(agg.init(spec), ups)
        # a random tree: permuted leaves in random groups, merged with a random fan-out
        perm = data.draw(st.permutations(range(len(ups))), label="perm")
        cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(ups) - 1))), label="cuts"))
        groups = [perm[a:b] for a, b in itertools.pairwise([0, *cuts, len(ups)]) if a < b]
        leaves = [agg.fold_many(agg.init(spec), [ups[i] for i in g]) for g in groups]
        tree = reduce_tree(agg, leaves, data.draw(st.integers(2, 3), label="fanout"))
        for state in (flat, tree):
            q = _quotient(state)
            for j in range(len(xs[0])):
                _bound_holds(float(q[j]), xs, ws, j)
            assert _bits(agg.finalize_flat(state)) == _bits(q.astype(dtype))
        results[backend] = (_bits(flat.acc), _bits(flat.comp), flat.weight, flat.weight_comp)
    assert len(set(results.values())) == 1  # both backends: the same bits


def test_the_bound_is_not_met_by_rounded_products() -> None:
    """The test above has teeth: summing the rounded products ``fl(w x)`` exactly (as the
    compensated sum did before) misses the bound on the issue's example."""
    xs, ws = [[3.0], [-1.0]], [0.1, 0.3]
    rounded = math.fsum(w * x[0] for w, x in zip(ws, xs, strict=True)) / (ws[0] + ws[1])
    with pytest.raises(AssertionError):
        _bound_holds(rounded, xs, ws, 0)
    assert rounded == 1.3877787807814457e-16  # 2x the exact 6.94e-17


# -- both backends: the same bits --------------------------------------------------------------
@pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="needs numba")
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("k", [2, 9])  # serial and parallel numba drivers
def test_numba_and_numpy_kernels_give_the_same_bits(dtype: Any, k: int) -> None:
    rng = np.random.default_rng(11 + k)
    size = 2 * kernels.BLOCK + 17 if k == 2 else 4 * kernels.BLOCK + 5
    assert kernels._parallel(size, k) == (k == 9)
    xs = [(rng.standard_normal(size) * 10.0 ** rng.integers(-30, 30, size)).astype(dtype)
          for _ in range(k)]  # fmt: skip
    ws = rng.uniform(0.01, 5.0, k) * 10.0 ** rng.integers(-3, 3, k)
    if dtype == np.float64:  # values beyond 2**996 (scaled split), with small weights
        xs[0][:4] = [1.7e308, -(2.0**997), 2.0**996, 1e300]
        ws[0] = 1e-9
    start = rng.standard_normal(size)
    outs = []
    for use_numba in (True, False):
        acc, comp = start.copy(), np.zeros(size)
        ok = kernels.fold_compensated(acc, comp, xs, ws, use_numba=use_numba)
        outs.append((ok, _bits(acc), _bits(comp)))
    assert outs[0] == outs[1] and outs[0][0] is True


# -- merges keep the compensation ----------------------------------------------------------------
def _all_trees(leaves: list[int]) -> list[Any]:
    """Every binary bracketing of ``leaves`` in this order."""
    if len(leaves) == 1:
        return [leaves[0]]
    return [
        (left, right)
        for cut in range(1, len(leaves))
        for left in _all_trees(leaves[:cut])
        for right in _all_trees(leaves[cut:])
    ]


def _merge_tree(agg: Any, spec: ParamSpec, ups: list[Update], tree: Any) -> Any:
    if isinstance(tree, int):  # a leaf: one update folded into its own state
        return agg.fold(agg.init(spec), ups[tree])
    return agg.merge(_merge_tree(agg, spec, ups, tree[0]), _merge_tree(agg, spec, ups, tree[1]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("size", [1, MERGE_BIG])
@pytest.mark.parametrize(
    ("values", "weights", "rounded_once"),
    [
        ([1e16, 1.0, -1e16], [1.0, 1.0, 1.0], True),  # an addition's error only in comp
        ([3.0, -1.0, 1e-17], [0.1, 0.3, 1.0], False),  # a product's error only in comp
        ([1.0, 1.0, 1.0], [1e16, 1.0, 1.0], True),  # the weight sum's error in weight_comp
    ],
)
def test_every_merge_tree_equals_the_flat_fold_and_the_exact_mean(
    backend: str, size: int, values: list[float], weights: list[float], rounded_once: bool
) -> None:
    """Each leaf folded alone, then merged along every tree over every leaf order (and via the
    identity, and :func:`reduce_tree`): the flat fold's bits, which are the exact mean
    correctly rounded where the sums are float64 numbers (``rounded_once``), and within the
    documented bound of it anyway. Dropping a compensation term in ``merge`` breaks these."""
    agg = _mean(backend)
    spec = _spec(size)
    ups = [Update([_padded([v], size)], w) for v, w in zip(values, weights, strict=True)]
    exact = sum(Fraction(w) * Fraction(v) for v, w in zip(values, weights, strict=True)) / sum(
        Fraction(w) for w in weights
    )
    flat = agg.finalize_flat(agg.fold_many(agg.init(spec), ups))
    _bound_holds(float(flat[0]), [[v] for v in values], weights, 0)
    if rounded_once:
        assert flat[0] == float(exact)
    trees = [t for p in itertools.permutations(range(len(ups))) for t in _all_trees(list(p))]
    assert len(trees) == 12
    for tree in trees:
        got = agg.finalize_flat(_merge_tree(agg, spec, ups, tree))
        assert _bits(got) == _bits(flat), (tree, got[0], flat[0])
    for fanout in (2, 3):
        for perm in itertools.permutations(range(len(ups))):
            leaves = [agg.fold(agg.init(spec), ups[i]) for i in perm]
            got = agg.finalize_flat(reduce_tree(agg, leaves, fanout))
            assert _bits(got) == _bits(flat), (perm, fanout)
    # a partial state merged into the identity (a copy) and then on
    for first in range(len(ups)):
        state = agg.merge(
            agg.init(spec), agg.fold_many(agg.init(spec), ups[:first] + ups[first + 1 :])
        )
        got = agg.finalize_flat(agg.merge(state, agg.fold(agg.init(spec), ups[first])))
        assert _bits(got) == _bits(flat), first


# -- partial aggregates at the root --------------------------------------------------------------
D = 5


def _root(d: Path, checkpoint_updates: int = 0) -> Federation:
    strategy = fedagg.strategies.fedavg(aggregator=fedagg.aggregators.mean("float64"))
    policy = SyncPolicy(strategy=strategy, rounds=1, clients_per_round=3)
    server = strategy.init([np.zeros(D, np.float32)])
    return Federation(policy, server, num_clients=3, seed=1, directory=d,
                      checkpoint_updates=checkpoint_updates)  # fmt: skip


_VALUES = [1e16, 1.0, -1e16]  # job j sends _VALUES[j] in every coordinate, weight 1


def _upload(fed: Federation, job: int, client: int, version: int) -> UploadRow:
    delta = np.full(D, _VALUES[job], np.float32)
    path = fed.spool / f"{job:012d}-c{client}.upd"
    delta.tofile(path)
    return UploadRow(
        client,
        job,
        str(path),
        1.0,
        version,
        {},
        delta.nbytes,
        hashlib.sha256(delta.tobytes()).digest(),
    )


def _start(fed: Federation) -> dict[int, Any]:
    fed.open()
    fed.step([r for r in fed.log([("start", 0.0, None, None, None, None)]) if r])
    assert len(fed.tasks) == 3
    return {t.job: t for t in fed.tasks.values()}


@pytest.mark.parametrize("restart", ["no", "replay", "checkpoint"])
def test_the_root_merges_a_partials_compensation(tmp_path: Path, restart: str) -> None:
    """An edge's partial of jobs 0 and 1 (``1e16 + 1``: the 1 lives only in the compensation
    buffer) merged at the root with job 2 (``-1e16``): the model is ``1/3``, as when the three
    arrive at the root directly. A root that reads the sums but not the compensation gets 0.
    With ``restart`` the root is reopened after applying the partial, which it then replays
    from its log (``load_partial`` again), or restores from a checkpoint taken after it."""
    flat_fed = _root(tmp_path / "flat")
    for job, t in sorted(_start(flat_fed).items()):
        up = _upload(flat_fed, job, t.client, t.version)
        flat_fed.step([r for r in flat_fed.log([("arrival", 1.0, t.client, job, None, up)]) if r])
    assert flat_fed.finished
    flat = flat_fed.server.params
    assert np.all(flat == np.float32(1 / 3))

    ckpt = 1 if restart == "checkpoint" else 0
    fed = _root(tmp_path / "tree", ckpt)
    tasks = _start(fed)
    agg = fed.policy.strategy.aggregator  # type: ignore[attr-defined]
    child = agg.init(fed.spec, version=0)
    for job in (0, 1):
        agg.fold(child, Update([np.full(D, _VALUES[job], np.float32)], 1.0))
    assert np.all(child.comp == 1.0) and np.all(child.acc == np.float32(1e16))  # 1 in comp only
    path = fed.spool / "partial-edge.upd"
    with open(path, "wb") as f:
        for b in partial_buffers(child):
            f.write(b)
    info = partial_info(child)
    info = {k: info[k] for k in ("weight", "weight_comp", "accumulator")} | {"edge": "e"}
    parts = tuple(UploadRow(tasks[j].client, j, str(path), 1.0, 0, {}, path.stat().st_size, b"")
                  for j in (0, 1))  # fmt: skip
    fed.step([r for r in fed.log([("partial", 1.0, None, None, None, PartialRows(parts, info))])
              if r])  # fmt: skip
    if restart != "no":
        fed.close()
        fed = _root(tmp_path / "tree", ckpt)
        fed.open()
        assert (fed.replayed > 0) == (restart == "replay")
    t = tasks[2]
    up = _upload(fed, 2, t.client, t.version)
    fed.step([r for r in fed.log([("arrival", 2.0, t.client, 2, None, up)]) if r])
    assert fed.finished
    assert _bits(fed.server.params) == _bits(flat)
    flat_fed.close()
    fed.close()


def test_load_partial_restores_the_compensation(tmp_path: Path) -> None:
    """The loader the root and the edges share: ``acc`` *and* ``comp`` come back bit for bit."""
    agg = fedagg.aggregators.mean("float64")
    spec = _spec(3, np.float32)
    state = agg.fold_many(agg.init(spec, version=2), [
        Update([np.array([1e16, 3.0, 0.1], np.float32)], 1.0),
        Update([np.array([1.0, -1.0, 0.2], np.float32)], 0.1),
    ])  # fmt: skip
    assert np.all(state.comp != 0)
    path = tmp_path / "p.upd"
    with open(path, "wb") as f:
        for b in partial_buffers(state):
            f.write(b)
    got = load_partial(agg, spec, 2, path, partial_info(state), 2)
    assert _bits(got.acc) == _bits(state.acc) and _bits(got.comp) == _bits(state.comp)
    assert (got.weight, got.weight_comp, got.count) == (state.weight, state.weight_comp, 2)
