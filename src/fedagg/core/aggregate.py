"""Aggregators: commutative monoids over client updates.

An aggregator is four pure functions over a state value::

    state = agg.init(spec)                 # the identity element
    state = agg.fold(state, update)        # add one update (validated first)
    state = agg.merge(state, other)        # combine two partial states (any order, any tree)
    delta = agg.finalize(state)            # the aggregated delta, shaped like the spec

``fold``, ``fold_many`` and ``merge`` update the state they are given *in place* and return
it (as JAX does with a donated buffer): no model-sized temporary is made per update. A refused
update raises an :class:`~fedagg.errors.UpdateError` and leaves the state bit-for-bit as it was.

``decomposable`` says whether ``merge`` is exact (a true monoid). Rules that are not
(median, Krum, ...) work from a spool instead; see the robust-aggregation issue.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt

from fedagg.core import _stream
from fedagg.core import kernels as _kernels
from fedagg.core._segments import batch_segments, nonfinite_error
from fedagg.core._segments import layout as coord_layout
from fedagg.core._stream import save_fold  # a fold on receive's one-pass kernel (deploy)
from fedagg.core.spec import ArrayTree, ParamSpec
from fedagg.core.update import Update
from fedagg.errors import (
    ConfigError,
    EmptyAggregate,
    InvalidWeight,
    NonFiniteUpdate,
    SpecMismatch,
    StaleUpdate,
    StateError,
)

__all__ = [
    "F64_SAFE",
    "Aggregator",
    "Backend",
    "Composed",
    "Mean",
    "MeanState",
    "PreTransform",
    "accumulator_dtype",
    "check_mergeable",
    "check_peak",
    "check_update",
    "compose",
    "donate",
    "mean",
    "save_fold",
]

S = TypeVar("S")
#: Per-update bound on |w x| for the float64 accumulator, divided by the update count: the
#: running sum then cannot overflow (float64 max is ~1.8e308). See :func:`check_peak`.
F64_SAFE = 1e300
Arr = npt.NDArray[Any]
Backend = Literal["auto", "numba", "numpy"]
Accumulator = Literal["float32", "float64"]
_TRANSIENT = {"transient": True}  # scratch fields, never saved


@runtime_checkable
class Aggregator(Protocol[S]):
    """The aggregator contract. Every built-in one passes the shared conformance suite."""

    @property
    def decomposable(self) -> bool:
        """True when ``merge`` is exact, so partial states combine along any tree."""
        ...

    def init(self, spec: ParamSpec, *, version: int | None = None) -> S:
        """The empty state for a model of this spec, aggregating updates of ``version``."""
        ...

    def fold(self, state: S, update: Update) -> S:
        """Validate ``update`` and add it to ``state`` (in place)."""
        ...

    def fold_many(self, state: S, updates: Iterable[Update]) -> S:
        """Fold several queued updates at once; all or none (the state is unchanged on error)."""
        ...

    def merge(self, state: S, other: S) -> S:
        """Combine ``other`` into ``state`` (in place); ``other`` is not changed."""
        ...

    def finalize(self, state: S) -> ArrayTree:
        """The aggregated delta, as a list or dict like the spec."""
        ...

    def finalize_flat(self, state: S) -> Arr:
        """The aggregated delta as one flat buffer in the spec's dtype."""
        ...

    def count(self, state: S) -> int:
        """How many updates the state holds."""
        ...


def check_update(spec: ParamSpec, version: int | None, update: Update) -> None:
    """Raise the right :class:`UpdateError` if ``update`` cannot be folded for this spec.

    Checks the metadata only (weight, version, structure, shapes, dtypes); values are
    checked for finiteness by the fold itself.
    """
    cid = update.client_id
    if not update.is_weight_valid():
        raise InvalidWeight(cid, f"weight must be finite and > 0, got {update.weight!r}")
    if not update.is_scale_valid():
        raise InvalidWeight(cid, f"scale must be a finite number, got {update.scale!r}")
    if not math.isfinite(float(update.weight) * float(update.scale)):
        raise InvalidWeight(cid, "weight * scale overflows")
    if version is not None and update.base_version is not None and update.base_version != version:
        raise StaleUpdate(
            cid, f"trained from model version {update.base_version}, aggregating version {version}"
        )
    problem = spec.mismatch(update.delta)
    if problem is not None:
        raise SpecMismatch(cid, problem)


