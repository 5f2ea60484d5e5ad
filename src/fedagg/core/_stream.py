"""The streaming fold: one update at a time into a plain (non-compensated) mean, no undo copy.

:meth:`Mean.fold <fedagg.core.aggregate.Mean.fold>` of a single update used the batched kernel:
copy each accumulator block to an undo buffer, add the update, test the result. That is four
to five model-sized memory streams per update (read the sums, write the undo copy and the
read its line for ownership first, read the update, write the sums back), and the kernel ran
multi-threaded, which stalls when updates arrive one by one with other work in between (the
OpenMP threads go to sleep and must be woken for every fold, and a thread of a 2-core machine
that another process holds delays the whole fold).

Here, instead, serially (no thread to wake or wait for; one core reads memory at about the
machine's read-once rate):

1. **scan**: ``max |x|`` of the update, as an integer maximum over the bits of ``|x|`` (for IEEE
   floats the order of the magnitudes' bit patterns is the order of the magnitudes, and every
   NaN or infinity lies above the largest finite value). One vectorised read of the update,
   from its end back to its start (64 KiB blocks, each forwards): the end, written last, is
   what is still in cache, and the start, read last, is in cache when the fold begins there.
   A NaN or infinity anywhere refuses the update before any state was touched.
2. **bound**: the state remembers a bound on ``max |acc|`` from its previous streaming fold
   (keyed by its count and weight: any other change of the sums makes it unknown, and it is
   then measured once, as when the bound has grown too loose to pass). If
   ``(max|acc| + |w| max|x|) (1 + 2**-20)`` stays below the dtype's largest value, no sum can
   overflow, and that same expression bounds the sums after the fold (the next fold's bound:
   no pass over the sums to measure them); otherwise (never in practice) the caller takes the
   checked path with its undo copy, whose result and error are the same.
3. **fold**: ``acc[i] += w * x[i]``, one serial stream per segment. Three streams: read the
   update (its start still in cache from the scan), read and write the sums.

Bits: every coordinate gets the very operation the batched kernel and numpy apply,
``acc = acc + w*x`` in the accumulator's dtype, with no fast-math (no FMA contraction), so the
result is bit-identical to the old path's, and a refused update leaves the state untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.core import kernels as _kernels

__all__ = [
    "STREAM_MIN_SIZE",
    "bound_after",
    "finalize_into",
    "fits",
    "fold_trusted_blocked",
    "fold_unchecked",
    "peak",
    "save_fold",
    "streamable",
]

Arr = npt.NDArray[Any]

#: Models smaller than this take the batched kernel (its undo copy then sits in cache).
STREAM_MIN_SIZE = 1 << 16
#: Elements per fold block: 4Ki float32 = 16 KiB, so the block's max is taken from L1.
_BLOCK = 4096
#: Elements per block of the scan (64 KiB of float32), scanned from the last block back.
_SCAN = 16384
#: Relative margin of the overflow bound: far above the two roundings (2**-24 each) it covers.
_MARGIN = 1.0 + 2.0**-20

_UINT: dict[int, np.dtype[Any]] = {4: np.dtype(np.uint32), 8: np.dtype(np.uint64)}
_FLOAT: dict[int, np.dtype[Any]] = {4: np.dtype(np.float32), 8: np.dtype(np.float64)}
_MASK = {4: np.uint32(0x7FFFFFFF), 8: np.uint64(0x7FFFFFFFFFFFFFFF)}
_NATIVE = (np.dtype(np.float32), np.dtype(np.float64))
_FMAX = {4: float(np.finfo(np.float32).max), 8: float(np.finfo(np.float64).max)}
#: The bit pattern of +inf: every |NaN| and |inf| has bits >= it, every finite value below.
_INF_BITS = {4: 0x7F800000, 8: 0x7FF0000000000000}


if _kernels.HAVE_NUMBA:
    import numba

    _jit = numba.njit(cache=True, nogil=True)

    @_jit
    def _max_fwd(xb: Arr, mask: Any) -> Any:  # pragma: no cover - jitted
        # max over the bit patterns of |x| (sign bit cleared): an integer reduction, vectorised
        m = mask - mask
        for i in range(xb.size):
            v = xb[i] & mask
            m = v if v > m else m
        return m

    @_jit
    def _max_bits(xb: Arr, mask: Any) -> Any:  # pragma: no cover - jitted
        # the blocks from the last to the first (each forwards, for the prefetchers): the end of
        # an update was written last (built, received), so it is the part still in cache, and
        # the start, read last here, is still there when the fold begins with it
        m = mask - mask
        n = xb.size
        for b in range((n + _SCAN - 1) // _SCAN - 1, -1, -1):
            v = _max_fwd(xb[b * _SCAN : min(n, (b + 1) * _SCAN)], mask)
            m = v if v > m else m
        return m

    @_jit
    def _fold_one(acc: Arr, x: Arr, w: Any) -> None:  # pragma: no cover - jitted
        # acc += w*x in acc's dtype, no fast-math: the very operation of every other fold
        for i in range(acc.size):
            acc[i] += w * x[i]

    @_jit
    def _save_fold_nb(acc: Arr, undo: Arr, x: Arr, w: Any) -> int:  # pragma: no cover - jitted
        # one pass, while each line is in cache: undo = acc; acc += w*x (the very operation of
        # every other fold, no fast-math); the count of non-finite sums (an overflow)
        nbad = 0
        for i in range(acc.size):
            a = acc[i]
            undo[i] = a
            v = a + w * x[i]
            acc[i] = v
            nbad += not np.isfinite(v)
        return nbad

    @_jit
    def _fold_trusted_nb(acc: Arr, xs: Any, ws: Arr) -> None:  # pragma: no cover - jitted
        # acc += sum_k ws[k] * xs[k], in acc's dtype, no fast-math: each ``a += w*x`` rounds
        # the product and the sum exactly as the batched folds and numpy do (same bits). One
        # update: a single stream; several: one cache block of acc at a time, read and written
        # once for all of them.
        n = acc.size
        if len(xs) == 1:
            x = xs[0]
            w = ws[0]
            for i in range(n):
                acc[i] += w * x[i]
            return
        for lo in range(0, n, _kernels.BLOCK):
            hi = min(n, lo + _kernels.BLOCK)
            a = acc[lo:hi]
            for k in range(len(xs)):
                xk = xs[k][lo:hi]
                wk = ws[k]
                for i in range(hi - lo):
                    a[i] += wk * xk[i]

    @_jit
    def _quotient(acc: Arr, total: float, out: Arr) -> None:  # pragma: no cover - jitted
        # numpy's finalize: float64(acc) / total, rounded to out's dtype (the same bits)
        for i in range(acc.size):
            out[i] = np.float64(acc[i]) / total

    @_jit
    def _quotient_comp(acc: Arr, comp: Arr, total: float, out: Arr) -> None:  # pragma: no cover
        for i in range(acc.size):
            out[i] = (np.float64(acc[i]) + comp[i]) / total


def _bits(x: Arr) -> tuple[Arr, Any]:
    size = x.dtype.itemsize
    return x.view(_UINT[size]), _MASK[size]


def _as_float(bits: Any, size: int) -> float:
    return float(np.asarray(bits, _UINT[size]).view(_FLOAT[size]))


def streamable(acc: Arr, segs: Sequence[Arr], *, use_numba: bool) -> bool:
    """Whether the streaming kernels can fold ``segs`` into ``acc``: compiled kernels allowed,
    a model of at least :data:`STREAM_MIN_SIZE`, native float dtypes only."""
    return (
        use_numba
        and _kernels.HAVE_NUMBA
        and acc.size >= STREAM_MIN_SIZE
        and acc.dtype in _NATIVE
        and all(s.dtype in _NATIVE for s in segs)
    )


def peak(xs: Sequence[Arr]) -> float:
    """``max |x|`` over the arrays (1-D, native float dtypes), exactly; ``math.inf`` if one
    holds a NaN or an infinity. Serial: one integer-max pass over each array's bits, from the
    last array to the first (see ``_max_bits``)."""
    top = 0.0
    for x in reversed(xs):
        if x.size == 0:
            continue
        xb, mask = _bits(x)
        m = int(_max_bits(xb, mask))
        size = x.dtype.itemsize
        if m >= _INF_BITS[size]:
            return math.inf
        top = max(top, _as_float(m, size))
    return top


def fits(acc_peak: float, w: float, x_peak: float, dtype: np.dtype[Any]) -> bool:
    """True if ``acc + w*x`` cannot overflow ``dtype`` at any coordinate when ``max |acc|``
    is at most ``acc_peak`` and ``max |x|`` is ``x_peak`` (both finite): the sum's two
    roundings are covered by a relative margin of ``2**-20``."""
    return (acc_peak + abs(w) * x_peak) * _MARGIN < _FMAX[dtype.itemsize]


def bound_after(acc_peak: float, w: float, x_peak: float) -> float:
    """An upper bound of ``max |acc + w*x|`` (every coordinate's two roundings covered, as in
    :func:`fits`) when ``max |acc| <= acc_peak`` and ``max |x| = x_peak``: what the next
    fold's :func:`fits` can check instead of measuring ``max |acc|``."""
    return (acc_peak + abs(w) * x_peak) * _MARGIN


