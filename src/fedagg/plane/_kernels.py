"""The receiver's one-pass kernels of the shared-memory plane: copy an update and take its
``max |x|`` in one pass (:func:`copy_peak`), ``max |x|`` alone (:func:`peak`), the workers'
validated fold (:func:`fold_validated`) and their thread count (:func:`set_threads`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedagg.core import kernels as _kernels
from fedagg.core.aggregate import Mean, MeanState
from fedagg.plane._shards import Arr

__all__ = ["copy_peak", "fold_validated", "nan_first", "peak", "set_threads"]

# --------------------------------------------------------------------------------------------
# Kernels: one pass that copies an update and takes max |x| from its bit patterns
# --------------------------------------------------------------------------------------------

_MASKS = {4: (np.uint32, 0x7FFFFFFF), 8: (np.uint64, 0x7FFFFFFFFFFFFFFF)}

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


def set_threads(threads: int) -> None:
    """Numba's thread count in a worker process (1: the workers are the parallelism)."""
    if _kernels.HAVE_NUMBA:
        import numba as nb

        with contextlib.suppress(Exception):
            config: Any = nb.config
            nb.set_num_threads(max(1, min(threads, int(config.NUMBA_NUM_THREADS))))


def fold_validated(
    state: MeanState,
    xs: Sequence[Arr],
    weights: Sequence[float],
    scales: Sequence[float],
    *,
    use_numba: bool = True,
) -> None:
    """:meth:`Mean.fold_trusted <fedagg.core.aggregate.Mean.fold_trusted>` with the numba
    kernels allowed or not (what the workers run on the updates the receiver validated)."""
    Mean(state.accumulator, backend="auto" if use_numba else "numpy").fold_trusted(
        state, xs, weights, scales
    )


def nan_first(x: float) -> float:
    """Sort key for max(): NaN beats everything (so a NaN peak is never lost)."""
    return math.inf if math.isnan(x) else x
