"""The Ray aggregation tree and the actor-based Ray executor, on one local Ray instance."""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from benchmarks._ray_tree import (  # noqa: E402
    NodeLost,
    RayTree,
    placement_options,
    train_round,
    tree_aggregate,
    tree_shape,
)

from fedagg.clients import LocalSGD  # noqa: E402
from fedagg.core.aggregate import mean  # noqa: E402
from fedagg.core.spec import ParamSpec  # noqa: E402
from fedagg.core.update import Update  # noqa: E402
from fedagg.data._types import ArrayDataset  # noqa: E402
from fedagg.errors import (  # noqa: E402
    ConfigError,
    EmptyAggregate,
    NonFiniteUpdate,
    SpecMismatch,
    StaleUpdate,
)
from fedagg.models import LogReg  # noqa: E402
from fedagg.sim import LocalExecutor  # noqa: E402
from fedagg.sim._ray import DEFAULT_CACHE_BYTES, RayExecutor, assign_jobs  # noqa: E402
from tests.conftest import make_model, random_delta  # noqa: E402

U32 = 2.0**-24


@pytest.fixture(scope="module", autouse=True)
def local_ray() -> Iterator[None]:
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    if started:
        ray.shutdown()


def spec_and_updates(
    n: int, seed: int = 0, version: int | None = None, spec: ParamSpec | None = None
) -> tuple[ParamSpec, list[Update]]:
    spec = BIG if spec is None else spec
    rng = np.random.default_rng(seed)
    ups = [
        Update(
            random_delta(spec, rng, scale=float(rng.uniform(0.1, 10))),
            weight=float(rng.integers(1, 100)),
            client_id=f"c{i}",
            base_version=version,
        )
        for i in range(n)
    ]
    return spec, ups


def flat_fold(agg: Any, spec: ParamSpec, ups: list[Update], version: int | None = None) -> Any:
    st = agg.init(spec, version=version)
    for u in ups:
        agg.fold(st, u)
    return agg.finalize_flat(st)


