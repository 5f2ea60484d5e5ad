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
them with :meth:`Mean.fold_trusted <fedagg.core.aggregate.Mean.fold_trusted>`:
``acc[lo:hi] += w * slot[lo:hi]`` straight out of the slot (float32; float64 uses the
compensated kernel), with ``Mean``'s weight and count bookkeeping, so the bits are those of
``Mean.fold``, without ``Mean``'s second look at the values (an undo copy and a finiteness test,
or a ``max |x|`` pass). Synchronous folds use ``Mean.fold`` itself (checked, with a snapshot).

The worker side that the socket planes share is in :mod:`fedagg.plane._shards`, the
coordinator (:class:`~fedagg.plane._service.Service`) in :mod:`fedagg.plane._service`.

A worker that dies or does not answer within ``timeout`` seconds raises
:class:`AggregatorFailed` (no hang); the aggregator is then unusable and :meth:`close` (or
leaving the ``with`` block) stops the workers and unlinks every shared-memory segment.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing.connection as mpc
import os
import traceback
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import numpy as np

from fedagg.core.aggregate import MeanState
from fedagg.core.spec import Delta, ParamSpec
from fedagg.core.update import Update
from fedagg.errors import ConfigError, StateError
from fedagg.plane._kernels import copy_peak, nan_first, peak, set_threads
from fedagg.plane._service import SHM_PREFIX, Service
from fedagg.plane._shards import (
    Accumulator,
    AggregatorFailed,
    Arr,
    Backend,
    Shards,
    StartMethod,
    align,
    array_at,
    attach,
    comp_offset,
    error_reply,
    handle_common,
)

__all__ = ["SHM_PREFIX", "AggregatorFailed", "Lease", "ShmAggregator"]

_PAGE = 4096
#: Most queued updates a worker folds in one pass.
_MAX_BATCH = 16


# --------------------------------------------------------------------------------------------
# The shared-memory worker and aggregator
# --------------------------------------------------------------------------------------------


def _shm_worker(conn: mpc.Connection, cfg: dict[str, Any]) -> None:
    """A worker of :class:`ShmAggregator`: folds its shards of each slot it is handed."""
    set_threads(cfg["threads"])
    spec = ParamSpec.from_dict(cfg["spec"])
    shards = Shards(spec, cfg["bounds"], cfg["accumulator"], cfg["version"], cfg["backend"])
    acc_dtype = shards.states[0].acc.dtype
    seg = attach(cfg["segment"])
    stride, nslots = cfg["stride"], cfg["slots"]
    slots = [array_at(seg.buf, spec.dtype, spec.size, i * stride) for i in range(nslots)]
    pslots = (
        [array_at(seg.buf, acc_dtype, spec.size, i * stride) for i in range(nslots)]
        if cfg["partials"]
        else []
    )
    cslots = (
        [
            array_at(seg.buf, np.dtype(np.float64), spec.size, i * stride + cfg["comp_offset"])
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
                    replies = [(*error_reply(m[1], e), m[2]) for m in batch]
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
                reply = error_reply(seq, e)
                if op in ("fold", "merge"):
                    reply = (*reply, msg[2])
            conn.send(reply)
    except (EOFError, BrokenPipeError, KeyboardInterrupt):
        return
    finally:
        del slots, pslots, cslots
        with contextlib.suppress(BufferError):
            seg.close()


class ShmAggregator(Service):
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
        self._comp_off = comp_offset(spec, self._acc_dtype)
        need = spec.nbytes
        if self.partials:
            f64 = accumulator == "float64"
            need = max(need, self._comp_off + spec.size * 8 if f64 else spec.size * 8)
        self.slot_nbytes = need
        self.stride = align(max(1, need), _PAGE)
        try:
            self._seg = self._temp_segment(self.stride * slots)
            buf = cast(memoryview, self._seg.buf)
            np.frombuffer(buf, np.uint8)[::_PAGE] = 0  # fault the pages in once, now
            self._slots = [
                array_at(buf, spec.dtype, spec.size, i * self.stride) for i in range(slots)
            ]
            self._pslots = (
                [array_at(buf, self._acc_dtype, spec.size, i * self.stride) for i in range(slots)]
                if self.partials
                else []
            )
            self._cslots = (
                [
                    array_at(buf, np.dtype(np.float64), spec.size, i * self.stride + self._comp_off)
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
                top = max(top, part, key=nan_first)
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
