"""Asynchronous policies: FedBuff, FedAsync, FedFix and async FedAvg as one mechanism.

Every policy here is the general stochastic-weight update of Fraboni et al. (JMLR 2023)::

    x <- x + lr * sum_i omega_i * delta_i        omega_i = b_i * s(tau_i) * c_i / D

where ``delta_i`` was computed against the model client i last *received*, ``tau_i`` is its
staleness (server steps since that model), ``b_i`` its base weight (sample count or 1),
``s`` a staleness function, ``c_i`` an optional correction that makes ``E[omega_i] = p_i``
(``windows``: FedFix's ``ceil(tau_i / dt)``; ``frequency``: ``1 / freq_i`` estimated online
with FedAU's interval estimator), and ``D`` the normaliser: the sum of the step's base
weights (``participants``) or the number of clients N (``clients``, i.e. ``p_i = 1/N``).

What differs between the papers is only *when* the server steps and *who* restarts then:

========================  ============  ==========  ===========================================
policy                    trigger       restart     weights
========================  ============  ==========  ===========================================
sync FedAvg               buffer = C    step        b = n_i, D = participants
FedBuff (Nguyen et al.)   buffer = K    arrival     b = 1, s = 1/sqrt(1+tau), D = K (updates)
async FedAvg              arrival       arrival     identical: omega = 1; unbiased: frequency
FedFix-dt                 window dt     step        identical: p_i; unbiased: p_i ceil(tau/dt)
FedAsync (Xie et al.)     arrival       arrival     mixing: x <- (1-a) x + a (x_tau + delta)
========================  ============  ==========  ===========================================

FedBuff divides the buffer's sum by the number of updates in it, as the paper's Algorithm 1
does; ``fedbuff(..., weights="examples")`` weighs by sample count instead (``b = n_i``,
``D = sum n_i``).

``concurrency`` clients train at any time. ``restart="arrival"`` gives a client that
reported (or dropped out) a new job at once, with the current model; ``"step"`` makes it
wait for the next server step and its new model (FedFix, and Fraboni's FedBuff). Free slots
are filled uniformly at random from the idle clients available in slot ``step``.

A policy is a pure state machine: events in, actions out, no clock and no I/O, so the same
code runs in the simulator and (later) behind the gRPC server. Each server step emits one
:class:`~fedagg.policy.Applied` record, with the staleness of what it folded.

This module holds the mechanism (:class:`AsyncPolicy`) and its state; the named policies of
the table (:func:`fedbuff`, :func:`fedfix`, :func:`async_fedavg`, :func:`fedasync`,
:func:`sync_fedavg`) are settings of it, in ``_async_recipes``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fedagg._checkpoint import register
from fedagg.core.aggregate import donate
from fedagg.core.participation import IntervalEstimator, IntervalState
from fedagg.core.staleness import Staleness, constant
from fedagg.core.strategy import ServerState, Strategy
from fedagg.errors import ConfigError, UpdateError
from fedagg.policy._events import (
    Action,
    Applied,
    Arrival,
    Dispatch,
    Dropout,
    Event,
    Finish,
    Merge,
    PolicyContext,
    RoundStats,
    SetTimer,
    Start,
    Timer,
    apply_or_skip,
    effective_weights,
    note_refusal,
    refusal_reason,
    round_stats,
    settled_reason,
)

__all__ = ["AsyncPolicy", "AsyncState"]

Arr = npt.NDArray[Any]
Trigger = Literal["arrival", "buffer", "window"]
Restart = Literal["arrival", "step"]
Base = Literal["examples", "uniform"]
Normalize = Literal["participants", "clients"]
Correction = Literal["none", "windows", "frequency"]


@register
@dataclass(frozen=True, slots=True)
class _Job:
    client: int
    version: int  # the model version the client trains from
    window: int  # the window it started in (FedFix)


@register
@dataclass
class AsyncState:
    """The asynchronous policy's whole state (a value the engine holds)."""

    server: ServerState
    step: int = 0  # server steps closed so far (records emitted)
    window: int = 0  # index of the open window (trigger="window")
    agg: Any = None
    jobs: dict[int, _Job] = field(default_factory=dict)  # in flight, by job id
    busy: set[int] = field(default_factory=set)
    free: int = 0  # training slots to fill
    fills: int = 0  # fills made in this step (seeds the sampling stream)
    next_job: int = 0
    started: float = 0.0
    dispatched: int = 0
    folded: int = 0
    dropped: int = 0
    refused: int = 0
    late: int = 0
    loss_sum: float = 0.0
    loss_weight: float = 0.0
    base_weights: list[float] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    staleness: list[int] = field(default_factory=list)
    participants: list[int] = field(default_factory=list)
    accepted: dict[int, Any] = field(default_factory=dict)
    freq: IntervalState | None = None  # inclusion intervals, for correction="frequency"
    bases: dict[int, Arr] = field(default_factory=dict)  # mixing: models still trained on
    base_refs: dict[int, int] = field(default_factory=dict)
    finished: bool = False
    #: each folded update's (claimed weight, train loss), as ``loss_sum`` adds them
    claims: list[tuple[float, float]] = field(default_factory=list)
    refusals: dict[str, int] = field(default_factory=dict)  # this step's, by reason


