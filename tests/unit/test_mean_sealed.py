"""Mean's public API for the other planes (issue 15, "Mean sealed").

* :func:`~fedagg.core.aggregate.check_mergeable` refuses what ``Mean.merge`` refuses (spec,
  model version, accumulator), with the same :class:`~fedagg.errors.StateError`, and
  ``Mean.merge`` changes nothing then.
* :func:`~fedagg.core.aggregate.check_peak` is the float64 fold's value rule: an update is
  refused by it exactly when ``Mean.fold`` refuses it for its values.
* :meth:`~fedagg.core.aggregate.Mean.fold_trusted` gives ``fold``'s bits (sums, compensation,
  weight sum and its compensation, count) on random inputs, both accumulators, both backends,
  float32 and float64 models, small (numpy) and large (compiled) buffers, in any batching.
* The planes import no private name of another module.
"""

from __future__ import annotations

import ast
import importlib
import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedagg
from fedagg.core.aggregate import (
    F64_SAFE,
    Mean,
    MeanState,
    accumulator_dtype,
    check_mergeable,
    check_peak,
)
from fedagg.core.spec import ParamSpec
from fedagg.core.update import Update
from fedagg.errors import NonFiniteUpdate, StateError

BACKENDS = ["numba", "numpy"] if Mean().use_numba else ["numpy"]
#: long enough for the compiled kernels (NUMBA_MIN_SIZE is 2**16)
BIG = 70_001
SRC = Path(fedagg.__file__).parent


def _spec(size: int, dtype: Any = np.float32) -> ParamSpec:
    return ParamSpec.from_arrays([np.zeros(size, dtype)])


def _bits(a: np.ndarray | None) -> bytes | None:
    return None if a is None else a.tobytes()


def _snapshot(s: MeanState) -> tuple[Any, ...]:
    w, wc = s.weight, s.weight_comp
    return (_bits(s.acc), _bits(s.comp), w.hex(), wc.hex(), s.count, s.version, s.accumulator)


def _filled(agg: Mean, spec: ParamSpec, seed: int, version: int | None = None) -> MeanState:
    rng = np.random.default_rng(seed)
    st_ = agg.init(spec, version=version)
    for _ in range(3):
        x = rng.standard_normal(spec.size).astype(spec.dtype)
        agg.fold(st_, Update(delta=x, weight=float(rng.uniform(0.5, 5)), base_version=version))
    return st_


# -- merge compatibility --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("spec", "cannot merge states of different specs"),
        ("shape", "cannot merge states of different specs"),
        ("dtype", "cannot merge states of different specs"),
        ("version", "cannot merge version 4 into 3"),
        ("accumulator", "cannot merge states with different accumulators"),
    ],
)
@pytest.mark.parametrize("acc", ["float32", "float64"])
def test_check_mergeable_refuses_what_merge_refuses(change: str, message: str, acc: str) -> None:
    agg = Mean(acc)  # type: ignore[arg-type]
    spec = _spec(40)
    state = _filled(agg, spec, 1, version=3)
    other_spec = {
        "spec": ParamSpec.from_arrays({"w": np.zeros(40, np.float32)}),
        "shape": _spec(41),
        "dtype": _spec(40, np.float64),
    }.get(change, spec)
    other_agg = (
        Mean("float32" if acc == "float64" else "float64") if change == "accumulator" else agg
    )
    other = _filled(other_agg, other_spec, 2, version=4 if change == "version" else 3)
    before = _snapshot(state)
    with pytest.raises(StateError, match=message):
        check_mergeable(
            other, spec=state.spec, version=state.version, accumulator=state.accumulator
        )
    with pytest.raises(StateError, match=message):
        agg.merge(state, other)
    assert _snapshot(state) == before
    same = _filled(agg, spec, 3, version=3)
    check_mergeable(same, spec=spec, version=3, accumulator=acc)  # compatible: no error
    agg.merge(state, same)
    assert state.count == 6


def test_accumulator_dtype_is_the_states() -> None:
    for acc in ("float32", "float64"):
        for dtype in (np.float16, np.float32, np.float64):
            spec = _spec(5, dtype)
            st_ = Mean(acc).init(spec)  # type: ignore[arg-type]
            assert accumulator_dtype(spec, acc) == st_.acc.dtype
            st_.check()


# -- the value rule ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_check_peak_refuses_non_finite(bad: float) -> None:
    for f64 in (False, True):
        with pytest.raises(NonFiniteUpdate, match="NaN or Inf") as e:
            check_peak("c7", 1.0, abs(bad), count=1, float64=f64)
        assert e.value.client_id == "c7"


def test_check_peak_bound_only_for_float64() -> None:
    check_peak("c", 2.0, F64_SAFE, count=1, float64=False)  # float32: the fold decides
    check_peak("c", 1.0, F64_SAFE, count=1, float64=True)  # at the bound: accepted
    check_peak("c", -1.0, F64_SAFE / 3, count=3, float64=True)
    with pytest.raises(NonFiniteUpdate, match="overflow float64"):
        check_peak("c", -2.0, F64_SAFE / 3, count=3, float64=True)
    with pytest.raises(NonFiniteUpdate, match="overflow float64"):
        check_peak("c", 1e300, 1e300, count=1, float64=True)  # |w x| overflows to inf