def check_peak(client_id: str, weighted: float, peak: float, *, count: int, float64: bool) -> None:
    """Mean's value rules for one update, from ``peak = max |delta|`` (one read pass the caller
    may fuse with a copy): raise :class:`~fedagg.errors.NonFiniteUpdate` if ``peak`` is NaN or
    infinite, or, for a float64 accumulator (``float64``), if ``|weighted| * peak`` exceeds
    ``F64_SAFE / count``, where ``weighted`` is the update's ``weight * scale`` and ``count`` the
    number of updates the state holds once this one is folded: no sum of ``count`` such
    products can then overflow. An update that passes may go to :meth:`Mean.fold_trusted`."""
    if not math.isfinite(peak):
        raise NonFiniteUpdate(client_id, "delta holds NaN or Inf values")
    if float64 and abs(weighted) * peak > F64_SAFE / max(1, count):  # Python floats: no warning
        raise NonFiniteUpdate(client_id, "weighted delta would overflow float64")


def check_mergeable(
    other: MeanState, *, spec: ParamSpec, version: int | None, accumulator: str
) -> None:
    """Raise :class:`~fedagg.errors.StateError` unless ``other`` can merge into a mean state of
    this spec, model version and accumulator (what :meth:`Mean.merge` checks). A state that
    arrived from elsewhere should also pass :meth:`MeanState.check`."""
    if other.spec != spec:
        raise StateError("cannot merge states of different specs")
    if other.version != version:
        raise StateError(f"cannot merge version {other.version} into {version}")
    if other.accumulator != accumulator:
        raise StateError("cannot merge states with different accumulators")


def accumulator_dtype(spec: ParamSpec, accumulator: str) -> np.dtype[Any]:
    """The dtype of a mean state's ``acc`` (its float64 ``comp``, if any, follows it):
    float64 for the float64 accumulator or a model wider than float32, else float32."""
    if accumulator == "float64" or spec.dtype.itemsize > 4:
        return np.dtype(np.float64)
    return np.dtype(np.float32)


# --------------------------------------------------------------------------------------------
# Weighted mean
# --------------------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class MeanState:
    """The weighted mean's partial aggregate: ``(sum w*delta, sum w, count)``.

    ``acc`` holds ``sum w*delta`` in the accumulator dtype; with the float64 accumulator,
    ``comp`` holds the running compensation: the rounding errors of every product and every
    addition, summed (the sum is ``acc + comp``, exact up to the rounding of ``comp``'s own
    additions; see :class:`Mean`).
    ``weight``/``weight_comp`` do the same for the scalar weight sum. ``undo`` is scratch
    memory that lets a bad batch be rolled back exactly; ``peak``, ``(count, weight, bound)``
    after a streaming fold (``bound >= max |acc|``), bounds the next one's sums (while count
    and weight are those).
    A state finalized in place (see :func:`donate`) holds no sums any more: using it again is
    a StateError.
    """

    spec: ParamSpec
    version: int | None
    accumulator: Accumulator
    acc: Arr
    comp: Arr | None
    weight: float = 0.0
    weight_comp: float = 0.0
    count: int = 0
    undo: Arr | None = field(default=None, repr=False, metadata=_TRANSIENT)
    peak: tuple[int, float, float] | None = field(default=None, repr=False, metadata=_TRANSIENT)
    #: set by :func:`donate`: ``finalize_flat`` may write the mean into ``acc`` (consuming it)
    donated: bool = field(default=False, repr=False, metadata=_TRANSIENT)

    def check(self) -> None:
        """Raise StateError unless the fields are consistent (used when a state is loaded)."""
        n = self.spec.size
        want = accumulator_dtype(self.spec, self.accumulator)
        ok = (
            isinstance(self.acc, np.ndarray)
            and self.acc.shape == (n,)
            and self.acc.dtype == want
            and (self.comp is None) == (self.accumulator == "float32")
            and (self.comp is None or (self.comp.shape == (n,) and self.comp.dtype == np.float64))
            and isinstance(self.count, int)
            and self.count >= 0
            and math.isfinite(self.weight)
            and self.weight >= 0
        )
        if not ok:
            raise StateError("inconsistent MeanState (shapes, dtypes, count or weight)")

    def nbytes(self) -> int:
        """Memory held by the state, scratch included."""
        return sum(a.nbytes for a in (self.acc, self.comp, self.undo) if a is not None)


def _two_sum(a: float, b: float) -> tuple[float, float]:
    t = a + b
    e = (a - t) + b if abs(a) >= abs(b) else (b - t) + a
    return t, e