@dataclass(frozen=True)
class AsyncPolicy:
    """The general asynchronous policy (see the module docstring for the table of papers).

    Args:
        strategy: aggregator (with pre-transforms) and server optimizer of each step.
        rounds: server steps to take (windows, for ``trigger="window"``).
        trigger: step on every ``arrival``, when ``buffer`` updates were folded, or at the end
            of every ``window`` of virtual time.
        buffer: K, for ``trigger="buffer"``. A buffer also closes early when no client is
            training any more (nothing else can arrive before the step).
        window: the window length dt, for ``trigger="window"``.
        concurrency: clients training at once (default: all clients).
        restart: when a client that reported gets its next job (module docstring).
        staleness: ``s(tau)``; see :mod:`fedagg.staleness`.
        base: ``"examples"`` (``b_i = n_i``) or ``"uniform"`` (``b_i = 1``).
        normalize: ``"participants"`` (``D = sum b_i`` over the step) or ``"clients"``
            (``D = N``; needs ``base="uniform"``).
        correction: ``"none"``, ``"windows"`` (FedFix unbiased) or ``"frequency"``.
        cutoff: the interval estimator's cutoff K, for ``correction="frequency"``.
        max_staleness: updates staler than this are dropped (counted as late).
        mixing: FedAsync's alpha: the step is ``x <- (1 - a) x + a (x_tau + delta)`` with
            ``a = lr * alpha * s(tau)`` (needs ``trigger="arrival"`` and an sgd optimizer,
            whose lr it uses). Keeps at most one model per version still being trained on.
    """

    strategy: Strategy
    rounds: int
    trigger: Trigger = "buffer"
    buffer: int = 10
    window: float = 1.0
    concurrency: int | None = None
    restart: Restart = "arrival"
    staleness: Staleness = field(default_factory=constant)
    base: Base = "examples"
    normalize: Normalize = "participants"
    correction: Correction = "none"
    cutoff: int = 100_000
    max_staleness: int | None = None
    mixing: float | None = None

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError("rounds must be >= 1")
        if self.trigger not in ("arrival", "buffer", "window"):
            raise ConfigError(
                f"trigger must be 'arrival', 'buffer' or 'window', not {self.trigger!r}"
            )
        if self.restart not in ("arrival", "step"):
            raise ConfigError(f"restart must be 'arrival' or 'step', not {self.restart!r}")
        if self.base not in ("examples", "uniform"):
            raise ConfigError(f"base must be 'examples' or 'uniform', not {self.base!r}")
        if self.normalize not in ("participants", "clients"):
            raise ConfigError(
                f"normalize must be 'participants' or 'clients', not {self.normalize!r}"
            )
        if self.correction not in ("none", "windows", "frequency"):
            raise ConfigError(
                f"correction must be 'none', 'windows' or 'frequency', not {self.correction!r}"
            )
        if self.buffer < 1 or not (math.isfinite(self.window) and self.window > 0):
            raise ConfigError("buffer must be >= 1 and window finite and > 0")
        if self.concurrency is not None and self.concurrency < 1:
            raise ConfigError("concurrency must be >= 1")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ConfigError("max_staleness must be >= 0")
        if self.normalize == "clients" and self.base != "uniform":
            raise ConfigError("normalize='clients' (p_i = 1/N) needs base='uniform'")
        if self.correction == "windows" and self.trigger != "window":
            raise ConfigError("correction='windows' (FedFix) needs trigger='window'")
        if self.mixing is not None:
            if not (0 < self.mixing <= 1):
                raise ConfigError(f"mixing alpha must be in (0, 1], got {self.mixing!r}")
            if self.trigger != "arrival" or self.correction != "none":
                raise ConfigError("mixing (FedAsync) needs trigger='arrival' and no correction")
            if self.strategy.optimizer.name != "sgd":
                raise ConfigError(
                    "mixing (FedAsync) replaces the server optimizer: use an sgd strategy "
                    f"(its lr scales alpha), not {self.strategy.optimizer.name!r}"
                )
        IntervalEstimator(self.cutoff)  # validates the cutoff

    # -- protocol -------------------------------------------------------------------------
    def init(self, server: ServerState, ctx: PolicyContext) -> AsyncState:
        state = AsyncState(server=server)
        state.free = min(self.concurrency or ctx.num_clients, ctx.num_clients)
        if self.correction == "frequency":
            state.freq = IntervalEstimator(self.cutoff).init(ctx.num_clients)
        self._reset(state, 0.0)
        return state

    def step(self, state: AsyncState, event: Event, ctx: PolicyContext) -> list[Action]:
        if state.finished:
            return []
        actions: list[Action] = []
        if isinstance(event, Start):
            self._fill(state, ctx, actions)
            if self.trigger == "window":
                actions.append(SetTimer(self._window_end(0), 0))
        elif isinstance(event, Arrival):
            self._arrival(state, event, ctx, actions)
        elif isinstance(event, Merge):
            raise ConfigError(
                "async policies measure staleness per update at the root: edge aggregators "
                "relay their clients' updates (relay mode) instead of merging them"
            )
        elif isinstance(event, Dropout):
            job = self._finish_job(state, event.job)
            if job is not None:
                state.dropped += 1
                self._release_base(state, job.version)
                self._refill(state, event.now, ctx, actions)
        elif isinstance(event, Timer) and self.trigger == "window" and event.tag == state.window:
            state.window += 1  # clients restarted by this step start in the next window
            self._close(state, event.now, ctx, actions)
            if not state.finished:
                actions.append(SetTimer(self._window_end(state.window), state.window))
        if not state.finished and not state.jobs and self.trigger != "window" and state.free:
            # nobody is training and nobody could be dispatched: nothing can happen any more
            if state.folded:
                self._close(state, getattr(event, "now", 0.0), ctx, actions)
            if not state.jobs and not state.finished:
                state.finished = True
                actions.append(Finish())
        return actions

    def _window_end(self, w: int) -> float:
        """When window ``w`` closes: ``(w + 1) dt``, plus a relative 1e-9 so that a job
        lasting exactly a whole number of windows (up to the round-off of work / speed) is
        counted in the window it ends, as FedFix's ``return_time <= (n + 1) dt`` does."""
        return (w + 1) * self.window * (1.0 + 1e-9)

    # -- events -------------------------------------------------------------------------------
    def _arrival(
        self, state: AsyncState, ev: Arrival, ctx: PolicyContext, actions: list[Action]
    ) -> None:
        job = self._finish_job(state, ev.job)
        if job is None:  # not a job of ours (or reported twice): ignore
            state.late += 1
            return
        tau = state.server.version - job.version
        if self.max_staleness is not None and tau > self.max_staleness:
            state.late += 1
            self._release_base(state, job.version)
            self._refill(state, ev.now, ctx, actions)
            return
        if self.mixing is not None:
            self._mix(state, ev, job, tau, ev.now, actions)
            self._refill(state, ev.now, ctx, actions)
            return
        b = float(ev.update.weight) if self.base == "examples" else 1.0
        c = 1.0
        if self.correction == "windows":
            c = float(state.window - job.window + 1)
        elif self.correction == "frequency":
            assert state.freq is not None
            c = float(IntervalEstimator(self.cutoff).weights(state.freq, [job.client])[0])
        w = b * self.staleness(tau) * c
        try:
            self.strategy.aggregator.fold(
                state.agg, replace(ev.update, weight=w, base_version=None)
            )
        except UpdateError as e:
            state.refused += 1
            note_refusal(state.refusals, refusal_reason(e))
        else:
            self._record_fold(state, ev, b, w, tau)
        full = self.buffer if self.trigger == "buffer" else 1
        if self.trigger != "window" and state.folded >= full:
            self._close(state, ev.now, ctx, actions)
        self._refill(state, ev.now, ctx, actions)

    def _record_fold(self, state: AsyncState, ev: Arrival, b: float, w: float, tau: int) -> None:
        state.folded += 1
        state.base_weights.append(b)
        state.weights.append(w)
        state.staleness.append(tau)
        state.participants.append(ev.client)
        if ev.client_state is not None:
            state.accepted[ev.client] = ev.client_state
        n = float(ev.update.weight)
        loss = float(ev.update.metrics.get("train_loss", math.nan))
        state.claims.append((n, loss))
        if math.isfinite(loss):
            state.loss_sum += n * loss
            state.loss_weight += n

    def _refill(
        self, state: AsyncState, now: float, ctx: PolicyContext, actions: list[Action]
    ) -> None:
        """After a report or a dropout freed a slot."""
        if state.finished:
            return
        if self.restart == "arrival":
            self._fill(state, ctx, actions)
        elif self.trigger == "buffer" and not state.jobs:
            self._close(state, now, ctx, actions)  # the buffer cannot fill any more

    def _finish_job(self, state: AsyncState, job_id: int) -> _Job | None:
        job = state.jobs.pop(job_id, None)
        if job is not None:
            state.busy.discard(job.client)
            state.free += 1
        return job

    # -- steps --------------------------------------------------------------------------------
    def _close(
        self, state: AsyncState, now: float, ctx: PolicyContext, actions: list[Action]
    ) -> None:
        self._settle(state)
        applied = state.folded > 0
        mass = 1.0
        if applied:
            total = math.fsum(state.weights)
            d = (
                math.fsum(state.base_weights)
                if self.normalize == "participants"
                else float(ctx.num_clients)
            )
            mass = total / d
            new = apply_or_skip(self.strategy, state.server, state.agg, mass)
            applied = new is not None
            if new is not None:
                state.server = new
            if applied and state.freq is not None:
                IntervalEstimator(self.cutoff).observe(state.freq, state.participants)
        stats = self._stats(state, now, applied, effective_weights(state.weights, mass))
        if self._step_done(state, stats, now, actions):
            return
        if self.restart == "step":
            self._fill(state, ctx, actions)

    def _mix(
        self,
        state: AsyncState,
        ev: Arrival,
        job: _Job,
        tau: int,
        now: float,
        actions: list[Action],
    ) -> None:
        """FedAsync: ``x <- (1 - a) x + a (x_tau + delta)``, ``a = lr * alpha * s(tau)``."""
        assert self.mixing is not None
        server = state.server
        agg = self.strategy.begin(server, version=None)
        base = state.bases[job.version]
        try:  # validation and pre-transforms (clipping) of the strategy's aggregator
            self.strategy.aggregator.fold(agg, replace(ev.update, weight=1.0, base_version=None))
        except UpdateError as e:
            state.refused += 1
            note_refusal(state.refusals, refusal_reason(e))
            self._release_base(state, job.version)
            return
        donate(agg)  # a one-update aggregate of its own: the mix is computed in its sums
        y = self.strategy.aggregator.finalize_flat(agg)
        y += base  # base + delta, in the delta's buffer (a + b == b + a, to the bit)
        self._release_base(state, job.version)
        lr = float(self.strategy.optimizer.hyperparams.get("lr", 1.0))
        a = min(1.0, lr * self.mixing * self.staleness(tau))
        dt = server.params.dtype.type
        new = server.params * dt(1.0 - a)
        y *= dt(a)
        new += y
        self._record_fold(state, ev, 1.0, a, tau)
        state.server = ServerState(server.spec, new, server.version + 1, server.opt)
        self._step_done(state, self._stats(state, now, True, (a,)), now, actions)

    def _step_done(
        self, state: AsyncState, stats: RoundStats, now: float, actions: list[Action]
    ) -> bool:
        """Report the server step ``stats`` describes and begin the next; True if that step
        was the last."""
        actions.append(Applied(stats, dict(state.accepted)))
        state.step += 1
        self._reset(state, now)
        if state.step >= self.rounds:
            state.finished = True
            actions.append(Finish())
            return True
        return False

    def _reset(self, state: AsyncState, now: float) -> None:
        state.agg = self.strategy.begin(state.server, version=None)
        state.started = now
        state.fills = 0
        state.dispatched = state.folded = state.dropped = state.refused = state.late = 0
        state.loss_sum = state.loss_weight = 0.0
        state.weights, state.base_weights, state.staleness = [], [], []
        state.participants = []
        state.claims = []
        state.refusals = {}
        state.accepted = {}

    def _settle(self, state: AsyncState) -> None:
        """An aggregator that keeps updates until the step closes (the server's canonical
        order, :meth:`fedagg.deploy.Canonical.settle`) folds them now: those its fold refuses
        count as refused, not folded, and leave the step's participants and losses."""
        settle = getattr(self.strategy.aggregator, "settle", None)
        if settle is None or state.agg is None:
            return
        for u in settle(state.agg):
            i = next(
                (
                    i
                    for i, (c, w) in enumerate(zip(state.participants, state.weights, strict=False))
                    if str(c) == u.client_id and w == float(u.weight)
                ),
                None,
            )
            if i is None:
                continue
            client = state.participants.pop(i)
            for seq in (state.weights, state.base_weights, state.staleness, state.claims):
                if i < len(seq):
                    seq.pop(i)
            state.accepted.pop(client, None)
            state.folded -= 1
            state.refused += 1
            note_refusal(state.refusals, settled_reason(state.agg, u.client_id))
            # the sums as if the refused update had never been added (same order, same bits)
            state.loss_sum = state.loss_weight = 0.0
            for n, loss in state.claims:
                if math.isfinite(loss):
                    state.loss_sum += n * loss
                    state.loss_weight += n

    def _stats(
        self, state: AsyncState, now: float, applied: bool, omega: tuple[float, ...]
    ) -> RoundStats:
        return round_stats(
            state,
            state.step,
            now,
            applied,
            state.dispatched,
            state.loss_sum,
            state.loss_weight,
            omega,
            state.staleness,
        )

    # -- dispatch -----------------------------------------------------------------------------
    def _fill(self, state: AsyncState, ctx: PolicyContext, actions: list[Action]) -> None:
        """Fill the free slots with idle available clients, chosen uniformly at random."""
        if state.free <= 0:
            return
        avail = ctx.available(state.step)
        idle = avail[~np.isin(avail, np.fromiter(state.busy, np.int64, len(state.busy)))]
        k = min(state.free, len(idle))
        if k == 0:
            return
        key = [ctx.seed, 0x5EC7, state.step] + ([state.fills] if state.fills else [])
        rng = np.random.default_rng(key)
        chosen = np.sort(rng.choice(idle, size=k, replace=False)).tolist()
        state.fills += 1
        version = state.server.version
        for c in chosen:
            state.jobs[state.next_job] = _Job(int(c), version, state.window)
            state.busy.add(int(c))
            state.next_job += 1
        if self.mixing is not None:
            if version not in state.bases:
                state.bases[version] = state.server.params.copy()
            state.base_refs[version] = state.base_refs.get(version, 0) + k
        state.free -= k
        state.dispatched += k
        actions.append(Dispatch(tuple(int(c) for c in chosen), (False,) * k))

    def _release_base(self, state: AsyncState, version: int) -> None:
        refs = state.base_refs.get(version)
        if refs is None:
            return
        if refs <= 1:
            state.base_refs.pop(version)
            state.bases.pop(version, None)
        else:
            state.base_refs[version] = refs - 1
