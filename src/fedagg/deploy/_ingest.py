"""Fold on receive (``[deploy] ingest = "fold"``): an upload's checked chunks are folded into
the round's live accumulator as they arrive, under a *fold lease*, and rolled back exactly if
the upload fails.

**The lease.** At most one at a time (so the fold order is the log order, and a replay after
a crash, which folds the spooled files in log order, reproduces the state bit for bit). The
engine thread grants it at an upload's header (:meth:`FoldIngest.grant`) when the upload's
fold is known then: a synchronous policy (no participation weighting, no SCAFFOLD) whose
aggregator is a plain :class:`~fedagg.core.aggregate.Mean` (float32 or float64 accumulator),
or one bounded in arrival order (:class:`~fedagg.deploy._bounds.Bounded`) once its window is
warm and with the claimed weight under the weight cap; the task open and pending in its round.
No canonical order, pre-transform, secure aggregation, DP or asynchronous policy: they fold
what arrives differently, or later.

**A chunk** (on an I/O thread, :meth:`Lease.fold`, after it was checked, hashed and written to
the spool as before): its range of the accumulator (``acc``, and ``comp`` for float64) is
copied aside (the pre-image, into the federation's :class:`Scratch`, reused by every lease),
and the chunk is added, element by element the same operation as the whole-update fold's
kernel (:meth:`~fedagg.core.aggregate.Mean.fold_trusted`): the same bits as the spool path.
For a plain accumulator both happen in one pass while the range is in cache
(:func:`~fedagg.core.aggregate.save_fold`, which also tests the sums); for float64, a copy then
``fold_trusted``. A float32 sum that overflows (where the spool path's fold would refuse the
update), or a float64 one, gives up the lease.
Ranges are disjoint (chunks in order, shards apart), so the shards of one upload fold at once.

**Rollback** (:meth:`Lease.rollback`): every saved range copied back, exact; after it, the
upload goes on being spooled and, if it is accepted, is folded from its spool like any other.
A failed upload (a bad chunk, a truncation, a bad trailer or signature, a disconnect, a
timeout, a cancellation) rolls back before its call ends. The engine revokes (rolls back) an
active lease before it applies any other event (a round closing on a timer or a dropout, an
edge's partial, another upload's arrival) and before a checkpoint: nothing ever reads or
replaces the accumulator with a partial fold in it.

**Commit.** When the leased upload's arrival row is stepped, the engine checks that the policy
will fold it unchanged (still pending, the norm within the bounds, the float64 overflow bound
of :func:`~fedagg.core.aggregate.check_peak`); if not, it rolls back and the update is read
back from its spool, for the policy to decide as usual. If so, the policy steps an ``Arrival``
whose delta is a read-only map of the spool file, and the aggregator wrappers installed here
(:class:`FoldingMean`, :class:`FoldingBounded`) recognise it: the mean then only does the
weight bookkeeping (:meth:`~fedagg.core.aggregate.Mean.count_folded`), the bounds use the
norm already measured. The policy code is unchanged; the log row is the same as the spool
path's (its spool is its replay).

**Other uploads** completing while a lease is active wait for it (up to :data:`LEASE_GRACE`
seconds) before their arrival is logged, then revoke it: log order stays fold order, a
concurrent upload finishing a little earlier costs the lease nothing, and a slow (or stalled)
leased upload cannot hold the others' acknowledgements for longer than the grace.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.core import kernels
from fedagg.core.aggregate import Mean, MeanState, check_peak, check_update, save_fold
from fedagg.core.spec import ParamSpec
from fedagg.core.update import Update
from fedagg.deploy._bounds import Bounded, BoundedState, check_claim, limits
from fedagg.deploy._spoolcheck import check_size
from fedagg.deploy._store import EventRow, UploadRow
from fedagg.errors import StateError, UpdateError
from fedagg.policy import SyncPolicy, SyncState

__all__ = [
    "LEASE_GRACE",
    "FoldIngest",
    "FoldingBounded",
    "FoldingMean",
    "Lease",
    "Scratch",
    "Turns",
]

Arr = npt.NDArray[Any]

#: Seconds a completed upload waits for another upload's active lease before revoking it.
LEASE_GRACE = 2.0
#: Elements per kernel call on an I/O thread: the compensated fold and ``max |x|`` run their
#: serial kernels below these sizes (the parallel ones are for the engine thread only).
_F64_PIECE = 1 << 18
_PEAK_PIECE = (1 << 16) - 1


@dataclass(frozen=True)
class _Token:
    """The leased upload the policy is about to step: its delta (a map of its spool file),
    its weight and its norm (measured at the commit check; 0 without bounds)."""

    delta: Any
    weight: float
    norm: float


class Lease:
    """One upload folding into the live accumulator ``state`` (a :class:`MeanState`) with
    ``mean``'s kernels at ``weight``; thread-safe: the I/O threads fold chunks (disjoint
    ranges at once), the engine thread or the failing upload rolls back."""

    def __init__(
        self, key: tuple[int, int], mean: Mean, state: MeanState, weight: float,
        scratch: Scratch | None = None,
    ) -> None:  # fmt: skip
        self.key = key  # (client, job)
        self.mean, self.state, self.weight = mean, state, weight
        self.scratch = Scratch() if scratch is None else scratch
        self.cond = threading.Condition()
        self.live = True  # folding; False once rolled back or committed
        self.complete = False  # every chunk folded and the upload verified
        self.active = 0  # folds running
        self.ranges: list[tuple[int, int]] = []  # element ranges whose pre-image is saved
        self.undo_acc: Arr | None = None
        self.undo_comp: Arr | None = None
        self.peak = 0.0  # max |x| over the folded chunks (the float64 overflow bound)
        self.rolled_back = False
        self.path: str | None = None  # its spool file, once complete (before() matches it: L1)
        #: True once rolled back or committed: the pre-image buffers are free for another lease
        self.settled = False
        #: set by the service when the upload's arrival is queued or the upload failed
        self.ended: asyncio.Event | None = None

    @property
    def wants_peak(self) -> bool:
        """Whether chunks need ``max |x|`` (the float64 accumulator's overflow bound)."""
        return self.state.comp is not None

    def fold(self, lo: int, x: Arr, peak: float = 0.0) -> None:
        """Fold ``x`` (checked: finite) into elements ``[lo, lo + x.size)``, its pre-image
        saved first (any thread). An overflow rolls the whole lease back."""
        st = self.state
        hi = lo + x.size
        with self.cond:
            if not self.live:
                return
            self.active += 1
            if self.undo_acc is None:  # the federation's scratch (see Scratch)
                self.undo_acc, self.undo_comp = self.scratch.take(st)
        ok = False
        try:
            with self.cond:
                self.peak = max(self.peak, peak)
            ok = self._fold(lo, hi, x)
        finally:
            with self.cond:
                self.active -= 1
                self.cond.notify_all()
        if not ok:  # the sums overflow: the spool path's fold refuses the update
            self.rollback()

    def _fold(self, lo: int, hi: int, x: Arr) -> bool:
        """Save the pre-image of ``[lo, hi)``, then fold ``x`` into it; False on an overflow
        (the range is saved: a rollback restores it)."""
        st = self.state
        assert self.undo_acc is not None
        if st.comp is None and self.mean.use_numba:  # one pass: save, fold, test the sums
            ok = save_fold(st.acc[lo:hi], self.undo_acc[lo:hi], x, self.weight)
            if ok is not None:
                with self.cond:
                    self.ranges.append((lo, hi))
                return ok
        self.undo_acc[lo:hi] = st.acc[lo:hi]
        if st.comp is not None and self.undo_comp is not None:
            self.undo_comp[lo:hi] = st.comp[lo:hi]
        with self.cond:
            self.ranges.append((lo, hi))
        step = _F64_PIECE if st.comp is not None else hi - lo
        for a in range(lo, hi, max(1, step)):
            b = min(hi, a + step)
            comp = None if st.comp is None else st.comp[a:b]
            part = MeanState(st.spec, st.version, st.accumulator, st.acc[a:b], comp)
            try:
                self.mean.fold_trusted(part, [x[a - lo : b - lo]], [self.weight])
            except StateError:  # float64: a non-finite sum
                return False
            if comp is None and not kernels.all_finite(part.acc, use_numba=True, parallel=False):
                return False
        return True

    def rollback(self) -> bool:
        """Undo every fold of this lease, exactly (idempotent; waits for running folds);
        True if this call rolled it back."""
        with self.cond:
            if not self.live:
                return False
            self.live = False
            while self.active:
                self.cond.wait()
            st = self.state
            for lo, hi in self.ranges:
                assert self.undo_acc is not None
                st.acc[lo:hi] = self.undo_acc[lo:hi]
                if st.comp is not None and self.undo_comp is not None:
                    st.comp[lo:hi] = self.undo_comp[lo:hi]
            self._drop()
            self.rolled_back = self.settled = True
            return True

    def commit(self) -> None:
        """The fold stands (the policy counted it): the pre-images go."""
        with self.cond:
            self.live = False
            self._drop()
            self.settled = True

    def _drop(self) -> None:
        self.ranges = []
        self.undo_acc = self.undo_comp = None


class Scratch:
    """The pre-image buffers of a federation's fold leases: allocated at its first lease's
    first fold and reused by every later lease (one lease at a time, so one set of buffers),
    across rounds. A model-sized buffer allocated per upload (as before) cost the kernel's
    page faults and zeroing of every page on each upload: about 1.6 CPU-s per GiB on the
    benchmark machine (a VM), more than the rest of the fold. The price: one model-sized
    buffer held while folding on receive, so a round's close holds three models (the old
    parameters, the sums becoming the new ones, this), as it did with a lease's own buffer."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.acc: Arr | None = None
        self.comp: Arr | None = None

    def take(self, state: MeanState) -> tuple[Arr, Arr | None]:
        """Buffers shaped like ``state``'s ``acc`` and ``comp`` (None without one); their
        contents are whatever the last lease left."""
        with self.lock:
            self.acc = _like(self.acc, state.acc)
            self.comp = None if state.comp is None else _like(self.comp, state.comp)
            return self.acc, self.comp

    def release(self) -> None:
        with self.lock:
            self.acc = self.comp = None


def _like(buf: Arr | None, ref: Arr) -> Arr:
    if buf is not None and buf.shape == ref.shape and buf.dtype == ref.dtype:
        return buf
    return np.empty_like(ref)


def chunk_peak(x: Arr) -> float:
    """``max |x|`` of a chunk (``inf`` if it holds a NaN or an infinity), with the serial
    kernel: pieces below the parallel kernels' threshold (this runs on an I/O thread)."""
    top = 0.0
    for lo in range(0, x.size, _PEAK_PIECE):
        p = kernels.max_abs(x[lo : lo + _PEAK_PIECE], use_numba=kernels.HAVE_NUMBA)
        if not math.isfinite(p):
            return math.inf
        top = max(top, p)
    return top


# -- the aggregator wrappers ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class FoldingMean(Mean):
    """:class:`Mean` that recognises an update already folded on receive (the token's delta):
    for it, only the weight bookkeeping. Every other update folds as :class:`Mean` does."""

    token: list[_Token] = field(default_factory=list, compare=False, repr=False)

    def fold_many(
        self, state: MeanState, updates: Any, *, undo: bool = False
    ) -> MeanState:  # fmt: skip
        ups = list(updates)
        t = self.token[0] if self.token else None
        if t is not None and len(ups) == 1 and ups[0].delta is t.delta:
            u = ups[0]
            check_update(state.spec, state.version, u)
            if float(u.weight) != t.weight or float(u.scale) != 1.0:
                raise StateError("an update folded on receive was changed before its fold")
            self.token.clear()
            return self.count_folded(state, [t.weight])
        return Mean.fold_many(self, state, ups, undo=undo)


@dataclass(frozen=True)
class FoldingBounded(Bounded):
    """:class:`Bounded` (arrival order) that takes the norm of an update folded on receive
    from its token (measured once, at the commit check, by the same function)."""

    token: list[_Token] = field(default_factory=list, compare=False, repr=False)

    def _check(self, state: Any, update: Update) -> float:
        t = self.token[0] if self.token else None
        if t is not None and update.delta is t.delta:
            check_update(state.spec, state.version, update)
            return t.norm
        return super()._check(state, update)


def _folding(agg: Any, token: list[_Token]) -> Any:
    """``agg`` with the wrappers, or None if its fold cannot happen on receive."""
    if isinstance(agg, FoldingMean | FoldingBounded):
        return agg
    if type(agg) is Mean:
        return FoldingMean(agg.accumulator, agg.batch, agg.backend, token=token)
    if type(agg) is Bounded and not agg.hold and type(agg.inner) is Mean:
        inner = _folding(agg.inner, token)
        return FoldingBounded(inner, agg.key, bounds=agg.bounds, hold=False,
                              tracker=agg.tracker, token=token)  # fmt: skip
    return None


# -- the engine's side ---------------------------------------------------------------------------
class FoldIngest:
    """A federation's fold leases (engine thread only, but :class:`Lease` methods)."""

    def __init__(self, fed: Any) -> None:
        self.fed = fed
        self.lease: Lease | None = None
        self.committing: Lease | None = None
        self.token: list[_Token] = []
        self.installed: bool | None = None  # the wrappers are in the policy (None: not tried)
        self.commits = 0  # uploads whose fold on receive stood (for tests and metrics)
        self.scratch = Scratch()  # the leases' pre-image buffers

    def _install(self) -> bool:
        fed = self.fed
        pol = fed.policy
        if type(pol) is not SyncPolicy or pol.weighting is not None or pol.scaffold:
            return False
        agg = _folding(pol.strategy.aggregator, self.token)
        if agg is None:
            return False
        if agg is not pol.strategy.aggregator:
            fed.policy = replace(pol, strategy=replace(pol.strategy, aggregator=agg))
        return True

    def grant(self, client: int, job: int, version: int, weight: float) -> Lease | None:
        """A lease for the upload of (client, job) from ``version`` claiming ``weight``, or
        None (another is active, or its fold is not known now)."""
        if self.lease is not None and not self.lease.settled:  # live, or rolling back
            return None
        self.lease = None
        if self.installed is None:
            self.installed = self._install()
        fed = self.fed
        task = fed.tasks.get(job)
        if (
            not self.installed
            or task is None
            or (task.client, task.version) != (client, version)
            or job in fed.secure.dims
            or not (math.isfinite(weight) and weight > 0)
        ):
            return None
        st = fed.state
        if not isinstance(st, SyncState) or not st.open or job not in st.pending:
            return None
        agg = fed.policy.strategy.aggregator
        ms = st.agg
        if isinstance(agg, FoldingBounded):
            if not isinstance(ms, BoundedState) or ms.held or ms.closed or ms.pending:
                return None
            cap = limits(agg.bounds, ms.window, "").weight
            if cap is not None and weight > cap:
                return None
            agg, ms = agg.inner, ms.inner
        if not isinstance(agg, FoldingMean) or not isinstance(ms, MeanState):
            return None
        if ms.version != version:
            return None
        ms.peak = None  # its max |acc| is stale as soon as a chunk folds
        self.lease = Lease((client, job), agg, ms, float(weight), self.scratch)
        return self.lease

    def warmup(self) -> None:
        """Compile the kernels a lease runs on the I/O threads (for read-only chunks, as gRPC's
        buffers are) now, not on the first upload's chunks."""
        spec = self.fed.spec
        x = np.zeros(2 * _PEAK_PIECE + 2, spec.dtype)
        x.flags.writeable = False
        chunk_peak(x)
        kernels.all_finite(x, use_numba=True, parallel=False)
        for acc in ("float32", "float64"):
            mean = Mean(acc)
            st = mean.init(ParamSpec.from_arrays([np.zeros(x.size, spec.dtype)]))
            Lease((0, 0), mean, st, 1.0).fold(0, x)

    def revoke(self, lease: Lease | None = None) -> None:
        """Roll the active lease back (``lease``: only if it is that one)."""
        cur = self.lease
        if cur is None or (lease is not None and cur is not lease):
            return
        cur.rollback()
        self.lease = None

    def before(self, row: EventRow) -> None:
        """Before ``row`` is applied: the active lease is revoked, unless ``row`` is its
        upload's arrival (then it may commit, see :meth:`folded`)."""
        lease = self.lease
        if lease is None:
            return
        u = row.upload
        mine = row.kind == "arrival" and u is not None and (u.client, u.job) == lease.key
        mine = mine and lease.path in (None, u.path if u else None)  # this attempt's file
        if mine and lease.live and lease.complete:
            self.committing = lease
        else:
            self.revoke()

    def folded(self, u: UploadRow) -> Arr | None:
        """The delta to step for the arrival of ``u`` if its fold on receive stands (a
        read-only map of its spool file, recognised by the wrappers), else None (the lease, if
        any, rolled back: the update is read back from its spool)."""
        lease = self.committing
        if lease is None or lease.key != (u.client, u.job):
            return None
        fed = self.fed
        n = fed.spec.size
        check_size(u.path, u.nbytes, n * fed.spec.dtype.itemsize, f"client {u.client}, job {u.job}")
        delta: Arr = np.memmap(u.path, dtype=fed.spec.dtype, mode="r", shape=(n,))
        update = Update(delta=delta, weight=u.weight, client_id=str(u.client),
                        base_version=u.version)  # fmt: skip
        norm = self._stands(lease, update)
        if norm is None:
            self.committing = None
            self.revoke(lease)
            return None
        self.token[:] = [_Token(delta, float(u.weight), norm)]
        lease.commit()  # it stands: its pre-image is not needed any more
        return delta

    def _stands(self, lease: Lease, update: Update) -> float | None:
        """Whether the policy will fold ``update`` unchanged: its norm (0 without bounds) if
        so, else None."""
        fed = self.fed
        st = fed.state
        if not isinstance(st, SyncState) or not st.open or lease.key[1] not in st.pending:
            return None
        agg, ms, norm = fed.policy.strategy.aggregator, st.agg, 0.0
        w = float(update.weight)
        try:
            if isinstance(agg, FoldingBounded):
                if not isinstance(ms, BoundedState) or ms.held or ms.closed or ms.pending:
                    return None
                norm = check_claim(agg.bounds, ms.spec, ms.version, update)
                lim = limits(agg.bounds, ms.window, "")
                if (lim.weight is not None and w > lim.weight) or (
                    lim.norm is not None and norm > lim.norm
                ):
                    return None
                ms = ms.inner
            if ms is not lease.state:
                return None
            check_update(ms.spec, ms.version, update)
            if not math.isfinite(ms.weight + w):
                return None
            if ms.comp is not None:
                check_peak(update.client_id, w, lease.peak, count=ms.count + 1, float64=True)
        except UpdateError:
            return None
        return norm

    def after(self) -> None:
        """After the policy stepped the committing arrival: the lease commits; had the policy
        not folded it (which :meth:`_stands` rules out), the state would be inconsistent."""
        lease, self.committing = self.committing, None
        if lease is None:
            return
        self.lease = None
        if self.token:
            self.token.clear()
            raise StateError(
                f"the upload of job {lease.key[1]} folded on receive was not folded by the "
                "policy: restart the server (the log replays it)"
            )
        lease.commit()
        self.commits += 1


# -- the service's side --------------------------------------------------------------------------
class Turns:
    """Fold leases as the service sees them (event loop): taking one at an upload's header,
    and the turn of a completed upload while another holds one."""

    def __init__(
        self, ingest: str, engine: Any, io: ThreadPoolExecutor,
        in_engine: Callable[..., Awaitable[Any]],
    ) -> None:  # fmt: skip
        self.on = ingest == "fold"
        self.engine, self.io, self.in_engine = engine, io, in_engine
        self.holder: Lease | None = None
        #: arrivals on their way to the engine (waiting for their turn, queued, not yet
        #: logged): a lease granted now would be revoked by the first of them
        self.coming = 0

    @contextlib.contextmanager
    def arriving(self, logged: asyncio.Future[Any]) -> Iterator[None]:
        """An arrival on its way to the log, from here until ``logged`` resolves."""
        self.coming += 1
        try:
            yield
        except BaseException:
            self.coming -= 1
            raise
        logged.add_done_callback(self._logged)

    def _logged(self, _: asyncio.Future[Any]) -> None:
        self.coming -= 1

    async def take(self, client: int, head: Any, masked: bool) -> Lease | None:
        fold: FoldIngest | None = getattr(self.engine, "ingest", None)
        if not self.on or masked or fold is None or fold.installed is False:
            return None
        if self.coming or (self.holder is not None and self.holder.live):  # no round trip
            return None
        lease: Lease | None = await self.in_engine(
            fold.grant, client, int(head.task), int(head.version), float(head.weight)
        )
        if lease is not None:
            lease.ended = asyncio.Event()
            self.holder = lease
        return lease

    async def turn(self, mine: Lease | None) -> None:
        """Before a completed upload's arrival is queued: wait for another upload's active
        lease to end (its arrival queued first), up to :data:`LEASE_GRACE`, then revoke it."""
        h = self.holder
        if h is None or h is mine or not h.live or h.ended is None:
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LEASE_GRACE):
                await h.ended.wait()
                return
        await self.revoke(h)

    async def revoke(self, lease: Lease) -> None:
        """Roll ``lease`` back on the engine thread if it is still the engine's."""
        fold: FoldIngest = self.engine.ingest
        await self.in_engine(fold.revoke, lease)

    async def end(self, lease: Lease | None, queued: bool) -> None:
        """The leased upload's arrival is queued (the engine decides), or it never will be:
        then its folds are undone now."""
        if lease is None:
            return
        try:
            if not queued:
                await rollback(self.io, lease)
        finally:
            if self.holder is lease:
                self.holder = None
            if lease.ended is not None:
                lease.ended.set()


async def rollback(io: ThreadPoolExecutor, lease: Lease) -> None:
    """Roll ``lease`` back on ``io`` (a copy of up to the model: not on the event loop); it
    completes even if this call is cancelled."""
    job = io.submit(lease.rollback)
    with contextlib.suppress(BaseException):  # cancelled while waiting: it runs to its end
        await asyncio.shield(asyncio.wrap_future(job))
