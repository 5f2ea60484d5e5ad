"""The server's federation engine: a round or async policy, event-sourced and crash-safe.

This is the deployment counterpart of the simulator's event loop. It holds the same policy
objects (``SyncPolicy``, ``AsyncPolicy``, ...) and feeds them the same events; what differs is
where events come from (the network, a real clock) and that every event is made durable
before the policy sees it:

1. an accepted upload is already on disk (the spool file, fsynced) when it gets here;
2. :meth:`Federation.log` writes the events of a batch and the uploads' idempotency keys
   ``(client, job)`` in one SQLite transaction; only then are the uploads acknowledged;
3. :meth:`Federation.step` feeds the logged events to the policy, in log order;
4. after a round closes (and, with ``checkpoint_updates=k``, after every k folds mid-round),
   the policy's whole state is checkpointed: model, optimizer, the aggregation state (the
   monoid's partial sums), sampling state. Spool files the checkpoint covers are deleted.

On restart, :meth:`Federation.open` loads the last checkpoint and replays the events logged
after it, re-reading their updates from the spool: the policy is deterministic, so the state
after the replay is the state before the crash, bit for bit, and an accepted update is folded
exactly once. A retried upload finds its key in the log and is acknowledged without being
counted again.

Nothing here does network I/O or reads a clock: the server passes ``now`` in.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fedagg._checkpoint import dump, loads, register
from fedagg.core import kernels
from fedagg.core.spec import ParamSpec
from fedagg.core.strategy import ServerState
from fedagg.core.update import Update
from fedagg.deploy._canonical import Canonical, CanonicalState
from fedagg.deploy._commit import Committer, cut_lost_tail, logged_files, settle
from fedagg.deploy._faults import crash_point
from fedagg.deploy._files import secret_key
from fedagg.deploy._free import FreeSpools
from fedagg.deploy._ingest import FoldIngest
from fedagg.deploy._partial import accumulator_of, load_partial, read_into
from fedagg.deploy._receivers import read_buffer, start_receivers, stop_receivers
from fedagg.deploy._secure import SecureBook, SecureCtx, StageRequest, decode_reply, reopen
from fedagg.deploy._spoolcheck import check_size, fsync_dir, verified, verify_file
from fedagg.deploy._store import RECOVERY_HINT, EventRow, LogItem, Store, UploadRow
from fedagg.errors import ConfigError, StateError
from fedagg.policy import (
    Applied,
    Arrival,
    ClientDPPolicy,
    Commit,
    Dispatch,
    Dropout,
    Event,
    Finish,
    MaskedMerge,
    Merge,
    Policy,
    PrivatePolicy,
    RoundStats,
    SecurePolicy,
    SecureReply,
    SecureRequest,
    SetTimer,
    Start,
    Timer,
    partial_epochs,
)

__all__ = ["Effects", "Federation", "LogItem", "TaskInfo"]

Arr = npt.NDArray[Any]
Order = Literal["arrival", "canonical"]
log = logging.getLogger("fedagg.server")


@register
@dataclass(frozen=True, slots=True)
class TaskInfo:
    """One job: which client trains, from which model version, for how many epochs."""

    job: int
    client: int
    version: int
    epochs: int
    #: the per-task client config as it travels (JSON), where it is not computed from the
    #: version here: an edge's tasks carry their parent's ("" at the root)
    config: str = ""
    #: secure aggregation: the stage-0 request of the job's secure round (it rides on the
    #: task), None for a plaintext task
    secure: StageRequest | None = None


@dataclass
class Effects:
    """What the server must do after some events: send tasks, arm timers, report rounds."""

    tasks: list[TaskInfo] = field(default_factory=list)
    timers: list[tuple[float, int]] = field(default_factory=list)
    rounds: list[RoundStats] = field(default_factory=list)
    finished: bool = False
    min_open_job: int = 0  # every job below this one is resolved
    forward: list[Any] = field(default_factory=list)  # an edge's partials to send up
    #: by closed round: the model version it left and its flat parameters (to evaluate)
    round_models: dict[int, tuple[int, Arr]] = field(default_factory=dict)
    #: secure aggregation stage requests (past stage 0) to push to their clients
    secure: list[StageRequest] = field(default_factory=list)

    def merge(self, other: Effects) -> None:
        self.forward += other.forward
        self.secure += other.secure
        self.round_models.update(other.round_models)
        self.tasks += other.tasks
        self.timers += other.timers
        self.rounds += other.rounds
        self.finished = self.finished or other.finished
        self.min_open_job = max(self.min_open_job, other.min_open_job)


def task_problem(tasks: dict[int, TaskInfo], client: int, job: int, version: int) -> str | None:
    """Why (client, job, version) is not an open task of that client in ``tasks``:
    ``"unknown"``, ``"denied"`` (another client's), ``"version"``; None if it is."""
    task = tasks.get(job)
    if task is None:
        return "unknown"
    if task.client != client:
        return "denied"
    if task.version != version:
        return "version"
    return None


# -- canonical fold order ------------------------------------------------------------------------
@register
@dataclass
class _Snapshot:
    """What a checkpoint holds besides the policy's state."""

    policy: Any
    seq: int
    next_job: int
    now: float
    tasks: dict[int, TaskInfo]
    timers: dict[int, float]
    models: dict[int, Arr]
    finished: bool
    secure: SecureBook | None = None  # (checkpoints from before secure aggregation: None)


class Federation:
    """Event-sourced policy execution with a durable log (see the module docstring)."""

    def __init__(
        self,
        policy: Policy,
        server: ServerState,
        *,
        num_clients: int,
        seed: int,
        directory: str | os.PathLike[str],
        epochs: int = 1,
        checkpoint_every: int = 1,
        checkpoint_updates: int = 0,
        identity: dict[str, str] | None = None,
        identities: Sequence[bytes] | None = None,
    ) -> None:
        if checkpoint_every < 1 or checkpoint_updates < 0:
            raise ConfigError("checkpoint_every must be >= 1 and checkpoint_updates >= 0")
        self.policy = policy
        #: the initial server state, until :meth:`open` has built the policy's state from it
        #: (then None: the policy's state holds the model, and keeping this would pin version 0)
        self.server0: ServerState | None = server
        self.spec: ParamSpec = server.spec
        #: the clients' Ed25519 identities (raw public keys, the keyring's order): what
        #: secure aggregation checks their signatures with
        self.ctx = SecureCtx(num_clients, seed, identities or ())
        self.secure = SecureBook()
        #: whether rounds run secure aggregation (a SecurePolicy): edges are refused
        self.secure_rounds = isinstance(policy, SecurePolicy)
        if self.secure_rounds and checkpoint_updates:
            raise ConfigError(
                "checkpoint_updates > 0 checkpoints mid-round, which secure aggregation rounds "
                "cannot resume from (their session is rebuilt only at a round's start): use 0"
            )
        self.seed = seed
        self.epochs = epochs
        self.checkpoint_every = checkpoint_every
        self.checkpoint_updates = checkpoint_updates
        self._folds_since_ckpt = 0
        self.dir = Path(directory)
        self.spool = self.dir / "spool"
        self.spool.mkdir(parents=True, exist_ok=True)
        self.store = Store(self.dir / "state.db")
        if isinstance(policy, PrivatePolicy | ClientDPPolicy):  # DP: noise, cohorts from a secret
            self.ctx.noise_secret = secret_key(self.dir / "dp.key")
        self.identity = identity or {}
        self.state: Any = None
        self.seq = 0  # the last event logged
        self.applied = 0  # the last event fed to the policy (what a checkpoint covers)
        self.next_job = 0
        self.now = 0.0
        self.tasks: dict[int, TaskInfo] = {}  # jobs not yet resolved (arrival or dropout)
        self.timers: dict[int, float] = {}
        #: the parameters of earlier versions that open tasks still need (the current
        #: version's are the server's own, see :meth:`model`)
        self.models: dict[int, Arr] = {}
        #: recycled spool files, overwritten by the next uploads (any thread)
        self.free = FreeSpools(self.spool, self.spec.nbytes)
        self.finished = False
        self.started = False
        self._since_ckpt = 0
        self._due = False  # a checkpoint left to settle() (a deferred step)
        self.replayed = 0
        #: seconds spent logging events, in the policy (fold, finalize, optimizer) and
        #: writing checkpoints
        self.timings = {"log": 0.0, "policy": 0.0, "checkpoint": 0.0}
        self.checkpoints = 0  # written by this process
        #: fold on receive: the lease of the upload folding as it arrives, if any
        self.ingest = FoldIngest(self)
        #: ``[deploy] durability`` (set before :meth:`open`, see :meth:`set_durability`); with
        #: "retained", the committer of spool files and the watermark (:mod:`._commit`)
        self.durability, self.sync_spools = "fsync", True
        self.committer: Committer | None = None
        self.cut: list[int] = []  # jobs cut from the log at the last open (a power failure)
        #: "retained": jobs of the last logged batch whose uploads are synced before their
        #: acknowledgement (below the watermark: their clients would not keep them)
        self.late: set[int] = set()

    def set_durability(self, mode: str, sync: bool = True) -> None:
        """Before :meth:`open`: "fsync", or "retained" (not under secure aggregation, whose
        clients keep nothing: "fsync" then)."""
        self.durability = "fsync" if self.secure_rounds else mode
        self.sync_spools = sync

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self) -> Effects:
        """Start afresh, or recover: load the last checkpoint and replay the log after it.
        Returns what the server must (re)do: outstanding tasks and timers."""
        stored = {k: self.store.meta(k) for k in self.identity}
        if any(v is not None for v in stored.values()):
            diff = [k for k, v in stored.items() if v != self.identity[k]]
            if diff:
                raise StateError(
                    f"the state directory {self.dir} belongs to another federation "
                    f"(differs in: {', '.join(diff)}); use a new one"
                )
        else:
            self.store.set_meta(self.identity)
        # the whole event log against its hash chain: an edit or a cut is a StateError
        self.store.verify()
        for tmp in self.spool.glob("tmp-*"):  # uploads cut off by a crash: never acknowledged
            tmp.unlink()
        self.free.found()
        ckpts = self.store.checkpoints()
        server0, self.server0 = self.server0, None
        if not ckpts:
            if server0 is None:
                raise StateError("open() was called twice on this Federation")
            self.state = self.policy.init(server0, self.ctx)
            self.seq = self.store.last_seq()
            if self.seq:
                raise StateError(
                    f"events were logged in {self.store.path} but no checkpoint is recorded: "
                    f"{RECOVERY_HINT}"
                )
            self._checkpoint()
            self._settle()
            return Effects()
        at, path = ckpts[0]
        self.cut = cut_lost_tail(self.store, self.dir, at)  # "retained": lost in a power failure
        snap = loads(self.store.read_checkpoint(at))  # its sha256 checked against its record
        if not isinstance(snap, _Snapshot):
            raise StateError(f"{path} is not a federation checkpoint")
        self.state, self.seq, self.next_job = snap.policy, snap.seq, snap.next_job
        self.applied = snap.seq
        self.now, self.tasks, self.timers = snap.now, dict(snap.tasks), dict(snap.timers)
        self.models, self.finished = dict(snap.models), snap.finished
        self.models.pop(self.server.version, None)  # a copy of the server's (older files)
        self.secure = snap.secure or SecureBook()
        reopen(self.state, self.tasks, self.ctx)  # the secure round it opened, if any
        self.started = self.seq > 0
        effects = Effects()
        for row in self.store.events_after(self.seq):
            effects.merge(self._apply(row))
            effects.round_models.clear()  # replayed rounds are not evaluated again
            self.seq = row.seq
            self.replayed += 1
        # what the server must redo: every task still open, every timer still armed
        effects.tasks = sorted(self.tasks.values(), key=lambda t: t.job)
        effects.timers = sorted((at, tag) for tag, at in self.timers.items())
        effects.finished = self.finished
        self._settle()
        return effects

    def _settle(self) -> None:
        low, retained = min(self.tasks, default=self.next_job), self.durability == "retained"
        self.committer = settle(self.store, self.dir, self.spool, self.seq, self.server.version,
                                low, retained, self.sync_spools)  # fmt: skip

    def secure_dim(self, job: int) -> int | None:
        """The masked upload's length (uint32 words) of a secure round's job, else None."""
        return self.secure.dims.get(job)

    def keep_origin(self, client: int, job: int, origin: bytes) -> None:
        """An accepted upload's client signatures: the root has no use for them (an edge
        forwards them, see :meth:`fedagg.deploy._edge.EdgeEngine.keep_origin`)."""

    def close(self) -> None:
        self.ingest.revoke()
        if self.committer is not None:
            self.committer.close()
        self.store.close()
        stop_receivers(getattr(getattr(self.policy, "strategy", None), "aggregator", None))

    def warmup(self) -> None:
        """Compile the aggregator's kernels on a tiny update now, not on the first upload
        (numba compiles per signature: a read-only array like a spool file's view)."""

        small = np.zeros(1024, self.spec.dtype)
        small.flags.writeable = False
        kernels.all_finite(small, use_numba=True, parallel=False)
        self.ingest.warmup()  # fold on receive's kernels
        kernels.sum_squares(small, use_numba=True)  # the bounds' norm pass
        strategy = getattr(self.policy, "strategy", None)
        agg = getattr(strategy, "aggregator", None)
        while isinstance(agg, Canonical):  # the rule itself (a wrapper's state must not see it)
            agg = agg.inner
        if agg is None:
            return
        start_receivers(agg)  # deploy.receivers: their processes, before the server listens
        # serial and parallel kernels, on a read-only array (as a spool file's view is)
        for n in (1024, 2 * kernels.PARALLEL_MIN_WORK):
            x = np.zeros(n, self.spec.dtype)
            x.flags.writeable = False
            spec = ParamSpec.from_arrays([np.zeros(n, self.spec.dtype)])
            with contextlib.suppress(Exception):  # best effort: some rules need several
                st = agg.init(spec, version=None)
                st = agg.fold(st, Update(delta=x, weight=1.0))
                agg.finalize_flat(st)

    # -- the server's entry points (engine thread only) ----------------------------------------
    def check_upload(self, client: int, job: int, version: int) -> str | None:
        """Why an upload for (client, job) cannot be accepted, or None. ``"duplicate"`` means
        it was accepted before."""
        if self.store.has_upload(client, job):
            return "duplicate"
        return self.task_problem(client, job, version)

    def task_problem(self, client: int, job: int, version: int) -> str | None:
        """Why (client, job, version) is not an open task of that client, without asking the
        log (safe from the server's event loop): ``"unknown"``, ``"denied"``, ``"version"``."""
        return task_problem(self.tasks, client, job, version)

    def log(self, events: Sequence[LogItem]) -> list[EventRow | None]:
        """Make a batch of events durable, in one transaction (see :meth:`Store.log_batch`)."""
        t0 = time.perf_counter()
        events, dup = self.secure.fresh(events)
        rows, self.seq = self.store.log_batch(self.seq, events)
        for i in dup:  # secure replies already logged (or twice in this batch): duplicates
            rows.insert(i, None)
        if self.committer is not None:  # "retained": their spools are synced in the background
            self.late = self.committer.logged(self.seq, *logged_files(rows))
        self.timings["log"] += time.perf_counter() - t0
        crash_point("logged")
        return rows

    def step(self, rows: Iterable[EventRow], *, defer: bool = False) -> Effects:
        """Feed logged events to the policy; checkpoint when rounds have closed (with
        ``defer``, in :meth:`settle`, once the effects are out: a checkpoint only shortens a
        recovery, the log has the events, so the next round's tasks need not wait for it;
        the federation's end is checkpointed here)."""
        effects = Effects()
        for row in rows:
            if row.kind == "secure":
                crash_point(f"secure-{row.tag}")
            elif row.info.get("masked") or (row.kind == "arrival" and row.job in self.secure.dims):
                crash_point("secure-2")  # a masked upload, or an edge's masked partial
            if row.kind in ("arrival", "partial"):
                crash_point("fold")
                self._folds_since_ckpt += 1
            t0 = time.perf_counter()
            effects.merge(self._apply(row))
            self.timings["policy"] += time.perf_counter() - t0
            if effects.rounds:
                crash_point("applied")
            mid = 0 < self.checkpoint_updates <= self._folds_since_ckpt
            if self._since_ckpt >= self.checkpoint_every or mid:
                self._due = defer and not self.finished
                if not self._due:
                    self._checkpoint()
        if self.committer is not None:  # no new model version leaves before it is durable
            vs = [t.version for t in effects.tasks] + [v for v, _ in effects.round_models.values()]
            self.committer.barrier(self.applied, min(self.tasks, default=self.next_job), vs,
                                   bool(effects.rounds) or effects.finished,
                                   high=self.next_job)  # fmt: skip
        return effects

    def settle(self) -> None:
        """The checkpoint a deferred :meth:`step` left due, if any."""
        if self._due:
            self._due = False
            self._checkpoint()

    def ready(self) -> bool:
        """Whether every open task is known here (the root: always)."""
        return True

    def partial_accumulator(self) -> str | None:
        """The accumulator partial aggregates must use to merge here (None: they cannot)."""
        agg = getattr(getattr(self.policy, "strategy", None), "aggregator", None)
        return None if agg is None else accumulator_of(agg)

    def model(self, version: int) -> Arr | None:
        """The flat model of ``version`` while a task needs it (None if no longer kept)."""
        if version == self.server.version:
            return self.server.params
        return self.models.get(version)

    @property
    def server(self) -> ServerState:
        s = getattr(self.state, "server", None)
        if s is None:  # a wrapper's state (secure aggregation): its inner policy's
            s = getattr(getattr(self.state, "inner", None), "server", None)
        if not isinstance(s, ServerState):
            raise StateError("the policy state holds no ServerState")
        return s

    # -- internals ---------------------------------------------------------------------------
    def _event(self, row: EventRow) -> Event:
        if row.kind == "start":
            return Start(row.time)
        if row.kind == "timer":
            return Timer(row.time, int(row.tag or 0))
        if row.kind == "dropout":
            return Dropout(row.time, int(row.client or 0), int(row.job or 0))
        if row.kind == "arrival" and row.upload is not None:
            u = row.upload
            if not u.path or not os.path.exists(u.path):
                raise StateError(f"the spooled update of job {u.job} is missing ({u.path!r})")
            delta = self.ingest.folded(u)  # folded on receive, if that stands
            if delta is None:
                delta = self._read(u, f"client {u.client}, job {u.job}")
            update = Update(
                delta=delta, weight=u.weight, client_id=str(u.client), base_version=u.version,
                metrics=u.metrics,
            )  # fmt: skip
            return Arrival(row.time, u.client, u.job, update, {}, None, u.nbytes)
        if row.kind == "secure":
            message = decode_reply(int(row.tag or 0), base64.b64decode(row.info["message"]))
            return SecureReply(row.time, int(row.client or 0), int(row.job or 0),
                               int(row.info["round"]), int(row.tag or 0), message)  # fmt: skip
        if row.kind == "partial" and row.parts and row.info.get("masked"):  # via an edge
            p = row.parts[0]
            if not p.path or not os.path.exists(p.path):
                raise StateError(f"the spooled masked partial {p.path!r} is missing")
            values: Arr = np.fromfile(p.path, dtype=np.uint32)
            verified(p, values, f"masked partial, job {p.job}")
            masked = tuple((u.client, u.job, float(u.metrics.get("train_loss", float("nan"))))
                           for u in row.parts)  # fmt: skip
            return MaskedMerge(row.time, self.secure.rounds.get(p.job, -1), masked, values)
        if row.kind == "partial" and row.parts:
            p = row.parts[0]
            if not p.path or not os.path.exists(p.path):
                raise StateError(f"the spooled partial aggregate {p.path!r} is missing")
            verify_file(p, f"partial aggregate, job {p.job}")
            agg = getattr(getattr(self.policy, "strategy", None), "aggregator", None)
            if agg is None:
                raise StateError("this policy cannot merge partial aggregates")
            state = load_partial(agg, self.spec, p.version, p.path, row.info, len(row.parts))
            jobs = tuple(
                (u.client, u.job, u.weight, float(u.metrics.get("train_loss", float("nan"))))
                for u in row.parts
            )
            return Merge(row.time, jobs, state)
        raise StateError(f"malformed event {row.seq} ({row.kind})")

    def take_free(self) -> Path | None:
        """A spool file to overwrite (any thread), or None."""
        return self.free.take()

    def _read(self, u: UploadRow, what: str) -> Arr:
        """A spooled update as an array, re-verified against what was logged when it was
        accepted (size, and its checksum, see :func:`~fedagg.deploy._spoolcheck.verified`): a
        file altered, truncated or corrupted on disk is a :class:`StateError`, never folded.

        A read-only map of the file, hashed through the map: its pages are the page cache's
        (where the upload just landed), so no model-sized buffer is read into (a pooled one
        was a third model at a round's close, and the copy cost more than the map's page
        faults: 4-5x for 256 MiB). The same whether it is folded at once (arrival order) or
        kept until the round closes (canonical order, or bounds warming up, see
        :meth:`Canonical.holds`), where it costs no memory until it is folded."""
        n, path = self.spec.size, u.path
        dim = self.secure.dims.get(u.job)
        if dim is not None:  # a masked upload (uint32, uniform noise): read as it is
            check_size(path, u.nbytes, 4 * dim, what)
            masked: Arr = np.fromfile(path, dtype=np.uint32, count=dim)
            verified(u, masked, what)
            return masked
        check_size(path, u.nbytes, n * self.spec.dtype.itemsize, what)
        agg = getattr(getattr(self.policy, "strategy", None), "aggregator", None)
        held = isinstance(agg, Canonical) and agg.holds(getattr(self.state, "agg", None))
        # deploy.receivers: a shared-memory slot they fold in place (not for an update kept
        # until the round's close: the slot is reused by the next read)
        buf = None if held else read_buffer(agg)
        if buf is not None:
            read_into(path, [buf.data.cast("B")], "the spooled update")
            out: Arr = buf.view()
            out.flags.writeable = False
        else:  # mapped read-only: the page cache's pages, no model-sized copy
            out = np.memmap(path, dtype=self.spec.dtype, mode="r", shape=(n,))
        verified(u, out, what)
        return out

    def _apply(self, row: EventRow) -> Effects:
        self.ingest.before(row)  # an active fold lease is revoked, unless row is its arrival
        ev = self._event(row)
        self.applied = row.seq
        self.now = max(self.now, row.time)
        if row.kind == "start":
            self.started = True
        elif row.kind == "timer":
            self.timers.pop(int(row.tag or 0), None)
        elif row.kind == "secure":
            self.secure.answered(int(row.client or 0))
        elif row.job is not None:
            self.tasks.pop(row.job, None)
            self.secure.arrived(int(row.client or 0), row.job, row.kind == "arrival")
        for u in row.parts:
            self.tasks.pop(u.job, None)
            self.secure.arrived(u.client, u.job, True)
        agg = getattr(getattr(self.policy, "strategy", None), "aggregator", None)
        adopt = getattr(agg, "adopt", None)
        if adopt is not None:  # bounds: the next round's window, from the state (a loaded one)
            adopt(getattr(self.state, "agg", None))
        version = self.server.version
        if any(t.version == version for t in self.tasks.values()):
            self.models[version] = self.server.params  # kept if this step makes a new version
        actions = self.policy.step(self.state, ev, self.ctx)
        self.ingest.after()
        effects = Effects()
        for a in actions:
            if isinstance(a, Dispatch):
                if a.server_extra is not None:
                    raise ConfigError(
                        "policies that send extra server state (SCAFFOLD) are simulation-only"
                    )
                version = self.server.version
                for c, slow in zip(a.clients, a.partial, strict=True):
                    job = self.next_job
                    self.next_job += 1
                    epochs = partial_epochs(self.epochs, self.seed, job) if slow else self.epochs
                    t = TaskInfo(job, int(c), version, epochs)
                    self.tasks[job] = t
                    effects.tasks.append(t)
            elif isinstance(a, SetTimer):
                self.timers[a.tag] = a.at
                effects.timers.append((a.at, a.tag))
            elif isinstance(a, Applied):
                s = a.stats
                stats = {
                    "round": s.round, "version": s.version, "selected": s.selected,
                    "dispatched": s.dispatched, "folded": s.folded, "dropped": s.dropped,
                    "refused": s.refused, "late": s.late, "applied": s.applied,
                    "started": s.started, "ended": s.ended, "client_loss": s.client_loss,
                    "staleness_mean": s.staleness_mean, "participants": list(s.participants),
                }  # fmt: skip
                with self.store.tx():
                    self.store.put_round(s.round, s.version, s.folded, s.applied, row.seq, stats)
                effects.rounds.append(s)
                effects.round_models[s.round] = (self.server.version, self.server.params)
                self._since_ckpt += 1
            elif isinstance(a, Finish):
                self.finished = True
                effects.finished = True
            elif isinstance(a, Commit):
                pass  # client states live on the clients in deployment
            elif isinstance(a, SecureRequest):
                for r in self.secure.request(a.round, a.stage, a.messages, a.jobs):
                    task = self.tasks.get(r.job)
                    if r.stage == 0:  # it rides on its training task
                        if task is None or task.client != r.client:
                            raise StateError(f"secure round {r.round}: job {r.job} is not an "
                                             f"open task of client {r.client}")  # fmt: skip
                        self.tasks[r.job] = task = replace(task, secure=r)
                        effects.tasks = [task if t.job == r.job else t for t in effects.tasks]
                    else:
                        effects.secure.append(r)
        live = {t.version for t in self.tasks.values()} - {self.server.version}
        for v in [v for v in self.models if v not in live]:
            del self.models[v]  # no open task needs it (the current one: the server holds it)

        effects.min_open_job = min(self.tasks, default=self.next_job)
        return effects

    def _checkpoint(self) -> None:
        self.ingest.revoke()  # never a partial fold in a checkpoint
        agg = getattr(self.state, "agg", None)
        if isinstance(agg, CanonicalState) and agg.pending:
            return  # updates kept until the close (canonical order, bounds warming up): the
            # log covers them; try after the next event
        t0 = time.perf_counter()
        snap = _Snapshot(
            self.state, self.applied, self.next_job, self.now, dict(self.tasks), dict(self.timers),
            dict(self.models), self.finished, self.secure,
        )  # fmt: skip
        path = self.dir / f"checkpoint-{self.applied:012d}.npz"
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # private, any umask
        with os.fdopen(fd, "wb") as f:
            digest = dump(snap, f)  # streamed and hashed as written: no copy in memory
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(self.dir)
        crash_point("checkpoint")
        self.store.add_checkpoint(self.applied, str(path), self.server.version, digest)
        if self.committer is not None:  # what it covers needs no spool fsync
            self.committer.covered(self.applied)
        self._since_ckpt = self._folds_since_ckpt = 0
        self._due = False
        # what the checkpoint covers is no longer needed: older checkpoints, folded spools
        for _, old in self.store.checkpoints()[1:]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(old)
        for p in self.store.spooled_through(self.applied):
            self.free.recycle(p)
        self.store.retire(self.applied)
        self.timings["checkpoint"] += time.perf_counter() - t0
        self.checkpoints += 1
