"""An upload cut off while its spool file is being opened or written (the peer went away, a
timeout) leaves no ``tmp-`` file and no open descriptor behind, and the descriptor is never
closed under a running write.

Before the fix, the server's receive path awaited the open on the I/O pool outside its
``try``: a call cancelled during the open (a client sending a second message over gRPC's
limit, say) left the new file and its descriptor behind, and a cancelled write could have its
descriptor closed while the worker still wrote to it."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fedagg.deploy._upload import SpoolFile


def _open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def _opener(started: threading.Event, go: threading.Event):  # type: ignore[no-untyped-def]
    def opener(tmp: Path) -> int:
        started.set()
        go.wait(10)
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    return opener


async def _cancel_while(tmp: Path, final: Path, during: str) -> tuple[set[int], list[str]]:
    pool = ThreadPoolExecutor(1)
    started, go = threading.Event(), threading.Event()
    written: list[int] = []
    before = _open_fds()

    def slow_write(fd: int, data: bytes) -> None:
        started.set()
        go.wait(10)
        written.append(os.write(fd, data))  # raises EBADF if fd was closed under it

    async def receive() -> None:
        spool = SpoolFile(pool, tmp, final)
        try:
            if during == "open":
                await spool.open(_opener(started, go))
            else:
                await spool.open(lambda p: os.open(p, os.O_WRONLY | os.O_CREAT, 0o600))
                await spool.start(slow_write, b"x" * 4096)
        except BaseException:
            await spool.discard()
            raise

    task = asyncio.get_running_loop().create_task(receive())
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 10)
    task.cancel()
    await asyncio.sleep(0.05)  # the cancellation is delivered while the job still runs
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    pool.shutdown(wait=True)
    if during == "write":
        assert written == [4096]  # the write ran to the end on an open descriptor
    leaked = _open_fds() - before
    return leaked, sorted(p.name for p in tmp.parent.iterdir())


@pytest.mark.parametrize("during", ["open", "write"])
def test_a_cancelled_upload_leaves_no_file_and_no_descriptor(tmp_path: Path, during: str) -> None:
    tmp, final = tmp_path / "tmp-x", tmp_path / "0-1-x.upd"
    leaked, files = asyncio.run(_cancel_while(tmp, final, during))
    assert files == []
    assert leaked == set()


def test_a_committed_upload_is_moved_and_closed(tmp_path: Path) -> None:
    tmp, final = tmp_path / "tmp-x", tmp_path / "0-1-x.upd"

    async def go() -> None:
        pool = ThreadPoolExecutor(1)
        spool = SpoolFile(pool, tmp, final)
        await spool.open(lambda p: os.open(p, os.O_WRONLY | os.O_CREAT, 0o600))
        await spool.start(os.write, b"abc")
        await spool.commit()
        assert spool.fd == -1
        await spool.discard()  # after a commit, a later failure removes the moved file
        pool.shutdown()

    asyncio.run(go())
    assert list(tmp_path.iterdir()) == []
