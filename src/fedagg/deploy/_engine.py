"""What the federation service drives: an :class:`Engine` (the root's
:class:`~fedagg.deploy._fed.Federation`, an edge's :class:`~fedagg.deploy._edge.EdgeEngine`),
and what the service counts (:class:`ServerStats`).

Every method of an engine runs on the service's one engine thread; its attributes are read
by the event loop between steps (the engine changes them only inside its methods).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy.typing as npt

from fedagg.core.spec import ParamSpec
from fedagg.deploy._fed import Effects, TaskInfo
from fedagg.deploy._store import EventRow, LogItem, Store
from fedagg.policy import AllAvailable, RoundStats

__all__ = ["Engine", "Item", "ServerStats"]


class Engine(Protocol):
    """The state behind a federation service: an event log, the open tasks, the models."""

    @property
    def spec(self) -> ParamSpec:
        """The model's layout (what an update must fit)."""
        ...

    @property
    def ctx(self) -> AllAvailable:
        """The clients (``ctx.num_clients``)."""
        ...

    @property
    def seed(self) -> int: ...

    @property
    def tasks(self) -> Mapping[int, TaskInfo]:
        """The open tasks, by job."""
        ...

    @property
    def started(self) -> bool: ...

    @property
    def finished(self) -> bool: ...

    @property
    def now(self) -> float:
        """The federation's clock at its last event (a restart resumes from it)."""
        ...

    @property
    def spool(self) -> Path:
        """Where uploads are spooled."""
        ...

    @property
    def store(self) -> Store:
        """The state database (event log)."""
        ...

    def open(self) -> Effects:
        """Recover from the state directory: what to do first."""
        ...

    def warmup(self) -> None: ...

    def close(self) -> None: ...

    def log(self, events: Sequence[LogItem]) -> list[EventRow | None]:
        """Commit events (None for an upload already logged: a duplicate)."""
        ...

    def step(self, rows: Iterable[EventRow], *, defer: bool = False) -> Effects:
        """Apply logged events: the tasks, timers, rounds and forwards they cause (with
        ``defer``, work nothing sent waits for is left to :meth:`settle`)."""
        ...

    def settle(self) -> None:
        """The work a deferred :meth:`step` left (a checkpoint), after its effects are out."""
        ...

    def model(self, version: int) -> npt.NDArray[Any] | None:
        """A model version's flat parameters, if still kept."""
        ...

    def task_problem(self, client: int, job: int, version: int) -> str | None:
        """Why ``client`` may not upload ``job`` from ``version`` ("unknown", "denied",
        "version"), or None."""
        ...

    def ready(self) -> bool:
        """Whether the open tasks are all known (an edge learns them from its parent)."""
        ...

    def partial_accumulator(self) -> str | None:
        """The accumulator partials must have to merge here, or None if they cannot."""
        ...

    def take_free(self) -> Path | None:
        """A recycled spool file of an upload's size, or None."""
        ...

    def secure_dim(self, job: int) -> int | None:
        """The uint32 words of ``job``'s masked upload if it is of a secure aggregation
        round, else None (a plaintext update of the model's size)."""
        ...

    def keep_origin(self, client: int, job: int, origin: bytes) -> None:
        """An accepted upload's client signatures (a serialized ``Origin``), given just before
        its arrival is logged: an edge keeps them to forward; the root has no use for them."""
        ...


@dataclass
class ServerStats:
    uploads: int = 0
    duplicates: int = 0
    refused: int = 0
    bytes_in: int = 0
    bytes_out: int = 0  # model bytes sent (downloads)
    receive_s: float = 0.0  # in upload handlers: checking, hashing, spooling chunks
    rounds: list[RoundStats] = field(default_factory=list)


@dataclass
class Item:
    """An event for the engine, and the future its logged row is set on."""

    event: LogItem
    done: asyncio.Future[EventRow | None] | None = None
    #: acknowledged as "retain" (``durability = "retained"``: the client keeps the update
    #: until the watermark covers it); otherwise its spool is synced before ``done`` is set
    retain: bool = False
