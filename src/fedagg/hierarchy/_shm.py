"""One host's aggregation data plane over shared memory (LIFL's design).

A receiver (the caller's process) writes each update *once* into a slot of a ring of
model-sized shared-memory slots, allocated once. ``S`` coordinate shards
(:func:`fedagg.core.tree.shard_bounds`) are owned by ``W`` worker processes (started with
``forkserver`` or ``spawn``, so no copy-on-write faults); each worker folds ``slot[lo:hi]``
straight out of shared memory, zero-copy, into its own :class:`~fedagg.core.aggregate.MeanState`
over that slice, using the real :func:`fedagg.aggregators.mean`. The weighted mean is
element-wise, so the concatenated shard results are bit-for-bit those of one in-process fold.

Hand-off: per-worker pipes carry only ``(op, seq, slot, weight, scale, client_id)`` tuples; a
slot is free again when every worker has acknowledged it. When every slot is busy,
:meth:`ShmAggregator.submit` waits (backpressure).

Validation happens in the receiver, before the update is published to any worker, so a refused
update changes no state: structure, shape and dtype (:class:`~fedagg.errors.SpecMismatch`),
weight (:class:`~fedagg.errors.InvalidWeight`), version (:class:`~fedagg.errors.StaleUpdate`)
and values (:class:`~fedagg.errors.NonFiniteUpdate`). The value check is fused with the write
into the slot (one pass that copies the update and takes ``max |x|`` over its bit patterns);
the slot is not handed to any worker until the check has passed. The float64 accumulator's
overflow rule is checked against the whole update's peak, exactly as :class:`Mean` does. For
the float32 accumulator the receiver keeps a running bound ``sum |w s| max|x|``: while it
cannot reach float32's range, no worker can overflow and updates are pipelined; past it (only
for values near 1e38) each update is folded synchronously and rolled back on every shard if
any shard overflows.

Pipelined updates are therefore already validated when a worker sees them, and the worker folds
them with :func:`fold_validated`: ``acc[lo:hi] += w * slot[lo:hi]`` straight out of the slot
(float32; float64 uses :mod:`fedagg.core._kernels`' compensated kernel), with ``Mean``'s weight
and count bookkeeping, so the bits are those of ``Mean.fold``, without ``Mean``'s second look at
the values (an undo copy and a finiteness test, or a ``max |x|`` pass). Synchronous folds use
``Mean.fold`` itself (checked, with a snapshot).

A worker that dies or does not answer within ``timeout`` seconds raises
:class:`AggregatorFailed` (no hang); the aggregator is then unusable and :meth:`close` (or
leaving the ``with`` block) stops the workers and unlinks every shared-memory segment.
"""

from __future__ import annotations

import collections
import contextlib
import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import secrets
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from multiprocessing.process import BaseProcess
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt

from fedagg import errors as _errors
from fedagg.core import kernels as _kernels
from fedagg.core.aggregate import _F64_SAFE, Mean, MeanState, _two_sum, check_update
from fedagg.core.spec import ArrayTree, Delta, ParamSpec
from fedagg.core.tree import shard_bounds
from fedagg.core.update import Update
from fedagg.errors import (
    ConfigError,
    EmptyAggregate,
    FedaggError,
    InvalidWeight,
    NonFiniteUpdate,
    StateError,
    UpdateError,
)

__all__ = ["AggregatorFailed", "Lease", "ShmAggregator", "copy_peak", "peak"]

Arr = npt.NDArray[Any]
Accumulator = Literal["float32", "float64"]
Backend = Literal["auto", "numba", "numpy"]
StartMethod = Literal["forkserver", "spawn"]

#: Prefix of every shared-memory segment this module creates (``/dev/shm/fedagg_...``).
SHM_PREFIX = "fedagg_"
_FLT_MAX = float(np.finfo(np.float32).max)
_U32 = 2.0**-24
_PAGE = 4096
#: Most queued updates a worker folds in one pass.
_MAX_BATCH = 16


class AggregatorFailed(FedaggError, RuntimeError):
    """A worker process died, did not answer in time, or failed unexpectedly.

    The aggregator is unusable afterwards; close it (its shared memory is unlinked).
    """


# --------------------------------------------------------------------------------------------
# Kernels: one pass that copies an update and takes max |x| from its bit patterns; the
# workers' fold of updates the receiver has already validated
# --------------------------------------------------------------------------------------------

_MASKS = {4: (np.uint32, 0x7FFFFFFF), 8: (np.uint64, 0x7FFFFFFFFFFFFFFF)}
_BLOCK = _kernels.BLOCK

if _kernels.HAVE_NUMBA:
    import numba

    @numba.njit(cache=True, nogil=True)
    def _copy_peak_bits(dst: Arr, src: Arr, mask: Any) -> Any:  # pragma: no cover - jitted
        # Integer max of |bits|: exact (IEEE order of non-negative floats is integer order),
        # vectorises without fast-math, and any NaN/Inf has bits >= the exponent mask.
        m = src.dtype.type(0)
        for i in range(src.size):
            v = src[i]
            dst[i] = v
            a = v & mask
            m = a if a > m else m
        return m

    @numba.njit(cache=True, nogil=True)
    def _peak_bits(src: Arr, mask: Any) -> Any:  # pragma: no cover - jitted
        m = src.dtype.type(0)
        for i in range(src.size):
            a = src[i] & mask
            m = a if a > m else m
        return m

    @numba.njit(cache=True, nogil=True)
    def _fold_trusted_nb(acc: Arr, xs: Any, ws: Arr) -> None:  # pragma: no cover - jitted
        # acc += sum_k ws[k] * xs[k], in acc's dtype, no fast-math: each ``a += w*x`` rounds
        # the product and the sum exactly as _kernels' folds and numpy do (same bits). Inputs
        # were validated by the receiver, so there is no undo copy, no scratch block and no
        # finiteness test. One update: a single stream; several: one cache block of acc at a
        # time, read and written once for all of them.
        n = acc.size
        if len(xs) == 1:
            x = xs[0]
            w = ws[0]
            for i in range(n):
                acc[i] += w * x[i]
            return
        for lo in range(0, n, _BLOCK):
            hi = min(n, lo + _BLOCK)
            a = acc[lo:hi]
            for k in range(len(xs)):
                xk = xs[k][lo:hi]
                wk = ws[k]
                for i in range(hi - lo):
                    a[i] += wk * xk[i]


