"""Private files: keys, the state directory and what is in it are readable by their owner only.

* private keys (``fedagg keys``, ``fedagg certs``) are written to a temporary file created with
  mode 0600 and renamed over the old one, so that re-running over a 0644 file leaves 0600;
* the state directory (and its ``spool/``) is 0700, and every file in it 0600: on start,
  :func:`private_state_dir` tightens what an older version (or a loose umask) left behind.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from fedagg.deploy._store import RECOVERY_HINT
from fedagg.errors import StateError

__all__ = ["PRIVATE_DIR", "PRIVATE_FILE", "private_state_dir", "secret_key", "write_private"]

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def write_private(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, also over an existing file of another mode
    (a temporary file in the same directory, fsynced, then renamed over ``path``)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    try:
        os.fchmod(fd, PRIVATE_FILE)  # a stale temporary file keeps its old mode otherwise
        with os.fdopen(fd, "wb") as f:
            fd = -1
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise


def private_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and its parents) if needed; make it 0700."""
    d = Path(path)
    d.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    os.chmod(d, PRIVATE_DIR)
    return d


def private_state_dir(path: str | os.PathLike[str]) -> Path:
    """The state directory and its ``spool/``: 0700, every regular file in them 0600.
    An unwritable or foreign-owned directory is a :class:`StateError`, not a traceback."""
    d = Path(path)
    try:
        for sub in (d, d / "spool"):
            private_dir(sub)
            for f in sub.iterdir():
                st = f.lstat()
                if stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) & 0o077:
                    os.chmod(f, PRIVATE_FILE)
        db = d / "state.db"
        wal = d / "state.db-wal"
        lost = (not db.exists() or db.stat().st_size == 0) and not (
            wal.exists() and wal.stat().st_size > 0
        )
        held = [*d.glob("checkpoint-*.npz"), *(d / "spool").glob("*.upd")]
    except OSError as e:
        raise StateError(
            f"cannot use the state directory {d}: {e} (it must be a directory this user owns)"
        ) from e
    if lost and held:  # never start a fresh federation over another one's files
        raise StateError(
            f"the state database {db} is missing or empty, but {d} holds a federation's "
            f"checkpoints or spooled updates ({held[0].name}, ...): {RECOVERY_HINT}"
        )
    return d


def secret_key(path: str | os.PathLike[str], nbytes: int = 32) -> bytes:
    """The ``nbytes``-byte secret kept in ``path`` (mode 0600), made from the OS's randomness
    the first time: the same key after a restart, never derivable from the config."""
    p = Path(path)
    if p.exists():
        key = p.read_bytes()
        if len(key) != nbytes:
            raise StateError(f"{p} holds {len(key)} bytes, not a {nbytes}-byte key")
        return key
    key = secrets.token_bytes(nbytes)
    write_private(p, key)
    return key
