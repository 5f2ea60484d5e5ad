"""The Gram matrix of a round's updates, summed over fixed coordinate chunks (the one pass
the distance-based robust rules make over the updates). See :mod:`fedagg.core.robust`."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.errors import EmptyAggregate

__all__ = ["GRAM_CHUNK", "Gram", "gram", "gram_sum"]

Arr = npt.NDArray[Any]
F64 = npt.NDArray[np.float64]

#: Coordinates per Gram chunk. Every distance-based rule sums its Gram matrix over chunks of
#: exactly these columns (aligned to absolute coordinates), in chunk order, whatever the I/O
#: block size or store: the grouping of the float64 sums is fixed by the model size alone.
GRAM_CHUNK = 4096


@dataclass(frozen=True, slots=True)
class Gram:
    """A Gram matrix accumulated over fixed coordinate chunks, each chunk centred on its own
    column means: ``X X^T = centred + u 1^T + 1 u^T + s``.

    Distances depend only on ``centred`` (the cross terms cancel exactly), so
    :meth:`sq_dists` never sees the cancellation of a large common component, and its result
    is exactly symmetric: two updates that are each other's nearest neighbour get bit-equal
    distances (an exact tie stays a tie)."""

    centred: F64
    u: F64
    s: float

    def full(self) -> F64:
        """``X X^T`` (float64)."""
        out: F64 = self.centred + (self.u[:, None] + self.u[None, :]) + self.s
        return out

    def sq_dists(self) -> F64:
        """Squared pairwise distances (exactly symmetric, zero on the diagonal)."""
        g = self.centred
        diag = np.diag(g)
        out: F64 = np.maximum((diag[:, None] + diag[None, :]) - 2.0 * g, 0.0)
        np.fill_diagonal(out, 0.0)
        return out

    def spread(self) -> float:
        """The median centred squared norm: the scale of the distances' rounding errors."""
        return float(np.median(np.diag(self.centred)))


class _GramAcc:
    """Accumulates ``Gram`` over :data:`GRAM_CHUNK`-column chunks from blocks of any width."""

    def __init__(self, centre: bool) -> None:
        self.centre = centre
        self.g: F64 | None = None
        self.u: F64 | None = None
        self.s = 0.0
        self.pend: F64 | None = None
        self.fill = 0

    def add(self, x: F64) -> None:
        """The next columns (in coordinate order) of every row."""
        k = x.shape[1]
        pos = 0
        while pos < k:
            if self.fill == 0 and k - pos >= GRAM_CHUNK:
                self._chunk(x[:, pos : pos + GRAM_CHUNK])
                pos += GRAM_CHUNK
                continue
            if self.pend is None:
                self.pend = np.empty((len(x), GRAM_CHUNK))
            take = min(GRAM_CHUNK - self.fill, k - pos)
            self.pend[:, self.fill : self.fill + take] = x[:, pos : pos + take]
            self.fill += take
            pos += take
            if self.fill == GRAM_CHUNK:
                self._chunk(self.pend)
                self.fill = 0

    def _chunk(self, x: F64) -> None:
        if self.g is None:
            self.g = np.zeros((len(x), len(x)))
            self.u = np.zeros(len(x))
        assert self.u is not None
        if self.centre:
            mu = x.mean(axis=0)
            xc = x - mu  # a fresh C-contiguous array: BLAS sees the same input whatever x was
            self.g += xc @ xc.T
            self.u += xc @ mu
            self.s += float(mu @ mu)
        else:
            xc = np.ascontiguousarray(x)
            self.g += xc @ xc.T

    def result(self) -> Gram:
        if self.fill:
            assert self.pend is not None
            self._chunk(self.pend[:, : self.fill])
            self.fill = 0
        if self.g is None:
            raise EmptyAggregate("no coordinates")
        assert self.u is not None
        return Gram(self.g, self.u, self.s)


def gram_sum(
    blocks: Iterable[tuple[int, int, F64]], extra: Arr | None = None, *, centre: bool = True
) -> Gram:
    """The :class:`Gram` of the rows delivered block by block (blocks of any width, in
    coordinate order), plus ``extra`` as a last row. ``centre=False`` sums the plain products
    (then ``centred`` is ``X X^T`` itself: an all-zero row has an exactly zero norm)."""
    acc = _GramAcc(centre)
    for c0, c1, blk in blocks:
        acc.add(blk if extra is None else np.vstack([blk, extra[c0:c1].astype(np.float64)]))
    return acc.result()


def gram(blocks: Iterable[tuple[int, int, F64]], extra: Arr | None = None) -> F64:
    """``X X^T`` (float64) of the rows delivered block by block, plus ``extra`` as a last row.

    Each fixed chunk of :data:`GRAM_CHUNK` coordinates is centred on its own column means
    before its product, and the cross terms added back: inner products are sums of the same
    float64 products, but the centred part (what distances depend on) does not lose its digits
    to a large common component. The grouping depends on the model size only, not on the
    blocks."""
    return gram_sum(blocks, extra).full()