def _fast(src: Arr) -> bool:
    return _kernels.HAVE_NUMBA and src.dtype.kind == "f" and src.dtype.itemsize in _MASKS


def _bits_to_float(bits: int, dtype: np.dtype[Any]) -> float:
    utype, _ = _MASKS[dtype.itemsize]
    return float(np.array(bits, utype).view(dtype))


def copy_peak(dst: Arr, src: Arr, *, use_numba: bool = True) -> float:
    """Copy ``src`` into ``dst`` (same size and float dtype) and return ``max |src|`` as a
    float: ``inf`` or ``nan`` when ``src`` holds a non-finite value. One read and one write."""
    if src.size == 0:
        return 0.0
    if use_numba and _fast(src):
        utype, mask = _MASKS[src.dtype.itemsize]
        bits = _copy_peak_bits(dst.view(utype), src.view(utype), utype(mask))
        return _bits_to_float(int(bits), src.dtype)
    np.copyto(dst, src)
    return _kernels.max_abs(dst, use_numba=False)


def peak(src: Arr, *, use_numba: bool = True) -> float:
    """``max |src|`` (``inf``/``nan`` if ``src`` holds a non-finite value); one read pass."""
    if src.size == 0:
        return 0.0
    if use_numba and _fast(src):
        utype, mask = _MASKS[src.dtype.itemsize]
        return _bits_to_float(int(_peak_bits(src.view(utype), utype(mask))), src.dtype)
    return _kernels.max_abs(src, use_numba=False)


def fold_validated(
    state: MeanState,
    xs: Sequence[Arr],
    weights: Sequence[float],
    scales: Sequence[float],
    *,
    use_numba: bool = True,
) -> None:
    """``Mean.fold_many(state, updates)`` for updates the receiver has already validated
    (finite values, weights, and an overflow bound that no fold can reach): the same bits in
    ``acc``/``comp``, the same weight sum, compensation and count; without ``fold_many``'s
    second look at the values (float32: an undo copy and a finiteness test of every
    coordinate; float64: a separate ``max |x|`` pass per update).

    ``xs[k]`` is update k's flat delta over ``state``'s coordinates (e.g. a shard's slice of
    a shared-memory slot, zero-copy); ``weights``/``scales`` as in :class:`Update`.
    """
    if not xs:
        return
    ws = np.array([float(w) * float(s) for w, s in zip(weights, scales, strict=True)], np.float64)
    acc, comp = state.acc, state.comp
    if comp is not None:  # float64: Neumaier's compensated kernel, as Mean uses
        ok = _kernels.fold_compensated(acc, comp, xs, ws, use_numba=use_numba)
    elif _kernels.HAVE_NUMBA and _kernels._compiled(use_numba, acc.size, acc, *xs):
        _fold_trusted_nb(acc, _kernels._typed(xs), ws.astype(acc.dtype))
        ok = True
    else:  # small or non-native: Mean's numpy kernel, minus the undo copy
        ok = _kernels.fold_plain(acc, acc, xs, ws, save_undo=False, use_numba=False)
    if not ok:  # cannot happen for validated input: the slot changed after it was checked
        raise AggregatorFailed("a validated update left a non-finite accumulator")
    w, wc = state.weight, state.weight_comp
    for wt in weights:
        w, e = _two_sum(w, float(wt))
        wc += e
    state.weight, state.weight_comp = w, wc
    state.count += len(xs)


# --------------------------------------------------------------------------------------------
# Worker side: the states of the shards one worker owns
# --------------------------------------------------------------------------------------------


def _sub_spec(spec: ParamSpec, lo: int, hi: int) -> ParamSpec:
    return ParamSpec(names=("shard",), shapes=((hi - lo,),), dtype=spec.dtype, keyed=False)


