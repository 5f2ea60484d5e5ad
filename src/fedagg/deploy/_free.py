"""Recycled spool files: a folded update's file is renamed and overwritten by a later upload
of the same size, reusing its page cache and disk blocks (no fresh pages to fault in)."""

from __future__ import annotations

import collections
import contextlib
import os
import uuid
from pathlib import Path

__all__ = ["FreeSpools"]


class FreeSpools:
    """Up to ``keep`` files of ``nbytes`` in ``spool`` kept for reuse (``free-*``); deque
    append and pop are thread-safe, so any thread may :meth:`take` one."""

    def __init__(self, spool: Path, nbytes: int, keep: int = 8) -> None:
        self.spool, self.nbytes, self.keep = spool, nbytes, keep
        self.files: collections.deque[Path] = collections.deque()

    def found(self) -> None:
        """Take back the files a previous run left for reuse (those beyond ``keep``, or not
        of an update's size, go)."""
        for f in sorted(self.spool.glob("free-*")):
            if f.stat().st_size == self.nbytes and len(self.files) < self.keep:
                self.files.append(f)
            else:
                f.unlink()

    def recycle(self, path: str) -> None:
        """A spool file no longer needed: kept (renamed) for the next upload to overwrite, up
        to ``keep`` of them; removed otherwise (and if it is not an update's size: a partial
        aggregate's payload)."""
        with contextlib.suppress(OSError):
            if os.path.getsize(path) != self.nbytes:
                os.unlink(path)
                return
        if len(self.files) < self.keep:
            new = self.spool / f"free-{uuid.uuid4().hex}"
            with contextlib.suppress(FileNotFoundError):
                os.rename(path, new)
                self.files.append(new)
                return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def take(self) -> Path | None:
        """A file to overwrite, or None."""
        try:
            return self.files.pop()
        except IndexError:
            return None