def _add_weights(state: MeanState, weights: Iterable[float], n: int) -> None:
    """Fold's bookkeeping: add client ``weights`` to the compensated weight sum, ``n`` to count."""
    w, wc = state.weight, state.weight_comp
    for wt in weights:
        w, e = _two_sum(w, float(wt))
        wc += e
    state.weight, state.weight_comp = w, wc
    state.count += n


def _live(state: MeanState) -> None:
    # a state finalized in place has its sums emptied (a range's view of live sums, as a fold
    # lease folds into, is not: its spec is the whole model's)
    if state.acc.size == 0 and state.spec.size > 0:
        raise StateError("this mean state was finalized in place (donated): it holds no sums")


def donate(state: Any) -> None:
    """Let the next ``finalize_flat`` of ``state`` (a :class:`MeanState`, or a wrapper's state
    holding one as ``inner``, at any depth) write the mean into the state's own sums when their
    dtype is the model's: the state is consumed (a round's close, which drops it after)."""
    while state is not None and not isinstance(state, MeanState):
        state = getattr(state, "inner", None)
    if state is not None:
        state.donated = True


@dataclass(frozen=True, slots=True)
class Mean:
    """Weighted mean of the deltas: ``sum(w_i * s_i * delta_i) / sum(w_i)``.

    Args:
        accumulator: ``"float32"`` (fast: plain sums) or ``"float64"`` (exact mode: error-free
            products in compensated sums).

            * float32: for each coordinate, ``|err| <= gamma_n * sum_i |w_i x_i| / W`` plus
              one rounding, with ``gamma_n = n*u/(1-n*u)``, ``u = 2**-24`` and n the number
              of updates (the recursive-summation bound; blocking and merge trees only shorten
              the chains). Extra memory: 2x the model (accumulator and undo scratch).
            * float64: each product is split exactly into its rounded value and its
              rounding error (Dekker's TwoProduct, plain float64 multiplies and adds), and the
              rounded values are summed with Neumaier's compensation, which also collects the
              products' errors (Ogita, Rump and Oishi's Dot2). Write ``v_i`` for the float64
              ``w_i * s_i`` (``= w_i`` unless a pre-transform scales), ``W = sum_i w_i`` and
              ``q = sum_i v_i x_i / W`` (both exact), ``A = sum_i |v_i x_i|`` and
              ``u = 2**-53``. Then, per coordinate, the float64 quotient ``q'`` (before the
              final cast to the model dtype) of the flat fold *or of any merge tree* (any
              batching, order or shape) satisfies::

                  |q' - q| <= 3*u*|q| + 5*(n**2 + 1)*u**2 * A / W

              for ``n <= 2**43`` updates, barring underflow (a nonzero ``|v_i x_i|`` or ``|q|``
              below ``2**-969 ~ 2e-292``). The rounded sum ``acc + comp`` is within
              ``u*|S| + gamma_n*gamma_2n*A`` of ``S = sum_i v_i x_i``, with ``gamma_k =
              k*u/(1 - k*u)``, and the weight sum within ``(u + gamma_n*gamma_2n)*W`` of
              ``W``. So a float32 model gets ``q`` correctly rounded unless ``q`` lies within
              that distance of a float32 rounding boundary. Extra memory: two float64 buffers
              (4x a float32 model); values are checked in a separate read pass instead of an
              undo buffer.
        batch: how many queued updates ``fold_many`` adds per cache-blocked pass.
        backend: ``"numba"`` (compiled kernels), ``"numpy"`` (pure numpy fallback) or
            ``"auto"`` (numba when installed).
    """

    accumulator: Accumulator = "float32"
    batch: int = 64
    backend: Backend = "auto"

    def __post_init__(self) -> None:
        if self.accumulator not in ("float32", "float64"):
            raise ConfigError(
                f"accumulator must be 'float32' or 'float64', not {self.accumulator!r}"
            )
        if not isinstance(self.batch, int) or self.batch < 1:
            raise ConfigError(f"batch must be a positive integer, not {self.batch!r}")
        if self.backend not in ("auto", "numba", "numpy"):
            raise ConfigError(f"backend must be 'auto', 'numba' or 'numpy', not {self.backend!r}")
        if self.backend == "numba" and not _kernels.HAVE_NUMBA:
            raise ConfigError("backend='numba' but numba is not installed")

    @property
    def decomposable(self) -> bool:
        return True

    @property
    def use_numba(self) -> bool:
        """Whether the compiled kernels run (the backend allows them and numba is installed)."""
        return self.backend != "numpy" and _kernels.HAVE_NUMBA

    # -- monoid -----------------------------------------------------------------------------
    def init(self, spec: ParamSpec, *, version: int | None = None) -> MeanState:
        dt = accumulator_dtype(spec, self.accumulator)
        comp = np.zeros(spec.size, np.float64) if self.accumulator == "float64" else None
        return MeanState(spec, version, self.accumulator, np.zeros(spec.size, dt), comp)

    def fold(self, state: MeanState, update: Update) -> MeanState:
        return self.fold_many(state, (update,))

    def fold_many(
        self, state: MeanState, updates: Iterable[Update], *, undo: bool = False
    ) -> MeanState:
        """Fold ``updates`` (all or none). A single update into the float32 accumulator of a
        large model streams (:mod:`fedagg.core._stream`: a scan of its values, then the fold,
        serially, without an undo copy; the same bits). With ``undo``, the plain accumulator's
        previous sums are left in ``state.undo`` (what :class:`Sharded` rolls back with)."""
        ups = list(updates)
        _live(state)
        for u in ups:
            check_update(state.spec, state.version, u)
        if not ups:
            return state
        spec = state.spec
        total = state.weight + math.fsum(float(u.weight) for u in ups)
        if not math.isfinite(total):
            raise InvalidWeight(ups[-1].client_id, "the sum of weights overflows")
        pieces = [spec.segments(u.delta) for u in ups]
        ws = np.array([float(u.weight) * float(u.scale) for u in ups], dtype=np.float64)
        one = self.accumulator == "float32" and len(ups) == 1 and not undo
        top = self._stream(state, ups[0], pieces[0], ws[0]) if one else None
        if self.accumulator == "float64":
            self._fold_compensated(state, ups, pieces, ws)
        elif top is None:
            state.peak = None  # the batched kernel does not measure max |acc|
            self._fold_plain(state, ups, pieces, ws)
        _add_weights(state, (u.weight for u in ups), len(ups))
        if top is not None:
            state.peak = (state.count, state.weight, top)
        return state

    def fold_trusted(
        self,
        state: MeanState,
        xs: Sequence[Arr],
        weights: Sequence[float],
        scales: Sequence[float] | None = None,
    ) -> MeanState:
        """``fold_many`` of updates the caller has already validated: the same bits in
        ``acc``/``comp``, weight sum, compensation and count, without the fold's look at the
        values (float32: a scan or an undo copy and a test; float64: a ``max |x|`` pass).

        ``xs[k]`` is update k's flat delta over ``state``'s coordinates (e.g. a shard's slice of
        a received buffer, zero-copy); ``weights``/``scales`` as in :class:`Update` (scales
        default to 1). The caller guarantees what :func:`check_update` and :func:`check_peak`
        check, for the float32 accumulator also that no sum can overflow float32 (a running
        bound); if not, the state may be left changed and StateError is raised.
        """
        _live(state)
        if not xs:
            return state
        ss = [1.0] * len(xs) if scales is None else scales
        ws = np.array([float(w) * float(s) for w, s in zip(weights, ss, strict=True)], np.float64)
        acc, comp = state.acc, state.comp
        state.peak = None
        if comp is not None:  # float64: Neumaier's compensated kernel, as fold_many uses
            ok = _kernels.fold_compensated(acc, comp, xs, ws, use_numba=self.use_numba)
        elif _kernels.HAVE_NUMBA and _kernels._compiled(self.use_numba, acc.size, acc, *xs):
            _stream.fold_trusted_blocked(acc, xs, ws.astype(acc.dtype))
            ok = True
        else:  # small or non-native: the numpy kernel, minus the undo copy
            ok = _kernels.fold_plain(acc, acc, xs, ws, save_undo=False, use_numba=False)
        if not ok:
            raise StateError("a trusted fold left a non-finite accumulator: unvalidated input")
        _add_weights(state, weights, len(xs))
        return state

    def count_folded(self, state: MeanState, weights: Sequence[float]) -> MeanState:
        """The bookkeeping of updates whose values were already added to ``acc``/``comp`` by
        :meth:`fold_trusted` on slices of the state (a server folding an upload chunk by chunk
        as it arrives): the weight sum, its compensation and the count, as ``fold_trusted``
        of the whole updates would leave them."""
        state.peak = None
        _add_weights(state, weights, len(weights))
        return state

    def _stream(self, state: MeanState, u: Update, segs: list[Arr], w: float) -> float | None:
        """The streaming fold of one update (see :mod:`fedagg.core._stream`) into ``acc``,
        returning a bound on ``max |acc|`` after it; None, with ``acc`` untouched, when it does
        not apply or cannot rule out an overflow."""
        acc = state.acc
        if not _stream.streamable(acc, segs, use_numba=self.use_numba):
            return None
        top = _stream.peak(segs)
        if not math.isfinite(top):
            raise NonFiniteUpdate(u.client_id, "delta holds NaN or Inf values")
        known = state.peak
        wa = acc.dtype.type(w)
        if known is None or known[:2] != (state.count, state.weight):
            known = None  # the sums changed otherwise since: their bound is unknown
        elif not _stream.fits(known[2], float(wa), top, acc.dtype):
            known = None  # the running bound is too loose: measure the sums themselves
        if known is None:
            known = (state.count, state.weight, _stream.peak([acc]))
            state.peak = known
            if not (math.isfinite(known[2]) and _stream.fits(known[2], float(wa), top, acc.dtype)):
                return None
        _stream.fold_unchecked(acc, coord_layout(state.spec, [segs]), segs, wa)
        return _stream.bound_after(known[2], float(wa), top)

    def _fold_plain(
        self, state: MeanState, ups: list[Update], pieces: list[list[Arr]], ws: Arr
    ) -> None:
        if state.undo is None:
            state.undo = np.empty_like(state.acc)
        layout = coord_layout(state.spec, pieces)
        saved: list[tuple[int, int]] = []  # ranges whose pre-call values sit in undo
        for lo in range(0, len(ups), self.batch):
            hi = min(len(ups), lo + self.batch)
            for s0, s1, segs in batch_segments(layout, pieces, lo, hi):
                first = lo == 0
                ok = _kernels.fold_plain(
                    state.acc[s0:s1],
                    state.undo[s0:s1],
                    segs,
                    ws[lo:hi],
                    save_undo=first,
                    use_numba=self.use_numba,
                )
                if first:
                    saved.append((s0, s1))
                if not ok:
                    for r0, r1 in saved:
                        state.acc[r0:r1] = state.undo[r0:r1]
                    raise nonfinite_error(ups[lo:hi], pieces[lo:hi], self.use_numba)

    def _fold_compensated(
        self, state: MeanState, ups: list[Update], pieces: list[list[Arr]], ws: Arr
    ) -> None:
        assert state.comp is not None
        # check first (no undo buffers here): finite values, and no float64 overflow possible
        count = state.count + len(ups)
        for u, w, segs in zip(ups, ws, pieces, strict=True):
            peak = max((_kernels.max_abs(s, use_numba=self.use_numba) for s in segs), default=0.0)
            check_peak(u.client_id, float(w), peak, count=count, float64=True)
        layout = coord_layout(state.spec, pieces)
        for lo in range(0, len(ups), self.batch):
            hi = min(len(ups), lo + self.batch)
            for s0, s1, segs in batch_segments(layout, pieces, lo, hi):
                _kernels.fold_compensated(
                    state.acc[s0:s1], state.comp[s0:s1], segs, ws[lo:hi], use_numba=self.use_numba
                )

    def merge(self, state: MeanState, other: MeanState) -> MeanState:
        spec, version, accumulator = state.spec, state.version, state.accumulator
        check_mergeable(other, spec=spec, version=version, accumulator=accumulator)
        _live(state)
        _live(other)
        if other.count == 0:  # the identity: exactly nothing to add (not even a -0.0 sign)
            return state
        state.peak = None
        if state.count == 0:
            state.acc[...] = other.acc
            if state.comp is not None and other.comp is not None:
                state.comp[...] = other.comp
            state.weight, state.weight_comp = other.weight, other.weight_comp
            state.count = other.count
            return state
        if state.comp is not None and other.comp is not None:
            _kernels.merge_compensated(
                state.acc, state.comp, other.acc, other.comp, use_numba=self.use_numba
            )
        else:
            if state.undo is None:
                state.undo = np.empty_like(state.acc)
            state.undo[...] = state.acc
            with np.errstate(over="ignore", invalid="ignore"):
                state.acc += other.acc
            if not _kernels.all_finite(state.acc, use_numba=self.use_numba):
                state.acc[...] = state.undo
                raise StateError("merge overflows the float32 accumulator; use 'float64'")
        w, e = _two_sum(state.weight, other.weight)
        state.weight = w
        state.weight_comp += other.weight_comp + e
        state.count += other.count
        return state

    def finalize_flat(self, state: MeanState) -> Arr:
        """The mean: a new buffer, or a donated state's ``acc`` (:func:`donate`; same bits)."""
        _live(state)
        if state.count == 0:
            raise EmptyAggregate("no update was folded: nothing to finalize")
        total = state.weight + state.weight_comp
        acc, comp = state.acc, state.comp
        inplace = state.donated and acc.dtype == state.spec.dtype
        out = acc if inplace else np.empty(state.spec.size, state.spec.dtype)
        if not _stream.finalize_into(acc, comp, total, out, use_numba=self.use_numba):
            step = 1 << 16  # float64, a 512 KiB chunk at a time: a tiny total must not underflow
            for lo in range(0, out.size, step):
                hi = min(out.size, lo + step)
                part = acc[lo:hi].astype(np.float64)
                if comp is not None:
                    part += comp[lo:hi]
                part /= total
                out[lo:hi] = part
        if inplace:  # each quotient overwrote the sum it was computed from: the state is spent
            state.acc, state.comp, state.undo = np.empty(0, acc.dtype), None, None
        return out

    def finalize(self, state: MeanState) -> ArrayTree:
        return state.spec.unflatten(self.finalize_flat(state))

    def count(self, state: MeanState) -> int:
        return state.count


