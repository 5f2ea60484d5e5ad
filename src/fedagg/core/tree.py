"""Trees and shards of monoid states: the pure math behind hierarchical aggregation.

Nothing here does I/O. See :mod:`fedagg.hierarchy` for the processes, shared memory and Ray
actors that run it.
"""

from __future__ import annotations

from fedagg.errors import ConfigError

__all__ = ["shard_bounds"]


def shard_bounds(size: int, shards: int, align: int = 16) -> list[tuple[int, int]]:
    """``shards`` contiguous coordinate ranges ``[lo, hi)`` covering ``range(size)``.

    The ranges are as equal as ``align`` allows: every boundary but the last is a multiple of
    ``align`` elements (16 float32 = one 64-byte cache line, so two workers never write the
    same line). Shards may be empty when ``size`` is small.
    """
    if shards < 1:
        raise ConfigError(f"shards must be >= 1, got {shards}")
    if size < 0 or align < 1:
        raise ConfigError(f"invalid size {size} or alignment {align}")
    units = -(-size // align)  # ceil
    out: list[tuple[int, int]] = []
    for i in range(shards):
        lo = min(size, (units * i // shards) * align)
        hi = min(size, (units * (i + 1) // shards) * align)
        out.append((lo, hi))
    return out