def by_leaf(ups: list[Update], leaves: int) -> list[list[Update]]:
    n = len(ups)
    return [ups[n * j // leaves : n * (j + 1) // leaves] for j in range(leaves)]


def submit_all(tree: RayTree, ups: list[Any]) -> None:
    for j, group in enumerate(by_leaf(ups, tree.leaves)):
        for u in group:
            tree.submit_async(j, u)


# -- shape and placement (pure) ----------------------------------------------------------------


def test_tree_shapes() -> None:
    assert tree_shape(2, depth=3) == [1, 2, 4]
    assert tree_shape(3, depth=3) == [1, 3, 9]
    assert tree_shape(2, leaves=5) == [1, 2, 3, 5]
    assert tree_shape(4, leaves=1) == [1]
    for bad in ({"depth": 2, "leaves": 4}, {}, {"depth": 0}, {"leaves": 0}):
        with pytest.raises(ConfigError):
            tree_shape(2, **bad)


def test_placement_targets_the_parents_node_softly() -> None:
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    opts = placement_options("ab" * 28, num_cpus=0.01)
    s = opts["scheduling_strategy"]
    assert isinstance(s, NodeAffinitySchedulingStrategy)
    assert s.node_id == "ab" * 28
    assert s.soft is True
    assert opts["num_cpus"] == 0.01
    root = placement_options(None)
    assert "scheduling_strategy" not in root
    assert root["num_cpus"] == 0.0


def test_job_assignment_is_balanced_and_sticky() -> None:
    held: list[set[int]] = [{0, 1, 2}, {3}]
    plan = assign_jobs([3, 0, 1, 2, 4], 2, held, [300, 100])
    assert plan == [[1, 2, 3], [0, 4]]  # cap ceil(5/2)=3; 4 is new, goes to the lighter
    assert assign_jobs([9], 3, [set(), set(), set()], [5, 1, 3]) == [[], [0], []]


# -- the tree -----------------------------------------------------------------------------------
# Every actor is a worker process (a second or two of start-up, CPU-bound on 2 cores, and each
# level of a tree waits for the level above): the module's actors are few, shared, and all
# started at once. A three-level tree needs 6 actors (fanout 2 over 3 leaves); the float32 tree
# takes 3, the executor 2 and tree_aggregate's one-shot tree 1. The tree nodes fold with numpy
# kernels, bit-identical to numba's by design (tests/conformance:
# test_numba_and_numpy_backends_agree), so that no actor loads compiled kernels.

#: The model of the simulated round, whose spec every tree test uses: 40,080 float32 parameters,
#: so that every update and state travels through Ray's shared-memory object store (over 100 KiB)
#: and reaches a node as read-only arrays.
MODEL = LogReg(500, 80)
BIG = ParamSpec.from_arrays(MODEL.init(0))


@pytest.fixture(scope="module")
def started(local_ray: None) -> Iterator[dict[str, Future[Any]]]:
    """The shared trees and the executor, their actors started in parallel."""
    pool = ThreadPoolExecutor(4)
    spec, ups = spec_and_updates(9, seed=5, spec=ParamSpec.from_arrays(make_model("dict")))
    refs = [ray.put(u) for u in ups]
    futures: dict[str, Future[Any]] = {
        # three levels over three leaves: the second inner node has one child
        "tree64": pool.submit(
            RayTree, mean("float64", backend="numpy"), BIG, fanout=2, leaves=3, timeout=60
        ),
        # two leaves under the root; the last test to use it kills its nodes
        "tree32": pool.submit(
            RayTree, mean("float32", backend="numpy"), BIG, fanout=2, leaves=2, timeout=60
        ),
        "executor": pool.submit(RayExecutor, workers=2),
        # for test_object_refs_are_folded_where_they_land: a one-shot tree (one node; the refs
        # spread over several leaves are folded by tree64 in that test)
        "refs": pool.submit(
            lambda: (spec, ups, tree_aggregate(by_leaf(refs, 1), mean("float64"), spec, fanout=2))
        ),
    }
    yield futures
    pool.shutdown()
    for name in ("tree64", "tree32", "executor"):
        if futures[name].exception() is None:
            futures[name].result().close()


@pytest.fixture
def tree64(started: dict[str, Future[Any]]) -> RayTree:
    """A 3-level tree (6 actors), float64 mean over BIG."""
    tree: RayTree = started["tree64"].result()
    return tree


@pytest.fixture
def tree32(started: dict[str, Future[Any]]) -> RayTree:
    """Two leaves under the root (3 actors), float32 mean over BIG."""
    tree: RayTree = started["tree32"].result()
    return tree


def test_three_level_tree_is_exact_and_placed_with_parents(tree64: RayTree) -> None:
    tree64.reset()
    spec, ups = spec_and_updates(20)
    assert tree64.shape == [1, 2, 3]
    assert len(tree64.actors) == 6
    assert tree64.children == [[1, 2], [3, 4], [5], [], [], []]
    for i, p in enumerate(tree64.parent):
        if p is not None:
            assert tree64.node_ids[i] == tree64.node_ids[p]
            assert i in tree64.children[p]
    submit_all(tree64, ups)
    got = tree64.finalize_flat()
    assert tree64.count() == 20
    want = flat_fold(mean("float64"), spec, ups)
    assert got.dtype == want.dtype
    assert got.tobytes() == want.tobytes()  # bitwise
    assert tree64.finalize_flat().tobytes() == want.tobytes()  # a flush is repeatable
    out = tree64.finalize()
    assert isinstance(out, dict)
    assert set(out) == {"W", "b"}


def test_float32_tree_is_within_the_summation_bound(tree64: RayTree, tree32: RayTree) -> None:
    spec, ups = spec_and_updates(20, seed=1)
    assert tree32.shape == [1, 2]
    tree32.reset()
    submit_all(tree32, ups)
    got = tree32.finalize_flat().astype(np.float64)
    wx = [u.weight * spec.as_flat(u.delta).astype(np.float64) for u in ups]
    w_total = math.fsum(u.weight for u in ups)
    exact = np.array([math.fsum(col) for col in zip(*wx, strict=True)]) / w_total
    mag = np.sum(np.abs(wx), axis=0) / w_total
    k = len(ups) - 1
    gamma = k * U32 / (1 - k * U32)
    assert np.all(np.abs(got - exact) <= 2 * gamma * mag)
    # the float64 accumulator gives the exact mean rounded once to float32
    tree64.reset()
    submit_all(tree64, ups)
    assert tree64.finalize_flat().tobytes() == exact.astype(np.float32).tobytes()


def test_reset_starts_a_new_round_on_the_same_actors(tree64: RayTree) -> None:
    _, ups1 = spec_and_updates(8, seed=2, version=1)
    _, ups2 = spec_and_updates(6, seed=3, version=2)
    agg = mean("float64")
    tree64.reset(version=1)
    actors = list(tree64.actors)
    submit_all(tree64, ups1)
    assert tree64.finalize_flat().tobytes() == flat_fold(agg, BIG, ups1, 1).tobytes()
    tree64.reset(version=2)
    assert tree64.actors == actors
    assert tree64.count() == 0
    with pytest.raises(EmptyAggregate):
        tree64.finalize_flat()
    with pytest.raises(StaleUpdate):
        tree64.submit(0, ups1[0])  # trained from the previous version
    submit_all(tree64, ups2)
    assert tree64.finalize_flat().tobytes() == flat_fold(agg, BIG, ups2, 2).tobytes()


def poisoned(u: Update, value: float, client_id: str) -> Update:
    bad = {k: v.copy() for k, v in u.delta.items()}  # type: ignore[union-attr]
    bad["W"][1, 2] = value
    return Update(bad, weight=2.0, client_id=client_id)


@pytest.mark.parametrize("which", ["float32", "float64"])
def test_bad_updates_raise_typed_errors_and_change_nothing(
    which: str, tree64: RayTree, tree32: RayTree
) -> None:
    tree = tree32 if which == "float32" else tree64
    # NaN for float32; float64 gets Inf: the numba float64 max_abs kernel misses a NaN
    # followed by a finite value (core/kernels.py, reported)
    bad_value = np.nan if which == "float32" else np.inf
    tree.reset()
    spec, ups = spec_and_updates(6, seed=4)
    submit_all(tree, ups)
    before = tree.finalize_flat()
    with pytest.raises(NonFiniteUpdate) as e:
        tree.submit(1, poisoned(ups[0], bad_value, "evil"))
    assert e.value.client_id == "evil"
    wrong = np.zeros(spec.size + 1, np.float32)
    with pytest.raises(SpecMismatch):
        tree.submit(0, ray.put(Update(wrong, client_id="short")))  # through an object ref
    assert tree.finalize_flat().tobytes() == before.tobytes()
    tree.submit_async(0, [ups[0], poisoned(ups[0], bad_value, "evil2")])  # one of two refused
    refused = tree.drain()
    assert [type(r) for r in refused] == [NonFiniteUpdate]
    assert refused[0].client_id == "evil2"
    assert tree.count() == 7
    tree.reset()
    submit_all(tree, ups)
    tree.submit_async(1, poisoned(ups[0], bad_value, "late"))
    with pytest.raises(NonFiniteUpdate):
        tree.finalize_flat()  # an undrained refusal is raised once ...
    assert tree.finalize_flat().tobytes() == before.tobytes()  # ... the state is intact
    with pytest.raises(ConfigError):
        tree.submit(0, np.zeros(spec.size, np.float32))  # not an Update


def test_object_refs_are_folded_where_they_land(
    started: dict[str, Future[Any]], tree64: RayTree
) -> None:
    # tree_aggregate over object references (run in ``started``, so that its one-node tree
    # starts with the other actors)
    spec, ups, got = started["refs"].result()
    want = spec.unflatten(flat_fold(mean("float64"), spec, ups))
    assert isinstance(got, dict) and isinstance(want, dict)
    for k in want:
        assert got[k].tobytes() == want[k].tobytes()
    # references spread over the leaves of a 3-level tree
    _, big = spec_and_updates(9, seed=5)
    tree64.reset()
    submit_all(tree64, [ray.put(u) for u in big])
    assert tree64.count() == 9
    assert tree64.finalize_flat().tobytes() == flat_fold(mean("float64"), BIG, big).tobytes()


def test_a_killed_node_gives_a_clear_error(tree32: RayTree) -> None:
    """Kills tree32's nodes: the last test that uses it."""
    tree = tree32
    tree.reset()
    _, ups = spec_and_updates(4, seed=6)
    submit_all(tree, ups)
    tree.drain()
    ray.kill(tree.actors[tree.leaf_node(1)])
    with pytest.raises(NodeLost, match="died"):
        tree.finalize_flat()  # the dead leaf's flush fails, and so the root's
    with pytest.raises(NodeLost):
        tree.submit(1, ups[0])
    ray.kill(tree.actors[0])
    with pytest.raises(NodeLost):
        tree.finalize_flat()


# -- the actor-based executor, and a round on Ray -------------------------------------------------


def clients(n: int, seed: int = 7, features: int = 10, classes: int = 3) -> list[ArrayDataset]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        m = int(rng.integers(8, 40))
        x = rng.standard_normal((m, features))
        out.append(ArrayDataset(x, rng.integers(0, classes, m), classes))
    return out


def job_args(datas: list[ArrayDataset], picks: list[int], seed: int) -> tuple[Any, ...]:
    rngs = [np.random.default_rng([seed, j]) for j in picks]
    return [datas[j] for j in picks], rngs, [1 + j % 2 for j in picks], [None] * len(picks)


@pytest.fixture
def executor(started: dict[str, Future[Any]]) -> RayExecutor:
    ex: RayExecutor = started["executor"].result()
    assert not ex._owned  # the module's Ray instance: close() leaves it running
    return ex


def test_actor_executor_matches_the_local_executor_and_caches_data(executor: RayExecutor) -> None:
    # Bit for bit on any machine: an actor and the test process run the same BLAS kernels with
    # one thread each (the local executor's calls of under SMALL_CALL clients, the actors'
    # num_cpus=1). That matters: OpenBLAS's product bits can change with its thread count (a
    # 64 x 500 by 500 x 80 float32 product already does), while the batches of 8 rows here and
    # in the round below give the same bits with one thread or two.
    model = LogReg(10, 3)
    alg = LocalSGD(epochs=1, batch_size=8, lr=0.1)
    rng = np.random.default_rng(0)
    params = {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in model.init(0).items()}
    datas = clients(12)
    local = LocalExecutor()
    shipped = []
    rounds = [[0, 3, 5, 7, 9, 11], [3, 0, 5, 9, 2], [7, 11, 0, 3], [1, 4, 3], [6, 8]]
    for rnd, picks in enumerate(rounds):
        if rnd == 3:
            executor.cache_bytes = 0  # from now on a worker keeps only its current call's data
        d, rngs, epochs, states = job_args(datas, picks, rnd)
        want = local.train(alg, model, params, d, rngs, epochs, states, None)
        d, rngs, epochs, states = job_args(datas, picks, rnd)
        before = executor.shipped
        got = executor.train(alg, model, params, d, rngs, epochs, states, None)
        shipped.append(executor.shipped - before)
        assert len(got) == len(want)
        for (g, _), (w, _) in zip(got, want, strict=True):
            assert g.num_examples == w.num_examples
            for k in w.delta:
                assert g.delta[k].tobytes() == w.delta[k].tobytes()
    executor.cache_bytes = DEFAULT_CACHE_BYTES
    # only client 2 (new, round 2) and 3 (round 3: its worker is full) are shipped again
    assert shipped == [6, 1, 1, 2, 2]
    held = [ray.get(a.cached.remote()) for a in executor.actors]
    assert sorted(map(len, held)) == [2 + 1, 2 + 1]  # algorithm, model, last round's client
    assert sum(map(len, held)) == sum(executor._holders.values())  # the mirror is right


def test_a_round_trains_on_workers_and_folds_at_the_leaves(
    executor: RayExecutor, tree64: RayTree
) -> None:
    model = MODEL
    alg = LocalSGD(epochs=1, batch_size=8, lr=0.1)
    params = model.init(0)
    spec = ParamSpec.from_arrays(params)
    assert spec == tree64.spec
    datas = clients(10, seed=8, features=500, classes=80)
    picks = list(range(10))
    ids = [str(j) for j in picks]
    agg = mean("float64")
    tree = tree64  # train_round resets it
    d, rngs, epochs, states = job_args(datas, picks, 1)
    res = train_round(executor, tree, alg, model, params, d, rngs, epochs, states, None,
                      client_ids=ids, version=4)  # fmt: skip
    d, rngs, epochs, states = job_args(datas, picks, 1)
    local = LocalExecutor().train(alg, model, params, d, rngs, epochs, states, None)
    ups = [
        Update(r.delta, weight=float(r.num_examples), client_id=str(j), base_version=4)
        for (r, _), j in zip(local, picks, strict=True)
    ]
    want = flat_fold(agg, spec, ups, version=4)
    assert res.refused == []
    assert res.delta is not None
    assert spec.as_flat(res.delta).tobytes() == want.tobytes()
    assert res.num_examples == [len(datas[j]) for j in picks]
    assert tree.count() == 10
    # the next round reuses the actors and the cached data
    shipped = executor.shipped
    d, rngs, epochs, states = job_args(datas, picks, 2)
    res2 = train_round(executor, tree, alg, model, params, d, rngs, epochs, states, None,
                       client_ids=ids, version=5)  # fmt: skip
    assert executor.shipped == shipped
    assert res2.delta is not None and tree.count() == 10


def test_an_executor_too_big_for_the_cluster_fails_clearly() -> None:
    with pytest.raises(ConfigError, match="did not start"):
        RayExecutor(workers=1, num_cpus=64, start_timeout=0.2)
