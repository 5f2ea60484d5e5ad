"""ParamSpec: layout, zero-copy views, structure checks."""

from __future__ import annotations

import numpy as np
import pytest

import fedagg
from tests.conftest import make_model


@pytest.mark.parametrize("kind", ["dict", "list"])
def test_round_trip_through_flat(kind: str) -> None:
    model = make_model(kind)
    spec = fedagg.ParamSpec.from_arrays(model)
    assert spec.size == 12 + 4 + 1
    assert spec.offsets == (0, 12, 16, 17)
    assert spec.nbytes == 17 * 4
    flat = spec.as_flat(model)
    back = spec.unflatten(flat)
    assert type(back) is type(model)
    for a, b in zip(spec.leaves(back), spec.leaves(model), strict=True):
        np.testing.assert_array_equal(a, b)
        assert a.shape == b.shape


def test_unflatten_returns_views_not_copies() -> None:
    spec = fedagg.ParamSpec.from_arrays(make_model("dict"))
    flat = spec.zeros()
    views = spec.unflatten(flat)
    views["w"][0, 0] = 7.0
    assert flat[0] == 7.0
    assert all(np.shares_memory(v, flat) for v in views.values())


def test_as_flat_recognises_views_of_one_buffer_and_bytes() -> None:
    spec = fedagg.ParamSpec.from_arrays(make_model("list"))
    flat = np.arange(spec.size, dtype=np.float32)
    assert spec.as_flat(spec.unflatten(flat)) is not None
    assert np.shares_memory(spec.as_flat(spec.unflatten(flat)), flat)
    assert np.shares_memory(spec.as_flat(flat), flat)
    raw = flat.tobytes()
    view = spec.as_flat(raw)
    np.testing.assert_array_equal(view, flat)
    assert not view.flags.owndata  # a view over the bytes, no copy
    # views of a buffer in another order, or of separate arrays, are copied correctly
    parts = spec.unflatten(flat)
    swapped = [parts[1], parts[0], parts[2]]
    other = fedagg.ParamSpec.from_arrays(swapped)
    np.testing.assert_array_equal(
        other.as_flat(swapped), np.concatenate([p.reshape(-1) for p in swapped])
    )
    assert not np.shares_memory(other.as_flat(swapped), flat)


def test_offset_view_of_a_larger_buffer() -> None:
    spec = fedagg.ParamSpec.from_arrays([np.zeros(3, np.float32), np.zeros(2, np.float32)])
    big = np.arange(10, dtype=np.float32)
    views = spec.unflatten(big[4:9])
    np.testing.assert_array_equal(spec.as_flat(views), [4, 5, 6, 7, 8])
    assert np.shares_memory(spec.as_flat(views), big)


def test_non_contiguous_leaves_are_copied() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    spec = fedagg.ParamSpec.from_arrays([np.zeros((4, 3), np.float32)])
    strided = base[:, ::2]
    np.testing.assert_array_equal(spec.as_flat([strided]), strided.reshape(-1))


@pytest.mark.parametrize(
    ("arrays", "needle"),
    [
        ([], "at least one"),
        ({}, "at least one"),
        ([np.zeros(2, np.float32), np.zeros(2, np.float64)], "one dtype"),
        ([np.zeros(2, np.int64)], "floating-point"),
        ("not arrays", "list or dict"),
    ],
)
def test_invalid_specs(arrays: object, needle: str) -> None:
    with pytest.raises(fedagg.SpecError, match=needle):
        fedagg.ParamSpec.from_arrays(arrays)  # type: ignore[arg-type]


def test_mismatch_explains_why() -> None:
    spec = fedagg.ParamSpec.from_arrays(make_model("dict"))
    good = make_model("dict")
    assert spec.mismatch(good) is None
    assert "missing ['s']" in str(spec.mismatch({"w": good["w"], "b": good["b"]}))
    assert "shape" in str(spec.mismatch({**good, "b": np.zeros(5, np.float32)}))
    assert "dtype" in str(spec.mismatch({**good, "b": good["b"].astype(np.float16)}))
    assert "bytes" in str(spec.mismatch(b"\0" * 3))
    assert "expected (17,)" in str(spec.mismatch(np.zeros(16, np.float32)))
    assert "arrays" in str(spec.mismatch([good["w"]]))
    with pytest.raises(fedagg.SpecError):
        spec.leaves([good["w"]])


def test_dict_round_trip_and_equality() -> None:
    spec = fedagg.ParamSpec.from_arrays(make_model("dict", np.float64))
    again = fedagg.ParamSpec.from_dict(spec.to_dict())
    assert again == spec
    assert again.offsets == spec.offsets
    with pytest.raises(fedagg.SpecError):
        fedagg.ParamSpec.from_dict({"names": ["a"]})
