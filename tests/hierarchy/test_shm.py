"""The one-host data planes: shared memory, Unix sockets and sharded TCP flows (real processes).

Every path must give the bits of an in-process ``fedagg.aggregators.mean`` fold, refuse bad
updates with the same typed errors and no state change, fail (not hang) when a worker dies, and
leave no shared-memory segment behind.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from benchmarks._sockets import ShardReceiver, ShardSender, SocketAggregator, send_sharded

import fedagg
from fedagg.core import kernels as _kernels
from fedagg.errors import (
    ConfigError,
    InvalidWeight,
    NonFiniteUpdate,
    SpecMismatch,
    StaleUpdate,
    StateError,
)
from fedagg.plane import (
    SHM_PREFIX,
    AggregatorFailed,
    ShmAggregator,
    copy_peak,
    fold_validated,
    peak,
)

SPEC = fedagg.ParamSpec.from_arrays(
    {"w": np.zeros((301, 333), np.float32), "b": np.zeros(77, np.float32)}
)
N_UP = 5
#: Workers fold with numpy kernels (bit-identical to numba's by design): a fresh process's first
#: numba call costs seconds on a busy 2-core machine. One case below keeps the default backend.
NP: dict[str, Any] = {"backend": "numpy"}


def _segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(SHM_PREFIX)}


#: Segments of the module's shared pools (see ``pools``): they outlive a test by design.
_SHARED: set[str] = set()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    before = _segments()
    yield
    assert _segments() - before - _SHARED == set(), "shared-memory segments leaked"


Pools = Callable[..., Any]


@pytest.fixture(scope="module")
def pools() -> Iterator[Pools]:
    """Worker pools shared by the tests of this module: ``pools(cls, **kw)`` is one
    ``cls(SPEC, **kw)`` (numpy kernels) per distinct configuration, reset to ``version`` at
    every request. Starting workers is most of what a test here costs; a reset gives the empty
    state, and fold statistics are compared as differences (``_folds``)."""
    before = _segments()
    made: dict[tuple[Any, ...], Any] = {}

    def get(cls: Any, version: int | None = None, **kw: Any) -> Any:
        key = (cls, *sorted(kw.items()))
        if key not in made:
            fresh = _segments()
            made[key] = cls(SPEC, **kw, **NP)
            _SHARED.update(_segments() - fresh)
        agg = made[key]
        agg.reset(version)
        return agg

    yield get
    for agg in made.values():
        agg.close()
    _SHARED.clear()
    assert _segments() - before == set(), "shared-memory segments leaked"


@pytest.fixture(scope="module", autouse=True)
def default_backend_pool() -> Iterator[Future[ShmAggregator]]:
    """The one pool with the default kernels (numba): its workers load compiled kernels, seconds
    on a busy 2-core machine, so it starts first, in the background, and is used last
    (``test_default_backend_equals_in_process_fold``)."""
    before = _segments()
    with ThreadPoolExecutor(1) as pool:
        fut = pool.submit(ShmAggregator, SPEC, shards=1, workers=1, accumulator="float32", slots=2)
        while not fut.done() and not _segments() - before:  # its segment exists at once
            time.sleep(0.005)
        mine = _segments() - before
        _SHARED.update(mine)
        yield fut
    if fut.exception() is None:
        fut.result().close()
    _SHARED.difference_update(mine)
    assert _segments() - before == set(), "shared-memory segments leaked"


def _folds(agg: Any) -> list[tuple[int, int]]:
    """Per worker: updates folded so far by the validated and by the checked path."""
    return [(st["validated"], st["checked"]) for st in agg._fold_stats()]


def _since(agg: Any, before: list[tuple[int, int]]) -> list[tuple[int, int]]:
    return [(v - v0, c - c0) for (v, c), (v0, c0) in zip(_folds(agg), before, strict=True)]


def _updates(seed: int = 0, n: int = N_UP) -> list[tuple[np.ndarray, float]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal(SPEC.size).astype(np.float32), float(rng.integers(1, 1000)))
        for _ in range(n)
    ]


def _reference(ups: list[tuple[np.ndarray, float]], acc: str) -> tuple[Any, Any]:
    agg = fedagg.aggregators.mean(acc)  # type: ignore[arg-type]
    st = agg.init(SPEC)
    for x, w in ups:
        agg.fold(st, fedagg.Update(delta=x, weight=w))
    return agg, st


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.tobytes() == b.tobytes()


def _same_state(a: Any, b: Any) -> bool:
    comps = (a.comp is None and b.comp is None) or _same_bits(a.comp, b.comp)
    return (
        _same_bits(a.acc, b.acc)
        and comps
        and (a.weight, a.weight_comp, a.count) == (b.weight, b.weight_comp, b.count)
    )


def _tcp_round(rx: ShardReceiver, sends: list[dict[str, Any]]) -> list[Any]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with ShardSender(rx.addrs, SPEC) as s:
                for kw in sends:
                    s.send(**kw)
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    th = threading.Thread(target=run)
    th.start()
    out = rx.wait(len(sends), timeout=30)
    th.join(30)
    assert not errors, errors
    return out


# -- bit-identical results -------------------------------------------------------------------


def _check_equals_in_process_fold(sa: ShmAggregator, acc: str, shards: int, workers: int) -> None:
    ups = _updates(shards)
    agg, ref = _reference(ups, acc)
    base = _folds(sa)
    for i, (x, w) in enumerate(ups):  # several delta forms: flat, dict of views, bytes
        delta: Any = x if i % 3 == 0 else SPEC.unflatten(x) if i % 3 == 1 else x.tobytes()
        sa.submit(delta, w)
    assert sa.count == N_UP
    assert _same_bits(sa.finalize_flat(), agg.finalize_flat(ref))
    # every update went through the validated fast fold
    assert _since(sa, base) == [(N_UP, 0)] * workers
    got = sa.state()
    assert _same_state(got, ref)
    parts = sa.shard_states()
    assert len(parts) == shards
    assert _same_bits(np.concatenate([p.acc for p in parts]), ref.acc)
    out = sa.finalize()
    assert isinstance(out, dict) and _same_bits(out["b"], agg.finalize(ref)["b"])  # type: ignore[call-overload]
    sa.reset()  # a second round on the same workers
    sa.submit(ups[0][0], ups[0][1])
    _, one = _reference(ups[:1], acc)
    assert _same_state(sa.state(), one)


@pytest.mark.parametrize("acc", ["float32", "float64"])
@pytest.mark.parametrize(("shards", "workers"), [(1, 1), (2, 2), (3, 3), (3, 2)])
def test_shm_equals_in_process_fold(acc: str, shards: int, workers: int, pools: Pools) -> None:
    sa = pools(ShmAggregator, shards=shards, workers=workers, accumulator=acc, slots=2)
    _check_equals_in_process_fold(sa, acc, shards, workers)


@pytest.mark.parametrize("acc", ["float32", "float64"])
def test_socket_and_sharded_tcp_equal_in_process_fold(acc: str, pools: Pools) -> None:
    ups = _updates(7)
    agg, ref = _reference(ups, acc)
    want = agg.finalize_flat(ref)
    so = pools(SocketAggregator, shards=3, workers=2, accumulator=acc)
    base = _folds(so)
    for x, w in ups:
        so.submit(x, w)
    assert _same_bits(so.finalize_flat(), want)
    assert _same_state(so.state(), ref)
    assert _since(so, base) == [(N_UP, 0)] * 2
    for shards in (1, 3):
        rx = pools(ShardReceiver, shards=shards, accumulator=acc)
        base = _folds(rx)
        res = _tcp_round(
            rx,
            [{"update": x, "weight": w, "client_id": f"c{i}"} for i, (x, w) in enumerate(ups)],
        )
        assert res == [(f"c{i}", None) for i in range(N_UP)]
        assert _same_bits(rx.finalize_flat(), want)
        assert _same_state(rx.state(), ref)
        assert all(v == N_UP for v, _ in _since(rx, base))


def test_merge_partials_through_slots(pools: Pools) -> None:
    a, b = _updates(1, 3), _updates(2, 2)
    agg, whole = _reference(a + b, "float64")
    _, pa = _reference(a, "float64")
    _, pb = _reference(b, "float64")
    with ShmAggregator(SPEC, shards=2, accumulator="float64", partials=True, **NP) as sa:
        sa.merge(agg.init(SPEC))  # the identity: no-op
        sa.merge(pa)
        sa.merge(pb)
        merged = agg.merge(agg.merge(agg.init(SPEC), pa), pb)
        assert _same_state(sa.state(), merged)
        assert sa.count == whole.count
        with pytest.raises(StateError):
            sa.merge(fedagg.aggregators.mean("float32").init(SPEC))
    plain = pools(ShmAggregator, shards=2, workers=2, accumulator="float32", slots=2)
    with pytest.raises(ConfigError):
        plain.merge(pa)


# -- refusals change nothing -----------------------------------------------------------------


def _bad_inputs() -> list[tuple[Any, float, type[Exception]]]:
    x = _updates(3, 1)[0][0]
    nan, inf = x.copy(), x.copy()
    nan[SPEC.size - 1] = np.nan  # in the last shard only
    inf[5] = -np.inf  # in the first shard only
    return [
        (x[:-1], 1.0, SpecMismatch),
        (x.astype(np.float64), 1.0, SpecMismatch),
        ([x], 1.0, SpecMismatch),
        (nan, 1.0, NonFiniteUpdate),
        (inf, 1.0, NonFiniteUpdate),
        (x, 0.0, InvalidWeight),
        (x, float("nan"), InvalidWeight),
    ]


@pytest.mark.parametrize("kind", ["shm", "unix"])
@pytest.mark.parametrize("acc", ["float32", "float64"])
def test_bad_updates_raise_typed_errors_and_change_nothing(
    kind: str, acc: str, pools: Pools
) -> None:
    ups = _updates(4, 3)
    agg, ref = _reference(ups, acc)
    if kind == "shm":
        sa = pools(ShmAggregator, version=7, shards=3, workers=3, accumulator=acc, slots=2)
    else:
        sa = pools(SocketAggregator, version=7, shards=3, workers=2, accumulator=acc)
    sa.submit(ups[0][0], ups[0][1])
    for bad, w, err in _bad_inputs():
        with pytest.raises(err):
            sa.submit(bad, w)
    with pytest.raises(StaleUpdate):
        sa.submit(ups[1][0], 1.0, base_version=6)
    assert sa.count == 1
    for x, w in ups[1:]:
        sa.submit(fedagg.Update(delta=x, weight=w, base_version=7))
    assert _same_bits(sa.finalize_flat(), agg.finalize_flat(ref))


def test_float32_overflow_in_one_shard_rolls_back_every_shard(pools: Pools) -> None:
    big = np.full(SPEC.size, 1.0, np.float32)
    big[-10:] = 3e38  # only the last shard overflows when this is folded twice
    agg, ref = _reference([(big, 1.0)], "float32")
    sa = pools(ShmAggregator, shards=3, workers=3, accumulator="float32", slots=2)
    base = _folds(sa)
    sa.submit(big, 1.0)
    with pytest.raises(NonFiniteUpdate, match="overflows float32"):
        sa.submit(big, 1.0)
    assert sa.count == 1
    assert _same_state(sa.state(), ref)
    # past the receiver's bound every fold takes the checked path, never the fast one
    assert all(v == 0 and c >= 1 for v, c in _since(sa, base))
    with pytest.raises(NonFiniteUpdate):  # what the in-process fold says too
        agg.fold(agg.fold(agg.init(SPEC), fedagg.Update(delta=big)), fedagg.Update(delta=big))
    small = np.full(SPEC.size, -1.0, np.float32)
    sa.submit(small, 1.0)
    agg.fold(ref, fedagg.Update(delta=small, weight=1.0))
    assert _same_bits(sa.finalize_flat(), agg.finalize_flat(ref))


def test_sharded_tcp_refuses_bad_updates_without_changing_any_shard(pools: Pools) -> None:
    ups = _updates(5, 2)
    agg, ref = _reference(ups, "float32")
    bad = ups[0][0].copy()
    bad[-1] = np.nan  # the last shard only
    rx = pools(ShardReceiver, shards=3, accumulator="float32")
    res = _tcp_round(
        rx,
        [
            {"update": ups[0][0], "weight": ups[0][1], "client_id": "a"},
            {"update": bad, "weight": 1.0, "client_id": "nan"},
            {"update": ups[1][0], "weight": -1.0, "client_id": "neg"},
            {"update": ups[1][0], "weight": ups[1][1], "client_id": "b"},
        ],
    )
    assert [cid for cid, _ in res] == ["a", "nan", "neg", "b"]
    assert res[0][1] is None and res[3][1] is None
    assert isinstance(res[1][1], NonFiniteUpdate)
    assert isinstance(res[2][1], InvalidWeight)
    # shards of the wrong size: refused, and the sender's connections are dropped
    with ShardSender(rx.addrs, SPEC) as s:
        wrong = memoryview(np.zeros(SPEC.size, np.float32)).cast("B")

        def send_wrong() -> None:
            with contextlib.suppress(OSError):  # the workers may drop us first
                s.send_raw(b"x" * 16, wrong, 1.0, 1.0, "short", None, [8, 8, 8])

        t = threading.Thread(target=send_wrong)
        t.start()
        ((cid, err),) = rx.wait(1, timeout=30)
        t.join(30)
    assert cid == "short" and isinstance(err, SpecMismatch)
    assert _same_state(rx.state(), ref)
    x, w = _updates(6, 1)[0]
    t = threading.Thread(target=send_sharded, args=(x, rx.addrs, SPEC, w))
    t.start()
    assert rx.wait(1, timeout=30)[0][1] is None
    t.join(30)
    agg.fold(ref, fedagg.Update(delta=x, weight=w))
    assert _same_bits(rx.finalize_flat(), agg.finalize_flat(ref))


# -- failures: no hang, no leak ----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["shm", "unix"])
def test_killed_worker_raises_instead_of_hanging(kind: str) -> None:
    cls = ShmAggregator if kind == "shm" else SocketAggregator
    ups = _updates(8, 3)
    sa = cls(SPEC, shards=2, timeout=10, **NP)
    try:
        sa.submit(ups[0][0], 1.0)
        victim = sa._procs[1]
        victim.kill()
        victim.join(10)
        with pytest.raises(AggregatorFailed, match="worker 1"):
            for x, w in ups * 4:  # the failure surfaces on a submit or on finalize
                sa.submit(x, w)
            sa.finalize_flat()
        with pytest.raises(AggregatorFailed):  # and stays
            sa.submit(ups[0][0], 1.0)
    finally:
        sa.close()
    assert not any(p.is_alive() for p in sa._procs)
    sa.close()  # twice is fine


def test_close_unlinks_and_guards() -> None:
    sa = ShmAggregator(SPEC, shards=2, slots=3, **NP)
    name = sa.segment_name
    assert os.path.exists(f"/dev/shm/{name}")
    with pytest.raises(ConfigError):
        ShmAggregator(SPEC, shards=2, workers=3)
    sa.close()
    assert not os.path.exists(f"/dev/shm/{name}")
    with pytest.raises(StateError):
        sa.submit(np.zeros(SPEC.size, np.float32), 1.0)
    with ShmAggregator(SPEC, shards=1, **NP) as empty, pytest.raises(fedagg.errors.EmptyAggregate):
        empty.finalize_flat()


def test_copy_peak_kernels() -> None:
    x = np.random.default_rng(0).standard_normal(100_001).astype(np.float32)
    out = np.empty_like(x)
    assert copy_peak(out, x) == float(np.abs(x).max()) == peak(x)
    assert _same_bits(out, x)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[-1] = bad
        assert not np.isfinite(copy_peak(out, y)) and not np.isfinite(peak(y))
    d = x.astype(np.float64) * 1e300
    assert peak(d) == float(np.abs(d).max())


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("acc", ["float32", "float64"])
@pytest.mark.parametrize("size", [_kernels.BLOCK * 3 + 5, 1000])
def test_fold_validated_equals_mean_fold(backend: str, acc: str, size: int) -> None:
    """The workers' fast fold: the bits, weight sum, compensation and count of Mean.fold
    one update at a time, for one update per call and for blocked batches (numba kernel
    above NUMBA_MIN_SIZE, numpy below; float32 and float64 deltas)."""
    if backend == "numba" and not _kernels.HAVE_NUMBA:
        pytest.skip("numba is not installed")
    rng = np.random.default_rng(size)
    for dtype in (np.float32, np.float64):
        spec = fedagg.ParamSpec.from_arrays([np.zeros(size, dtype)])
        xs = [
            (rng.standard_normal(size) * 10.0 ** rng.integers(-3, 4)).astype(dtype)
            for _ in range(6)
        ]
        ws = [float(w) for w in rng.uniform(0.5, 500.0, 6)]
        ss = [1.0, -0.5, 1.0, 3.0, 1.0, 0.25]
        agg = fedagg.aggregators.mean(acc, backend=backend)  # type: ignore[arg-type]
        ref, got = agg.init(spec), agg.init(spec)
        for x, w, s in zip(xs, ws, ss, strict=True):
            agg.fold(ref, fedagg.Update(delta=x, weight=w, scale=s))
        use_numba = backend == "numba"
        fold_validated(got, xs[:1], ws[:1], ss[:1], use_numba=use_numba)
        fold_validated(got, xs[1:4], ws[1:4], ss[1:4], use_numba=use_numba)
        fold_validated(got, xs[4:], ws[4:], ss[4:], use_numba=use_numba)
        fold_validated(got, [], [], [], use_numba=use_numba)
        assert _same_state(got, ref), (dtype, acc, backend, size)


def test_lease_commit_writes_in_place(pools: Pools) -> None:
    ups = _updates(9, 3)
    agg, ref = _reference(ups, "float32")
    sa = pools(ShmAggregator, shards=2, workers=2, accumulator="float32", slots=2)
    for x, w in ups:
        lease = sa.lease()
        lease.array[...] = x  # e.g. sock.recv_into(lease.array)
        sa.commit(lease, w)
        with pytest.raises(StateError):
            sa.commit(lease, w)
    bad = sa.lease()
    bad.array[...] = ups[0][0]
    bad.array[3] = np.nan
    with pytest.raises(NonFiniteUpdate):
        sa.commit(bad, 1.0)
    sa.release(sa.lease())
    assert _same_bits(sa.finalize_flat(), agg.finalize_flat(ref))


def test_default_backend_equals_in_process_fold(
    default_backend_pool: Future[ShmAggregator],
) -> None:
    """As test_shm_equals_in_process_fold, with the workers' default (compiled) kernels."""
    sa = default_backend_pool.result()
    sa.reset()
    _check_equals_in_process_fold(sa, "float32", 1, 1)