def fold_unchecked(
    acc: Arr, layout: Sequence[tuple[int, int]], segs: Sequence[Arr], w: Any
) -> None:
    """``acc += w * x`` (``w`` in ``acc``'s dtype) for the update's segments, laid out as in
    :func:`fold_unchecked`'s caller gives; the caller has checked :func:`fits`."""
    for j, (s0, s1) in enumerate(layout):
        if s1 > s0:
            _fold_one(acc[s0:s1], segs[0][s0:s1] if len(segs) == 1 else segs[j], w)


def save_fold(acc: Arr, undo: Arr, x: Arr, w: float) -> bool | None:
    """``undo[:] = acc; acc += w * x`` in one serial pass (``w`` rounded to ``acc``'s dtype
    first, as :meth:`Mean.fold_trusted <fedagg.core.aggregate.Mean.fold_trusted>` does: the
    same bits), for a fold on receive that saves its pre-image as it folds. False if a sum is
    not finite (an overflow, for finite ``x``: ``undo`` then holds the pre-image of the whole
    range); None, with nothing touched, unless compiled kernels run and ``acc``, ``undo`` and
    ``x`` are float32 or float64 (the caller then copies and folds separately)."""
    if not (
        _kernels.HAVE_NUMBA
        and acc.dtype in _NATIVE
        and undo.dtype == acc.dtype
        and x.dtype in _NATIVE
        and acc.shape == undo.shape == x.shape
    ):
        return None
    return int(_save_fold_nb(acc, undo, x, acc.dtype.type(w))) == 0


def fold_trusted_blocked(acc: Arr, xs: Sequence[Arr], ws: Arr) -> None:
    """``acc += sum_k ws[k] * xs[k]`` (``ws`` in ``acc``'s dtype) with no check at all: what
    :meth:`Mean.fold_trusted <fedagg.core.aggregate.Mean.fold_trusted>` runs when compiled."""
    _fold_trusted_nb(acc, _kernels._typed(xs), ws)


def finalize_into(acc: Arr, comp: Arr | None, total: float, out: Arr, *, use_numba: bool) -> bool:
    """``out = (float64(acc) + comp) / total`` in ``out``'s dtype, serially, in one pass (no
    temporary); False, with ``out`` untouched, unless compiled kernels may run and ``out`` is
    float32 or float64 (the caller then computes it chunk by chunk in numpy: the same bits)."""
    if not (use_numba and _kernels.HAVE_NUMBA and out.dtype in _NATIVE and acc.dtype in _NATIVE):
        return False
    if comp is None:
        _quotient(acc, total, out)
    else:
        _quotient_comp(acc, comp, total, out)
    return True
