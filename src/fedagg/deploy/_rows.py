"""The rows of the event log as the engine sees them: an upload, a partial aggregate's jobs,
an event's note, a logged event; and an event as the server hands it to the log."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["EventRow", "LogItem", "Note", "PartialRows", "UploadRow"]


@dataclass(frozen=True, slots=True)
class UploadRow:
    client: int
    job: int
    path: str
    weight: float
    version: int
    metrics: dict[str, float]
    nbytes: int
    sha256: bytes
    #: xxh3-128 of the bytes as received (b'' in logs from before it): what a read-back checks
    checksum: bytes = b""


@dataclass(frozen=True, slots=True)
class PartialRows:
    """What a partial aggregate logs: one upload row per job it covers (all pointing at its
    payload file) and its info (weight sums, accumulator, version)."""

    parts: tuple[UploadRow, ...]
    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Note:
    """What an event without an upload logs besides its columns (a secure aggregation reply:
    its round, stage and message), as JSON in ``partials.info``: covered by the hash chain."""

    info: dict[str, Any]


@dataclass(frozen=True, slots=True)
class EventRow:
    seq: int
    kind: str
    time: float
    client: int | None
    job: int | None
    tag: int | None
    upload: UploadRow | None
    #: a partial aggregate's jobs (one row each; ``upload`` is the first) and its info
    parts: tuple[UploadRow, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)


#: An event as the server hands it to the engine's ``log``:
#: ``(kind, time, client, job, tag, upload or partial aggregate)``.
LogItem = tuple[
    str, float, int | None, int | None, int | None, UploadRow | PartialRows | Note | None
]