class _Shards:
    """A worker's shards: one Mean state per owned coordinate range, plus an optional snapshot
    taken before a synchronous operation so that it can be rolled back."""

    def __init__(
        self,
        spec: ParamSpec,
        bounds: Sequence[tuple[int, int]],
        accumulator: Accumulator,
        version: int | None,
        backend: Backend,
    ) -> None:
        self.agg = Mean(accumulator=accumulator, backend=backend)
        self.spec = spec
        self.bounds = list(bounds)
        self.subs = [_sub_spec(spec, lo, hi) for lo, hi in self.bounds]
        self.states = [self.agg.init(s, version=version) for s in self.subs]
        self._snap: list[tuple[Arr, Arr | None, float, float, int]] | None = None
        #: updates folded by each path since the start (``_Service._fold_stats``)
        self.stats = {"validated": 0, "validated_passes": 0, "checked": 0}

    def reset(self, version: int | None) -> None:
        self.states = [self.agg.init(s, version=version) for s in self.subs]
        self._snap = None

    def snapshot(self) -> None:
        self._snap = [
            (
                st.acc.copy(),
                None if st.comp is None else st.comp.copy(),
                st.weight,
                st.weight_comp,
                st.count,
            )
            for st in self.states
        ]

    def rollback(self) -> None:
        if self._snap is None:
            raise StateError("nothing to roll back")
        for st, (acc, comp, w, wc, c) in zip(self.states, self._snap, strict=True):
            st.acc[...] = acc
            if comp is not None and st.comp is not None:
                st.comp[...] = comp
            st.weight, st.weight_comp, st.count = w, wc, c
        self._snap = None

    def run(self, sync: bool, op: Callable[[], None]) -> None:
        """Run ``op``; when ``sync``, snapshot first and restore every shard if it fails."""
        if not sync:
            self._snap = None
            op()
            return
        self.snapshot()
        try:
            op()
        except BaseException:
            self.rollback()
            raise

    def fold(self, views: Sequence[Arr], weight: float, scale: float, cid: str) -> None:
        """The checked fold (``Mean.fold``: values re-checked, undo copy): for updates that
        could overflow float32, run under :meth:`run` with a snapshot."""
        for st, v in zip(self.states, views, strict=True):
            self.agg.fold(st, Update(delta=v, weight=weight, scale=scale, client_id=cid))
        self.stats["checked"] += 1

    def fold_validated(self, batch: Sequence[tuple[Sequence[Arr], float, float]]) -> None:
        """Fold updates the receiver has validated and found unable to overflow: each is
        ``(one view per owned shard, weight, scale)``. Several queued updates go in one
        cache-blocked pass per shard; the bits are those of ``Mean.fold`` one by one."""
        self._snap = None
        ws, ss = [b[1] for b in batch], [b[2] for b in batch]
        for j, st in enumerate(self.states):
            fold_validated(st, [b[0][j] for b in batch], ws, ss, use_numba=self.agg._numba)
        self.stats["validated"] += len(batch)
        self.stats["validated_passes"] += 1

    def merge(
        self,
        accs: Sequence[Arr],
        comps: Sequence[Arr | None],
        weight: float,
        weight_comp: float,
        count: int,
    ) -> None:
        for st, sub, a, c in zip(self.states, self.subs, accs, comps, strict=True):
            other = MeanState(sub, st.version, st.accumulator, a, c, weight, weight_comp, count)
            self.agg.merge(st, other)

    def finalize_into(self, out: Arr) -> None:
        for (lo, hi), st in zip(self.bounds, self.states, strict=True):
            out[lo:hi] = self.agg.finalize_flat(st)

    def export_into(self, acc: Arr, comp: Arr | None) -> tuple[float, float, int]:
        for (lo, hi), st in zip(self.bounds, self.states, strict=True):
            acc[lo:hi] = st.acc
            if comp is not None and st.comp is not None:
                comp[lo:hi] = st.comp
        st0 = self.states[0]
        return st0.weight, st0.weight_comp, st0.count

    def warm_up(self, views: Sequence[Arr]) -> None:
        """Load the fold kernels for these sizes (numba compiles or reads its cache) untimed."""
        for sub, v in zip(self.subs, views, strict=True):
            scratch = self.agg.init(sub)
            self.agg.fold(scratch, Update(delta=v))
            fold_validated(scratch, [v], [1.0], [1.0], use_numba=self.agg._numba)
            fold_validated(scratch, [v, v], [1.0, 1.0], [1.0, 1.0], use_numba=self.agg._numba)
            self.agg.finalize_flat(scratch)


def _error_reply(seq: int, e: BaseException) -> tuple[Any, ...]:
    if isinstance(e, UpdateError):
        return ("err", seq, type(e).__name__, e.client_id, e.reason)
    if isinstance(e, FedaggError):
        return ("err", seq, type(e).__name__, "", str(e))
    text = "".join(traceback.format_exception(e))
    return ("err", seq, "AggregatorFailed", "", f"worker error: {text}")


def _rebuild_error(kind: str, cid: str, text: str) -> FedaggError:
    cls = getattr(_errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, UpdateError):
        return cls(cid, text)
    if isinstance(cls, type) and issubclass(cls, FedaggError):
        return cls(text)
    return AggregatorFailed(text)


def _set_threads(threads: int) -> None:
    if _kernels.HAVE_NUMBA:
        import numba as nb

        with contextlib.suppress(Exception):
            config: Any = nb.config
            nb.set_num_threads(max(1, min(threads, int(config.NUMBA_NUM_THREADS))))


def _attach(name: str) -> SharedMemory:
    return SharedMemory(name=name)


def _array(buf: Any, dtype: np.dtype[Any], n: int, offset: int) -> Arr:
    return np.ndarray((n,), dtype=dtype, buffer=buf, offset=offset)


def handle_common(
    shards: _Shards, spec: ParamSpec, msg: tuple[Any, ...], acc_dtype: np.dtype[Any]
) -> tuple[Any, ...] | None:
    """The control operations every worker kind shares; None for an unknown op."""
    op, seq = msg[0], msg[1]
    if op == "rollback":
        shards.rollback()
        return ("ok", seq, -1, None)
    if op == "reset":
        shards.reset(msg[2])
        return ("ok", seq, -1, None)
    if op == "stats":
        return ("ok", seq, -1, dict(shards.stats))
    if op == "finalize":
        seg = _attach(msg[2])
        try:
            out = _array(seg.buf, spec.dtype, spec.size, 0)
            shards.finalize_into(out)
            del out
        finally:
            seg.close()
        return ("ok", seq, -1, None)
    if op == "export":
        seg = _attach(msg[2])
        try:
            acc = _array(seg.buf, acc_dtype, spec.size, 0)
            comp = (
                _array(seg.buf, np.dtype(np.float64), spec.size, _comp_offset(spec, acc_dtype))
                if shards.agg.accumulator == "float64"
                else None
            )
            info = shards.export_into(acc, comp)
            del acc, comp
        finally:
            seg.close()
        return ("ok", seq, -1, info)
    return None


def _comp_offset(spec: ParamSpec, acc_dtype: np.dtype[Any]) -> int:
    return _align(spec.size * acc_dtype.itemsize, 64)


