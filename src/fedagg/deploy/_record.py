"""A deployment in the run database (:class:`fedagg.runs.RunDB`, ``[output] db``), with the
simulator's schema: one run, one row per closed round, so ``fedagg runs`` lists and compares
simulated and deployed runs alike. Never in the server's state database.

A row is written when its round closes, and written again when the evaluations of its model
arrive (server-side: ``test_loss``, ``test_accuracy``; federated: ``client_loss``,
``client_accuracy``). ``virtual_time`` is the federation's clock (seconds since it started,
downtime excluded), ``wall_time`` seconds since the run started. ``bytes_down`` counts the
model sent to each client dispatched, ``bytes_up`` the update bytes received while the round
was open. Columns a deployment has no value for are empty (NaN).

The run's id is kept in the state database's meta table (with the run database's path): a
restarted server continues the same run, and rounds already recorded are not written again.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedagg.policy import RoundStats, format_refusals
from fedagg.runs import ROUND_COLUMNS, RunDB, jsonable

__all__ = ["RunRecorder"]

#: what a row takes from a round's stats (a RoundStats, or the state database's record)
_STATS = (
    "round", "version", "ended", "client_loss", "selected", "dispatched", "folded", "dropped",
    "refused", "late", "applied", "staleness_mean", "staleness_max", "epsilon",
)  # fmt: skip

log = logging.getLogger("fedagg.server")


class RunRecorder:
    """Record a deployment in ``path`` (a :class:`RunDB`); use it on one thread (the event
    loop's). Rounds recorded before :meth:`bind` wait in memory."""

    def __init__(
        self, path: str | os.PathLike[str], name: str, seed: int, config: Mapping[str, Any],
        *, model_bytes: int = 0, bytes_in: Callable[[], int] = lambda: 0, keep: int = 256,
    ) -> None:  # fmt: skip
        self.path = os.path.abspath(os.fspath(path))
        self.name, self.seed, self.config = name, seed, jsonable(config)
        self.model_bytes = model_bytes
        self.bytes_in = bytes_in
        self.keep = keep
        self.db: RunDB | None = None
        self.run_id: int | None = None
        self.started = time.time()
        self.rows: dict[int, dict[str, Any]] = {}  # by round (1-based), the latest kept
        self.recorded: set[int] = set()  # rounds already in the database (a resumed run)
        self._bytes0 = bytes_in()

    def bind(
        self, meta: Mapping[str, str | None], past: Sequence[Mapping[str, Any]] = ()
    ) -> dict[str, str]:
        """Open the database and start the run, or continue the one the state's ``meta``
        names (``run_id``, ``run_db``); returns the meta to store. Rounds recorded so far
        are written now, and the ``past`` rounds of the state database (their stats) that
        the run lacks (closed just before a crash): without evaluations."""
        self.db = RunDB(self.path)
        known = {r.id: r for r in self.db.runs()}
        rid = meta.get("run_id")
        same = meta.get("run_db") == self.path and rid is not None and rid.isdigit()
        if same and int(rid or 0) in known:
            self.run_id = int(rid or 0)
            self.started = known[self.run_id].started
            self.recorded = {int(r["round"]) for r in self.db.rounds(self.run_id)}
            self.db.resume_run(self.run_id)
            log.info("continuing run %d in %s", self.run_id, self.path)
        else:
            self.run_id = self.db.start_run(self.name, self.seed, self.config, kind="deploy")
            log.info("recording the deployment as run %d in %s", self.run_id, self.path)
        for st in past:
            r = int(st["round"]) + 1
            if r not in self.recorded and r not in self.rows:
                self.rows[r] = self._row(st, wall=math.nan)
                self._write(r)
                self.rows.pop(r, None)
        for r in sorted(self.rows):
            self._write(r)
        return {"run_id": str(self.run_id), "run_db": self.path}

    def round(self, s: RoundStats) -> None:
        """A round closed."""
        got = self.bytes_in()
        up, self._bytes0 = max(0, got - self._bytes0), got
        fields: dict[str, Any] = {f: getattr(s, f) for f in _STATS}
        fields["refusals"] = format_refusals(s.refusals)
        self.rows[s.round + 1] = self._row(fields, wall=time.time(), bytes_up=up)
        for old in sorted(self.rows)[: -self.keep]:
            del self.rows[old]
        self._write(s.round + 1)

    def _row(self, s: Mapping[str, Any], wall: float, bytes_up: float = math.nan) -> dict[str, Any]:
        row: dict[str, Any] = dict.fromkeys(ROUND_COLUMNS, math.nan)
        row.update({k: s[k] for k in _STATS if k in s and k not in ("round", "ended")})
        row.update(
            round=int(s["round"]) + 1, virtual_time=s["ended"], wall_time=wall,
            applied=int(s["applied"]), bytes_down=int(s["dispatched"]) * self.model_bytes,
            bytes_up=bytes_up, refusals=s.get("refusals") or None,
        )  # fmt: skip
        return row

    def metrics(self, round_: int, version: int, source: str, values: Mapping[str, float]) -> None:
        """Evaluation metrics of round ``round_``'s model (``source``: ``"server"`` or
        ``"clients"``)."""
        row = self.rows.get(round_ + 1)
        if row is None:
            return
        prefix = "test" if source == "server" else "client"
        for m in ("loss", "accuracy"):
            if m in values:
                row[f"{prefix}_{m}"] = float(values[m])
        self._write(round_ + 1)

    def _write(self, r: int) -> None:
        if self.db is None or self.run_id is None or r in self.recorded:
            return
        row = dict(self.rows[r])
        row["wall_time"] -= self.started  # NaN stays NaN
        self.db.add_round(self.run_id, row)

    def finish(self, status: str, extra: Mapping[str, Any] | None = None) -> None:
        """End the run: ``"finished"``, ``"failed"`` or ``"interrupted"``."""
        if self.db is None or self.run_id is None:
            return
        rows = self.db.rounds(self.run_id)
        evaluated = [r for r in rows if r.get("test_accuracy") is not None]
        last = evaluated[-1] if evaluated else (rows[-1] if rows else {})
        summary = {
            "rounds": len(rows),
            "final_accuracy": last.get("test_accuracy"),
            "final_loss": last.get("test_loss"),
            "virtual_time": rows[-1]["virtual_time"] if rows else None,
            "wall_time": time.time() - self.started,
            **(extra or {}),
        }
        self.db.finish_run(self.run_id, status, summary)
        self.db.close()
        self.db = None
