"""A client's kept updates (``durability = "retained"``, :mod:`fedagg.deploy._client`): each
update acknowledged as "retain" is kept until the server's committed watermark is above its
task, to be sent again if the server, restarted after a power failure, gives the task again.

At most :data:`MAX_KEPT` are kept (the server's watermark can lag: a straggler's open task
holds it for up to :data:`fedagg.deploy._commit.HOLD` seconds): beyond, the oldest is
dropped, with a log line, and its task trained again if it is given again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["MAX_KEPT", "Kept", "KeptUpdates"]

#: the most updates a client keeps for the server; beyond, the oldest is dropped
MAX_KEPT = 8
log = logging.getLogger("fedagg.client")


@dataclass(frozen=True)
class Kept:
    """An update acknowledged as "retain": what to send again if its task comes back."""

    version: int
    epochs: int
    config: str
    stream: int  # the task stream it was given on (a task listed twice on one is not lost)
    delta: np.ndarray[Any, Any]  # not copied: checked against ``check`` before it is re-sent
    check: bytes
    weight: float
    metrics: dict[str, float]


class KeptUpdates(dict[int, Kept]):
    """The kept updates by task, at most ``most`` (the oldest dropped beyond); the tasks of
    those dropped (until the watermark is above them: their task stream, by task)."""

    def __init__(self, most: int = MAX_KEPT) -> None:
        super().__init__()
        self.most = most
        self.dropped: dict[int, int] = {}

    def keep(self, task: int, kept: Kept, watermark: int) -> None:
        self[task] = kept
        self.dropped.pop(task, None)
        while len(self) > self.most:  # the watermark lags: the oldest goes
            old = min(self)
            self.dropped[old] = self.pop(old).stream
            log.warning("task %d: its kept update dropped (%d kept, the most; the server's "
                        "watermark is at %d): trained again if the server lost it",
                        old, self.most, watermark)  # fmt: skip

    def covered(self, watermark: int) -> None:
        """The server's committed watermark: the updates of tasks below it are durable."""
        for task in [j for j in self if j < watermark]:
            del self[task]
        for task in [j for j in self.dropped if j < watermark]:
            del self.dropped[task]

    def lost(self, task: int, streams: int) -> str | None:
        """Task ``task`` given again, on task stream ``streams``, after this client uploaded
        it: ``"resend"`` (the server lost the upload: a later stream), ``"train"`` (lost,
        and its kept update was dropped), or None (listed twice on one stream)."""
        kept = self.get(task)
        if kept is not None:
            return "resend" if kept.stream < streams else None
        if self.dropped.get(task, streams) < streams:
            del self.dropped[task]
            return "train"
        return None
