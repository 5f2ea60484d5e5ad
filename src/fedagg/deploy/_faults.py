"""Fault injection for crash tests: kill this process at a named point.

Off unless configured: the library never reads the environment for it. A process entry point
turns it on explicitly, before it starts a server, an edge aggregator or a client::

    from fedagg.deploy import _faults
    _faults.configure("fold:3")      # SIGKILL at the 3rd pass through crash_point("fold")
    _faults.configure(None)          # off again

``fedagg server`` and ``fedagg client`` (:mod:`fedagg.cli`, the only place that reads the
environment) do this from ``--crash-at SPEC`` or, without the flag, from the
``FEDAGG_CRASH_AT`` environment variable, which is how the crash tests set it on the
processes they start.

A spec is ``"point[:n[:seconds]]"``: the n-th (1-based, default 1) pass through
``crash_point("point")`` SIGKILLs the process: no cleanup, no flush, as a power cut or an OOM
kill would. The points are the places where a crash is most likely to lose or double-count an
update (mid-upload, between spooling and logging, between queuing and committing, between
logging and folding, in a fold, before and after a checkpoint). While off, or at another
point, a pass costs a global lookup and a comparison. Secure aggregation has a point per
protocol stage (``secure-0`` to ``secure-4``: a reply of that stage logged, not yet stepped).

With ``seconds``, the thread at the point first stalls that long while the rest of the process
runs on, then kills it: a crash in the middle of a slow step (a commit waiting for the disk).
What the other threads do meanwhile gets out, as it would: an acknowledgement sent before the
commit it depends on reaches the client, and is then seen to be lost.

With a fourth field ``power`` (``"logged:3:0:power"``), the kill is a power loss: first what
was written but not yet synced is lost. The code that knows what that is registers it with
:func:`on_power_loss` (the spool committer of ``durability = "retained"``: the spool files
after its mark are deleted, emptied or cut short); the SQLite log is fsynced at each commit.

The setting is process-wide (what it does, a SIGKILL, is too). An invalid spec raises
:class:`~fedagg.ConfigError` naming the valid points, and leaves the setting as it was.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedagg.errors import ConfigError

__all__ = [
    "POINTS", "SECURE_POINTS", "Faults", "configure", "crash_point", "current", "on_power_loss",
]  # fmt: skip

POINTS = (
    "upload",  # server: mid-way through receiving an upload's chunks
    "spooled",  # server: upload on disk, not yet logged
    "upload-queued",  # server, edge: an accepted upload queued, its batch not yet committed
    "logged",  # server: events committed (acks may not have gone out), not yet folded
    "fold",  # server: about to feed an arrival to the policy
    "applied",  # server: a round closed, before its checkpoint
    "checkpoint",  # server: checkpoint file written, not yet recorded
    "commit",  # server, durability "retained": acknowledged spools about to be synced
    "client-upload",  # client: mid-way through pushing an update
    "edge-logged",  # edge aggregator: uploads logged (acks may not have gone out), not forwarded
    "edge-forwarded",  # edge aggregator: the parent acknowledged a forward, not yet recorded
)
#: secure aggregation, apart from :data:`POINTS` (a plaintext federation never passes them).
#: Server: ``secure-s``, a client's reply of stage s logged (acknowledged or not), not yet fed
#: to the policy (``secure-2``: a masked upload about to be folded). Client:
#: ``client-secure-s``, about to send its reply of stage s (``client-secure-2``: its masked
#: upload), a dropout at that stage. Edge aggregator: ``edge-masked``, a masked upload (or a
#: child edge's masked partial) logged and added into its masked partial, not yet forwarded.
SECURE_POINTS = (
    tuple(f"secure-{s}" for s in range(5))
    + tuple(f"client-secure-{s}" for s in range(5))
    + ("edge-masked",)
)


@dataclass(frozen=True, slots=True)
class Faults:
    """Kill the process at the ``nth`` pass through ``crash_point(point)``, after stalling
    that thread for ``stall`` seconds; ``power``: losing what was not yet synced first."""

    point: str
    nth: int = 1
    stall: float = 0.0
    power: bool = False

    def __post_init__(self) -> None:
        if self.point not in POINTS + SECURE_POINTS:
            raise ConfigError(
                f"unknown crash point {self.point!r}; the points are: "
                f"{', '.join(POINTS + SECURE_POINTS)}"
            )
        if isinstance(self.nth, bool) or not isinstance(self.nth, int) or self.nth < 1:
            raise ConfigError(
                f"crash point {self.point}: n must be an integer >= 1, got {self.nth!r}"
            )
        if not (
            isinstance(self.stall, (int, float)) and math.isfinite(self.stall) and self.stall >= 0
        ):
            raise ConfigError(
                f"crash point {self.point}: seconds must be finite and >= 0, got {self.stall!r}"
            )

    @classmethod
    def parse(cls, spec: str) -> Faults:
        """``"point[:n[:seconds[:power]]]"`` (e.g. ``"fold:3"``, ``"upload-queued:2:0.3"``,
        ``"logged:2:0:power"``)."""
        parts = spec.strip().split(":")
        if len(parts) > 4 or not parts[0] or (len(parts) == 4 and parts[3] != "power"):
            raise ConfigError(cls._malformed(spec))
        point, nth, stall, power = (*parts, "", "", "")[:4]
        try:
            n = int(nth) if nth else 1
            s = float(stall) if stall else 0.0
        except ValueError:
            raise ConfigError(cls._malformed(spec)) from None
        return cls(point, n, s, power == "power")

    @staticmethod
    def _malformed(spec: str) -> str:
        return (
            f"malformed crash spec {spec!r}: expected POINT[:N[:SECONDS[:power]]], "
            f"with POINT one of: {', '.join(POINTS + SECURE_POINTS)}"
        )

    def __str__(self) -> str:
        tail = f":{self.stall:g}" if self.stall or self.power else ""
        return f"{self.point}:{self.nth}{tail}" + (":power" if self.power else "")


_ACTIVE: Faults | None = None
_COUNTS: dict[str, int] = {}
_LOCK = threading.Lock()
_POWER_LOSS: Callable[[], None] | None = None


def on_power_loss(fn: Callable[[], None] | None) -> None:
    """What a ``power`` fault loses before the kill (None: nothing): the last registered."""
    global _POWER_LOSS
    _POWER_LOSS = fn


def configure(spec: Faults | str | None) -> Faults | None:
    """Set this process's fault injection (a :class:`Faults`, a spec string, or None or
    ``""`` for none) and restart the pass counts; returns the previous setting."""
    global _ACTIVE
    faults = spec
    if isinstance(spec, str):
        faults = Faults.parse(spec) if spec.strip() else None
    if faults is not None and not isinstance(faults, Faults):
        raise ConfigError(
            f"fault injection: expected a Faults, a spec string or None, got {spec!r}"
        )
    with _LOCK:
        previous, _ACTIVE = _ACTIVE, faults
        _COUNTS.clear()
    return previous


def current() -> Faults | None:
    """This process's fault injection, or None."""
    return _ACTIVE


def crash_point(name: str) -> None:
    faults = _ACTIVE
    if faults is None or faults.point != name:
        return
    with _LOCK:
        _COUNTS[name] = n = _COUNTS.get(name, 0) + 1
    if n == faults.nth:
        if faults.stall:
            time.sleep(faults.stall)
        lose = _POWER_LOSS
        if faults.power and lose is not None:
            lose()
        os.kill(os.getpid(), signal.SIGKILL)
