"""The coordinate-wise robust rules: the median and the trimmed mean, sorting one coordinate
block at a time. See :mod:`fedagg.core.robust`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.core._spool import BLOCK_BYTES, Spooled, SpoolState, StoreFactory, check_f, need_updates
from fedagg.errors import ConfigError

__all__ = ["CoordinateMedian", "TrimmedMean", "median", "trimmed_mean"]

Arr = npt.NDArray[Any]


@dataclass(frozen=True, slots=True)
class CoordinateMedian(Spooled):
    """The coordinate-wise median. For an even number of updates it is the mean of the two
    middle values (numpy's rule; ``torch.median`` would return the lower one)."""

    def finalize_flat(self, state: SpoolState) -> Arr:
        need_updates(state, 1, "the median")
        out = np.empty(state.spec.size, state.spec.dtype)
        n = state.count
        for c0, c1, blk in self._blocks(state):
            srt = np.sort(blk, axis=0)  # faster than np.median along a short axis
            mid = srt[n // 2] if n % 2 else (srt[n // 2 - 1] + srt[n // 2]) / 2.0
            out[c0:c1] = mid
        return out


@dataclass(frozen=True, slots=True)
class TrimmedMean(Spooled):
    """Per coordinate, drop the ``b`` largest and ``b`` smallest values and average the rest.

    ``b`` is given (``b = f`` in the Byzantine-robust literature) or ``int(beta * n)``
    (Flower's FedTrimmedAvg); with too few updates it is lowered to ``(n - 1) // 2``.
    """

    b: int | None = None
    beta: float | None = None

    def __post_init__(self) -> None:
        if (self.b is None) == (self.beta is None):
            raise ConfigError("give exactly one of b (values cut per side) and beta (fraction)")
        if self.b is not None:
            check_f(self.b)
        if self.beta is not None and not 0 <= self.beta < 0.5:
            raise ConfigError(f"beta must be in [0, 0.5), got {self.beta!r}")

    def cut(self, n: int) -> int:
        b = self.b if self.b is not None else int((self.beta or 0.0) * n)
        return min(b, (n - 1) // 2)

    def finalize_flat(self, state: SpoolState) -> Arr:
        n = need_updates(state, 1, "the trimmed mean")
        b = self.cut(n)
        out = np.empty(state.spec.size, state.spec.dtype)
        for c0, c1, blk in self._blocks(state):
            srt = np.sort(blk, axis=0)
            out[c0:c1] = srt[b : n - b].mean(axis=0)
        return out


def median(
    *, spool: StoreFactory | None = None, block_bytes: int = BLOCK_BYTES
) -> CoordinateMedian:
    """The coordinate-wise median."""
    return CoordinateMedian(spool, block_bytes)


def trimmed_mean(
    b: int | None = None,
    *,
    beta: float | None = None,
    spool: StoreFactory | None = None,
    block_bytes: int = BLOCK_BYTES,
) -> TrimmedMean:
    """The coordinate-wise trimmed mean, cutting ``b`` (or ``int(beta n)``) per side."""
    return TrimmedMean(spool, block_bytes, b, beta)
