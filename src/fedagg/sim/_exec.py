"""What every executor shares: the training call itself and how a dispatch is cut up."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["chunk_args", "split", "train_chunk"]

Arr = npt.NDArray[Any]


def train_chunk(
    algorithm: Any,
    model: Any,
    params: dict[str, Arr],
    datas: Sequence[Any],
    rngs: Sequence[np.random.Generator],
    epochs: Sequence[int],
    states: Sequence[Any],
    server_state: Any,
) -> list[tuple[Any, Any]]:
    """One batched ``train_many`` call (stacked parameters where the model allows). A client's
    result does not depend on which others share the call, so any cut gives the same model."""
    return list(
        algorithm.train_many(
            model,
            params,
            list(datas),
            list(rngs),
            epochs=list(epochs),
            states=list(states),
            server_state=server_state,
        )
    )


def split(n: int, parts: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` ranges cutting ``n`` jobs into at most ``parts`` contiguous, even chunks."""
    k = max(1, min(parts, n))
    bounds = [n * i // k for i in range(k + 1)]
    return [(a, b) for a, b in itertools.pairwise(bounds) if b > a]


def chunk_args(
    workers: int,
    algorithm: Any,
    model: Any,
    params: Any,
    datas: Sequence[Any],
    rngs: Sequence[np.random.Generator],
    epochs: Sequence[int],
    states: Sequence[Any],
    server_state: Any,
) -> list[tuple[Any, ...]]:
    """:func:`train_chunk`'s arguments for each of at most ``workers`` contiguous chunks."""
    return [
        (algorithm, model, params, datas[a:b], list(rngs[a:b]), list(epochs[a:b]),
         list(states[a:b]), server_state)
        for a, b in split(len(datas), workers)
    ]  # fmt: skip