@settings(max_examples=60)
@given(
    w=st.floats(1e-3, 1e3),
    scale=st.floats(-1e3, 1e3).filter(lambda s: abs(s) > 1e-6),
    exp=st.integers(280, 308),
    held=st.integers(0, 5),
)
def test_check_peak_agrees_with_the_float64_fold(
    w: float, scale: float, exp: int, held: int
) -> None:
    """An update near the float64 bound: check_peak refuses it iff Mean.fold does."""
    agg = Mean("float64", backend="numpy")
    spec = _spec(4, np.float64)
    state = agg.init(spec)
    for _ in range(held):
        agg.fold(state, Update(delta=np.ones(4), weight=1.0))
    x = np.array([0.0, -(10.0**exp) / 7, 1.0, 2.0])
    peak = float(np.abs(x).max())
    try:
        check_peak("c", w * scale, peak, count=held + 1, float64=True)
        refused = False
    except NonFiniteUpdate:
        refused = True
    try:
        agg.fold(state, Update(delta=x, weight=w, scale=scale, client_id="c"))
        folded = True
    except NonFiniteUpdate:
        folded = False
    assert refused != folded


# -- the trusted fold -------------------------------------------------------------------------


def _updates(rng: np.random.Generator, size: int, n: int, dtype: Any) -> list[Update]:
    out = []
    for i in range(n):
        mag = 10.0 ** float(rng.integers(-8, 9))
        x = (rng.standard_normal(size) * mag).astype(dtype)
        if i % 3 == 1:  # cancellation: the compensation matters
            x[: size // 2] = -x[: size // 2] * 1e8
        w = float(rng.uniform(1e-3, 1e3))
        s = float(rng.choice([1.0, -0.5, 3.0, 1e-7, 0.1]))
        out.append(Update(delta=x, weight=w, scale=s, client_id=f"c{i}"))
    return out


def _check_trusted(
    acc: str, backend: str, dtype: Any, size: int, seed: int, cuts: list[int]
) -> None:
    rng = np.random.default_rng(seed)
    spec = _spec(size, dtype)
    agg = Mean(acc, backend=backend)  # type: ignore[arg-type]
    ups = _updates(rng, size, 7, dtype)
    ref = agg.fold_many(agg.init(spec, version=2), ups)
    got = agg.init(spec, version=2)
    bounds = [0, *sorted(set(cuts)), len(ups)]
    for lo, hi in itertools.pairwise(bounds):
        part = ups[lo:hi]
        xs = [u.delta for u in part]
        ws = [u.weight for u in part]
        if all(u.scale == 1.0 for u in part):
            agg.fold_trusted(got, xs, ws)
        else:
            agg.fold_trusted(got, xs, ws, [u.scale for u in part])
    assert _snapshot(got) == _snapshot(ref), (acc, backend, dtype, size, cuts)
    assert agg.finalize_flat(got).tobytes() == agg.finalize_flat(ref).tobytes()


@settings(max_examples=40)
@given(
    acc=st.sampled_from(["float32", "float64"]),
    backend=st.sampled_from(BACKENDS),
    dtype=st.sampled_from([np.float32, np.float64]),
    size=st.integers(1, 300),
    seed=st.integers(0, 2**32 - 1),
    cuts=st.lists(st.integers(0, 7), max_size=4),
)
def test_fold_trusted_equals_fold_small(
    acc: str, backend: str, dtype: Any, size: int, seed: int, cuts: list[int]
) -> None:
    _check_trusted(acc, backend, dtype, size, seed, cuts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("acc", ["float32", "float64"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fold_trusted_equals_fold_compiled(acc: str, backend: str, dtype: Any) -> None:
    """Buffers long enough for the compiled kernels (trusted float32 kernel, compensated
    float64 kernel), one update per call and blocked batches."""
    _check_trusted(acc, backend, dtype, BIG, 11, [1, 4])
    _check_trusted(acc, backend, dtype, BIG, 12, [])


def test_fold_trusted_compensates_exactly() -> None:
    """The compensated path: [1e16, 1, -1e16] (weights 1) gives 1/3 exactly as fold does,
    where a plain float64 sum gives 0."""
    spec = _spec(3, np.float64)
    for backend in BACKENDS:
        agg = Mean("float64", backend=backend)  # type: ignore[arg-type]
        xs = [np.full(3, 1e16), np.ones(3), np.full(3, -1e16)]
        got = agg.fold_trusted(agg.init(spec), xs, [1.0, 1.0, 1.0])
        ref = agg.fold_many(agg.init(spec), [Update(delta=x) for x in xs])
        assert _snapshot(got) == _snapshot(ref)
        assert agg.finalize_flat(got).tolist() == [1 / 3] * 3


def test_fold_trusted_empty_and_unvalidated() -> None:
    spec = _spec(8)
    agg = Mean("float32")
    state = _filled(agg, spec, 5)
    before = _snapshot(state)
    assert agg.fold_trusted(state, [], []) is state
    assert _snapshot(state) == before
    with pytest.raises(StateError, match="unvalidated"):
        agg.fold_trusted(state, [np.full(8, np.nan, np.float32)], [1.0])


# -- no private imports across modules ------------------------------------------------------

PLANES = [
    "core/aggregate.py",
    "core/tree.py",
    "deploy/_partial.py",
    "plane/_kernels.py",
    "plane/_shm.py",
    "plane/_shards.py",
    "plane/_service.py",
]


@pytest.mark.parametrize("rel", PLANES)
def test_planes_import_no_private_names(rel: str) -> None:
    """``from m import _x`` only for a private *module* ``_x`` (a package's own layout)."""
    tree = ast.parse((SRC / rel).read_text())
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                if not alias.name.startswith("_"):
                    continue
                try:
                    importlib.import_module(f"{node.module}.{alias.name}")
                except ImportError:
                    bad.append(f"{node.module}.{alias.name}")
    assert not bad, f"{rel} imports private names: {bad}"
