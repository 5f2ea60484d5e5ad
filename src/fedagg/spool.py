"""Disk spools for the robust aggregators: the round's updates in a file, not in RAM.

    agg = fedagg.aggregators.krum(f=5, spool=fedagg.spool.disk("/var/tmp/fedagg"))

Each update is appended to an anonymous file as it arrives (it is deleted when the spool is
closed or the process ends). The rules then map the file and read it back in coordinate
blocks: block i of every row, one block at a time. After each block the pages just read are
released from the process (``madvise(MADV_DONTNEED)``), so the resident memory stays at the
blocks in flight whatever the number and size of the updates; the kernel's page cache, which
is not the process's memory, keeps what it can.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg.errors import ConfigError

__all__ = ["DiskStore", "disk"]

Arr = npt.NDArray[Any]


class DiskStore:
    """Rows of ``d`` values appended to an unnamed temporary file, read back by blocks."""

    def __init__(self, d: int, dtype: np.dtype[Any], directory: str | None = None) -> None:
        self.d = int(d)
        self.dtype = np.dtype(dtype)
        self._file = tempfile.TemporaryFile(dir=directory)  # noqa: SIM115 - lives with the store
        self._rows = 0
        self._map: mmap.mmap | None = None
        self._view: Arr | None = None

    @property
    def rows(self) -> int:
        return self._rows

    @property
    def nbytes(self) -> int:
        return self._rows * self.d * self.dtype.itemsize

    def append(self, segments: Sequence[Arr]) -> None:
        total = sum(int(s.size) for s in segments)
        if total != self.d:
            raise ValueError(f"a row of {total} values for a store of width {self.d}")
        self._unmap()
        fd = self._file.fileno()
        os.lseek(fd, self.nbytes, os.SEEK_SET)
        for s in segments:
            buf = np.ascontiguousarray(s, dtype=self.dtype).reshape(-1).view(np.uint8).data
            while buf:
                done = os.write(fd, buf)
                buf = buf[done:]
        self._rows += 1

    def read(self, c0: int, c1: int, out: Arr, rows: Sequence[int] | None = None) -> Arr:
        view = self._mapped()
        idx = range(self._rows) if rows is None else rows
        for r, i in enumerate(idx):
            out[r] = view[i, c0:c1]
        assert self._map is not None
        self._map.madvise(mmap.MADV_DONTNEED)  # drop the pages from this process (not the cache)
        return out

    def close(self) -> None:
        self._unmap()
        self._file.close()

    def _mapped(self) -> Arr:
        if self._view is None:
            if self._rows == 0:
                return np.empty((0, self.d), self.dtype)
            self._map = mmap.mmap(self._file.fileno(), self.nbytes, access=mmap.ACCESS_READ)
            self._view = np.frombuffer(self._map, self.dtype).reshape(self._rows, self.d)
        return self._view

    def _unmap(self) -> None:
        if self._map is not None:
            self._view = None
            self._map.close()
            self._map = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


class _Disk:
    def __init__(self, directory: str | None) -> None:
        self.directory = directory

    def __call__(self, d: int, dtype: np.dtype[Any]) -> DiskStore:
        return DiskStore(d, dtype, self.directory)

    def __repr__(self) -> str:
        return f"fedagg.spool.disk({self.directory!r})"


def disk(directory: str | os.PathLike[str] | None = None) -> _Disk:
    """A spool factory writing to ``directory`` (default: the system's temporary directory)."""
    if directory is not None:
        path = os.fspath(directory)
        if not os.path.isdir(path):
            raise ConfigError(f"spool directory {path!r} does not exist")
        return _Disk(path)
    return _Disk(None)