def _align(n: int, a: int) -> int:
    return -(-n // a) * a


def _shm_worker(conn: mpc.Connection, cfg: dict[str, Any]) -> None:
    """A worker of :class:`ShmAggregator`: folds its shards of each slot it is handed."""
    _set_threads(cfg["threads"])
    spec = ParamSpec.from_dict(cfg["spec"])
    shards = _Shards(spec, cfg["bounds"], cfg["accumulator"], cfg["version"], cfg["backend"])
    acc_dtype = shards.states[0].acc.dtype
    seg = _attach(cfg["segment"])
    stride, nslots = cfg["stride"], cfg["slots"]
    slots = [_array(seg.buf, spec.dtype, spec.size, i * stride) for i in range(nslots)]
    pslots = (
        [_array(seg.buf, acc_dtype, spec.size, i * stride) for i in range(nslots)]
        if cfg["partials"]
        else []
    )
    cslots = (
        [
            _array(seg.buf, np.dtype(np.float64), spec.size, i * stride + cfg["comp_offset"])
            for i in range(nslots)
        ]
        if cfg["partials"] and cfg["accumulator"] == "float64"
        else None
    )
    try:
        try:
            for s in slots:  # map our pages of every slot now, not on the first update
                for lo, hi in shards.bounds:
                    s[lo:hi:1024].sum()
            shards.warm_up([slots[0][lo:hi] for lo, hi in shards.bounds])
        except BaseException as e:
            conn.send(("failed", "".join(traceback.format_exception(e))))
            return
        conn.send(("ready", os.getpid()))
        backlog: collections.deque[tuple[Any, ...]] = collections.deque()
        while True:
            msg = backlog.popleft() if backlog else conn.recv()
            op, seq = msg[0], msg[1]
            if op == "stop":
                conn.send(("ok", seq, -1, None))
                return
            if op == "fold" and not msg[6]:
                # a pipelined fold: validated by the receiver and unable to overflow, so the
                # fast fold; those already queued behind it go in the same blocked pass
                batch = [msg]
                while len(batch) < _MAX_BATCH and not backlog and conn.poll():
                    nxt = conn.recv()
                    if nxt[0] == "fold" and not nxt[6]:
                        batch.append(nxt)
                    else:
                        backlog.append(nxt)
                try:
                    shards.fold_validated(
                        [
                            ([slots[m[2]][lo:hi] for lo, hi in shards.bounds], m[3], m[4])
                            for m in batch
                        ]
                    )
                    replies = [("ok", m[1], m[2], None) for m in batch]
                except BaseException as e:
                    replies = [(*_error_reply(m[1], e), m[2]) for m in batch]
                for r in replies:
                    conn.send(r)
                continue
            try:
                if op == "fold":
                    _, _, slot, w, s, cid, sync = msg
                    views = [slots[slot][lo:hi] for lo, hi in shards.bounds]
                    shards.run(sync, partial(shards.fold, views, w, s, cid))
                    reply: tuple[Any, ...] = ("ok", seq, slot, None)
                elif op == "merge":
                    _, _, slot, w, wc, count, sync = msg
                    accs = [pslots[slot][lo:hi] for lo, hi in shards.bounds]
                    comps: list[Arr | None] = (
                        [cslots[slot][lo:hi] for lo, hi in shards.bounds]
                        if cslots is not None
                        else [None] * len(accs)
                    )
                    shards.run(sync, partial(shards.merge, accs, comps, w, wc, count))
                    reply = ("ok", seq, slot, None)
                else:
                    common = handle_common(shards, spec, msg, acc_dtype)
                    if common is None:
                        raise AggregatorFailed(f"unknown operation {op!r}")
                    reply = common
            except BaseException as e:
                reply = _error_reply(seq, e)
                if op in ("fold", "merge"):
                    reply = (*reply, msg[2])
            conn.send(reply)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return
    finally:
        del slots, pslots, cslots
        with contextlib.suppress(BufferError):
            seg.close()


# --------------------------------------------------------------------------------------------
# Coordinator side: the transport-independent service
# --------------------------------------------------------------------------------------------


@dataclass
class _Inflight:
    remaining: int
    slot: int
    sync: bool
    replies: dict[int, tuple[Any, ...]]


def _cleanup(
    procs: list[BaseProcess], conns: list[mpc.Connection], segments: list[SharedMemory]
) -> None:
    """Stop the workers (politely, then by force) and unlink the shared memory. Idempotent."""
    for c in conns:
        with contextlib.suppress(Exception):
            c.send(("stop", -1))
    deadline = time.monotonic() + 5.0
    for p in procs:
        with contextlib.suppress(Exception):
            p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        with contextlib.suppress(Exception):
            if p.is_alive():
                p.terminate()
                p.join(2.0)
            if p.is_alive():
                p.kill()
                p.join(2.0)
    for c in conns:
        with contextlib.suppress(Exception):
            c.close()
    for seg in segments:
        with contextlib.suppress(Exception):
            seg.unlink()
        with contextlib.suppress(Exception):
            seg.close()
    procs.clear()
    conns.clear()
    segments.clear()


class _Service:
    """Workers owning coordinate shards, a control pipe each, and the receiver-side admission
    rules. Subclasses add the data transport (shared memory, Unix or TCP sockets)."""

    _worker_target: Callable[[mpc.Connection, dict[str, Any]], None]

    def __init__(
        self,
        spec: ParamSpec,
        *,
        shards: int,
        workers: int | None,
        accumulator: Accumulator,
        version: int | None,
        timeout: float,
        start_method: StartMethod,
        worker_threads: int,
        backend: Backend,
    ) -> None:
        if not isinstance(spec, ParamSpec):
            raise ConfigError(f"spec must be a ParamSpec, not {type(spec).__name__}")
        if accumulator not in ("float32", "float64"):
            raise ConfigError(f"accumulator must be 'float32' or 'float64', not {accumulator!r}")
        if not isinstance(shards, int) or shards < 1:
            raise ConfigError(f"shards must be a positive integer, not {shards!r}")
        workers = shards if workers is None else workers
        if not isinstance(workers, int) or not 1 <= workers <= shards:
            raise ConfigError(f"workers must be in 1..shards ({shards}), not {workers!r}")
        if start_method not in ("forkserver", "spawn"):
            raise ConfigError(f"start_method must be 'forkserver' or 'spawn', not {start_method!r}")
        if not timeout > 0:
            raise ConfigError(f"timeout must be > 0, not {timeout!r}")
        self.spec = spec
        self.version = version
        self.accumulator: Accumulator = accumulator
        self.timeout = float(timeout)
        self.bounds = shard_bounds(spec.size, shards)
        self.n_workers = workers
        #: shard indices owned by each worker (shard k belongs to worker k % W)
        self.owned = [list(range(w, shards, workers)) for w in range(workers)]
        self._agg = Mean(accumulator=accumulator, backend=backend)
        self._acc_dtype = self._agg.init(_sub_spec(spec, 0, 0)).acc.dtype
        self._backend = backend
        self._numba = backend != "numpy" and _kernels.HAVE_NUMBA
        self._threads = worker_threads
        self._ctx: Any = mp.get_context(start_method)
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload(["fedagg.hierarchy._shm", "fedagg.hierarchy._sockets"])
        self._procs: list[BaseProcess] = []
        self._conns: list[mpc.Connection] = []
        self._segments: list[SharedMemory] = []
        self._finalizer = weakref.finalize(self, _cleanup, self._procs, self._conns, self._segments)
        self._broken: AggregatorFailed | None = None
        self._closed = False
        self._seq = 0
        self._inflight: dict[int, _Inflight] = {}
        self._free: list[int] = []
        self.worker_info: list[Any] = []
        self._reset_mirror()

    # -- lifecycle ------------------------------------------------------------------------
    def _start(self, cfgs: Sequence[dict[str, Any]], startup_timeout: float) -> None:
        try:
            for i, cfg in enumerate(cfgs):
                parent, child = self._ctx.Pipe(duplex=True)
                p = self._ctx.Process(
                    target=type(self)._worker_target,
                    args=(child, cfg),
                    name=f"fedagg-{type(self).__name__}-{i}",
                    daemon=True,
                )
                p.start()
                child.close()
                self._procs.append(p)
                self._conns.append(parent)
            self.worker_info = [None] * len(cfgs)
            pending = set(range(len(cfgs)))
            deadline = time.monotonic() + startup_timeout
            while pending:
                for i, msg in self._wait(deadline, "starting"):
                    if msg[0] != "ready":
                        raise AggregatorFailed(f"worker {i} failed to start: {msg}")
                    self.worker_info[i] = msg[1]
                    pending.discard(i)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop the workers and unlink the shared memory. Safe to call twice."""
        self._closed = True
        self._release_views()
        self._finalizer()

    def _release_views(self) -> None:
        """Drop the receiver's views into shared memory (so that it can be closed)."""

    def __enter__(self) -> _Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_usable(self) -> None:
        if self._closed:
            raise StateError("the aggregator is closed")
        if self._broken is not None:
            raise AggregatorFailed(f"the aggregator failed earlier: {self._broken}")

    # -- waiting for workers ----------------------------------------------------------------
    def _fail(self, why: str) -> AggregatorFailed:
        self._broken = AggregatorFailed(why)
        return self._broken

    def _wait(self, deadline: float, doing: str) -> list[tuple[int, tuple[Any, ...]]]:
        """Messages from the workers, waiting until at least one arrives; raises
        AggregatorFailed if a worker died or nothing arrived before ``deadline``."""
        sentinels = {p.sentinel: i for i, p in enumerate(self._procs)}
        conns = {id(c): i for i, c in enumerate(self._conns)}
        left = deadline - time.monotonic()
        ready = mpc.wait([*self._conns, *sentinels], timeout=max(0.0, left))
        out: list[tuple[int, tuple[Any, ...]]] = []
        for r in ready:
            if isinstance(r, mpc.Connection):
                i = conns[id(r)]
                try:
                    while r.poll():
                        out.append((i, r.recv()))
                except (EOFError, OSError):
                    pass
        if out:
            return out
        for r in ready:
            if not isinstance(r, mpc.Connection):
                i = sentinels[cast(int, r)]
                code = self._procs[i].exitcode
                raise self._fail(f"worker {i} died (exit code {code}) while {doing}")
        if not ready:
            raise self._fail(f"no answer from the workers within {self.timeout:g}s while {doing}")
        for i, p in enumerate(self._procs):  # a closed pipe and no message: the worker is gone
            if not p.is_alive():
                raise self._fail(f"worker {i} died (exit code {p.exitcode}) while {doing}")
        return out

    def _send(self, i: int, msg: tuple[Any, ...]) -> None:
        try:
            self._conns[i].send(msg)
        except (BrokenPipeError, ConnectionError, OSError) as e:
            code = self._procs[i].exitcode
            raise self._fail(f"worker {i} is gone (exit code {code}): {e}") from e

    def _on_message(self, i: int, msg: tuple[Any, ...]) -> None:
        if msg[0] in ("ok", "err"):
            fl = self._inflight.get(msg[1])
            if fl is None:
                return
            fl.replies[i] = msg
            fl.remaining -= 1
            if msg[0] == "err" and not fl.sync:
                kind, text = msg[2], msg[4]
                raise self._fail(f"worker {i} refused a pipelined operation: {kind}: {text}")
            if fl.remaining == 0 and not fl.sync:
                del self._inflight[msg[1]]
                if fl.slot >= 0:
                    self._free.append(fl.slot)
            return
        self._on_other(i, msg)

    def _on_other(self, i: int, msg: tuple[Any, ...]) -> None:
        raise self._fail(f"unexpected message from worker {i}: {msg[:2]}")

    def _pump(self, done: Callable[[], bool], doing: str) -> None:
        deadline = time.monotonic() + self.timeout
        while not done():
            for i, msg in self._wait(deadline, doing):
                self._on_message(i, msg)
                deadline = time.monotonic() + self.timeout

    def _poll(self) -> None:
        """Handle whatever the workers already sent, without waiting."""
        for i, c in enumerate(self._conns):
            try:
                while c.poll():
                    self._on_message(i, c.recv())
            except (EOFError, OSError) as e:
                raise self._fail(f"worker {i} is gone: {e}") from e

    def _fold_stats(self) -> list[dict[str, int]]:
        """Per worker: updates folded by the validated fast path (and in how many blocked
        passes) and by the checked path, since the workers started."""
        self._check_usable()
        return cast(list[dict[str, int]], self._call(lambda i, seq: ("stats", seq), "stats"))

    def flush(self) -> None:
        """Wait until every update handed to the workers has been folded."""
        self._check_usable()
        self._pump(lambda: not self._inflight, "waiting for folds")

    def _issue(
        self,
        msgs: Callable[[int, int], tuple[Any, ...]],
        slot: int,
        sync: bool,
        after: Callable[[int], None] | None = None,
    ) -> int:
        """Send one operation to every worker (``after(i)`` runs right after worker i's
        message: the socket transports send the data there)."""
        seq = self._seq = self._seq + 1
        self._inflight[seq] = _Inflight(len(self._conns), slot, sync, {})
        for i in range(len(self._conns)):
            self._send(i, msgs(i, seq))
            if after is not None:
                after(i)
        return seq

    def _call(self, msgs: Callable[[int, int], tuple[Any, ...]], doing: str) -> list[Any]:
        """Run one operation on every worker synchronously; their payloads in worker order."""
        self.flush()
        seq = self._issue(msgs, -1, True)
        fl = self._inflight[seq]
        self._pump(lambda: fl.remaining == 0, doing)
        del self._inflight[seq]
        errs = [r for r in fl.replies.values() if r[0] == "err"]
        if errs:
            e = errs[0]
            raise _rebuild_error(e[2], e[3], e[4])
        return [fl.replies[i][3] for i in range(len(self._conns))]

    def _run_sync(
        self,
        msgs: Callable[[int, int], tuple[Any, ...]],
        slot: int,
        after: Callable[[int], None] | None = None,
    ) -> None:
        """Run a fold/merge on every worker with a snapshot; if any worker refuses it, roll the
        others back, so that no shard changes, and raise that worker's error."""
        self.flush()
        seq = self._issue(msgs, slot, True, after)
        fl = self._inflight[seq]
        try:
            self._pump(lambda: fl.remaining == 0, "folding synchronously")
        finally:
            self._inflight.pop(seq, None)
            if slot >= 0:
                self._free.append(slot)
        errs = {i: r for i, r in fl.replies.items() if r[0] == "err"}
        if not errs:
            return
        oks = [i for i in fl.replies if i not in errs]
        if oks:
            rseq = self._seq = self._seq + 1
            back = _Inflight(len(oks), -1, True, {})
            self._inflight[rseq] = back
            for i in oks:
                self._send(i, ("rollback", rseq))
            self._pump(lambda: back.remaining == 0, "rolling back")
            del self._inflight[rseq]
            if any(r[0] == "err" for r in back.replies.values()):
                raise self._fail("a worker could not roll back a refused update")
        e = next(iter(errs.values()))
        raise _rebuild_error(e[2], e[3], e[4])

    # -- admission (the receiver's copy of Mean's rules) -----------------------------------
    def _reset_mirror(self) -> None:
        self._count = 0
        self._weight = 0.0
        self._weight_comp = 0.0
        self._bound = 0.0  # float32: upper bound on sum |w s| max|x| folded so far

    @property
    def count(self) -> int:
        """Updates folded so far (partials count their own updates)."""
        return self._count

    def _as_update(
        self,
        update: Update | Delta,
        weight: float,
        scale: float,
        client_id: str,
        base_version: int | None,
    ) -> Update:
        u = (
            update
            if isinstance(update, Update)
            else Update(
                delta=update,
                weight=weight,
                scale=scale,
                client_id=client_id,
                base_version=base_version,
            )
        )
        check_update(self.spec, self.version, u)
        if not math.isfinite(self._weight + float(u.weight)):
            raise InvalidWeight(u.client_id, "the sum of weights overflows")
        return u

    def _admit_fold(self, u: Update, top: float) -> tuple[bool, float]:
        """Mean's value rules for ``u`` with ``max |x| = top``: raises the error Mean would,
        else returns (fold synchronously?, the new float32 bound)."""
        cid = u.client_id
        if not math.isfinite(top):
            raise NonFiniteUpdate(cid, "delta holds NaN or Inf values")
        ws = abs(float(u.weight) * float(u.scale))
        if self.accumulator == "float64" or self._acc_dtype == np.float64:
            if ws * top > _F64_SAFE / max(1, self._count + 1):
                raise NonFiniteUpdate(cid, "weighted delta would overflow float64")
            return False, self._bound
        bound = self._bound + ws * top
        growth = math.exp((self._count + 2) * _U32 * 1.01)
        safe = ws < _FLT_MAX / 4 and bound * growth < _FLT_MAX / 4
        return not safe, bound

    def _check_partial(self, other: MeanState) -> None:
        """Mean.merge's checks, plus the shapes and dtypes a loaded state must have."""
        if other.spec != self.spec:
            raise StateError("cannot merge states of different specs")
        if other.version != self.version:
            raise StateError(f"cannot merge version {other.version} into {self.version}")
        if other.accumulator != self.accumulator:
            raise StateError("cannot merge states with different accumulators")
        other.check()

    def _admit_merge(self, other: MeanState, top: float) -> tuple[bool, float]:
        if not math.isfinite(top):
            raise StateError("the partial state holds non-finite values")
        if self._acc_dtype == np.float64:
            return False, self._bound
        bound = self._bound + top
        growth = math.exp((self._count + other.count + 2) * _U32 * 1.01)
        return not bound * growth < _FLT_MAX / 4, bound

    def _folded(self, u: Update, bound: float) -> None:
        self._bound = bound
        w, e = _two_sum(self._weight, float(u.weight))
        self._weight, self._weight_comp = w, self._weight_comp + e
        self._count += 1

    def _merged(self, other: MeanState, bound: float) -> None:
        self._bound = bound
        if self._count == 0:
            self._weight, self._weight_comp = other.weight, other.weight_comp
        else:
            w, e = _two_sum(self._weight, other.weight)
            self._weight = w
            self._weight_comp += other.weight_comp + e
        self._count += other.count

    # -- results -----------------------------------------------------------------------------
    def _temp_segment(self, nbytes: int) -> SharedMemory:
        name = f"{SHM_PREFIX}{os.getpid()}_{secrets.token_hex(6)}"
        seg = SharedMemory(name=name, create=True, size=max(1, nbytes))
        self._segments.append(seg)
        return seg

    def _drop_segment(self, seg: SharedMemory) -> None:
        with contextlib.suppress(Exception):
            seg.unlink()
        with contextlib.suppress(BufferError):
            seg.close()
        with contextlib.suppress(ValueError):
            self._segments.remove(seg)

    def finalize_flat(self) -> Arr:
        """The aggregated delta as one flat array (bit-identical to an in-process fold)."""
        self._check_usable()
        if self._count == 0:
            raise EmptyAggregate("no update was folded: nothing to finalize")
        seg = self._temp_segment(self.spec.nbytes)
        try:
            self._call(lambda i, seq: ("finalize", seq, seg.name), "finalizing")
            view = _array(seg.buf, self.spec.dtype, self.spec.size, 0)
            out = view.copy()
            del view
        finally:
            self._drop_segment(seg)
        return out

    def finalize(self) -> ArrayTree:
        """The aggregated delta, shaped like the spec (a list or a dict of arrays)."""
        return self.spec.unflatten(self.finalize_flat())

    def state(self) -> MeanState:
        """The whole partial aggregate as one :class:`MeanState` (a copy), ready to be merged
        into a parent's state; bit-identical to the state of an in-process fold."""
        self._check_usable()
        n, isz = self.spec.size, self._acc_dtype.itemsize
        f64 = self.accumulator == "float64"
        off = _comp_offset(self.spec, self._acc_dtype)
        seg = self._temp_segment(off + n * 8 if f64 else n * isz)
        try:
            infos = self._call(lambda i, seq: ("export", seq, seg.name), "exporting the state")
            acc = _array(seg.buf, self._acc_dtype, n, 0).copy()
            comp = _array(seg.buf, np.dtype(np.float64), n, off).copy() if f64 else None
        finally:
            self._drop_segment(seg)
        w, wc, count = infos[0]
        if any(tuple(x) != (w, wc, count) for x in infos):
            raise self._fail("the workers disagree on the weight sum or count")
        return MeanState(self.spec, self.version, self.accumulator, acc, comp, w, wc, count)

    def shard_states(self) -> list[MeanState]:
        """One :class:`MeanState` per coordinate shard, over a flat sub-spec of that range."""
        full = self.state()
        out = []
        for lo, hi in self.bounds:
            comp = None if full.comp is None else full.comp[lo:hi].copy()
            out.append(
                MeanState(
                    _sub_spec(self.spec, lo, hi),
                    full.version,
                    full.accumulator,
                    full.acc[lo:hi].copy(),
                    comp,
                    full.weight,
                    full.weight_comp,
                    full.count,
                )
            )
        return out

    def reset(self, version: int | None = None) -> None:
        """Start a new round: every shard back to the empty state (for ``version``)."""
        self._check_usable()
        self._call(lambda i, seq: ("reset", seq, version), "resetting")
        self.version = version
        self._reset_mirror()


class ShmAggregator(_Service):
    """Weighted-mean aggregation on one host: a shared-memory slot ring, sharded workers.

    >>> with ShmAggregator(spec, shards=2, accumulator="float32", slots=4) as agg:  # doctest: +SKIP
    ...     agg.submit(flat_update, weight=10.0)
    ...     delta = agg.finalize()

    Args:
        spec: the model's layout.
        shards: number of coordinate shards (``shard_bounds(spec.size, shards)``).
        workers: worker processes (default: one per shard); worker ``j`` owns the shards
            ``j, j + W, j + 2W, ...``.
        accumulator: ``"float32"`` or ``"float64"``, as for :func:`fedagg.aggregators.mean`.
        slots: model-sized shared-memory slots (updates in flight at once).
        version: the model version being aggregated (checked against ``base_version``).
        partials: size the slots to also carry partial :class:`MeanState` s, for
            :meth:`merge` (a float64 accumulator needs 16 bytes per parameter).
        timeout: seconds without any answer from the workers before
            :class:`AggregatorFailed` is raised.
        start_method: ``"forkserver"`` (default, fast to start) or ``"spawn"``.
        worker_threads: numba threads per worker (1: the workers are the parallelism).
        backend: fold kernels, as for :class:`~fedagg.core.aggregate.Mean`.
    """

    _worker_target = staticmethod(_shm_worker)

    def __init__(
        self,
        spec: ParamSpec,
        *,
        shards: int = 1,
        workers: int | None = None,
        accumulator: Accumulator = "float32",
        slots: int = 4,
        version: int | None = None,
        partials: bool = False,
        timeout: float = 60.0,
        start_method: StartMethod = "forkserver",
        worker_threads: int = 1,
        backend: Backend = "auto",
    ) -> None:
        super().__init__(
            spec,
            shards=shards,
            workers=workers,
            accumulator=accumulator,
            version=version,
            timeout=timeout,
            start_method=start_method,
            worker_threads=worker_threads,
            backend=backend,
        )
        if not isinstance(slots, int) or slots < 1:
            raise ConfigError(f"slots must be a positive integer, not {slots!r}")
        self.partials = bool(partials)
        self._comp_off = _comp_offset(spec, self._acc_dtype)
        need = spec.nbytes
        if self.partials:
            f64 = accumulator == "float64"
            need = max(need, self._comp_off + spec.size * 8 if f64 else spec.size * 8)
        self.slot_nbytes = need
        self.stride = _align(max(1, need), _PAGE)
        try:
            self._seg = self._temp_segment(self.stride * slots)
            buf = cast(memoryview, self._seg.buf)
            np.frombuffer(buf, np.uint8)[::_PAGE] = 0  # fault the pages in once, now
            self._slots = [
                _array(buf, spec.dtype, spec.size, i * self.stride) for i in range(slots)
            ]
            self._pslots = (
                [_array(buf, self._acc_dtype, spec.size, i * self.stride) for i in range(slots)]
                if self.partials
                else []
            )
            self._cslots = (
                [
                    _array(buf, np.dtype(np.float64), spec.size, i * self.stride + self._comp_off)
                    for i in range(slots)
                ]
                if self.partials and accumulator == "float64"
                else None
            )
        except BaseException:
            self.close()
            raise
        self._free = list(range(slots))
        cfgs = [
            {
                "spec": spec.to_dict(),
                "bounds": [self.bounds[k] for k in owned],
                "accumulator": accumulator,
                "version": version,
                "backend": backend,
                "threads": worker_threads,
                "segment": self._seg.name,
                "stride": self.stride,
                "slots": slots,
                "partials": self.partials,
                "comp_offset": self._comp_off,
            }
            for owned in self.owned
        ]
        self._start(cfgs, startup_timeout=max(120.0, self.timeout))

    def __enter__(self) -> ShmAggregator:
        return self

    def _release_views(self) -> None:
        self._slots, self._pslots, self._cslots = [], [], None

    @property
    def segment_name(self) -> str:
        """The slot ring's shared-memory name (``/dev/shm/<name>`` on Linux)."""
        return self._seg.name

    def _acquire(self) -> int:
        """A free slot; waits (backpressure) while every slot is in flight."""
        self._poll()
        if not self._free:
            self._pump(lambda: bool(self._free), "waiting for a free slot")
        return self._free.pop()

    def submit(
        self,
        update: Update | Delta,
        weight: float = 1.0,
        *,
        scale: float = 1.0,
        client_id: str = "",
        base_version: int | None = None,
    ) -> None:
        """Validate an update, write it once into a free slot and hand it to the workers.

        ``update`` is an :class:`Update` (then ``weight``/``scale``/``client_id`` are
        ignored) or a delta: a flat array, bytes, or arrays shaped like the spec. Returns once
        the update is in shared memory (the caller may reuse its buffer); the fold runs
        asynchronously. Raises the :class:`~fedagg.errors.UpdateError` that
        :class:`~fedagg.core.aggregate.Mean` would raise, and then nothing has changed.
        """
        self._check_usable()
        u = self._as_update(update, weight, scale, client_id, base_version)
        slot = self._acquire()
        try:
            dst = self._slots[slot]
            top = 0.0
            off = 0
            for seg in self.spec.segments(u.delta):
                part = copy_peak(dst[off : off + seg.size], seg, use_numba=self._numba)
                top = max(top, part, key=_nan_first)
                off += seg.size
            sync, bound = self._admit_fold(u, top)
        except BaseException:
            self._free.append(slot)
            raise
        self._hand_off(u, slot, sync, bound)

    def lease(self) -> Lease:
        """A free slot to write an update into in place (e.g. ``sock.recv_into``): the
        receive *is* the one write. Waits while every slot is in flight. Hand it over with
        :meth:`commit`, or give it back with :meth:`release`."""
        self._check_usable()
        slot = self._acquire()
        return Lease(slot, self._slots[slot])

    def release(self, lease: Lease) -> None:
        """Give back a leased slot without folding it."""
        if lease.slot >= 0:
            self._free.append(lease.slot)
            lease.slot = -1

    def commit(
        self,
        lease: Lease,
        weight: float = 1.0,
        *,
        scale: float = 1.0,
        client_id: str = "",
        base_version: int | None = None,
    ) -> None:
        """Validate the update written into ``lease`` (one read pass) and hand it to the
        workers. On a refusal the slot is released and the typed error raised; no state
        changed."""
        self._check_usable()
        slot = lease.slot
        if slot < 0:
            raise StateError("this lease was already committed or released")
        lease.slot = -1
        try:
            u = self._as_update(lease.array, weight, scale, client_id, base_version)
            sync, bound = self._admit_fold(u, peak(self._slots[slot], use_numba=self._numba))
        except BaseException:
            self._free.append(slot)
            raise
        self._hand_off(u, slot, sync, bound)

    def _hand_off(self, u: Update, slot: int, sync: bool, bound: float) -> None:
        w, s, cid = float(u.weight), float(u.scale), u.client_id
        if sync:
            self._run_sync(lambda i, seq: ("fold", seq, slot, w, s, cid, True), slot)
        else:
            self._issue(lambda i, seq: ("fold", seq, slot, w, s, cid, False), slot, False)
        self._folded(u, bound)

    def merge(self, other: MeanState) -> None:
        """Merge a child's partial :class:`MeanState` (over the whole spec) into the shards,
        through a slot (needs ``partials=True``). Raises StateError as Mean.merge would."""
        self._check_usable()
        if not self.partials:
            raise ConfigError("merge() needs ShmAggregator(..., partials=True)")
        if not isinstance(other, MeanState):
            raise StateError(f"expected a MeanState, not {type(other).__name__}")
        self._check_partial(other)
        if other.count == 0:
            return  # the identity: nothing to add
        slot = self._acquire()
        try:
            top = copy_peak(self._pslots[slot], other.acc, use_numba=self._numba)
            if self._cslots is not None and other.comp is not None:
                np.copyto(self._cslots[slot], other.comp)
            sync, bound = self._admit_merge(other, top)
        except BaseException:
            self._free.append(slot)
            raise
        w, wc, c = float(other.weight), float(other.weight_comp), int(other.count)
        if sync:
            self._run_sync(lambda i, seq: ("merge", seq, slot, w, wc, c, True), slot)
        else:
            self._issue(lambda i, seq: ("merge", seq, slot, w, wc, c, False), slot, False)
        self._merged(other, bound)


@dataclass
class Lease:
    """A slot of :class:`ShmAggregator` leased for writing: ``array`` is the slot's flat view
    (the spec's dtype); ``slot`` is -1 once committed or released."""

    slot: int
    array: Arr


def _nan_first(x: float) -> float:
    """Sort key for max(): NaN beats everything (so a NaN peak is never lost)."""
    return math.inf if math.isnan(x) else x
