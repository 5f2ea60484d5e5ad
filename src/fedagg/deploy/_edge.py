"""Edge and intermediate aggregators: a tier of the aggregation tree (LIFL, AI Flow).

An edge aggregator is the same server with a parent: ``fedagg server`` with
``deploy.parent = "host:port"``. Towards its clients (and child edges) it speaks the usual
protocol; towards its parent it is an edge: it says which clients its subtree serves, receives
their tasks, pulls each model version once and serves it down, and sends up either

* **partial aggregates** (``edge_mode = "aggregate"``, the default under synchronous rounds):
  its clients' updates folded with the federation's own aggregator into one mean-monoid state
  per model version, and merged at the parent with ``merge`` (any depth: an intermediate merges
  its children's partials into its own); or
* **relayed updates** (``"relay"``, the default under asynchronous policies): each update
  passed on unchanged, so the root sees every update's base version and measures its
  staleness itself, exactly as without the tree.

With ``deploy.leaf_rule`` (e.g. ``"krum"``), an edge runs that robust rule over its own
clients and sends its result up as a mean partial weighted by its clients' total weight:
"robust at the leaves, then a mean above" (:class:`fedagg.core.tree.LeafThenMean`, whose
docstring states what that tolerates). The parents and the root then need the float64 mean.

A partial is forwarded when every task of its version in the subtree is resolved (uploaded or
dropped), or ``flush_after`` seconds after its first update, whichever is first.

In aggregate mode the edge bounds what its clients claim before folding, as the root does
(:mod:`fedagg.deploy._bounds`, the same ``[deploy]`` settings; relayed updates are bounded by
the root): a weight is capped at ``weight_cap`` x the lower median claimed weight, an update's
norm clipped (or refused) at ``norm_cap`` x the median norm and ``max_norm``. The reference
is the edge's own window: the bounded claims of the last ``bound_window`` clients among the
jobs its parent has acknowledged (each client's latest), kept in its state database in the
transaction that logs the acknowledgement, so a restart rebuilds it from the log exactly.
While it holds fewer than ``bound_warmup`` clients (or half the edge's subtree), a version's
updates are kept as views of their spool files until the partial is flushed, and bounded then
against their own claims (each client's latest): its flush timer then waits until that many
clients' updates are in, or every task of the version is resolved (or a restart forces it
out), so one client's update is never its own reference. The partial's jobs carry their
clients' signed weights (which the parent verifies); its weight sum, what the parent merges,
is the sum of the bounded weights, and may be less than theirs.

Nothing accepted is lost: an upload is acknowledged to the client only once it is spooled,
fsynced and logged at the edge, and it stays there until the parent acknowledges the partial
(or relay) that carries it. An edge that restarts replays its log and re-sends what the parent
has not acknowledged; the parent recognises the jobs (its idempotency keys) and counts them
once. A parent whose edge stays away longer than ``client_timeout`` drops the subtree's open
jobs, so it never waits forever; what the edge re-sends for them later is refused.

Edges are scoped and cannot forge. The parent's ``deploy.edge_clients`` says which clients each
edge may claim (none if it is not listed); a client connected directly, or held by another
live edge, cannot be claimed. Every update an edge forwards carries its client's own
signatures (``Origin``: the client's header Auth, digest and trailer signature), which the edge
keeps with the upload (in its state database, so a forward after a restart still carries
them) and every tier above verifies with the client's key and passes on unchanged: an edge can
neither invent a client's participation nor change its weight, metrics or (relayed) bytes. It
can still mis-add a partial's sum, of which it holds no proof: relay mode, or a robust rule at
the root, is the answer to an edge that is not trusted with that.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fedagg.core.aggregate import Aggregator
from fedagg.core.spec import ParamSpec
from fedagg.core.tree import LeafThenMean
from fedagg.core.update import Update
from fedagg.deploy._bounds import Bounds, Claim, bound_update, check_claim, limits, slide
from fedagg.deploy._faults import crash_point
from fedagg.deploy._fed import Effects, TaskInfo, task_problem
from fedagg.deploy._partial import (
    accumulator_of,
    load_partial,
    mean_state,
)
from fedagg.deploy._secure import SecureBook, StageRequest, params_dim
from fedagg.deploy._store import EventRow, LogItem, PartialRows, Store, UploadRow
from fedagg.errors import ConfigError, FedaggError, StateError, UpdateError
from fedagg.policy import AllAvailable

__all__ = ["EdgeEngine", "Forward"]

Arr = npt.NDArray[Any]
EdgeMode = Literal["aggregate", "relay"]
log = logging.getLogger("fedagg.edge")


@dataclass
class Forward:
    """What an edge sends up once: a partial aggregate of one version (``state``), or one
    relayed update (``relay``), and the jobs of clients that dropped out."""

    version: int
    jobs: list[tuple[int, int, float, float]]  # (client, job, weight, train_loss)
    dropped: list[tuple[int, int]] = field(default_factory=list)
    state: Any = None
    relay: UploadRow | None = None
    #: a masked partial of a secure round: the wrap-around uint32 sum of its jobs' uploads
    masked: Arr | None = None
    paths: list[str] = field(default_factory=list)  # spool files to delete once acknowledged
    #: each job's client signatures (a serialized ``Origin``), loaded before it is sent
    origins: dict[tuple[int, int], bytes] = field(default_factory=dict)


@dataclass
class _Pending:
    state: Any
    leaf: Any = None  # the leaf rule's state over this edge's own clients (leaf_rule)
    leaf_jobs: list[tuple[int, int]] = field(default_factory=list)
    jobs: list[tuple[int, int, float, float]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    #: bounds warming up: this version's updates (views of their spool files) and their norms,
    #: kept until the partial is flushed and bounded then (None: bounded as they arrive)
    held: list[tuple[Update, float, UploadRow]] | None = None
    #: each folded job's bounded claim (weight, norm); the window takes it once acknowledged
    claims: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)
    #: its flush timer fired while too few updates were kept to bound them against: it is
    #: flushed once there are enough, or every task of its version is resolved
    due: bool = False


class EdgeEngine:
    """The state of an edge aggregator; the server's engine thread drives it, as it drives a
    :class:`~fedagg.deploy._fed.Federation` at the root (the same entry points)."""

    def __init__(
        self,
        aggregator: Aggregator[Any],
        spec: ParamSpec,
        *,
        num_clients: int,
        directory: str | os.PathLike[str],
        mode: EdgeMode = "aggregate",
        flush_after: float = 1.0,
        leaf_rule: Aggregator[Any] | None = None,
        bounds: Bounds | None = None,
    ) -> None:
        if mode not in ("aggregate", "relay"):
            raise ConfigError(f"edge_mode must be 'aggregate' or 'relay', not {mode!r}")
        if not flush_after > 0:
            raise ConfigError("flush_after must be > 0")
        self.agg = aggregator
        self.spec = spec
        self.mode: EdgeMode = mode
        self.flush_after = flush_after
        self.ctx = AllAvailable(num_clients, 0)
        self.seed = 0
        self.dir = Path(directory)
        self.spool = self.dir / "spool"
        self.spool.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.dir / "state.db")
        # each accepted job's client signatures (serialized ``Origin``), until the parent
        # acknowledges the job: an edge-only table in the edge's state database
        self.store.db.execute(
            "CREATE TABLE IF NOT EXISTS edge_origins (client INTEGER NOT NULL, job INTEGER NOT "
            "NULL, origin BLOB NOT NULL, PRIMARY KEY (client, job))"
        )
        #: origins of uploads on their way to the log (written just before it), and of jobs
        #: acknowledged by the parent (deleted with the next batch)
        self.new_origins: dict[tuple[int, int], bytes] = {}
        self._forget: list[tuple[int, int]] = []
        #: the bounds on its clients' claims (aggregate mode; relayed updates are bounded
        #: above), the reference window (each recent client's latest acknowledged bounded
        #: claim, oldest first) and the claims of jobs forwarded and not yet acknowledged
        self.bounds = (
            bounds if bounds is not None and bounds.enabled and mode == "aggregate" else None
        )
        self.window: list[Claim] = []
        self.claims: dict[tuple[int, int], tuple[float, float]] = {}
        if self.bounds is not None:  # each client's latest acknowledged claim (job, bounded)
            self.store.db.execute(
                "CREATE TABLE IF NOT EXISTS edge_claims (client INTEGER PRIMARY KEY, job INTEGER "
                "NOT NULL, weight REAL NOT NULL, norm REAL NOT NULL)"
            )
        self.tasks: dict[int, TaskInfo] = {}
        #: secure aggregation: the stage requests for the subtree's clients, and each secure
        #: job's masked length (its upload is relayed to the parent as it came)
        self.secure = SecureBook()
        self.models: dict[int, Arr] = {}
        self.pending: dict[int, _Pending] = {}
        self.masked: dict[int, Forward] = {}  # secure rounds' masked partials, by version
        self.dropped: list[tuple[int, int]] = []
        self.seq = 0
        self.now = 0.0
        self.started = True  # rounds start at the root
        #: the parent's open tasks have all arrived (its task stream marks the end of them
        #: with a heartbeat); until then a request for an unknown task is told to retry
        self.synced = False
        self.finished = False
        self.replayed = 0
        self.replayed_clients: set[int] = set()  # whose uploads a restart replayed
        self.forwarded = 0
        if mode == "aggregate":
            mean_state(aggregator.init(ParamSpec.from_arrays([np.zeros(1, spec.dtype)])))
        self.leaf: LeafThenMean | None = None
        if leaf_rule is not None:
            if mode != "aggregate" or accumulator_of(aggregator) != "float64":
                raise ConfigError(
                    "a leaf rule seals its result into a float64 mean partial: it needs "
                    "edge_mode 'aggregate' and the float64 mean above (strategy.accumulator)"
                )
            self.leaf = LeafThenMean(leaf_rule, by="weight")

    # -- lifecycle -----------------------------------------------------------------------------
    def open(self) -> Effects:
        """Recover: everything logged and not acknowledged by the parent is folded again and
        forwarded at once (the tasks come back from the parent when the link reconnects)."""
        self.store.verify()  # the event log against its hash chain (StateError if broken)
        for tmp in self.spool.glob("tmp-*"):
            tmp.unlink()
        self.seq = self.store.last_seq()
        rows = list(self.store.events_after(0))
        acked = {(r.client, r.job) for r in rows if r.kind == "acked"}
        with self.store.tx():
            q = "DELETE FROM edge_origins WHERE client=? AND job=?"
            self.store.db.executemany(q, sorted(k for k in acked if k[0] is not None))
        if self.bounds is not None:
            self.window = self._acked_window(rows)
        effects = Effects()
        for row in rows:
            keys = {(u.client, u.job) for u in (row.parts or ((row.upload,) if row.upload else ()))}
            if row.kind in ("arrival", "partial") and keys and keys <= acked:
                continue
            if row.kind == "dropout" and (row.client, row.job) in acked:
                continue
            if row.kind in ("arrival", "partial", "dropout"):
                effects.merge(self._apply(row))
                self.replayed += 1
                if row.upload is not None:  # (not a child edge's partial's: not its clients)
                    self.replayed_clients.add(row.upload.client)
            # a replayed masked upload or child partial goes up alone, as it was logged: the
            # parent acknowledges as a duplicate one it had accepted before the crash and takes
            # the others (one masked sum mixing both would be refused as an overlap)
            effects.forward += [self.masked.pop(v) for v in sorted(self.masked)]
        effects.merge(self._flush(force=True))
        return effects

    def close(self) -> None:
        self.store.close()

    def warmup(self) -> None:
        small = np.zeros(1024, self.spec.dtype)
        small.flags.writeable = False
        spec = ParamSpec.from_arrays([np.zeros(1024, self.spec.dtype)])
        with contextlib.suppress(Exception):
            st = self.agg.init(spec, version=None)
            self.agg.fold(st, Update(delta=small, weight=1.0))

    # -- what the server asks ------------------------------------------------------------------
    def model(self, version: int) -> Arr | None:
        return self.models.get(version)

    def task_problem(self, client: int, job: int, version: int) -> str | None:
        return task_problem(self.tasks, client, job, version)

    def ready(self) -> bool:
        return self.synced

    def partial_accumulator(self) -> str | None:
        return accumulator_of(self.agg) if self.mode == "aggregate" else None

    def take_free(self) -> Path | None:
        return None

    @property
    def secure_rounds(self) -> bool:
        """Whether a masked partial from a child edge may be merged here: an edge takes them
        whenever its parent runs secure aggregation, which it learns from the secure rounds'
        tasks (a masked partial whose jobs are not such tasks is refused, or told to retry
        while the edge is catching up with its parent)."""
        return self.mode == "aggregate"

    def secure_dim(self, job: int) -> int | None:
        """The masked upload's length (uint32 words) of a secure round's job, else None."""
        return self.secure.dims.get(job)

    def secure_down(self, r: StageRequest) -> Effects:
        """A stage request from the parent for a client of this subtree: pushed to it (and
        again when it reconnects, until it is answered)."""
        self.secure.requests[r.client] = r
        return Effects(secure=[r])

    def keep_origin(self, client: int, job: int, origin: bytes) -> None:
        """An accepted upload's client signatures, logged with the upload by the next batch
        (see :meth:`log`)."""
        self.new_origins[(client, job)] = origin

    def add_tasks(self, tasks: Sequence[TaskInfo], seed: int) -> Effects:
        """Tasks from the parent for clients of this subtree (their model is already here)."""
        self.seed = seed
        effects = Effects()
        for t in tasks:
            resolved = self.store.has_upload(t.client, t.job) or self.store.has_event(
                "dropout", t.job
            )  # a job that dropped out here stays out, even if the parent re-sends it
            if t.secure is not None:  # a secure round's: its masked upload's length (also
                # for a job resolved here before a restart: its client's retry is a duplicate)
                self.secure.remember(t.job, t.secure.round, params_dim(t.secure.raw))
            if t.job not in self.tasks and not resolved:
                self.tasks[t.job] = t
                effects.tasks.append(t)
                if t.secure is not None:
                    self.secure.requests[t.client] = t.secure
        return effects

    def finish(self) -> Effects:
        """The parent says the federation is over: no task stays open (a late upload is
        told so, and its client stops), nothing more is forwarded."""
        self.finished = True
        self.tasks.clear()
        return Effects(finished=True)

    def log(self, events: Sequence[LogItem]) -> list[EventRow | None]:
        """Log events (after writing the client signatures of the uploads among them: what
        the log holds, the edge can forward with its proof)."""
        keep = []
        for _, _, _, _, _, up in events:
            parts = (
                up.parts
                if isinstance(up, PartialRows)
                else (up,)
                if isinstance(up, UploadRow)
                else ()
            )
            for u in parts:
                origin = self.new_origins.pop((u.client, u.job), None)
                if origin is not None:
                    keep.append((u.client, u.job, origin))
        if keep or self._forget:
            with self.store.tx():
                self.store.db.executemany(
                    "DELETE FROM edge_origins WHERE client=? AND job=?", self._forget
                )
                self.store.db.executemany(
                    "INSERT OR IGNORE INTO edge_origins VALUES (?, ?, ?)", keep
                )
            self._forget = []
        # the bounded claims of the jobs acknowledged in this batch, in its transaction: the
        # window a restart rebuilds from the log is the one this run has
        claimed = [
            (c, j, *self.claims[(c, j)])
            for k, _, c, j, _, _ in events
            if k == "acked" and c is not None and j is not None and (c, j) in self.claims
        ]
        sql = "INSERT OR REPLACE INTO edge_claims VALUES (?, ?, ?, ?)"
        also = [(sql, claimed)] if claimed else []
        rows, self.seq = self.store.log_batch(self.seq, events, also)
        self._forget = [(c, j) for k, _, c, j, _, _ in events
                        if k == "acked" and c is not None and j is not None]  # fmt: skip
        crash_point("edge-logged")
        return rows

    def origins_of(self, keys: Iterable[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
        """The kept client signatures of these jobs (those it has)."""
        q = "SELECT origin FROM edge_origins WHERE client=? AND job=?"
        out = {}
        for k in keys:
            row = self.store.db.execute(q, k).fetchone()
            if row is not None:
                out[k] = bytes(row[0])
        return out

    def step(self, rows: Iterable[EventRow], *, defer: bool = False) -> Effects:
        effects = Effects()
        for row in rows:
            effects.merge(self._apply(row))
        effects.merge(self._flush(force=False))
        live = {t.version for t in self.tasks.values()}
        newest = max(self.models, default=-1)
        for v in [v for v in self.models if v not in live and v != newest]:
            del self.models[v]
        return effects

    def settle(self) -> None:
        """Nothing: an edge checkpoints nothing (its log and its parent hold its state)."""

    # -- internals -----------------------------------------------------------------------------
    def _apply(self, row: EventRow) -> Effects:
        self.now = max(self.now, row.time)
        effects = Effects()
        if row.kind == "timer":
            effects.merge(self._flush(force=False, version=row.tag))
            return effects
        if row.kind == "acked":  # the link deleted the spool files; the log keeps the key
            if self.bounds is not None and row.client is not None and row.job is not None:
                claim = self.claims.pop((row.client, row.job), None)
                if claim is not None:  # folded, forwarded, and now in the parent's aggregate
                    self.window = slide(
                        self.window, [(str(row.client), *claim)], self.bounds.window
                    )
            return effects
        if row.kind == "dropout" and row.job is not None and row.client is not None:
            self.tasks.pop(row.job, None)
            self.dropped.append((row.client, row.job))
            return effects
        if row.kind == "arrival" and row.upload is not None:
            u = row.upload
            self.tasks.pop(u.job, None)
            masked = u.job in self.secure.dims or u.nbytes != self.spec.nbytes
            self.secure.arrived(u.client, u.job, True)
            if masked and self.mode == "aggregate":
                self._fold_masked((u,), effects)
                return effects
            if self.mode == "relay":
                loss = float(u.metrics.get("train_loss", math.nan))
                effects.forward.append(
                    Forward(u.version, [(u.client, u.job, u.weight, loss)], relay=u, paths=[u.path])
                )
                return effects
            pend = self._pending(u.version, effects)
            delta = np.memmap(u.path, dtype=self.spec.dtype, mode="r", shape=(self.spec.size,))
            update = Update(delta=delta, weight=u.weight, client_id=str(u.client),
                            base_version=u.version, metrics=u.metrics)  # fmt: skip
            try:
                claim = None
                if self.bounds is not None:
                    norm = check_claim(self.bounds, self.spec, u.version, update)
                    if pend.held is not None:  # warming up: bounded when the partial is flushed
                        pend.held.append((update, norm, u))
                        return effects
                    lim = limits(self.bounds, self.window, "this edge's recent claims")
                    update, w, n = bound_update(self.bounds, update, norm, lim)
                    claim = (w, n)
                self._fold(pend, u, update)
            except UpdateError as e:  # refused by a pre-transform: reported as a dropout
                log.warning("job %d refused at the edge: %s", u.job, e)
                self.dropped.append((u.client, u.job))
                return effects
            finally:
                del delta
            self._folded(pend, u, claim)
            return effects
        if row.kind == "partial" and row.parts:
            p = row.parts[0]
            for u in row.parts:
                self.tasks.pop(u.job, None)
            if row.info.get("masked"):  # a child edge's masked partial (an intermediate edge)
                for u in row.parts:
                    self.secure.arrived(u.client, u.job, True)
                self._fold_masked(row.parts, effects)
                return effects
            other = load_partial(self.agg, self.spec, p.version, p.path, row.info, len(row.parts))
            pend = self._pending(p.version, effects)
            self.agg.merge(pend.state, other)
            pend.jobs += [
                (u.client, u.job, u.weight, float(u.metrics.get("train_loss", math.nan)))
                for u in row.parts
            ]
            pend.paths.append(p.path)
            return effects
        raise StateError(f"malformed edge event {row.seq} ({row.kind})")

    def _fold_masked(self, parts: Sequence[UploadRow], effects: Effects) -> None:
        """A masked upload of a secure round (one part), or a child edge's masked partial
        (its jobs, one spool file), added into its version's masked partial with wrap-around
        uint32 adds: the masks cancel only in the root's total, so no tier sees a plaintext
        update. An intermediate edge merges its child edges' masked partials and its own
        clients' masked uploads alike, and forwards one masked partial up."""
        u = parts[0]
        values = np.fromfile(u.path, dtype=np.uint32)
        m = self.masked.get(u.version)
        if m is None:
            m = self.masked[u.version] = Forward(u.version, [], masked=np.zeros_like(values))
            effects.timers.append((self.now + self.flush_after, u.version))
        assert m.masked is not None
        if m.masked.size != values.size:
            log.warning("jobs %s: masked values of another length: not folded",
                        [p.job for p in parts])  # fmt: skip
            self.dropped += [(p.client, p.job) for p in parts]
            return
        np.add(m.masked, values, out=m.masked)  # modulo 2**32
        m.jobs += [(p.client, p.job, 1.0, float(p.metrics.get("train_loss", math.nan)))
                   for p in parts]  # fmt: skip
        m.paths.append(u.path)
        crash_point("edge-masked")

    def _fold(self, pend: _Pending, u: UploadRow, update: Update) -> None:
        """Fold one client's (bounded) update into its version's partial (or leaf rule)."""
        if self.leaf is not None:
            if pend.leaf is None:
                pend.leaf = self.leaf.leaf.init(self.spec, version=u.version)
            self.leaf.leaf.fold(pend.leaf, update)
            pend.leaf_jobs.append((u.client, u.job))
        else:
            self.agg.fold(pend.state, update)

    def _folded(self, pend: _Pending, u: UploadRow, claim: tuple[float, float] | None) -> None:
        """A folded update's job, as the partial lists it: its client's signed claim (the
        weight the client signed, not the bounded one the partial's sum holds)."""
        loss = float(u.metrics.get("train_loss", math.nan))
        pend.jobs.append((u.client, u.job, u.weight, loss))
        pend.paths.append(u.path)
        if claim is not None:
            pend.claims[(u.client, u.job)] = claim

    def _acked_window(self, rows: Sequence[EventRow]) -> list[Claim]:
        """The reference window from the log: the bounded claims of the acknowledged jobs, in
        the order the acknowledgements were logged (each client's latest is kept)."""
        assert self.bounds is not None
        q = "SELECT client, job, weight, norm FROM edge_claims"
        kept = {int(c): (int(j), float(w), float(n)) for c, j, w, n in self.store.db.execute(q)}
        acked: list[Claim] = []
        for r in rows:
            k = kept.get(r.client) if r.kind == "acked" and r.client is not None else None
            if k is not None and k[0] == r.job:
                acked.append((str(r.client), k[1], k[2]))
        return slide((), acked, self.bounds.window)

    def _warm(self) -> bool:
        return self.bounds is not None and len(self.window) >= self.bounds.warmup

    def _enough(self, pend: _Pending) -> bool:
        """Whether a partial may be flushed before its version's tasks are all resolved: not
        while it keeps fewer updates (clients) than the warm-up asks to bound them against."""
        if not pend.held or self.bounds is None or self._warm():
            return True  # (a partial of child partials only: nothing kept to bound)
        return len({u.client for _, _, u in pend.held}) >= self.bounds.warmup

    def _settle(self, pend: _Pending) -> None:
        """Bound the updates kept while warming up and fold them, in arrival order: against
        the window if it is warm by now, else against these updates' own claims (each
        client's latest), as the root bounds a warming-up round at its close."""
        assert self.bounds is not None and pend.held is not None
        held, pend.held, b = pend.held, None, self.bounds
        if self._warm():
            lim = limits(b, self.window, "this edge's recent claims")
        else:
            own = [(str(u.client), float(u.weight), n) for _, n, u in held]
            lim = limits(b, slide((), own, len(own)), "this partial's own median")
        for update, norm, u in held:
            try:
                bounded, w, n = bound_update(b, update, norm, lim)
                self._fold(pend, u, bounded)
            except UpdateError as e:
                log.warning("job %d refused at the edge: %s", u.job, e)
                self.dropped.append((u.client, u.job))
                continue
            self._folded(pend, u, (w, n))

    def _seal(self, pend: _Pending) -> None:
        """The leaf rule's result over this edge's clients, as a mean partial merged into the
        forward (its jobs' weights sum to the partial's weight)."""
        assert self.leaf is not None
        try:
            sealed = self.leaf.seal(pend.leaf, leaf_id="edge")
        except (UpdateError, FedaggError) as e:  # too few updates for the rule, say
            log.warning("leaf rule refused %d updates: %s", self.leaf.leaf.count(pend.leaf), e)
            leaf_jobs = set(pend.leaf_jobs)
            self.dropped += pend.leaf_jobs
            pend.jobs = [x for x in pend.jobs if (x[0], x[1]) not in leaf_jobs]
            return
        self.agg.merge(pend.state, sealed)

    def _pending(self, version: int, effects: Effects) -> _Pending:
        pend = self.pending.get(version)
        if pend is None:
            pend = self.pending[version] = _Pending(self.agg.init(self.spec, version=version))
            if self.bounds is not None and not self._warm():
                pend.held = []
            effects.timers.append((self.now + self.flush_after, version))
        return pend

    def _flush(self, *, force: bool, version: int | None = None) -> Effects:
        effects = Effects()
        open_versions = {t.version for t in self.tasks.values()}
        for v in sorted(self.masked):  # masked partials: when their version's tasks resolved
            if force or v == version or v not in open_versions:
                effects.forward.append(self.masked.pop(v))
        for v in sorted(self.pending):
            pend = self.pending[v]
            if force or v == version or pend.due or v not in open_versions:
                if not force and v in open_versions and not self._enough(pend):
                    pend.due = True  # warming up, too few to bound against: wait for more
                    continue
                del self.pending[v]
                if pend.held is not None:
                    self._settle(pend)
                if pend.leaf is not None:
                    self._seal(pend)
                if pend.jobs:
                    self.claims.update(
                        (k, pend.claims[k]) for k in ((c, j) for c, j, _, _ in pend.jobs)
                        if k in pend.claims
                    )  # fmt: skip
                    effects.forward.append(Forward(v, pend.jobs, state=pend.state,
                                                   paths=pend.paths))  # fmt: skip
        if self.dropped:  # reported with the next forward, or alone if none is waiting
            if effects.forward:
                effects.forward[-1].dropped += self.dropped
                self.dropped = []
            elif force or not self.pending:
                effects.forward.append(Forward(-1, [], dropped=self.dropped))
                self.dropped = []
        self.forwarded += len(effects.forward)
        return effects
