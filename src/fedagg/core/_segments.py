"""Helpers of :class:`~fedagg.core.aggregate.Mean`'s batched folds: which coordinate ranges
to fold, each batch's segments over them, and the error of a refused batch."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy.typing as npt

from fedagg.core import kernels as _kernels
from fedagg.core.spec import ParamSpec
from fedagg.core.update import Update
from fedagg.errors import NonFiniteUpdate

__all__ = ["batch_segments", "layout", "nonfinite_error"]

Arr = npt.NDArray[Any]


def layout(spec: ParamSpec, pieces: list[list[Arr]]) -> list[tuple[int, int]]:
    """Coordinate ranges to fold: the whole buffer if every update is one flat piece."""
    if all(len(p) == 1 for p in pieces):
        return [(0, spec.size)]
    off = spec.offsets
    return [(off[i], off[i + 1]) for i in range(len(spec))]


def batch_segments(
    layout: list[tuple[int, int]], pieces: list[list[Arr]], lo: int, hi: int
) -> Iterable[tuple[int, int, list[Arr]]]:
    for j, (s0, s1) in enumerate(layout):
        if s1 == s0:
            continue
        segs = []
        for p in pieces[lo:hi]:
            if len(layout) == 1 or len(p) > 1:
                segs.append(p[0] if len(layout) == 1 else p[j])
            else:  # a flat update, sliced to this layer (a view)
                segs.append(p[0][s0:s1])
        yield s0, s1, segs


def nonfinite_error(
    ups: Sequence[Update], pieces: Sequence[list[Arr]], use_numba: bool
) -> NonFiniteUpdate:
    for u, segs in zip(ups, pieces, strict=True):
        if not all(_kernels.all_finite(s, use_numba=use_numba) for s in segs):
            return NonFiniteUpdate(u.client_id, "delta holds NaN or Inf values")
    ids = ", ".join(repr(u.client_id) for u in ups)
    return NonFiniteUpdate(
        ups[0].client_id, f"weighted sum overflows float32 (batch of clients {ids})"
    )
