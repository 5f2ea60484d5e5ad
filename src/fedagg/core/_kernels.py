"""Fold kernels: cache-blocked weighted sums, compiled with numba, with a numpy fallback.

Every kernel here is pure: it reads its inputs and writes only the arrays it is handed.

Why blocked: folding one update at a time reads the update, reads the accumulator and writes
it back: three model-sized memory streams per update. Folding a batch of K queued updates one
cache block at a time reads the accumulator block once, adds K update blocks into it while it
sits in L1/L2, and writes it back once, so the traffic per update tends to the update's own bytes
(the read-once bound) as K grows.

Why an undo buffer: a NaN can sit at the last coordinate of the last update of a batch, after
every other block was already written. Before its block is changed the kernel copies the
accumulator block into ``undo`` (one write stream per batch, amortised over K updates); when the
batch turns out bad the caller copies ``undo`` back, so the state is bit-for-bit what it was.
The check itself is free: a non-finite input (or an overflow) leaves a non-finite accumulator
value, and the kernel tests the block while it is still in cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "HAVE_NUMBA",
    "all_finite",
    "fold_compensated",
    "fold_plain",
    "max_abs",
    "merge_compensated",
    "sum_squares",
]

Arr = npt.NDArray[Any]

#: Elements per cache block: 32Ki float32 = 128 KiB of accumulator, well inside L2.
BLOCK = 32768
_NP_BLOCK = 1 << 18

try:  # pragma: no cover - exercised by whichever environment runs the tests
    import numba
    from numba import prange
    from numba.typed import List as _TypedList

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover
    HAVE_NUMBA = False


if HAVE_NUMBA:
    # The folds use no fast-math at all: each ``a += w*x`` rounds the product and the sum
    # exactly as numpy does, so the numba and numpy paths (and so every segmentation of an
    # update) give the same bits. The loops still vectorise across coordinates. The norm and
    # finiteness reductions may re-associate; they never use 'nnan'/'ninf', so the checks
    # survive ('x - x' tricks do not: LLVM folds them under 'reassoc').
    _FM = {"nsz", "arcp", "contract", "reassoc"}
    _jit = numba.njit(fastmath=_FM, cache=True, nogil=True)
    _jit_exact = numba.njit(cache=True, nogil=True)
    _pjit = numba.njit(parallel=True, fastmath=_FM, cache=True, nogil=True)
    _pjit_exact = numba.njit(parallel=True, cache=True, nogil=True)

    # Each kernel is one block function plus two drivers: a serial loop for small work (a
    # parallel launch costs ~0.1-1 ms of thread wake-up) and a prange loop for large work.

    @_jit_exact
    def _plain_block(
        acc: Arr, undo: Arr, xs: Any, ws: Arr, save_undo: bool, lo: int, hi: int
    ) -> int:
        m = hi - lo
        a = acc[lo:hi]
        loc = np.empty(m, acc.dtype)
        for i in range(m):
            loc[i] = a[i]
        if save_undo:
            u = undo[lo:hi]
            for i in range(m):
                u[i] = loc[i]
        for k in range(len(xs)):
            x = xs[k][lo:hi]
            w = ws[k]
            for i in range(m):
                loc[i] += w * x[i]
        nbad = 0
        for i in range(m):
            a[i] = loc[i]
            nbad += not np.isfinite(loc[i])
        return nbad

    @_pjit_exact
    def _fold_plain_par(acc: Arr, undo: Arr, xs: Any, ws: Arr, save_undo: bool) -> bool:
        n = acc.size
        nblk = (n + BLOCK - 1) // BLOCK
        bad = np.zeros(nblk, np.int64)
        for b in prange(nblk):
            bad[b] = _plain_block(acc, undo, xs, ws, save_undo, b * BLOCK, min(n, (b + 1) * BLOCK))
        return bool(bad.sum() == 0)

    @_jit_exact
    def _fold_plain_ser(acc: Arr, undo: Arr, xs: Any, ws: Arr, save_undo: bool) -> bool:
        n = acc.size
        bad = 0
        for lo in range(0, n, BLOCK):
            bad += _plain_block(acc, undo, xs, ws, save_undo, lo, min(n, lo + BLOCK))
        return bool(bad == 0)

    @_jit_exact
    def _comp_block(acc: Arr, comp: Arr, xs: Any, ws: Arr, lo: int, hi: int) -> int:
        # Neumaier's compensated summation, per coordinate. No fastmath: the compensation
        # term is exactly what re-association would optimise away.
        m = hi - lo
        s = acc[lo:hi].copy()
        c = comp[lo:hi].copy()
        for k in range(len(xs)):
            x = xs[k][lo:hi]
            w = ws[k]
            for i in range(m):
                v = w * np.float64(x[i])
                t = s[i] + v
                if abs(s[i]) >= abs(v):
                    c[i] += (s[i] - t) + v
                else:
                    c[i] += (v - t) + s[i]
                s[i] = t
        nbad = 0
        for i in range(m):
            nbad += not (np.isfinite(s[i]) and np.isfinite(c[i]))
        acc[lo:hi] = s
        comp[lo:hi] = c
        return nbad

    @_pjit_exact
    def _fold_comp_par(acc: Arr, comp: Arr, xs: Any, ws: Arr) -> bool:
        n = acc.size
        nblk = (n + BLOCK - 1) // BLOCK
        bad = np.zeros(nblk, np.int64)
        for b in prange(nblk):
            bad[b] = _comp_block(acc, comp, xs, ws, b * BLOCK, min(n, (b + 1) * BLOCK))
        return bool(bad.sum() == 0)

    @_jit_exact
    def _fold_comp_ser(acc: Arr, comp: Arr, xs: Any, ws: Arr) -> bool:
        n = acc.size
        bad = 0
        for lo in range(0, n, BLOCK):
            bad += _comp_block(acc, comp, xs, ws, lo, min(n, lo + BLOCK))
        return bool(bad == 0)

    @_pjit_exact
    def _merge_comp_nb(s1: Arr, c1: Arr, s2: Arr, c2: Arr) -> None:
        for i in prange(s1.size):
            a = s1[i]
            v = s2[i]
            t = a + v
            e = ((a - t) + v) if abs(a) >= abs(v) else ((v - t) + a)
            s1[i] = t
            c1[i] = c1[i] + c2[i] + e

    @_jit
    def _count_nonfinite(x: Arr, lo: int, hi: int) -> int:
        xb = x[lo:hi]
        c = 0
        for i in range(hi - lo):
            c += not np.isfinite(xb[i])
        return c

    @_pjit
    def _all_finite_par(x: Arr) -> bool:
        n = x.size
        nblk = (n + BLOCK - 1) // BLOCK
        nbad = np.zeros(nblk, np.int64)
        for b in prange(nblk):
            nbad[b] = _count_nonfinite(x, b * BLOCK, min(n, (b + 1) * BLOCK))
        return bool(nbad.sum() == 0)

    @_jit_exact
    def _maxabs_block(x: Arr, lo: int, hi: int) -> float:
        xb = x[lo:hi]
        m = 0.0
        for i in range(hi - lo):
            v = abs(np.float64(xb[i]))
            if v != v:  # NaN: the answer, whatever follows (a later max must not hide it)
                return v
            if v > m:
                m = v
        return m

    @_pjit_exact
    def _max_abs_par(x: Arr) -> float:
        n = x.size
        nblk = (n + BLOCK - 1) // BLOCK
        part = np.zeros(nblk, np.float64)
        for b in prange(nblk):
            part[b] = _maxabs_block(x, b * BLOCK, min(n, (b + 1) * BLOCK))
        m = 0.0
        for b in range(nblk):
            if part[b] != part[b]:
                return float(part[b])
            if part[b] > m:
                m = part[b]
        return m

    @_jit_exact
    def _sumsq_block(x: Arr, lo: int, hi: int) -> float:
        xb = x[lo:hi]
        s = 0.0
        for i in range(hi - lo):
            v = np.float64(xb[i])
            s += v * v
        return s

    @_pjit_exact
    def _sum_squares_par(x: Arr) -> float:
        n = x.size
        nblk = (n + BLOCK - 1) // BLOCK
        part = np.zeros(nblk, np.float64)
        for b in prange(nblk):
            part[b] = _sumsq_block(x, b * BLOCK, min(n, (b + 1) * BLOCK))
        return float(part.sum())


#: Below this many elements of work a kernel runs serially (no thread wake-up).
PARALLEL_MIN_WORK = 1 << 20


def _parallel(n: int, k: int = 1) -> bool:
    return n > BLOCK and n * (k + 2) >= PARALLEL_MIN_WORK


#: Segments shorter than this fold faster in numpy: numba's typed list of inputs costs
#: ~15 us per update, more than the arithmetic on a small segment.
NUMBA_MIN_SIZE = 1 << 16


def _compiled(use_numba: bool, n: int, *arrays: Arr) -> bool:
    """Whether to use the numba kernels: large enough, and native float32/float64 only."""
    return use_numba and n >= NUMBA_MIN_SIZE and all(a.dtype in _NATIVE for a in arrays)


_NATIVE = (np.dtype(np.float32), np.dtype(np.float64))


def _readonly(x: Arr) -> Arr:
    """A read-only view, so that writable and read-only inputs share one numba type."""
    v = x.view()
    v.flags.writeable = False
    return v


def _typed(xs: Sequence[Arr]) -> Any:
    tl = _TypedList()
    for x in xs:
        tl.append(_readonly(x))
    return tl


def fold_plain(
    acc: Arr, undo: Arr, xs: Sequence[Arr], ws: Arr, *, save_undo: bool, use_numba: bool
) -> bool:
    """``acc += sum_k ws[k] * xs[k]`` in ``acc``'s dtype; True iff ``acc`` stays finite.

    With ``save_undo`` the previous ``acc`` is copied to ``undo`` first.
    """
    _same_size(acc, undo, xs)
    if _compiled(use_numba, acc.size, acc, *xs[:1]):
        kern = _fold_plain_par if _parallel(acc.size, len(xs)) else _fold_plain_ser
        return bool(kern(acc, undo, _typed(xs), ws.astype(acc.dtype), save_undo))
    with np.errstate(over="ignore", invalid="ignore"):
        return _fold_plain_np(acc, undo, xs, ws, save_undo)


def _fold_plain_np(acc: Arr, undo: Arr, xs: Sequence[Arr], ws: Arr, save_undo: bool) -> bool:
    ok = True
    scratch = np.empty(min(_NP_BLOCK, acc.size), acc.dtype)
    for lo in range(0, acc.size, _NP_BLOCK):
        hi = min(acc.size, lo + _NP_BLOCK)
        a = acc[lo:hi]
        if save_undo:
            undo[lo:hi] = a
        t = scratch[: hi - lo]
        for x, w in zip(xs, ws, strict=True):
            np.multiply(x[lo:hi], acc.dtype.type(w), out=t, casting="unsafe")
            a += t
        ok = ok and bool(np.isfinite(a).all())
    return ok


def fold_compensated(acc: Arr, comp: Arr, xs: Sequence[Arr], ws: Arr, *, use_numba: bool) -> bool:
    """Neumaier-compensated ``(acc, comp) += sum_k ws[k] * xs[k]`` in float64."""
    _same_size(acc, comp, xs)
    if _compiled(use_numba, acc.size, acc, *xs[:1]):
        kern = _fold_comp_par if _parallel(acc.size, len(xs)) else _fold_comp_ser
        return bool(kern(acc, comp, _typed(xs), ws.astype(np.float64)))
    with np.errstate(over="ignore", invalid="ignore"):
        _fold_comp_np(acc, comp, xs, ws)
    return bool(np.isfinite(acc).all() and np.isfinite(comp).all())


def _fold_comp_np(acc: Arr, comp: Arr, xs: Sequence[Arr], ws: Arr) -> None:
    for lo in range(0, acc.size, _NP_BLOCK):
        hi = min(acc.size, lo + _NP_BLOCK)
        s = acc[lo:hi]
        c = comp[lo:hi]
        for x, w in zip(xs, ws, strict=True):
            v = x[lo:hi].astype(np.float64) * float(w)
            t = s + v
            big = np.abs(s) >= np.abs(v)
            c += np.where(big, (s - t) + v, (v - t) + s)
            s[...] = t


def merge_compensated(s1: Arr, c1: Arr, s2: Arr, c2: Arr, *, use_numba: bool) -> None:
    """``(s1, c1) += (s2, c2)`` with the rounding error of the sum folded into ``c1``."""
    if use_numba and _parallel(s1.size) and s1.shape == c1.shape == s2.shape == c2.shape:
        _merge_comp_nb(s1, c1, s2, c2)
        return
    t = s1 + s2
    big = np.abs(s1) >= np.abs(s2)
    e = np.where(big, (s1 - t) + s2, (s2 - t) + s1)
    c1 += c2
    c1 += e
    s1[...] = t


def _same_size(acc: Arr, other: Arr, xs: Sequence[Arr]) -> None:
    if other.shape != acc.shape or any(x.shape != acc.shape for x in xs):
        raise ValueError("kernel inputs must all have the accumulator's shape")


def max_abs(x: Arr, *, use_numba: bool) -> float:
    """``max |x|`` in float64; inf or nan if ``x`` holds a non-finite value."""
    if x.size == 0:
        return 0.0
    if _compiled(use_numba, x.size, x):
        return float(_max_abs_par(_readonly(x)))
    if use_numba and x.dtype in _NATIVE:
        return float(_maxabs_block(_readonly(x), 0, x.size))
    with np.errstate(invalid="ignore"):
        if not all_finite(x, use_numba=False):
            return math.inf
        return float(np.abs(x).max())


def all_finite(x: Arr, *, use_numba: bool, parallel: bool = True) -> bool:
    if x.size == 0:
        return True
    if use_numba and x.dtype in _NATIVE:
        if parallel and _parallel(x.size):
            return bool(_all_finite_par(_readonly(x)))
        return bool(_count_nonfinite(_readonly(x), 0, x.size) == 0)
    return all(
        bool(np.isfinite(x[lo : lo + _NP_BLOCK]).all()) for lo in range(0, x.size, _NP_BLOCK)
    )


def sum_squares(x: Arr, *, use_numba: bool) -> float:
    """``sum(x**2)`` accumulated in float64 (inf or nan if ``x`` is not finite)."""
    if x.size == 0:
        return 0.0
    if use_numba and x.dtype in _NATIVE:
        if _parallel(x.size):
            return float(_sum_squares_par(_readonly(x)))
        return float(_sumsq_block(_readonly(x), 0, x.size))
    total = 0.0
    for lo in range(0, x.size, _NP_BLOCK):
        c = x[lo : lo + _NP_BLOCK].astype(np.float64)
        total += float(np.dot(c, c))
    return total
