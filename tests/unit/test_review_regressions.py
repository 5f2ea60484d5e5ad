"""Regression tests for edge cases found in review: each failed before its fix."""

from __future__ import annotations

import io

import numpy as np
import pytest

import fedagg


def spec_of(n: int, dtype: object = np.float32) -> fedagg.ParamSpec:
    return fedagg.ParamSpec.from_arrays([np.zeros(n, dtype)])  # type: ignore[call-overload]


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_float64_overflow_is_refused_and_state_unchanged(backend: str) -> None:
    agg = fedagg.aggregators.mean("float64", backend=backend)  # type: ignore[arg-type]
    spec = spec_of(70_000)
    state = agg.fold(agg.init(spec), fedagg.Update(np.ones(70_000, np.float32), 1.0, "a"))
    before = fedagg.dumps(state)
    with pytest.raises(fedagg.NonFiniteUpdate, match="overflow"):
        agg.fold(state, fedagg.Update(np.full(70_000, 1e10, np.float32), 1e300, "big"))
    assert fedagg.dumps(state) == before


def test_weight_sum_overflow_is_refused() -> None:
    agg = fedagg.aggregators.mean("float64")
    one = np.ones(3, np.float32)
    state = agg.fold(agg.init(spec_of(3)), fedagg.Update(one, 1e308, "a", scale=1e-10))
    with pytest.raises(fedagg.InvalidWeight, match="sum of weights"):
        agg.fold(state, fedagg.Update(one, 1e308, "b", scale=1e-10))
    assert agg.count(state) == 1


def test_tiny_weights_do_not_underflow_the_float32_mean() -> None:
    agg = fedagg.aggregators.mean("float32")
    state = agg.fold(agg.init(spec_of(4)), fedagg.Update(np.ones(4, np.float32), 1e-30, "a"))
    np.testing.assert_allclose(agg.finalize_flat(state), 1.0, rtol=1e-6)


def test_merge_overflow_is_refused_and_state_unchanged() -> None:
    agg = fedagg.aggregators.mean("float32")
    big = np.full(5, 3e38, np.float32)
    a = agg.fold(agg.init(spec_of(5)), fedagg.Update(big, 1.0, "a"))
    b = agg.fold(agg.init(spec_of(5)), fedagg.Update(big, 1.0, "b"))
    before = fedagg.dumps(a)
    with pytest.raises(fedagg.StateError, match="overflow"):
        agg.merge(a, b)
    assert fedagg.dumps(a) == before


def test_a_tampered_checkpoint_is_refused_not_run() -> None:
    agg = fedagg.aggregators.mean("float64")
    state = agg.fold(agg.init(spec_of(100_000)), fedagg.Update(np.ones(100_000, np.float32)))
    with np.load(io.BytesIO(fedagg.dumps(state))) as z:
        parts = {k: z[k] for k in z.files}
    parts["a1"] = parts["a1"][:10]  # a short compensation buffer
    buf = io.BytesIO()
    np.savez(buf, **parts)
    with pytest.raises(fedagg.StateError):
        fedagg.loads(buf.getvalue())


@pytest.mark.parametrize("dtype", [np.float16, np.dtype(">f4")])
def test_non_native_float_models_fold_on_the_numpy_path(dtype: object) -> None:
    spec = spec_of(70_000, dtype)
    x = np.full(70_000, 0.5, dtype)  # type: ignore[call-overload]
    for make in (
        lambda: fedagg.aggregators.mean(),
        lambda: fedagg.aggregators.compose(
            fedagg.transforms.clip_norm(1e9), fedagg.aggregators.mean()
        ),
    ):
        agg = make()
        out = agg.finalize_flat(agg.fold(agg.init(spec), fedagg.Update(x, 2.0)))
        np.testing.assert_allclose(out.astype(np.float64), 0.5, rtol=1e-3)


def test_weights_and_scales_of_any_numeric_type() -> None:
    agg = fedagg.aggregators.mean()
    state = agg.init(spec_of(2))
    agg.fold(
        state, fedagg.Update(np.ones(2, np.float32), np.float32(2.0), "a", scale=np.float32(0.5))
    )  # type: ignore[arg-type]
    with pytest.raises(fedagg.InvalidWeight):
        agg.fold(state, fedagg.Update(np.ones(2, np.float32), 10**400, "huge"))
    with pytest.raises(fedagg.InvalidWeight):
        agg.fold(state, fedagg.Update(np.ones(2, np.float32), True, "bool"))
    assert agg.count(state) == 1


def test_bad_buffers_and_keys_get_typed_errors() -> None:
    agg = fedagg.aggregators.mean()
    state = agg.init(spec_of(4))
    strided = memoryview(np.zeros(8, np.float32))[::2]
    with pytest.raises(fedagg.SpecMismatch, match="contiguous"):
        agg.fold(state, fedagg.Update(strided, 1.0, "s"))
    with pytest.raises(fedagg.SpecError):
        fedagg.ParamSpec.from_arrays({0: np.zeros(2, np.float32)})  # type: ignore[dict-item]
    spec = fedagg.ParamSpec(("a",), ((2,),), "float32", False)  # type: ignore[arg-type]
    assert spec.dtype == np.float32
    int_views = list(spec_of(4).unflatten(np.arange(4, dtype=np.float32)))
    assert spec_of(4).mismatch([int_views[0].view(np.int32)]) is not None


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("where", [0, 1, 700, 4095, 4096, 9999])
def test_float64_mean_refuses_a_nan_anywhere_in_the_update(backend: str, where: int) -> None:
    """A NaN followed by larger finite values in its block was once hidden by the max-abs
    kernel (``not v <= m`` let the next value overwrite the NaN): the f64 fold accepted it."""
    import fedagg
    from fedagg.core import kernels
    from fedagg.errors import NonFiniteUpdate

    if backend == "numba" and not kernels.HAVE_NUMBA:
        pytest.skip("numba not installed")
    x = np.linspace(0.0, 5.0, 10_000).astype(np.float32)
    x[where] = np.nan
    spec = fedagg.ParamSpec.from_arrays([np.zeros(10_000, np.float32)])
    agg = fedagg.aggregators.mean("float64", backend=backend)  # type: ignore[arg-type]
    state = agg.init(spec)
    with pytest.raises(NonFiniteUpdate):
        agg.fold(state, fedagg.Update(delta=x, weight=1.0))
    assert state.count == 0 and not state.acc.any()
    assert kernels.max_abs(x.astype(np.float64), use_numba=backend == "numba") != 5.0
