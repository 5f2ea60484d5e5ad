"""A received upload's way to the log and back: its arrival queued for the engine (in fold
order, after another upload's fold lease), and its acknowledgement once logged."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import TYPE_CHECKING, Any

from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._engine import Item
from fedagg.deploy._ingest import Lease
from fedagg.deploy._store import EventRow, UploadRow

if TYPE_CHECKING:
    from fedagg.deploy._service import FederationService

__all__ = ["acknowledge", "log_arrival"]


async def log_arrival(
    svc: FederationService, client: int, head: Any, path: Any, digest: bytes, check: bytes,
    metrics: dict[str, float], dim: int | None, lease: Lease | None, retain: bool,
) -> Item:  # fmt: skip
    """Queue a received upload's arrival for the engine (after another upload's fold
    lease, if one is active: log order = fold order); its row comes in the future."""
    weight = float(head.weight) if dim is None else 1.0  # masked: in the encoding
    upload = UploadRow(
        client, head.task, str(path), weight, head.version, metrics, head.nbytes,
        digest, check,
    )  # fmt: skip
    done: asyncio.Future[EventRow | None] = asyncio.get_running_loop().create_future()
    with svc.turns.arriving(done):
        await svc.turns.turn(lease)
        event = ("arrival", svc.now(), client, head.task, None, upload)
        await svc.queue.put(item := Item(event, done, retain))
    return item


async def acknowledge(
    svc: FederationService, client: int, head: Any, path: Any, item: Item, lease: Lease | None
) -> pb.PushReply:
    """The reply to a queued upload, once its arrival is logged (``retain``: its client
    keeps it until the watermark covers it; else synced first if below the mark)."""
    assert item.done is not None
    row = await item.done
    if row is None:  # a concurrent retry won the race
        if lease is not None:  # not stepped: its folds go (if nothing revoked them)
            await svc.turns.revoke(lease)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        svc.stats.duplicates += 1
        return svc.ack(head.task, True, item.retain)
    svc.stats.uploads += 1
    svc.progress.accepted(client, head.task, head.nbytes)
    return svc.ack(head.task, False, item.retain)
