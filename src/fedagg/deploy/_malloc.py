"""Keep large message buffers in the heap (glibc), so they are reused, not re-faulted.

Every gRPC message of a streamed update is a multi-MiB buffer. glibc serves allocations
above its mmap threshold with a fresh ``mmap`` and returns them with ``munmap``: each message
then costs a page fault per 4 KiB page, which on a VM costs as much as copying the data
several times. Raising the threshold (and the trim threshold, so freed memory is kept) makes
the buffers of one message reuse those of the last. A no-op where the C library is not glibc.
"""

from __future__ import annotations

import contextlib
import ctypes

__all__ = ["keep_large_buffers"]

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done: list[bool] = []


def keep_large_buffers(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Tune this process's allocator once; returns whether it applied."""
    if _done:
        return _done[0]
    ok = False
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)
        )
    _done.append(ok)
    return ok
