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

Why error-free products (the float64 accumulator): Neumaier's compensated sum keeps every
addition's rounding error, but a rounded product ``fl(w*x)`` would already have lost up to
``2**-53 |w x|`` before the sum sees it (e.g. ``0.1*3 - 0.3*1`` is off by 100%). Each product is
therefore split exactly, ``w*x = p + y`` with ``p = fl(w*x)``, by Dekker's ``TwoProduct``
(Veltkamp's split into 26-bit halves, plain multiplies and adds: no FMA, the same bits on any
IEEE-754 machine and in both backends), and ``y`` joins the addition's error in the
compensation term: Ogita, Rump and Oishi's ``Dot2`` (SIAM J. Sci. Comput. 26(6), 2005).
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

#: Veltkamp's splitter for float64: ``c = SPLIT*a; hi = c - (c - a); lo = a - hi`` gives
#: ``a == hi + lo`` exactly, each half with at most 26 significant bits.
_SPLIT = 134217729.0  # 2**27 + 1
#: ``SPLIT*a`` would overflow above this: such a factor is split (and its product's error
#: computed) at ``a * 2**-28``, then scaled back; every scaling by a power of 2 is exact there.
_SPLIT_MAX = 2.0**996
_DOWN = 2.0**-28
_UP = 2.0**28


def _split_weight(w: float) -> tuple[float, float, float, float]:
    """``(hi, lo, down, up)``: Veltkamp's split of ``w*down`` and the power of 2 undoing it.

    The kernels use the very same float64 operations on the weight (bit-identical results).
    """
    down, up = (_DOWN, _UP) if abs(w) > _SPLIT_MAX else (1.0, 1.0)
    a = w * down
    c = _SPLIT * a
    hi = c - (c - a)
    return hi, a - hi, down, up


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
    def _comp_block(acc: Arr, comp: Arr, xs: Any, ws: Arr, wide: bool, lo: int, hi: int) -> int:
        # Neumaier's compensated summation of error-free products (Dot2), per coordinate. No
        # fastmath: the compensation and the split are exactly what re-association (or a
        # contraction into an FMA) would change. ``wide``: float64 inputs, split like the
        # weight; a float32 input has 24 significant bits, so it is its own high half.
        m = hi - lo
        s = acc[lo:hi].copy()
        c = comp[lo:hi].copy()
        for k in range(len(xs)):
            x = xs[k][lo:hi]
            w = ws[k]
            # _split_weight, inline (numba cannot call the Python function)
            down = _DOWN if abs(w) > _SPLIT_MAX else 1.0
            up = _UP if abs(w) > _SPLIT_MAX else 1.0
            wa = w * down
            cw = _SPLIT * wa
            wh = cw - (cw - wa)
            wl = wa - wh
            nbig = 0
            if wide:  # values too large for SPLIT*x: rare, so looked for first
                for i in range(m):
                    nbig += abs(x[i]) > _SPLIT_MAX
            if wide and nbig == 0 and down == 1.0:  # the guarded loop below, minus the x1.0s
                for i in range(m):
                    xv = np.float64(x[i])
                    cx = _SPLIT * xv
                    xh = cx - (cx - xv)
                    xl = xv - xh
                    v = w * xv
                    y = wl * xl - (((v - wh * xh) - wl * xh) - wh * xl)
                    t = s[i] + v
                    e = ((s[i] - t) + v) if abs(s[i]) >= abs(v) else ((v - t) + s[i])
                    c[i] += e + y
                    s[i] = t
            elif wide:
                for i in range(m):
                    xv = np.float64(x[i])
                    big = abs(xv) > _SPLIT_MAX
                    fx = _DOWN if big else 1.0
                    ux = _UP if big else 1.0
                    xa = xv * fx
                    cx = _SPLIT * xa
                    xh = cx - (cx - xa)
                    xl = xa - xh
                    v = w * xv
                    vs = v * (fx * down)
                    y = (wl * xl - (((vs - wh * xh) - wl * xh) - wh * xl)) * (ux * up)
                    t = s[i] + v
                    e = ((s[i] - t) + v) if abs(s[i]) >= abs(v) else ((v - t) + s[i])
                    c[i] += e + y
                    s[i] = t
            else:
                for i in range(m):
                    xv = np.float64(x[i])
                    v = w * xv
                    y = ((wh * xv - v * down) + wl * xv) * up
                    t = s[i] + v
                    e = ((s[i] - t) + v) if abs(s[i]) >= abs(v) else ((v - t) + s[i])
                    c[i] += e + y
                    s[i] = t
        nbad = 0
        for i in range(m):
            nbad += not (np.isfinite(s[i]) and np.isfinite(c[i]))
        acc[lo:hi] = s
        comp[lo:hi] = c
        return nbad

    @_pjit_exact
    def _fold_comp_par(acc: Arr, comp: Arr, xs: Any, ws: Arr, wide: bool) -> bool:
        n = acc.size
        nblk = (n + BLOCK - 1) // BLOCK
        bad = np.zeros(nblk, np.int64)
        for b in prange(nblk):
            bad[b] = _comp_block(acc, comp, xs, ws, wide, b * BLOCK, min(n, (b + 1) * BLOCK))
        return bool(bad.sum() == 0)

    @_jit_exact
    def _fold_comp_ser(acc: Arr, comp: Arr, xs: Any, ws: Arr, wide: bool) -> bool:
        n = acc.size
        bad = 0
        for lo in range(0, n, BLOCK):
            bad += _comp_block(acc, comp, xs, ws, wide, lo, min(n, lo + BLOCK))
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
    """Compensated ``(acc, comp) += sum_k ws[k] * xs[k]`` in float64; True iff both stay finite.

    Every product ``ws[k] * xs[k][i]`` enters exactly: its rounded value is added to ``acc``
    and its rounding error, with the addition's, to ``comp`` (Dekker's TwoProduct, then
    Neumaier's step). Exact as long as no product underflows (``|w x| >= 2**-969`` or 0).
    Both backends give the same bits.
    """
    _same_size(acc, comp, xs)
    if _compiled(use_numba, acc.size, acc, *xs[:1]):
        kern = _fold_comp_par if _parallel(acc.size, len(xs)) else _fold_comp_ser
        wide = bool(xs[0].dtype.itemsize > 4) if xs else False
        return bool(kern(acc, comp, _typed(xs), ws.astype(np.float64), wide))
    with np.errstate(over="ignore", invalid="ignore"):
        _fold_comp_np(acc, comp, xs, ws)
    return bool(np.isfinite(acc).all() and np.isfinite(comp).all())


