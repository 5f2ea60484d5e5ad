"""A model is pulled only through the engine thread (review L3): the task lookup waits for
the engine's running step, whose durability barrier a new version's tasks must pass, so a
client cannot download a model version before the updates folded into it are durable."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from fedagg.deploy._service import FederationService
from tests.deploy.test_fold_ingest import Hand, _session


def test_a_pull_waits_for_the_engine_threads_step(tmp_path: Path) -> None:
    async def script(hand: Hand, service: FederationService) -> None:
        t = await hand.task(0)
        started, pulled = threading.Event(), threading.Event()

        def step() -> bool:  # a step waiting in its barrier (an fsync pass), as it were
            started.set()
            return pulled.wait(1.0)

        loop = asyncio.get_running_loop()
        busy = asyncio.create_task(service.in_engine(step))
        assert await loop.run_in_executor(None, started.wait, 10)
        pull = asyncio.create_task(hand.peers[0].pull(t))
        pull.add_done_callback(lambda _: pulled.set())
        assert await busy is False  # not served while the engine thread was in its step
        model = await asyncio.wait_for(pull, 10)  # served after it
        assert model.size == hand.size

    asyncio.run(_session(tmp_path / "p", "spool", script))
