"""The conformance suite every aggregator passes (as optax's contrib suite does for optimizers).

Add a new aggregator to ``AGGREGATORS`` and it is held to the whole contract: structure and
dtype of the result, in-place folding, atomic refusal of every kind of bad input, merge with the
identity, fold_many == repeated fold, save/load, and (for decomposable ones) the monoid laws.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import fedagg
from fedagg.core import kernels
from tests import robust_ref as ref
from tests.conftest import make_model, random_delta

A = fedagg.aggregators

NUMBA = pytest.mark.skipif(not kernels.HAVE_NUMBA, reason="numba not installed")

AGGREGATORS: dict[str, Callable[[], Any]] = {
    "mean-f32-numba": lambda: fedagg.aggregators.mean("float32", backend="numba"),
    "mean-f32-numpy": lambda: fedagg.aggregators.mean("float32", backend="numpy"),
    "mean-f64-numba": lambda: fedagg.aggregators.mean("float64", backend="numba"),
    "mean-f64-numpy": lambda: fedagg.aggregators.mean("float64", backend="numpy"),
    "mean-batch1": lambda: fedagg.aggregators.mean(batch=1),
    "clip+mean": lambda: fedagg.aggregators.compose(
        fedagg.transforms.clip_norm(1e6), fedagg.aggregators.mean()
    ),
    "reject+mean-f64": lambda: fedagg.aggregators.compose(
        fedagg.transforms.reject_nonfinite(), fedagg.aggregators.mean("float64")
    ),
    # robust rules (spooled; f = 0 where the rule needs n >= 2f + 3 on the suite's 4 updates)
    "median": lambda: A.median(),
    "median-disk": lambda: A.median(spool=fedagg.spool.disk(), block_bytes=4096),
    "trimmed-b1": lambda: A.trimmed_mean(1),
    "krum": lambda: A.krum(0),
    "krum-disk": lambda: A.krum(0, spool=fedagg.spool.disk(), block_bytes=4096),
    "multi-krum": lambda: A.multi_krum(0, 3),
    "bulyan": lambda: A.bulyan(0),
    "rfa": lambda: A.geometric_median(),
    "cc": lambda: A.centered_clipping(2.0, 3),
    "flag": lambda: A.flag_aggregator(3),
    "flag-lam-disk": lambda: A.flag_aggregator(3, 2.0, spool=fedagg.spool.disk()),
    # per-iteration monoids of RFA and centered clipping
    "weiszfeld-step": lambda: A.weiszfeld_step(np.zeros(1)),
    "clip-step": lambda: A.clip_step(np.zeros(1), 2.0),
    # the mean over coordinate shards (bit-identical to the unsharded mean); align=1 puts
    # refused values in a later shard than the first, so the cross-shard roll-back is tested
    "sharded-mean-f32": lambda: A.sharded(A.mean("float32"), 3, align=1),
    "sharded-mean-f64": lambda: A.sharded(A.mean("float64"), 4),
    "sharded-clip+mean": lambda: A.sharded(
        A.compose(fedagg.transforms.clip_norm(1e6), A.mean()), 5, align=1
    ),
}

#: What each aggregator must compute, from the updates (float64 flat result).
Reference = Callable[[fedagg.ParamSpec, list[fedagg.Update]], np.ndarray]


def _rows(spec: fedagg.ParamSpec, ups: list[fedagg.Update]) -> np.ndarray:
    return np.stack([spec.as_flat(u.delta).astype(np.float64) * u.scale for u in ups])


def _weiszfeld_ref(spec: fedagg.ParamSpec, ups: list[fedagg.Update]) -> np.ndarray:
    x = _rows(spec, ups)
    beta = np.array([u.weight for u in ups]) / np.maximum(1e-5, np.linalg.norm(x, axis=1))
    return beta @ x / beta.sum()


REFERENCES: dict[str, Reference] = {
    "median": lambda spec, ups: ref.median(_rows(spec, ups)),
    "median-disk": lambda spec, ups: ref.median(_rows(spec, ups)),
    "trimmed-b1": lambda spec, ups: ref.trimmed_mean(_rows(spec, ups), 1),
    "krum": lambda spec, ups: ref.multi_krum(_rows(spec, ups), 0, 1),
    "krum-disk": lambda spec, ups: ref.multi_krum(_rows(spec, ups), 0, 1),
    "multi-krum": lambda spec, ups: ref.multi_krum(_rows(spec, ups), 0, 3),
    "bulyan": lambda spec, ups: ref.bulyan(_rows(spec, ups), 0),
    "rfa": lambda spec, ups: ref.geometric_median(_rows(spec, ups), [u.weight for u in ups]),
    "cc": lambda spec, ups: ref.centered_clipping(_rows(spec, ups), 2.0, 3),
    "flag": lambda spec, ups: ref.flag(_rows(spec, ups), 3),
    "flag-lam-disk": lambda spec, ups: ref.flag(_rows(spec, ups), 3, lam=2.0),
    "weiszfeld-step": _weiszfeld_ref,
    "clip-step": lambda spec, ups: ref.centered_clipping(_rows(spec, ups), 2.0, 1),
}
#: Rules whose result does not overflow at float32 max * 1e30 (they do not weight the values,
#: or sum in float64): the "overflow" bad-input case does not apply to them.
NO_OVERFLOW = {n for n in AGGREGATORS if "f64" in n or "clip" in n} | set(REFERENCES)


@pytest.fixture(params=sorted(AGGREGATORS))
def agg(request: pytest.FixtureRequest) -> Any:
    a = AGGREGATORS[request.param]()
    if request.param.endswith("-step"):  # centred on the origin, whatever the model's size
        a = _recentre(a)
    return a


def _recentre(a: Any) -> Any:
    """A per-iteration monoid whose centre (zeros) fits any model: built lazily on init."""

    class Lazy:
        decomposable = True

        def __init__(self) -> None:
            self.inner: Any = None

        def _at(self, spec: fedagg.ParamSpec) -> Any:
            if self.inner is None or self.inner_size != spec.size:
                z = np.zeros(spec.size)
                self.inner = (
                    A.clip_step(z, 2.0) if isinstance(a, A.ClipStep) else A.weiszfeld_step(z)
                )
                self.inner_size = spec.size
            return self.inner

        def init(self, spec: fedagg.ParamSpec, *, version: int | None = None) -> Any:
            return self._at(spec).init(spec, version=version)

        def __getattr__(self, name: str) -> Any:
            def call(state: Any, *args: Any) -> Any:
                return getattr(self._at(state.spec), name)(state, *args)

            return call

    return Lazy()


@pytest.fixture(params=["dict", "list", "big"])
def model(request: pytest.FixtureRequest) -> Any:
    return make_model(request.param)


def snapshot(state: Any) -> bytes:
    """Everything a state holds, as bytes (scratch excluded): equal bytes, equal state."""
    return fedagg.dumps(state)


def updates_for(spec: fedagg.ParamSpec, n: int, seed: int = 0) -> list[fedagg.Update]:
    rng = np.random.default_rng(seed)
    return [
        fedagg.Update(
            delta=random_delta(spec, rng), weight=float(rng.integers(1, 100)), client_id=f"c{i}"
        )
        for i in range(n)
    ]


def reference_mean(spec: fedagg.ParamSpec, ups: list[fedagg.Update]) -> np.ndarray:
    acc = np.zeros(spec.size)
    for u in ups:
        acc += u.weight * spec.as_flat(u.delta).astype(np.float64)
    return acc / sum(u.weight for u in ups)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    """Equal up to float32 accumulation error, relative to the result's scale: coordinates
    that cancel to ~0 have no meaningful per-element relative error."""
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * float(np.abs(want).max()))


def test_is_an_aggregator(agg: Any) -> None:
    assert isinstance(agg, fedagg.Aggregator)
    assert isinstance(agg.decomposable, bool)


def test_result_matches_its_reference_and_spec(
    agg: Any, model: Any, request: pytest.FixtureRequest
) -> None:
    """The weighted mean, or for a robust rule its naive definition (tests/robust_ref.py)."""
    spec = fedagg.ParamSpec.from_arrays(model)
    ups = updates_for(spec, 7)
    state = agg.init(spec)
    for u in ups:
        state = agg.fold(state, u)
    assert agg.count(state) == 7
    out = agg.finalize(state)
    assert type(out) is type(model)
    assert fedagg.ParamSpec.from_arrays(out) == spec
    name = request.node.callspec.params["agg"]
    want = REFERENCES.get(name, reference_mean)(spec, ups)
    np.testing.assert_allclose(spec.as_flat(out), want, rtol=1e-5, atol=1e-6)


def test_fold_is_in_place_and_returns_the_state(agg: Any, model: Any) -> None:
    spec = fedagg.ParamSpec.from_arrays(model)
    state = agg.init(spec)
    assert agg.fold(state, updates_for(spec, 1)[0]) is state


def test_fold_many_equals_repeated_fold(agg: Any, model: Any) -> None:
    spec = fedagg.ParamSpec.from_arrays(model)
    ups = updates_for(spec, 9, seed=3)
    one = agg.init(spec)
    for u in ups:
        one = agg.fold(one, u)
    many = agg.fold_many(agg.init(spec), ups)
    assert_close(agg.finalize_flat(many), agg.finalize_flat(one))


def test_flat_and_structured_deltas_agree(agg: Any, model: Any) -> None:
    spec = fedagg.ParamSpec.from_arrays(model)
    ups = updates_for(spec, 4, seed=5)
    flat_ups = [fedagg.Update(delta=spec.as_flat(u.delta).copy(), weight=u.weight) for u in ups]
    raw_ups = [fedagg.Update(delta=spec.as_flat(u.delta).tobytes(), weight=u.weight) for u in ups]
    a = agg.finalize_flat(agg.fold_many(agg.init(spec), ups))
    b = agg.finalize_flat(agg.fold_many(agg.init(spec), flat_ups))
    c = agg.finalize_flat(agg.fold_many(agg.init(spec), raw_ups))
    np.testing.assert_array_equal(b, c)
    if isinstance(agg, fedagg.aggregators.Composed):
        # a clip factor comes from a norm whose float64 rounding depends on the segmentation
        assert_close(a, b)
    else:  # the fold itself is bit-identical whatever the representation
        np.testing.assert_array_equal(a, b)


def test_empty_finalize_raises(agg: Any, model: Any) -> None:
    state = agg.init(fedagg.ParamSpec.from_arrays(model))
    with pytest.raises(fedagg.EmptyAggregate):
        agg.finalize(state)


def test_merge_with_identity_changes_nothing(agg: Any, model: Any) -> None:
    spec = fedagg.ParamSpec.from_arrays(model)
    state = agg.fold_many(agg.init(spec), updates_for(spec, 5))
    before = snapshot(state)
    state = agg.merge(state, agg.init(spec))
    assert snapshot(state) == before
    ident = agg.merge(agg.init(spec), state)
    np.testing.assert_array_equal(agg.finalize_flat(ident), agg.finalize_flat(state))


def test_merge_of_halves_equals_flat_fold(agg: Any, model: Any) -> None:
    spec = fedagg.ParamSpec.from_arrays(model)
    ups = updates_for(spec, 10, seed=11)
    flat = agg.fold_many(agg.init(spec), ups)
    left = agg.fold_many(agg.init(spec), ups[:4])
    right = agg.fold_many(agg.init(spec), ups[4:])
    right_before = snapshot(right)
    merged = agg.merge(left, right)
    assert snapshot(right) == right_before, "merge must not change its second argument"
    assert agg.count(merged) == 10
    assert_close(agg.finalize_flat(merged), agg.finalize_flat(flat))


def test_merge_refuses_other_spec_or_version(agg: Any, model: Any) -> None:
    spec = fedagg.ParamSpec.from_arrays(model)
    other = fedagg.ParamSpec.from_arrays([np.zeros(2, np.float32)])
    with pytest.raises(fedagg.StateError):
        agg.merge(agg.init(spec), agg.init(other))
    with pytest.raises(fedagg.StateError):
        agg.merge(agg.init(spec, version=1), agg.init(spec, version=2))


def test_save_load_round_trip_is_bit_exact(agg: Any, model: Any, tmp_path: Any) -> None:
    spec = fedagg.ParamSpec.from_arrays(model)
    ups = updates_for(spec, 6)
    state = agg.fold_many(agg.init(spec, version=3), ups[:3])
    fedagg.save(tmp_path / "s.npz", state)
    loaded = fedagg.load(tmp_path / "s.npz")
    assert snapshot(loaded) == snapshot(state)
    # and the loaded state keeps working exactly like the original
    a = agg.finalize_flat(agg.fold_many(state, ups[3:]))
    b = agg.finalize_flat(agg.fold_many(loaded, ups[3:]))
    np.testing.assert_array_equal(a, b)


# -- bad input: typed error naming the client, state unchanged ------------------------------


def _bad_updates(spec: fedagg.ParamSpec) -> dict[str, tuple[type[Exception], fedagg.Update]]:
    rng = np.random.default_rng(9)
    good = random_delta(spec, rng)
    leaves = spec.leaves(good)

    def with_leaf(i: int, value: np.ndarray) -> Any:
        arrs = [x.copy() for x in leaves]
        arrs[i] = value
        return dict(zip(spec.names, arrs, strict=True)) if spec.keyed else arrs

    nan = leaves[0].copy()
    nan.flat[-1] = np.nan
    inf = leaves[1].copy()
    inf.flat[0] = -np.inf
    big = leaves[0].copy()
    big.flat[0] = np.finfo(np.float32).max
    return {
        "shape": (fedagg.SpecMismatch, fedagg.Update(with_leaf(0, leaves[0].T.copy()), 1.0, "bad")),
        "dtype": (
            fedagg.SpecMismatch,
            fedagg.Update(with_leaf(1, leaves[1].astype(np.float64)), 1.0, "bad"),
        ),
        "missing": (fedagg.SpecMismatch, fedagg.Update(leaves[:-1], 1.0, "bad")),
        "flat-size": (
            fedagg.SpecMismatch,
            fedagg.Update(np.zeros(spec.size + 1, spec.dtype), 1.0, "bad"),
        ),
        "nan": (fedagg.NonFiniteUpdate, fedagg.Update(with_leaf(0, nan), 1.0, "bad")),
        "inf": (fedagg.NonFiniteUpdate, fedagg.Update(with_leaf(1, inf), 1.0, "bad")),
        "overflow": (fedagg.NonFiniteUpdate, fedagg.Update(with_leaf(0, big), 1e30, "bad")),
        "zero-weight": (fedagg.InvalidWeight, fedagg.Update(good, 0.0, "bad")),
        "negative-weight": (fedagg.InvalidWeight, fedagg.Update(good, -2.0, "bad")),
        "nan-weight": (fedagg.InvalidWeight, fedagg.Update(good, float("nan"), "bad")),
        "stale": (fedagg.StaleUpdate, fedagg.Update(good, 1.0, "bad", base_version=6)),
    }


BAD_CASES = [
    "shape",
    "dtype",
    "missing",
    "flat-size",
    "nan",
    "inf",
    "overflow",
    "zero-weight",
    "negative-weight",
    "nan-weight",
    "stale",
]


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_update_is_refused_and_state_unchanged(
    agg: Any, model: Any, case: str, request: pytest.FixtureRequest
) -> None:
    spec = fedagg.ParamSpec.from_arrays(model)
    if spec.keyed and case == "missing":
        pytest.skip("list-only case")
    name = request.node.callspec.params["agg"]
    if case == "overflow" and name in NO_OVERFLOW:
        pytest.skip("float64 sums, clipped deltas and robust rules do not overflow here")
    state = agg.fold_many(agg.init(spec, version=5), updates_for(spec, 3))
    exc_type, bad = _bad_updates(spec)[case]
    before = snapshot(state)
    with pytest.raises(exc_type) as info:
        agg.fold(state, bad)
    assert isinstance(info.value, fedagg.UpdateError)
    assert info.value.client_id == "bad"
    assert "'bad'" in str(info.value)
    assert snapshot(state) == before


@pytest.mark.parametrize("case", ["nan", "inf", "shape", "stale"])
def test_fold_many_is_all_or_nothing(agg: Any, model: Any, case: str) -> None:
    spec = fedagg.ParamSpec.from_arrays(model)
    state = agg.fold_many(agg.init(spec, version=5), updates_for(spec, 2))
    before = snapshot(state)
    good = updates_for(spec, 150, seed=2)  # several kernel batches before the bad one
    with pytest.raises(fedagg.UpdateError) as info:
        agg.fold_many(state, [*good, _bad_updates(spec)[case][1], *good[:3]])
    assert info.value.client_id == "bad"
    assert snapshot(state) == before
    # the same state then folds good updates normally
    agg.fold_many(state, good[:2])
    assert agg.count(state) == 4


def test_deterministic(agg: Any, model: Any) -> None:
    spec = fedagg.ParamSpec.from_arrays(model)
    a = agg.finalize_flat(agg.fold_many(agg.init(spec), updates_for(spec, 20, seed=4)))
    b = agg.finalize_flat(agg.fold_many(agg.init(spec), updates_for(spec, 20, seed=4)))
    assert a.tobytes() == b.tobytes()


def test_inputs_are_not_modified(agg: Any, model: Any) -> None:
    spec = fedagg.ParamSpec.from_arrays(model)
    ups = updates_for(spec, 3)
    copies = copy.deepcopy([u.delta for u in ups])
    agg.finalize(agg.fold_many(agg.init(spec), ups))
    for u, c in zip(ups, copies, strict=True):
        np.testing.assert_array_equal(spec.as_flat(u.delta), spec.as_flat(c))


@NUMBA
def test_numba_and_numpy_backends_agree() -> None:
    spec = fedagg.ParamSpec.from_arrays([np.zeros(100_003, np.float32), np.zeros(7, np.float32)])
    ups = updates_for(spec, 70)
    for acc in ("float32", "float64"):
        a = fedagg.aggregators.mean(acc, backend="numba")
        b = fedagg.aggregators.mean(acc, backend="numpy")
        ra = a.finalize_flat(a.fold_many(a.init(spec), ups))
        rb = b.finalize_flat(b.fold_many(b.init(spec), ups))
        np.testing.assert_array_equal(ra, rb)  # both round each product and sum: same bits
