"""Fault injection for crash tests: kill this process at a named point.

``FEDAGG_CRASH_AT="point:n"`` makes the n-th (1-based) pass through ``crash_point("point")``
SIGKILL the process: no cleanup, no flush, as a power cut or an OOM kill would. The points
are the places where a crash is most likely to lose or double-count an update (mid-upload,
between spooling and logging, between queuing and committing, between logging and folding,
in a fold, before and after a checkpoint). Without the variable, a point costs one dict
lookup.

``"point:n:seconds"`` first stalls the thread at the point for that long while the rest of
the process runs on, then kills it: a crash in the middle of a slow step (a commit waiting
for the disk). What the other threads do meanwhile gets out, as it would: an acknowledgement
sent before the commit it depends on reaches the client, and is then seen to be lost.
"""

from __future__ import annotations

import os
import signal
import time

__all__ = ["POINTS", "crash_point"]

POINTS = (
    "upload",  # server: mid-way through receiving an upload's chunks
    "spooled",  # server: upload on disk, not yet logged
    "upload-queued",  # server, edge: an accepted upload queued, its batch not yet committed
    "logged",  # server: events committed (acks may not have gone out), not yet folded
    "fold",  # server: about to feed an arrival to the policy
    "applied",  # server: a round closed, before its checkpoint
    "checkpoint",  # server: checkpoint file written, not yet recorded
    "client-upload",  # client: mid-way through pushing an update
    "edge-logged",  # edge aggregator: uploads logged (acks may not have gone out), not forwarded
    "edge-forwarded",  # edge aggregator: the parent acknowledged a forward, not yet recorded
)

_SPEC = os.environ.get("FEDAGG_CRASH_AT", "")
_COUNTS: dict[str, int] = {}


def crash_point(name: str) -> None:
    if not _SPEC:
        return
    point, _, rest = _SPEC.partition(":")
    if point != name:
        return
    nth, _, stall = rest.partition(":")
    _COUNTS[name] = _COUNTS.get(name, 0) + 1
    if _COUNTS[name] == int(nth or 1):
        if stall:
            time.sleep(float(stall))
        os.kill(os.getpid(), signal.SIGKILL)
