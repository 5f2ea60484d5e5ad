"""Checks of spooled files against what the event log recorded when they were accepted."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import Any

import numpy.typing as npt

from fedagg.core import kernels
from fedagg.deploy._shardsum import is_sharded, sharded_checksum, sharded_file_checksum
from fedagg.deploy._store import UploadRow, checksum, new_checksum
from fedagg.errors import StateError

__all__ = ["SPOOL_HINT", "check_size", "fsync_dir", "verified", "verify_file"]

Arr = npt.NDArray[Any]


#: what to do about a spooled file that no longer matches what was accepted
SPOOL_HINT = (
    "it was acknowledged to its client, so it is neither folded nor dropped: restore the file "
    "(and the state directory) from a backup, or move the state directory aside to start a "
    "new federation (its progress is then lost)"
)


def _corrupt(path: str, what: str, problem: str) -> str:
    return f"the spooled file {path} ({what}) is corrupted: {problem}; {SPOOL_HINT}"


def check_size(path: str, logged: int, expect: int, what: str) -> None:
    try:
        size = os.path.getsize(path)
    except OSError as e:
        raise StateError(_corrupt(path, what, f"cannot read it ({e})")) from None
    if size != logged or size != expect:
        raise StateError(
            _corrupt(path, what, f"{size} bytes, {logged} were accepted (truncated or altered)")
        )


def verified(u: UploadRow, arr: Arr, what: str) -> None:
    """A spooled update's values against what was logged when it was accepted: its
    xxh3-128 checksum (~20 GB/s); for a row logged before checksums, its sha256 if the server
    required digests, else that its values are finite."""
    data = arr.data.cast("B")
    if u.checksum:
        got = sharded_checksum(data, u.checksum) if is_sharded(u.checksum) else checksum(data)
        _check_digest(u, got, "checksum", what)
    elif u.sha256:
        _check_digest(u, hashlib.sha256(data).digest(), "sha256", what)
    elif arr.size and not math.isfinite(kernels.max_abs(arr, use_numba=kernels.HAVE_NUMBA)):
        raise StateError(_corrupt(u.path, what, "it holds NaN or Inf values"))


def _check_digest(u: UploadRow, got: bytes, kind: str, what: str) -> None:
    if got != (u.checksum if kind == "checksum" else u.sha256):
        raise StateError(
            _corrupt(u.path, what, f"its {kind} differs from the one logged when it was accepted")
        )


def verify_file(u: UploadRow, what: str) -> None:
    """A spooled file's size and (if one was logged) checksum or sha256 against the log
    (one streamed read)."""
    check_size(u.path, u.nbytes, u.nbytes, what)
    if not (u.checksum or u.sha256):
        return
    try:
        with open(u.path, "rb") as f:
            if u.checksum and is_sharded(u.checksum):  # an upload split across streams
                _check_digest(u, sharded_file_checksum(f, u.nbytes, u.checksum), "checksum", what)
            elif u.checksum:
                h = new_checksum()
                while block := f.read(1 << 22):
                    h.update(block)
                _check_digest(u, h.digest(), "checksum", what)
            else:
                _check_digest(u, hashlib.file_digest(f, "sha256").digest(), "sha256", what)
    except OSError as e:
        raise StateError(_corrupt(u.path, what, f"cannot read it ({e})")) from None


def fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
