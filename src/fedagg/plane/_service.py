"""The coordinator side of the one-host data planes: worker processes, their control pipes,
and the receiver's admission rules (:class:`Service`). The shared-memory plane
(:mod:`fedagg.plane._shm`) and the socket planes (``benchmarks/_sockets.py``) add
the data transport.

The admission rules are Mean's (:func:`~fedagg.core.aggregate.check_update`,
:func:`~fedagg.core.aggregate.check_peak`, :func:`~fedagg.core.aggregate.check_mergeable`),
applied to the whole update before any worker sees it, plus a running float32 bound that says
when a fold must run synchronously (see :mod:`fedagg.plane._shm`).
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import secrets
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.process import BaseProcess
from multiprocessing.shared_memory import SharedMemory
from typing import Any, cast

import numpy as np

from fedagg import errors as _errors
from fedagg.core.aggregate import (
    Mean,
    MeanState,
    accumulator_dtype,
    check_mergeable,
    check_peak,
    check_update,
)
from fedagg.core.spec import ArrayTree, Delta, ParamSpec
from fedagg.core.tree import shard_bounds
from fedagg.core.update import Update
from fedagg.errors import (
    ConfigError,
    EmptyAggregate,
    FedaggError,
    InvalidWeight,
    StateError,
    UpdateError,
)
from fedagg.plane._shards import (
    Accumulator,
    AggregatorFailed,
    Arr,
    Backend,
    StartMethod,
    array_at,
    comp_offset,
    sub_spec,
)

__all__ = ["SHM_PREFIX", "Service"]

#: Prefix of every shared-memory segment the planes create (``/dev/shm/fedagg_...``).
SHM_PREFIX = "fedagg_"
_FLT_MAX = float(np.finfo(np.float32).max)
_U32 = 2.0**-24


def _rebuild_error(kind: str, cid: str, text: str) -> FedaggError:
    cls = getattr(_errors, kind, None)
    if isinstance(cls, type) and issubclass(cls, UpdateError):
        return cls(cid, text)
    if isinstance(cls, type) and issubclass(cls, FedaggError):
        return cls(text)
    return AggregatorFailed(text)


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


class Service:
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
        self._acc_dtype = accumulator_dtype(spec, accumulator)
        self._backend = backend
        self._numba = self._agg.use_numba
        self._threads = worker_threads
        self._ctx: Any = mp.get_context(start_method)
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload(["fedagg.plane._shm"])
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

    def __enter__(self) -> Service:
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
        self._weight = 0.0  # the workers' weight sum, without its compensation
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
        ws = abs(float(u.weight) * float(u.scale))
        wide = self._acc_dtype == np.float64
        check_peak(u.client_id, ws, top, count=self._count + 1, float64=wide)
        if wide:
            return False, self._bound
        bound = self._bound + ws * top
        growth = math.exp((self._count + 2) * _U32 * 1.01)
        safe = ws < _FLT_MAX / 4 and bound * growth < _FLT_MAX / 4
        return not safe, bound

    def _check_partial(self, other: MeanState) -> None:
        """Mean.merge's checks, plus the shapes and dtypes a loaded state must have."""
        check_mergeable(other, spec=self.spec, version=self.version, accumulator=self.accumulator)
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
        self._weight += float(u.weight)  # Mean's rounded weight sum: enough for its overflow
        self._count += 1

    def _merged(self, other: MeanState, bound: float) -> None:
        self._bound = bound
        self._weight += other.weight
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
            view = array_at(seg.buf, self.spec.dtype, self.spec.size, 0)
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
        off = comp_offset(self.spec, self._acc_dtype)
        seg = self._temp_segment(off + n * 8 if f64 else n * isz)
        try:
            infos = self._call(lambda i, seq: ("export", seq, seg.name), "exporting the state")
            acc = array_at(seg.buf, self._acc_dtype, n, 0).copy()
            comp = array_at(seg.buf, np.dtype(np.float64), n, off).copy() if f64 else None
        finally:
            self._drop_segment(seg)
        w, wc, count = infos[0]
        if any(tuple(x) != (w, wc, count) for x in infos):
            raise self._fail("the workers disagree on the weight sum or count")
        return MeanState(self.spec, self.version, self.accumulator, acc, comp, w, wc, count)

    def load(self, state: MeanState) -> None:
        """Replace the aggregate with ``state`` (a whole :class:`MeanState`, e.g. from a
        checkpoint), exactly: every shard takes its slice, bit for bit."""
        self._check_usable()
        self._check_partial(state)
        n, f64 = self.spec.size, self.accumulator == "float64"
        off = comp_offset(self.spec, self._acc_dtype)
        seg = self._temp_segment(off + n * 8 if f64 else n * self._acc_dtype.itemsize)
        try:
            acc = array_at(seg.buf, self._acc_dtype, n, 0)
            acc[...] = state.acc
            if f64 and state.comp is not None:
                array_at(seg.buf, np.dtype(np.float64), n, off)[...] = state.comp
            del acc
            w, wc, c = float(state.weight), float(state.weight_comp), int(state.count)
            self._call(lambda i, seq: ("load", seq, seg.name, w, wc, c), "loading a state")
        finally:
            self._drop_segment(seg)
        self._count, self._weight = int(state.count), float(state.weight)
        top = float(np.max(np.abs(state.acc), initial=0.0))
        self._bound = top if math.isfinite(top) else math.inf

    def shard_states(self) -> list[MeanState]:
        """One :class:`MeanState` per coordinate shard, over a flat sub-spec of that range."""
        full = self.state()
        out = []
        for lo, hi in self.bounds:
            comp = None if full.comp is None else full.comp[lo:hi].copy()
            out.append(
                MeanState(
                    sub_spec(self.spec, lo, hi),
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
