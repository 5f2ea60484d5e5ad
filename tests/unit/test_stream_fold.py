"""The streaming fold (``Mean.fold`` of one update into the float32 accumulator, issue 20).

* Its bits are the old checked kernel's (``fold_many([u], undo=True)``, the batched kernel with
  its undo copy) and numpy's ``acc + float32(w*s) * x``, for flat and layered updates, random
  weights, scales and magnitudes, in any sequence; ``finalize`` gives the numpy backend's bits.
* A NaN or an infinity at any coordinate of any 16 KiB block of any layer refuses the update
  with the old path's typed error and message, and leaves the state bit-identical (sums, weight
  sum and its compensation, count, and the remembered ``max |acc|``).
* An update that could overflow falls back to the checked path: same result, same error.
* The remembered ``max |acc|`` is exact after a streaming fold, and never trusted once the sums
  changed by another route (a trusted fold after a rollback to an earlier snapshot).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedagg.core import _stream
from fedagg.core.aggregate import Mean, MeanState
from fedagg.core.spec import ParamSpec
from fedagg.core.update import Update
from fedagg.errors import NonFiniteUpdate

pytestmark = pytest.mark.skipif(not Mean().use_numba, reason="the streaming fold is compiled")

N = _stream.STREAM_MIN_SIZE + 4099  # large enough to stream; a partial last block
FLAT = ParamSpec.from_arrays([np.zeros(N, np.float32)])
#: 5 layers of uneven sizes (one empty), the same N coordinates
LAYERED = ParamSpec.from_arrays(
    [np.zeros(s, np.float32) for s in (4096, 30_001, 0, N - 4096 - 30_001 - 7, 7)]
)
AGG = Mean()


def _delta(spec: ParamSpec, flat: np.ndarray) -> Any:
    return flat if len(spec.names) == 1 else [np.array(a) for a in spec.unflatten(flat)]


def _snap(s: MeanState) -> tuple[Any, ...]:
    return (s.acc.tobytes(), s.weight.hex(), s.weight_comp.hex(), s.count, s.peak)


def _random(rng: np.random.Generator, scale: float) -> np.ndarray:
    return ((rng.random(N, np.float32) - np.float32(0.5)) * np.float32(scale)).astype(np.float32)


updates = st.lists(
    st.tuples(
        st.integers(0, 2**32 - 1),  # seed
        st.floats(1e-3, 1e4),  # weight
        st.sampled_from([1.0, 0.5, 1e-3, 3.7]),  # scale
        st.sampled_from([1e-6, 1.0, 1e3, 1e8]),  # magnitude
    ),
    min_size=1,
    max_size=5,
)


@settings(max_examples=20, deadline=None)
@given(ups=updates, layered=st.booleans())
def test_streaming_fold_has_the_old_kernels_and_numpys_bits(
    ups: list[tuple[int, float, float, float]], layered: bool
) -> None:
    spec = LAYERED if layered else FLAT
    new, old = AGG.init(spec), AGG.init(spec)
    ref = np.zeros(N, np.float32)
    for seed, w, s, mag in ups:
        x = _random(np.random.default_rng(seed), mag)
        u = Update(delta=_delta(spec, x), weight=w, scale=s)
        AGG.fold(new, u)
        AGG.fold_many(old, [u], undo=True)
        ref = ref + np.float32(w * s) * x
        assert new.acc.tobytes() == old.acc.tobytes() == ref.tobytes()
        assert (new.weight, new.weight_comp, new.count) == (old.weight, old.weight_comp, old.count)
        assert new.peak is not None and new.peak[:2] == (new.count, new.weight)
        assert new.peak[2] >= float(np.abs(new.acc).max())  # a bound on the sums
    assert new.undo is None  # no undo copy was made
    want = Mean(backend="numpy").finalize_flat(old)
    assert AGG.finalize_flat(new).tobytes() == want.tobytes()


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    block=st.integers(0, (N - 1) // 4096),
    where=st.sampled_from(["first", "last", "any"]),
    offset=st.integers(0, 4095),
    bad=st.sampled_from([math.nan, math.inf, -math.inf]),
    layered=st.booleans(),
    before=st.integers(0, 2),
)
def test_a_nonfinite_value_anywhere_changes_nothing(
    seed: int, block: int, where: str, offset: int, bad: float, layered: bool, before: int
) -> None:
    spec = LAYERED if layered else FLAT
    rng = np.random.default_rng(seed)
    state = AGG.init(spec)
    for _ in range(before):  # a state with sums (and a remembered max |acc|), or an empty one
        AGG.fold(state, Update(delta=_delta(spec, _random(rng, 10.0)), weight=2.0))
    x = _random(rng, 1.0)
    lo, hi = block * 4096, min(N, (block + 1) * 4096)
    i = {"first": lo, "last": hi - 1, "any": min(hi - 1, lo + offset)}[where]
    x[i] = bad
    u = Update(delta=_delta(spec, x), weight=3.0, client_id="c")
    was = _snap(state)
    old = AGG.init(spec)
    old.acc[...] = state.acc
    with pytest.raises(NonFiniteUpdate) as old_err:
        AGG.fold_many(old, [u], undo=True)
    with pytest.raises(NonFiniteUpdate) as new_err:
        AGG.fold(state, u)
    assert (new_err.value.client_id, new_err.value.reason) == (
        old_err.value.client_id,
        old_err.value.reason,
    )
    assert _snap(state) == was


@pytest.mark.parametrize("layered", [False, True])
def test_a_possible_overflow_takes_the_checked_path(layered: bool) -> None:
    spec = LAYERED if layered else FLAT
    big = float(np.finfo(np.float32).max) / 2
    x = np.full(N, 1.0, np.float32)
    states = [AGG.init(spec), AGG.init(spec)]
    for s in states:  # sums at half the float32 range
        AGG.fold(s, Update(delta=_delta(spec, x), weight=big))
    # fits below the range, but not within the bound's margin: the checked path folds it
    near = Update(delta=_delta(spec, x), weight=big * (1 - 2.0**-23))
    AGG.fold(states[0], near)
    AGG.fold_many(states[1], [near], undo=True)
    assert states[0].acc.tobytes() == states[1].acc.tobytes()
    assert states[0].peak is None and states[0].undo is not None
    # overflows: refused with the checked path's error, nothing changed
    was = _snap(states[0])
    with pytest.raises(NonFiniteUpdate, match="overflows float32") as err:
        AGG.fold(states[0], Update(delta=_delta(spec, x), weight=big, client_id="o"))
    assert err.value.client_id == "o" and _snap(states[0]) == was


def test_a_bound_grown_too_loose_is_measured_again_not_refused() -> None:
    big = float(np.finfo(np.float32).max) / 4
    x = np.full(N, 1.0, np.float32)
    state, ref = AGG.init(FLAT), AGG.init(FLAT)
    for sign in (1.0, -1.0, 1.0, -1.0, 1.0):  # sums big, 0, big, 0, big: the bound grows to
        u = Update(delta=sign * x, weight=big)  # 4 big = the float32 range, the sums do not
        AGG.fold(state, u)
        AGG.fold_many(ref, [u], undo=True)
        assert state.peak is not None and state.peak[2] >= float(np.abs(state.acc).max())
    assert state.undo is None  # every fold streamed: the loose bound was measured, not refused
    assert state.acc.tobytes() == ref.acc.tobytes()


def test_the_remembered_peak_is_not_trusted_after_another_change() -> None:
    rng = np.random.default_rng(5)
    state = AGG.init(FLAT)
    AGG.fold(state, Update(delta=_random(rng, 1.0), weight=1.0))
    snap = (state.acc.copy(), state.weight, state.weight_comp, state.count)
    AGG.fold(state, Update(delta=_random(rng, 1.0), weight=1.0))  # remembers count 2, weight 2
    # a plane's rollback to the snapshot, then a trusted fold of another update, same weight
    state.acc[...], state.weight, state.weight_comp, state.count = snap
    big = _random(rng, 1e6)
    AGG.fold_trusted(state, [big], [1.0])
    assert state.peak is None
    AGG.fold(state, Update(delta=_random(rng, 1.0), weight=1.0))
    assert state.peak is not None and state.peak[2] >= float(np.abs(state.acc).max())
    # merge forgets it too
    other = AGG.init(FLAT)
    AGG.fold(other, Update(delta=_random(rng, 1.0), weight=1.0))
    AGG.merge(state, other)
    assert state.peak is None


def test_peak_is_exact_and_refuses_nonfinite() -> None:
    for dtype in (np.float32, np.float64):
        x = np.array([0.0, -3.5, 2.0, -0.0], dtype)
        assert _stream.peak([x, x[:0], x[:2]]) == 3.5
        for bad in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y[3] = bad
            assert _stream.peak([x, y]) == math.inf
    assert _stream.peak([]) == 0.0


# -- save_fold: a fold on receive's pre-image copy and fold in one pass ------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_save_fold_has_fold_trusteds_bits_and_saves_the_pre_image(dtype: Any) -> None:
    rng = np.random.default_rng(7)
    n = 70_001
    acc = (rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n)).astype(dtype)
    x = (rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n)).astype(dtype)
    x.flags.writeable = False  # as a received chunk is
    w = 3.7e-3
    want = acc.copy()
    _stream.fold_trusted_blocked(want, [x], np.array([w]).astype(dtype))
    before = acc.copy()
    undo = np.full_like(acc, np.nan)
    assert _stream.save_fold(acc, undo, x, w) is True
    assert acc.tobytes() == want.tobytes()
    assert undo.tobytes() == before.tobytes()


def test_save_fold_reports_an_overflow_with_the_whole_range_saved() -> None:
    n = 5000
    acc = np.ones(n, np.float32)
    acc[4321] = np.finfo(np.float32).max
    x = np.ones(n, np.float32)
    x[4321] = np.finfo(np.float32).max
    before = acc.copy()
    undo = np.zeros_like(acc)
    assert _stream.save_fold(acc, undo, x, 1.0) is False
    assert np.isinf(acc[4321])
    assert undo.tobytes() == before.tobytes()  # a rollback from it restores every coordinate


def test_save_fold_declines_what_it_cannot_compile() -> None:
    acc = np.zeros(10, np.float32)
    assert _stream.save_fold(acc, np.zeros(10, np.float16), np.ones(10, np.float32), 1.0) is None
    assert _stream.save_fold(acc, np.zeros(10, np.float32), np.ones(10, np.float16), 1.0) is None
    assert not acc.any()