def mean(
    accumulator: Accumulator = "float32", *, batch: int = 64, backend: Backend = "auto"
) -> Mean:
    """The weighted mean (FedAvg's aggregator). See :class:`Mean`."""
    return Mean(accumulator=accumulator, batch=batch, backend=backend)


# --------------------------------------------------------------------------------------------
# Pre-transforms and composition
# --------------------------------------------------------------------------------------------


class PreTransform(Protocol):
    """A per-update transform applied before the aggregator (e.g. norm clipping).

    It returns a new :class:`Update` (usually with a new ``scale``) and never copies the delta;
    it raises an :class:`~fedagg.errors.UpdateError` to refuse the update.
    """

    def __call__(self, spec: ParamSpec, update: Update) -> Update: ...


@dataclass(frozen=True, slots=True)
class Composed:
    """Pre-transforms applied to every update before ``inner`` folds it. See :func:`compose`."""

    pre: tuple[PreTransform, ...]
    inner: Aggregator[Any]

    @property
    def decomposable(self) -> bool:
        return self.inner.decomposable

    def init(self, spec: ParamSpec, *, version: int | None = None) -> Any:
        return self.inner.init(spec, version=version)

    def _apply(self, state: Any, update: Update) -> Update:
        spec: ParamSpec = state.spec
        check_update(spec, getattr(state, "version", None), update)
        for t in self.pre:
            update = t(spec, update)
        return update

    def fold(self, state: Any, update: Update) -> Any:
        return self.inner.fold(state, self._apply(state, update))

    def fold_many(self, state: Any, updates: Iterable[Update]) -> Any:
        return self.inner.fold_many(state, [self._apply(state, u) for u in updates])

    def merge(self, state: Any, other: Any) -> Any:
        return self.inner.merge(state, other)

    def finalize(self, state: Any) -> ArrayTree:
        return self.inner.finalize(state)

    def finalize_flat(self, state: Any) -> Arr:
        return self.inner.finalize_flat(state)

    def count(self, state: Any) -> int:
        return self.inner.count(state)


def compose(*parts: PreTransform | Aggregator[Any]) -> Composed:
    """``compose(clip_norm(1.0), reject_nonfinite(), mean())``: pre-transforms, then the
    aggregator (last). The result is an aggregator with the inner one's state."""
    if not parts:
        raise ConfigError("compose needs at least an aggregator")
    *pre, inner = parts
    if not isinstance(inner, Aggregator):
        raise ConfigError("the last argument of compose must be an aggregator")
    for p in pre:
        if isinstance(p, Aggregator) or not callable(p):
            raise ConfigError(f"{p!r} is not a pre-transform; only the last part may aggregate")
    if isinstance(inner, Composed):
        return Composed(tuple(pre) + inner.pre, inner.inner)  # type: ignore[arg-type]
    return Composed(tuple(pre), inner)  # type: ignore[arg-type]


def scaled(update: Update, factor: float) -> Update:
    """``update`` with its delta scaled by ``factor`` (no copy of the delta)."""
    return replace(update, scale=update.scale * factor)
