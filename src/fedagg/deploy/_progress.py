"""What a running server says about its progress: log lines, and ``status.json``.

A :class:`Progress` belongs to a :class:`~fedagg.deploy._service.FederationService`; the
service calls its hooks (one line each): the state opened, a task stream opened or closed,
a call authenticated or refused, an upload accepted, the engine's effects (tasks dispatched,
rounds closed, the end). It logs (``fedagg.server`` at the root, ``fedagg.edge`` at an edge):

* at start: a new federation, or ``resumed at round r from checkpoint c (model version v),
  replayed e events``;
* clients connecting and leaving, with the number connected;
* before the first round: ``waiting for k of n clients (deploy.wait_for = ...)`` every
  :data:`WAIT_EVERY` seconds while waiting, then once ``starting the first round``;
* each round's start (model version, clients dispatched) and close (folded, dropped, refused
  with reasons, late, duration); the end;
* refused requests: each at DEBUG, a WARNING summary at most every :data:`REFUSED_EVERY` s;
  each accepted upload at DEBUG.

Every line carries structured fields (``extra=``) for ``--log-json``. It also keeps
``status.json`` in the state directory (see :mod:`fedagg.deploy._status`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import time
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedagg.deploy._status import ALIVE_EVERY, load_status_file, write_status_file
from fedagg.deploy._transport import CallError

if TYPE_CHECKING:
    from fedagg.deploy._fed import Effects
    from fedagg.deploy._service import FederationService, Session
    from fedagg.policy import RoundStats

__all__ = ["Progress"]

#: while waiting for clients before the first round, the waiting line repeats this often (s)
WAIT_EVERY = 5.0
#: refused requests are summed up in a warning at most this often (s)
REFUSED_EVERY = 10.0
#: status.json is rewritten at most this often while something changes (s)
WRITE_EVERY = 1.0


class Progress:
    """The progress lines and ``status.json`` of one federation service."""

    def __init__(self, service: FederationService) -> None:
        self.svc = service
        self.edge = service.serves is not None
        self.log = logging.getLogger("fedagg.edge" if self.edge else "fedagg.server")
        store = getattr(service.engine, "store", None)
        self.dir = Path(store.path).parent if store is not None else None  # None: no status.json
        self.opened_ok = False
        self.closed = 0  # rounds closed
        self.closed_at_open = 0
        self.version = 0
        self.top = -1  # the newest model version tasks were dispatched at
        self.new_round = True  # a round closed since the last "started" line
        self.starting = False
        self.started_t = time.time()
        self.last_seen: dict[str, float] = {}
        self.refused_by: dict[str, dict[str, Any]] = {}
        self.policy_refused: dict[str, int] = {}
        self.counted_through = 0  # rounds whose refusals are in policy_refused
        self.duplicates0 = 0  # from the previous server's status.json
        self.recent_refused = 0
        self.dirty = True
        self.written = -math.inf
        self.waited = -math.inf
        self.summed = time.monotonic()
        self.write_failed = False
        self._task: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def opened(self) -> None:
        """After the engine opened (on the engine thread): the resume line (a state it cannot
        read is not the server's problem: no line, no status.json)."""
        try:
            self._opened()
        except Exception as e:
            self.log.warning("no progress reports: %s: %s", type(e).__name__, e)

    def _opened(self) -> None:
        eng = self.svc.engine
        db = eng.store.db
        last = db.execute("SELECT round, version FROM rounds ORDER BY round DESC LIMIT 1")
        row = last.fetchone()
        self.closed = self.closed_at_open = int(row[0]) + 1 if row else 0
        ck = db.execute("SELECT seq, version FROM checkpoints ORDER BY seq DESC LIMIT 1")
        ckpt = ck.fetchone()
        server = getattr(eng, "server", None)
        self.version = int(getattr(server, "version", row[1] if row else 0))
        self.top = max((t.version for t in eng.tasks.values()), default=-1)
        self.new_round = not eng.tasks
        prev = (load_status_file(self.dir) if self.dir is not None else None) or {}
        self.last_seen = {str(k): float(v) for k, v in dict(prev.get("last_seen") or {}).items()}
        self.refused_by = {str(k): dict(v) for k, v in dict(prev.get("refused") or {}).items()}
        self.policy_refused = {
            str(k): int(v) for k, v in dict(prev.get("policy_refused") or {}).items()
        }
        self.counted_through = int(prev.get("policy_refused_through_round") or 0)
        self.duplicates0 = int(prev.get("duplicates") or 0)
        self.opened_ok = True
        replayed = int(getattr(eng, "replayed", 0))
        n = len(self.svc.keys.names)
        if eng.store.last_seq() == 0:
            self.log.info(
                "new federation in %s: %d registered clients",
                self.dir,
                n,
                extra={"event": "new", "state": str(self.dir), "registered": n},
            )
            return
        what = "the end (finished)" if eng.finished else f"round {self.closed + 1}"
        if ckpt is None or self.edge:
            self.log.info(
                "resumed at %s, replayed %d events; %d tasks open",
                what,
                replayed,
                len(eng.tasks),
                extra={"event": "resumed", "replayed": replayed},
            )
            return
        self.log.info(
            "resumed at %s from checkpoint %d (model version %d), replayed %d events; model "
            "version %d, %d tasks open",
            what,
            ckpt[0],
            ckpt[1],
            replayed,
            self.version,
            len(eng.tasks),
            extra={
                "event": "resumed",
                "round": self.closed + 1,
                "checkpoint": int(ckpt[0]),
                "checkpoint_version": int(ckpt[1]),
                "replayed": replayed,
                "version": self.version,
                "open_tasks": len(eng.tasks),
            },
        )

    def start(self) -> None:
        """Once serving: the periodic waiting lines, refusal summaries, status.json."""
        self._task = asyncio.get_running_loop().create_task(self._tick())

    def stop(self) -> None:
        """The service stopped: the last status.json (``running: false``)."""
        if self._task is not None:
            self._task.cancel()
        if self.opened_ok:
            self.write(running=False)

    async def _tick(self) -> None:
        try:
            while True:
                now = time.monotonic()
                self._waiting(now)
                if self.recent_refused and now - self.summed >= REFUSED_EVERY:
                    self._sum_refused(now)
                if (self.dirty and now - self.written >= WRITE_EVERY) or (
                    now - self.written >= ALIVE_EVERY
                ):
                    self.write()
                await asyncio.sleep(0.25)
        except asyncio.CancelledError:
            raise
        except Exception:  # progress reports must never take the server down
            self.log.exception("progress reports stopped")

    # -- clients -----------------------------------------------------------------------------
    def _name(self, s: Session, clients: Collection[int]) -> tuple[str, str]:
        for name, es in self.svc.edge_sessions.items():
            if es is s:
                return "edge", name
        c = next(iter(clients), -1)
        return "client", self.svc.keys.names[c] if c >= 0 else "?"

    def _counts(self) -> dict[str, int]:
        return {"connected": self.svc.connected(), "registered": len(self.svc.keys.names)}

    def joined(self, s: Session, clients: Collection[int]) -> None:
        """A task stream opened."""
        kind, name = self._name(s, clients)
        n = self._counts()
        if kind == "client":
            self.last_seen[name] = time.time()
        serving = f" serving {len(clients)} clients" if kind == "edge" else ""
        self.log.info(
            "%s %s connected%s (%d of %d clients connected)",
            kind,
            name,
            serving,
            n["connected"],
            n["registered"],
            extra={"event": "connected", kind: name, **n},
        )
        self.dirty = True

    def left(self, s: Session, clients: Collection[int]) -> None:
        """A task stream closed (the client hung up, the network cut it, the end)."""
        kind, name = self._name(s, clients)
        n = self._counts()
        end = self.svc.engine.finished
        why = (
            "the federation finished"
            if end
            else (
                f"task stream closed; its tasks are dropped after client_timeout = "
                f"{self.svc.opt.client_timeout:g}s unless it reconnects"
            )
        )
        self.log.log(
            logging.DEBUG if end else logging.INFO,
            "%s %s left: %s (%d of %d clients connected)",
            kind,
            name,
            why,
            n["connected"],
            n["registered"],
            extra={"event": "left", kind: name, **n},
        )
        self.dirty = True

    def seen(self, client: int) -> int:
        """An authenticated call from ``client``; returns it."""
        self.last_seen[self.svc.keys.names[client]] = time.time()
        self.dirty = True
        return client

    def refused(self, method: str, peer: str, error: CallError) -> None:
        """A call refused (counted by method and status; summed up in a warning)."""
        key = f"{method} {error.status.name}"
        r = self.refused_by.setdefault(key, {"count": 0, "example": ""})
        r["count"] = int(r.get("count", 0)) + 1
        r["example"] = error.message[:200]
        self.recent_refused += 1
        self.dirty = True
        self.log.debug(
            "refused %s from %s: %s: %s",
            method,
            peer,
            error.status.name,
            error.message,
            extra={"event": "refused", "reason": key},
        )

    def _sum_refused(self, now: float) -> None:
        span = now - self.summed
        self.log.warning(
            "refused %d requests in the last %.0fs (all so far: %s)",
            self.recent_refused,
            span,
            self._reasons(),
            extra={
                "event": "refused_summary",
                "refused": self.recent_refused,
                "reasons": {k: v["count"] for k, v in self.refused_by.items()},
            },
        )
        self.recent_refused, self.summed = 0, now

    def _reasons(self) -> str:
        return ", ".join(f"{k}: {v['count']}" for k, v in sorted(self.refused_by.items()))

    def accepted(self, client: int, job: int, nbytes: int) -> None:
        """An upload made durable and acknowledged."""
        name = self.svc.keys.names[client] if client < len(self.svc.keys.names) else str(client)
        self.log.debug(
            "accepted the upload of job %d from %s (%d bytes)",
            job,
            name,
            nbytes,
            extra={"event": "upload", "client": name, "job": job, "bytes": nbytes},
        )
        self.dirty = True

    def pushed(self, duplicate: bool, seconds: float) -> None:
        """An upload (or a retry of an accepted one) acknowledged, ``seconds`` after its call
        began (``deploy.metrics`` observes it; see :mod:`fedagg.deploy._metrics`)."""

    # -- the first round ---------------------------------------------------------------------
    def _need(self) -> int:
        return self.svc.opt.wait_for or len(self.svc.sessions)

    def _waiting(self, now: float) -> None:
        if self.edge or self.starting or self.svc.engine.started or not self.opened_ok:
            return
        if now - self.waited < WAIT_EVERY:
            return
        self.waited = now
        need, n, have = self._need(), len(self.svc.sessions), self.svc.connected()
        what = "" if self.svc.opt.wait_for else ": all registered keys"
        if need > n:
            what += f", more than the {n} registered: the first round cannot start"
        self.log.log(
            logging.WARNING if need > n else logging.INFO,
            "waiting for %d of %d clients before the first round (deploy.wait_for = %d%s): "
            "%d connected",
            need,
            n,
            self.svc.opt.wait_for,
            what,
            have,
            extra={
                "event": "waiting",
                "need": need,
                "registered": n,
                "connected": have,
                "wait_for": self.svc.opt.wait_for,
            },
        )

    def start_sent(self) -> None:
        """The first round starts: enough clients are connected."""
        self.starting = True
        need, n, have = self._need(), len(self.svc.sessions), self.svc.connected()
        self.log.info(
            "starting the first round: %d of %d clients connected (deploy.wait_for = %d)",
            have,
            n,
            self.svc.opt.wait_for,
            extra={"event": "starting", "need": need, "registered": n, "connected": have},
        )

    # -- rounds ------------------------------------------------------------------------------
    def settled(self) -> None:
        """The engine finished a step's deferred work (its checkpoint)."""

    def effects(self, effects: Effects) -> None:
        """What the engine did: rounds closed, tasks dispatched, the end."""
        for r in effects.rounds:
            self._closed(r)
        if effects.tasks:
            top = max(t.version for t in effects.tasks)
            n = len(effects.tasks)
            if top > self.top or self.new_round:
                self.top, self.new_round = max(top, self.top), False
                if self.edge:
                    self.log.info(
                        "model version %d: %d tasks for this edge's clients",
                        top,
                        n,
                        extra={"event": "tasks", "version": top, "tasks": n},
                    )
                else:
                    self.log.info(
                        "round %d started: model version %d, %d clients dispatched",
                        self.closed + 1,
                        top,
                        n,
                        extra={
                            "event": "round_started",
                            "round": self.closed + 1,
                            "version": top,
                            "dispatched": n,
                        },
                    )
            else:
                self.log.debug("dispatched %d tasks at model version %d", n, top)
        if effects.finished:
            self._finished()

    def _closed(self, r: RoundStats) -> None:
        rnd = r.round + 1
        refusals = tuple(getattr(r, "refusals", ()) or ())
        if rnd <= self.closed_at_open:  # replayed from the log at a restart: logged before
            self.log.debug("round %d closed (replayed from the log)", rnd)
            return
        self.closed = max(self.closed, rnd)
        self.version = r.version + int(r.applied)  # stats.version: the one it trained from
        self.new_round = True
        if rnd > self.counted_through:
            for reason, n in refusals:
                self.policy_refused[str(reason)] = self.policy_refused.get(str(reason), 0) + n
            self.counted_through = rnd
        why = ", ".join(f"{reason}: {n}" for reason, n in refusals)
        dur = r.ended - r.started
        self.log.info(
            "round %d closed in %.2fs: %d folded, %d dropped, %d refused%s, %d late; model "
            "version %d%s",
            rnd,
            dur,
            r.folded,
            r.dropped,
            r.refused,
            f" ({why})" if why else "",
            r.late,
            self.version,
            "" if r.applied else " (not applied)",
            extra={
                "event": "round_closed",
                "round": rnd,
                "version": self.version,
                "trained_from": r.version,
                "folded": r.folded,
                "dropped": r.dropped,
                "refused": r.refused,
                "refusals": {str(k): n for k, n in refusals},
                "late": r.late,
                "applied": r.applied,
                "duration_s": round(dur, 3),
            },
        )
        if time.monotonic() - self.written >= 0.2:
            self.write()
        else:  # a burst of closes (async): the next tick writes
            self.dirty = True

    def _finished(self) -> None:
        st = self.svc.stats
        if self.edge:
            fwd = int(getattr(self.svc.engine, "forwarded", 0))
            self.log.info(
                "finished (the parent ended the federation): %d uploads, %d forwards",
                st.uploads,
                fwd,
                extra={"event": "finished", "uploads": st.uploads, "forwarded": fwd},
            )
        else:
            self.log.info(
                "finished: model version %d after %d rounds (this run: %d uploads accepted, %d "
                "duplicates acknowledged, %d requests refused)",
                self.version,
                self.closed,
                st.uploads,
                st.duplicates,
                st.refused,
                extra={
                    "event": "finished",
                    "version": self.version,
                    "rounds": self.closed,
                    "uploads": st.uploads,
                    "duplicates": st.duplicates,
                    "refused": st.refused,
                },
            )
        self.write()

    # -- status.json -------------------------------------------------------------------------
    def snapshot(self, running: bool = True) -> dict[str, Any]:
        svc = self.svc
        names = list(svc.keys.names)
        connected = [
            n
            for c, n in enumerate(names)
            if svc.sessions[c].connected
            or (c in svc.route and svc.edge_sessions[svc.route[c]].connected)
        ]
        now = time.time()
        eng = svc.engine
        return {
            "format": 1,
            "role": "edge" if self.edge else "server",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": self.started_t,
            "updated": now,
            "running": running,
            "stopped": None if running else now,
            "listen": svc.opt.listen,
            "tls": svc.opt.tls is not None,
            "wait_for": svc.opt.wait_for,
            "clients": names,
            "connected": connected,
            "edges_connected": [n for n, s in svc.edge_sessions.items() if s.connected],
            "last_seen": self.last_seen,
            "round": self.closed + (0 if eng.finished else 1),
            "rounds_closed": self.closed,
            "version": self.version,
            "finished": eng.finished,
            "duplicates": self.duplicates0 + svc.stats.duplicates,
            "uploads_this_run": svc.stats.uploads,
            "refused": self.refused_by,
            "policy_refused": self.policy_refused,
            "policy_refused_through_round": self.counted_through,
        }

    def write(self, running: bool = True) -> None:
        if not self.opened_ok or self.dir is None:
            return
        try:
            write_status_file(self.dir, self.snapshot(running))
        except OSError as e:
            if not self.write_failed:
                self.log.warning(
                    "cannot write %s/status.json (fedagg status reads it): %s", self.dir, e
                )
            self.write_failed = True
        self.written, self.dirty = time.monotonic(), False
