"""What the one-host data planes share on the worker side (shared memory and sockets alike).

* :class:`Shards`: a worker's coordinate shards, one :class:`~fedagg.core.aggregate.MeanState`
  each, folded with :class:`~fedagg.core.aggregate.Mean` itself: the checked fold for updates
  that could overflow float32 (under a snapshot), and :meth:`Mean.fold_trusted
  <fedagg.core.aggregate.Mean.fold_trusted>` for updates the receiver has validated.
* :func:`handle_common`: the control operations every worker kind answers (reset, rollback,
  finalize, export, stats), and :func:`error_reply`, how a worker reports a failure.

The coordinator side is :mod:`fedagg.plane._service`.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Sequence
from multiprocessing.shared_memory import SharedMemory
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fedagg.core.aggregate import Mean, MeanState
from fedagg.core.spec import ParamSpec
from fedagg.core.update import Update
from fedagg.errors import FedaggError, StateError, UpdateError

__all__ = [
    "Accumulator",
    "AggregatorFailed",
    "Arr",
    "Backend",
    "Shards",
    "StartMethod",
    "align",
    "array_at",
    "attach",
    "comp_offset",
    "error_reply",
    "handle_common",
    "sub_spec",
]

Arr = npt.NDArray[Any]
Accumulator = Literal["float32", "float64"]
Backend = Literal["auto", "numba", "numpy"]
StartMethod = Literal["forkserver", "spawn"]


class AggregatorFailed(FedaggError, RuntimeError):
    """A worker process died, did not answer in time, or failed unexpectedly.

    The aggregator is unusable afterwards; close it (its shared memory is unlinked).
    """


# --------------------------------------------------------------------------------------------
# Worker side: the states of the shards one worker owns
# --------------------------------------------------------------------------------------------


def sub_spec(spec: ParamSpec, lo: int, hi: int) -> ParamSpec:
    return ParamSpec(names=("shard",), shapes=((hi - lo,),), dtype=spec.dtype, keyed=False)


class Shards:
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
        self.subs = [sub_spec(spec, lo, hi) for lo, hi in self.bounds]
        self.states = [self.agg.init(s, version=version) for s in self.subs]
        self._snap: list[tuple[Arr, Arr | None, float, float, int]] | None = None
        #: updates folded by each path since the start (``Service._fold_stats``)
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
            self.agg.fold_trusted(st, [b[0][j] for b in batch], ws, ss)
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

    def load_from(self, acc: Arr, comp: Arr | None, weight: float, wc: float, count: int) -> None:
        """Set every shard to the matching slice of a whole state (a checkpoint's), exactly."""
        for (lo, hi), st in zip(self.bounds, self.states, strict=True):
            st.acc[...] = acc[lo:hi]
            if comp is not None and st.comp is not None:
                st.comp[...] = comp[lo:hi]
            st.weight, st.weight_comp, st.count = weight, wc, count
        self._snap = None

    def warm_up(self, views: Sequence[Arr]) -> None:
        """Load the fold kernels for these sizes (numba compiles or reads its cache) untimed."""
        for sub, v in zip(self.subs, views, strict=True):
            scratch = self.agg.init(sub)
            self.agg.fold(scratch, Update(delta=v))
            self.agg.fold_trusted(scratch, [v], [1.0])
            self.agg.fold_trusted(scratch, [v, v], [1.0, 1.0])
            self.agg.finalize_flat(scratch)


def error_reply(seq: int, e: BaseException) -> tuple[Any, ...]:
    if isinstance(e, UpdateError):
        return ("err", seq, type(e).__name__, e.client_id, e.reason)
    if isinstance(e, FedaggError):
        return ("err", seq, type(e).__name__, "", str(e))
    text = "".join(traceback.format_exception(e))
    return ("err", seq, "AggregatorFailed", "", f"worker error: {text}")


def attach(name: str) -> SharedMemory:
    return SharedMemory(name=name)


def array_at(buf: Any, dtype: np.dtype[Any], n: int, offset: int) -> Arr:
    return np.ndarray((n,), dtype=dtype, buffer=buf, offset=offset)


def handle_common(
    shards: Shards, spec: ParamSpec, msg: tuple[Any, ...], acc_dtype: np.dtype[Any]
) -> tuple[Any, ...] | None:
    """The control operations every worker kind shares (rollback, reset, stats, finalize,
    export, load); None for an unknown op."""
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
        seg = attach(msg[2])
        try:
            out = array_at(seg.buf, spec.dtype, spec.size, 0)
            shards.finalize_into(out)
            del out
        finally:
            seg.close()
        return ("ok", seq, -1, None)
    if op in ("export", "load"):
        seg = attach(msg[2])
        try:
            acc = array_at(seg.buf, acc_dtype, spec.size, 0)
            comp = (
                array_at(seg.buf, np.dtype(np.float64), spec.size, comp_offset(spec, acc_dtype))
                if shards.agg.accumulator == "float64"
                else None
            )
            if op == "load":
                shards.load_from(acc, comp, *msg[3:6])
                info = None
            else:
                info = shards.export_into(acc, comp)
            del acc, comp
        finally:
            seg.close()
        return ("ok", seq, -1, info)
    return None


def comp_offset(spec: ParamSpec, acc_dtype: np.dtype[Any]) -> int:
    return align(spec.size * acc_dtype.itemsize, 64)


def align(n: int, a: int) -> int:
    return -(-n // a) * a