def _fold_comp_np(acc: Arr, comp: Arr, xs: Sequence[Arr], ws: Arr) -> None:
    """The numba kernel's arithmetic, block-vectorised: the same float64 operations in the same
    order, so the same bits (a scaling by 1.0, which changes nothing, is skipped)."""
    nb = min(_NP_BLOCK, acc.size)
    v, t, y, a, b = (np.empty(nb) for _ in range(5))
    mask = np.empty(nb, np.bool_)
    for lo in range(0, acc.size, _NP_BLOCK):
        hi = min(acc.size, lo + _NP_BLOCK)
        m = hi - lo
        s, c = acc[lo:hi], comp[lo:hi]
        v_, t_, y_, a_, b_, mask_ = v[:m], t[:m], y[:m], a[:m], b[:m], mask[:m]
        for x, w in zip(xs, ws, strict=True):
            wh, wl, down, up = _split_weight(float(w))
            xv = np.asarray(x[lo:hi], np.float64)
            np.multiply(xv, float(w), out=v_)  # the rounded product
            if x.dtype.itemsize > 4:  # y = wl*xl - (((v - wh*xh) - wl*xh) - wh*xl)
                np.abs(xv, out=a_)
                np.greater(a_, _SPLIT_MAX, out=mask_)
                if mask_.any():  # huge values: split at x * 2**-28 (rare)
                    fx = np.where(mask_, _DOWN, 1.0)
                    ux: Arr | float = np.where(mask_, _UP, 1.0)
                    xa = xv * fx
                    vs = v_ * (fx * down)
                else:
                    ux, xa = 1.0, xv
                    vs = v_ * down if down != 1.0 else v_
                np.multiply(xa, _SPLIT, out=a_)
                np.subtract(a_, xa, out=b_)
                np.subtract(a_, b_, out=a_)  # xh
                np.subtract(xa, a_, out=b_)  # xl
                np.multiply(a_, wh, out=y_)
                np.subtract(vs, y_, out=y_)
                np.multiply(a_, wl, out=a_)
                np.subtract(y_, a_, out=y_)
                np.multiply(b_, wh, out=a_)
                np.subtract(y_, a_, out=y_)
                np.multiply(b_, wl, out=b_)
                np.subtract(b_, y_, out=y_)
                if up != 1.0 or not isinstance(ux, float):
                    y_ *= ux * up
            else:  # a float32 value is its own high half: y = (wh*x - v) + wl*x
                np.multiply(xv, wh, out=y_)
                np.subtract(y_, v_ * down if down != 1.0 else v_, out=y_)
                np.multiply(xv, wl, out=a_)
                y_ += a_
                if up != 1.0:
                    y_ *= up
            # Neumaier: e = (s - t) + v if |s| >= |v| else (v - t) + s; c += e + y
            np.add(s, v_, out=t_)
            np.abs(s, out=a_)
            np.abs(v_, out=b_)
            np.greater_equal(a_, b_, out=mask_)
            np.subtract(s, t_, out=a_)
            a_ += v_
            np.subtract(v_, t_, out=b_)
            b_ += s
            np.copyto(b_, a_, where=mask_)
            b_ += y_
            c += b_
            s[...] = t_


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
