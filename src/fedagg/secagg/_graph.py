"""SecAgg+'s communication graph: each client shares its secrets with, and masks against, only
its ``k`` neighbours (Bell et al., CCS 2020), ``k = O(log n)``.

The graph is a **random circulant**: the ids are shuffled by a generator seeded from the round's
public seed, laid on a ring, and each one is joined to the ``k/2`` nearest on either side. So it
is exactly ``k``-regular (``k`` even), symmetric, connected, and anyone holding the seed rebuilds
the same graph (clients check the server's neighbour lists against it). Odd ``k`` is rounded up;
``k >= n - 1`` gives the complete graph (what small rounds use: :func:`default_degree`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np

from fedagg.errors import ConfigError

__all__ = ["default_degree", "default_threshold", "neighbours"]


def default_degree(n: int) -> int:
    """``k = 2⌈1.5·log2 n⌉`` (even), or ``n - 1`` (complete) when that is not smaller: complete
    up to 12 clients, 14 at 20, 30 at 1,000, 42 at 10,000."""
    if n < 2:
        raise ConfigError(f"secure aggregation needs at least 2 clients, got {n}")
    return min(n - 1, 2 * math.ceil(1.5 * math.log2(n)))


def default_threshold(degree: int) -> int:
    """``t = ⌊k/2⌋ + 1``: a strict majority of the neighbours, the least ``t`` for which no
    ``t`` honest neighbours can hand out both kinds of share of the same client (each gives only
    one kind, and ``2t > k``)."""
    return degree // 2 + 1


def neighbours(ids: Sequence[int], degree: int, seed: bytes) -> dict[int, frozenset[int]]:
    """The neighbours of every id (symmetric: ``v in g[u]`` iff ``u in g[v]``; never itself)."""
    ids = sorted(ids)
    n = len(ids)
    if n < 2 or len(set(ids)) != n:
        raise ConfigError(f"the graph needs at least 2 distinct client ids, got {n}")
    if degree < 1:
        raise ConfigError(f"degree must be >= 1, got {degree}")
    if degree >= n - 1:
        everyone = frozenset(ids)
        return {u: everyone - {u} for u in ids}
    half = (degree + 1) // 2
    if 2 * half >= n - 1:
        everyone = frozenset(ids)
        return {u: everyone - {u} for u in ids}
    digest = hashlib.sha256(b"fedagg/secagg/v1/graph" + seed).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "big"))
    ring = [ids[i] for i in rng.permutation(n)]
    out: dict[int, set[int]] = {u: set() for u in ids}
    for i, u in enumerate(ring):
        for j in range(1, half + 1):
            v = ring[(i + j) % n]
            out[u].add(v)
            out[v].add(u)
    return {u: frozenset(vs) for u, vs in out.items()}
