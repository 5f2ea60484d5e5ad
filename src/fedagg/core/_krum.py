"""The distance-based ranking rules: Krum, Multi-Krum and Bulyan, and the tie-breaking rule
every ranking shares (:data:`TIE_RTOL`). See :mod:`fedagg.core.robust`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.core._spool import BLOCK_BYTES, Spooled, SpoolState, StoreFactory, check_f, need_updates
from fedagg.errors import ConfigError

__all__ = [
    "TIE_RTOL",
    "Bulyan",
    "Krum",
    "bulyan",
    "krum",
    "krum_pick",
    "multi_krum",
    "pick_best",
]

Arr = npt.NDArray[Any]
F64 = npt.NDArray[np.float64]

#: Ranking rules (Krum, Multi-Krum, Bulyan's selection, SketchKrum) treat scores within
#: ``TIE_RTOL * (best + scale)`` of the best as tied, and take the earliest folded update
#: among them (job order; the canonical order in a deployment with ``order = "canonical"``).
#: ``scale`` is the rounding scale of a score: ``k`` times the median centred squared norm of
#: the updates (``k`` distances are summed). Rounding differences between BLAS kernels,
#: thread counts and CPUs are ~1e-13 of that scale, far inside the tolerance, so the picks do
#: not hinge on the last bits of a sum.
TIE_RTOL = 1e-9


def pick_best(scores: F64, m: int, scale: float = 0.0) -> list[int]:
    """The indices of the ``m`` lowest ``scores``, in the order picked: each pick is the
    earliest index whose score is within ``TIE_RTOL * (best + scale)`` of the lowest score
    left (see :data:`TIE_RTOL`)."""
    left = np.arange(len(scores))
    out: list[int] = []
    clean = np.where(np.isnan(scores), np.inf, scores)  # an overflowed score ranks last
    for _ in range(min(m, len(scores))):
        s = clean[left]
        lo = float(s.min())
        tol = TIE_RTOL * (lo + scale)
        tied = np.flatnonzero(s <= lo + (tol if math.isfinite(tol) else 0.0))
        i = int(left[tied[0]]) if len(tied) else int(left[0])
        out.append(i)
        left = left[left != i]
    return out


def _krum_scores(d2: F64, alive: Sequence[int], f: int) -> F64:
    """Krum's score of each alive update: the sum of its ``n - f - 2`` smallest squared
    distances to the other alive updates (summed smallest first: equal multisets of
    distances give bit-equal scores)."""
    sub = d2[np.ix_(alive, alive)]
    n = len(alive)
    k = n - f - 2
    np.fill_diagonal(sub, np.inf)
    part: F64 = np.sort(sub, axis=1)[:, :k]
    out: F64 = part.sum(axis=1)
    return out


def krum_pick(d2: F64, alive: Sequence[int], f: int, m: int, spread: float = 0.0) -> list[int]:
    """The ``m`` alive updates with the best Krum scores, ties (:data:`TIE_RTOL`) going to the
    earliest; ``spread`` is the distances' rounding scale (:meth:`Gram.spread`)."""
    k = max(0, len(alive) - f - 2)
    best = pick_best(_krum_scores(d2, alive, f), m, k * spread)
    return [alive[i] for i in best]


@dataclass(frozen=True, slots=True)
class Krum(Spooled):
    """Krum (Blanchard et al. 2017) and Multi-Krum: score each update by the sum of its
    ``n - f - 2`` smallest squared distances to the others; return the best one (``m = 1``)
    or the plain mean of the ``m`` best (Multi-Krum, scored once). Needs ``n >= 2f + 3``.
    Distances come from the Gram matrix (one pass over the updates); ties within
    :data:`TIE_RTOL` go to the earliest folded update."""

    f: int = 0
    m: int = 1

    def __post_init__(self) -> None:
        check_f(self.f)
        if isinstance(self.m, bool) or not isinstance(self.m, int) or self.m < 1:
            raise ConfigError(f"m must be an int >= 1, got {self.m!r}")

    def select(self, state: SpoolState) -> list[int]:
        """The indices (in fold order) of the selected updates."""
        n = need_updates(state, 2 * self.f + 3, "Krum")
        g = self._gram(state)
        return sorted(krum_pick(g.sq_dists(), range(n), self.f, self.m, g.spread()))

    def finalize_flat(self, state: SpoolState) -> Arr:
        chosen = self.select(state)
        return self._combine(state, np.full(len(chosen), 1.0 / len(chosen)), chosen)


@dataclass(frozen=True, slots=True)
class Bulyan(Spooled):
    """Bulyan (El Mhamdi et al. 2018): ``theta = n - 2f`` updates chosen by repeated Krum
    (each pick removed, scores recomputed on the rest); then per coordinate, the mean of the
    ``beta = theta - 2f`` selected values closest to their median. Needs ``n >= 4f + 3``."""

    f: int = 0

    def __post_init__(self) -> None:
        check_f(self.f)

    def select(self, state: SpoolState) -> list[int]:
        n = need_updates(state, 4 * self.f + 3, "Bulyan")
        g = self._gram(state)
        d2, spread = g.sq_dists(), g.spread()
        alive = list(range(n))
        chosen: list[int] = []
        for _ in range(n - 2 * self.f):
            f = min(self.f, max(0, len(alive) - 3))  # Krum over the remaining candidates
            (pick,) = krum_pick(d2, alive, f, 1, spread)
            chosen.append(pick)
            alive.remove(pick)
        return sorted(chosen)

    def finalize_flat(self, state: SpoolState) -> Arr:
        chosen = self.select(state)
        theta = len(chosen)
        beta = theta - 2 * self.f
        out = np.empty(state.spec.size, state.spec.dtype)
        for c0, c1, blk in self._blocks(state, chosen):
            med = np.median(blk, axis=0)
            idx = np.argsort(np.abs(blk - med), axis=0, kind="stable")[:beta]
            out[c0:c1] = np.take_along_axis(blk, idx, axis=0).mean(axis=0)
        return out


def krum(f: int, *, spool: StoreFactory | None = None, block_bytes: int = BLOCK_BYTES) -> Krum:
    """Krum with ``f`` assumed Byzantine clients."""
    return Krum(spool, block_bytes, f, 1)


def multi_krum(
    f: int, m: int, *, spool: StoreFactory | None = None, block_bytes: int = BLOCK_BYTES
) -> Krum:
    """Multi-Krum: the mean of the ``m`` updates with the best Krum scores."""
    return Krum(spool, block_bytes, f, m)


def bulyan(f: int, *, spool: StoreFactory | None = None, block_bytes: int = BLOCK_BYTES) -> Bulyan:
    """Bulyan over Krum with ``f`` assumed Byzantine clients."""
    return Bulyan(spool, block_bytes, f)
