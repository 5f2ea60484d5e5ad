"""The discrete-event simulator: a virtual clock, an event heap, a policy and an executor.

Time is virtual: each client's job lasts what the :class:`SystemModel` says (download,
compute on its examples, upload); wall-clock time is measured but never used as simulated time.
Events pop in (time, sequence) order, so ties resolve the same way on every run, and every
random draw comes from ``(seed, ...)`` streams: the same seed gives the same model, bit for bit.

Client training for a dispatch runs at dispatch time (the model a client trains from is fixed
then) in one batched call to the executor; the updates are then delivered, and folded by the
policy, one by one at their virtual arrival times.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from fedagg.core.strategy import ServerState, Strategy
from fedagg.core.update import Update
from fedagg.errors import ConfigError
from fedagg.jobs import Jobs, train_chunk
from fedagg.policy import (
    Action,
    Applied,
    Arrival,
    Commit,
    Dispatch,
    Dropout,
    Event,
    Finish,
    Policy,
    RoundStats,
    SecurePolicy,
    SecureRequest,
    SetTimer,
    Start,
    Timer,
    format_refusals,
    partial_epochs,
)
from fedagg.sim._procs import ClientSlice
from fedagg.sim._secure import SimSecure
from fedagg.sim._system import SystemModel
from fedagg.sim._tasks import TaskConfig, make_tasks

__all__ = ["Executor", "LocalExecutor", "RoundRecord", "SimResult", "Simulation"]

Arr = npt.NDArray[Any]


class Executor(Protocol):
    """Runs a batch of client training jobs; results in the order of ``datas``. ``tasks``
    (each job's :class:`fedagg.clients.Task`) go to algorithms that take them."""

    def train(
        self,
        algorithm: Any,
        model: Any,
        params: dict[str, Arr],
        datas: Sequence[Any],
        rngs: Sequence[np.random.Generator],
        epochs: Sequence[int],
        states: Sequence[Any],
        server_state: Any,
        tasks: Sequence[Any] | None = None,
    ) -> list[tuple[Any, Any]]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """In-process: one batched ``train_many`` call (stacked parameters where possible).

    A call with fewer than :data:`SMALL_CALL` clients (asynchronous policies train one client
    per dispatch) runs with one BLAS thread: its matrix products are too small to split, and
    BLAS threads contending for 2 cores made them up to 15x slower. Products this small give
    the same bits with one thread or several; large ones need not (OpenBLAS splits them by
    thread count), so calls of ``SMALL_CALL`` clients or more replay bit for bit only with the
    same BLAS thread count.
    """

    def train(
        self,
        algorithm: Any,
        model: Any,
        params: dict[str, Arr],
        datas: Sequence[Any],
        rngs: Sequence[np.random.Generator],
        epochs: Sequence[int],
        states: Sequence[Any],
        server_state: Any,
        tasks: Sequence[Any] | None = None,
    ) -> list[tuple[Any, Any]]:
        jobs = Jobs(algorithm, model, params, datas, rngs, epochs, states, server_state, tasks)
        if len(datas) >= SMALL_CALL:
            return train_chunk(jobs)
        with _one_blas_thread():
            return train_chunk(jobs)

    def close(self) -> None:
        pass


#: Calls training fewer clients than this run with one BLAS thread (see LocalExecutor).
SMALL_CALL = 32
_CONTROLLER: list[Any] = []


def _one_blas_thread() -> Any:
    try:
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        return contextlib.nullcontext()
    if not _CONTROLLER:
        _CONTROLLER.append(ThreadpoolController())
    return _CONTROLLER[0].limit(limits=1, user_api="blas")


@dataclass(frozen=True, slots=True)
class RoundRecord:
    """One closed round: the policy's stats plus evaluation, wall time and traffic.

    Traffic and ``late`` count what happened while the round was open: bytes sent to the
    clients dispatched, bytes of every upload that arrived (late ones from earlier rounds
    included), and those late arrivals themselves. Metrics are NaN in rounds not evaluated.
    """

    stats: RoundStats
    test_loss: float
    test_accuracy: float
    client_accuracy: float
    train_loss: float
    train_accuracy: float
    wall_time: float
    bytes_down: int
    bytes_up: int

    def row(self) -> dict[str, Any]:
        s = self.stats
        return {
            "round": s.round + 1,
            "version": s.version,
            "virtual_time": s.ended,
            "wall_time": self.wall_time,
            "test_loss": self.test_loss,
            "test_accuracy": self.test_accuracy,
            "client_loss": s.client_loss,
            "client_accuracy": self.client_accuracy,
            "train_loss": self.train_loss,
            "train_accuracy": self.train_accuracy,
            "selected": s.selected,
            "dispatched": s.dispatched,
            "folded": s.folded,
            "dropped": s.dropped,
            "refused": s.refused,
            "late": s.late,
            "applied": int(s.applied),
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "staleness_mean": s.staleness_mean,
            "staleness_max": s.staleness_max,
            "epsilon": s.epsilon,
            "refusals": format_refusals(s.refusals),
        }


@dataclass
class SimResult:
    records: list[RoundRecord]
    server: ServerState
    wall_time: float
    client_updates: int
    events: int
    policy_state: Any = None
    train_time: float = 0.0
    eval_time: float = 0.0

    @property
    def overhead_per_round(self) -> float:
        """Wall seconds per round spent outside client training and evaluation: the engine's
        own cost (events, folding, the optimizer step, bookkeeping)."""
        rest = self.wall_time - self.train_time - self.eval_time
        return rest / max(1, len(self.records))

    @property
    def final(self) -> RoundRecord:
        return self.records[-1]


@dataclass
class _Ctx:
    """The engine facts a policy may read (see PolicyContext)."""

    system: SystemModel
    seed: int
    secure: SimSecure

    @property
    def num_clients(self) -> int:
        return self.system.num_clients

    def identity(self, client: int) -> bytes:
        """Client ``client``'s Ed25519 public key (secure aggregation: the engine's keys)."""
        return self.secure.identity(client)

    def available(self, slot: int) -> Arr:
        return self.system.available_clients(slot)


@dataclass
class Simulation:
    """A federation on one machine, in virtual time.

    Args:
        data: a ``fedagg.data.FederatedData`` (client training sets, global test set).
        model: a ``fedagg.models`` model (init, loss_and_grad, evaluate).
        algorithm: a ``fedagg.clients`` client algorithm (train / train_many).
        strategy: the server's strategy (aggregator + server optimizer).
        policy: a round or async policy (e.g. :class:`SyncPolicy`).
        system: client speeds, links, dropouts and availability.
        seed: the run's seed; with the same inputs, the same seed replays bit for bit.
        executor: where client training runs (default: in-process).
        eval_every: evaluate the global model every this many rounds (and at the last).
        eval_train: also evaluate the global objective, the loss over every client's training
            data (FedProx's "training loss"); costs a pass over all data per evaluation.
        eval_clients: the client-weighted accuracy is measured on at most this many of the
            round's participants (a seeded sample), on their own test sets.
        chunk: clients trained per executor call: bounds the client data held at once (lazy
            datasets generate a client's examples only when it trains).
        on_round: called with each :class:`RoundRecord` as it closes (progress, storage).
        stop_when: stop after the first record for which this returns True (e.g. a target
            accuracy: ``lambda r: r.test_accuracy >= 0.9``).
        byzantine: the clients that lie. With ``attack`` (an :class:`fedagg.attacks.Attack`,
            e.g. ``attacks.attack("alie")``; the package :mod:`fedagg.attacks`), their
            updates are replaced by the attack's, computed from all the honest updates of
            the same dispatch (an omniscient adversary); with ``byzantine_algorithm`` (e.g.
            the data-poisoning client ``fedagg.clients.LabelFlip(algorithm, 10)``, also
            ``attacks.LabelFlip``) they train with it instead.
        max_time: stop at this virtual time (an equal time budget for comparing policies);
            the last record is then evaluated if it was not.
        task_config: ``task_config(version)``, the per-task client config of the jobs
            training from that model version (``fedagg.config.client_config``): in each
            job's :class:`fedagg.clients.Task`, and the built-in algorithms take its
            ``lr``/``mu``/``beta`` (:func:`fedagg.clients.with_config`).
        eval_data: held-out examples (``.x``, ``.y``) evaluated instead of ``data.test``.
        secure_dropout: with a :class:`fedagg.policy.SecurePolicy`, the fraction of each
            round's clients that drop out of the protocol (:mod:`fedagg.sim._secure`).
    """

    data: Any
    model: Any
    algorithm: Any
    strategy: Strategy
    policy: Policy
    system: SystemModel
    seed: int = 0
    executor: Executor = field(default_factory=LocalExecutor)
    eval_every: int = 1
    eval_train: bool = False
    eval_clients: int = 100
    chunk: int = 2048
    on_round: Callable[[RoundRecord], None] | None = None
    max_time: float = math.inf
    stop_when: Callable[[RoundRecord], bool] | None = None
    byzantine: frozenset[int] = frozenset()
    attack: Any = None
    byzantine_algorithm: Any = None
    client_states: dict[int, Any] = field(default_factory=dict)
    task_config: Callable[[int], Mapping[str, Any]] | None = None
    eval_data: Any = None
    secure_dropout: float = 0.0
    _union: tuple[Arr, Arr] | None = field(default=None, init=False, repr=False)
    _tasks: TaskConfig = field(default_factory=lambda: TaskConfig(None), init=False, repr=False)
    _train_s: float = field(default=0.0, init=False, repr=False)
    _eval_s: float = field(default=0.0, init=False, repr=False)

    def run(self) -> SimResult:
        wall0 = time.perf_counter()
        self._train_s = self._eval_s = 0.0
        strategy = getattr(self.policy, "strategy", self.strategy)
        if strategy is not self.strategy:
            raise ConfigError("the simulation and its policy must share one strategy object")
        self.client_states = {}
        self._tasks = TaskConfig(self.task_config)
        server = self.strategy.init(self.model.init(self.seed))
        secure = SimSecure(self.seed, self.secure_dropout)
        ctx = _Ctx(self.system, self.seed, secure)
        state = self.policy.init(server, ctx)
        heap: list[tuple[float, int, Event]] = []
        seq = 0
        job = 0
        records: list[RoundRecord] = []
        updates = 0
        events = 0
        traffic = [0, 0]  # bytes down, up, since the last record
        model_bytes = server.spec.nbytes
        secure_policy = isinstance(self.policy, SecurePolicy)

        def push(t: float, ev: Event) -> None:
            nonlocal seq
            heapq.heappush(heap, (t, seq, ev))
            seq += 1

        def do(actions: list[Action], now: float) -> bool:
            nonlocal job, updates
            done = False
            for a in actions:
                if isinstance(a, Dispatch):
                    job = self._dispatch(a, state, now, job, model_bytes, push, traffic)
                elif isinstance(a, SetTimer):
                    push(a.at, Timer(a.at, a.tag))
                elif isinstance(a, Applied):
                    updates += a.stats.folded
                    self.client_states.update(a.client_states)
                    rec = self._record(a.stats, _server_of(state), wall0, traffic)
                    traffic[0] = traffic[1] = 0
                    records.append(rec)
                    if self.on_round is not None:
                        self.on_round(rec)
                    if self.stop_when is not None and self.stop_when(rec):
                        done = True
                elif isinstance(a, Commit):
                    self.client_states.update(a.client_states)
                elif isinstance(a, SecureRequest):
                    down, up = secure.bytes_down, secure.bytes_up
                    for ev in secure.request(a, now):
                        push(now, ev)
                    traffic[0] += secure.bytes_down - down
                    traffic[1] += secure.bytes_up - up
                elif isinstance(a, Finish):
                    done = True
            return done

        try:
            finished = do(self.policy.step(state, Start(0.0), ctx), 0.0)
            while heap and not finished:
                if heap[0][0] > self.max_time:
                    break
                now, _, ev = heapq.heappop(heap)
                events += 1
                if isinstance(ev, Arrival) and secure_policy:
                    masked = secure.arrival(ev, server.spec)  # the client masks its update
                    if masked is None:
                        continue  # held until its stage-2 shares come
                    ev = masked
                if isinstance(ev, Arrival):
                    traffic[1] += ev.update_bytes
                finished = do(self.policy.step(state, ev, ctx), now)
            if records and math.isnan(records[-1].test_accuracy):
                # stopped by the time budget between evaluations: evaluate the final model
                last = records[-1]
                traffic = [last.bytes_down, last.bytes_up]
                records[-1] = self._record(last.stats, _server_of(state), wall0, traffic, True)
        finally:
            self.executor.close()
        wall = time.perf_counter() - wall0
        return SimResult(
            records, _server_of(state), wall, updates, events, state, self._train_s, self._eval_s
        )

    # -- internals ------------------------------------------------------------------------------
    def _dispatch(
        self,
        a: Dispatch,
        state: Any,
        now: float,
        job: int,
        model_bytes: int,
        push: Callable[[float, Event], None],
        traffic: list[int],
    ) -> int:
        server = _server_of(state)
        params = {k: _readonly(v) for k, v in _as_dict(server.model).items()}
        extra_bytes = _nbytes(a.server_extra)
        down = model_bytes + extra_bytes
        jobs = list(range(job, job + len(a.clients)))
        full = int(getattr(self.algorithm, "epochs", 1))
        epochs = [
            partial_epochs(full, self.seed, j) if slow else full
            for j, slow in zip(jobs, a.partial, strict=True)
        ]
        train_idx: list[int] = []
        for i, (c, j) in enumerate(zip(a.clients, jobs, strict=True)):
            traffic[0] += down
            frac = self.system.drops_out(c, j)
            if frac is not None:  # drops out part-way through: never trains to completion
                n = len(self.data.clients[c])
                t = self.system.timing(c, n * full, down, model_bytes, job=j)
                push(now + frac * t.total, Dropout(now + frac * t.total, c, j))
            else:
                train_idx.append(i)
        chunks = [train_idx[lo : lo + self.chunk] for lo in range(0, len(train_idx), self.chunk)]
        config = self._tasks(server.version)
        tasks = make_tasks(jobs, a.clients, epochs, version=server.version, seed=self.seed,
                           config=config)  # fmt: skip

        lazy = getattr(self.executor, "lazy_data", False)

        def fetch(idx: list[int]) -> Sequence[Any]:
            if lazy:  # the executor's workers fetch (or generate) the data themselves
                return ClientSlice(self.data.clients, [a.clients[i] for i in idx])
            return [self.data.clients[a.clients[i]] for i in idx]

        # bounded memory: client data is made a chunk at a time; the next chunk's data is made
        # on a second thread while this one trains (generation and BLAS release the GIL)
        pool = ThreadPoolExecutor(1) if len(chunks) > 1 and not lazy else None
        nxt = pool.submit(fetch, chunks[0]) if pool and chunks else None
        trained: list[tuple[int, int, Any, Any]] = []
        for n_chunk, idx in enumerate(chunks):
            cl = [a.clients[i] for i in idx]
            t0 = time.perf_counter()
            datas = nxt.result() if nxt is not None else fetch(idx)
            if pool is not None and n_chunk + 1 < len(chunks):
                nxt = pool.submit(fetch, chunks[n_chunk + 1])
            algorithm = self._tasks.algorithm(self.algorithm, config)
            groups = [(algorithm, list(range(len(idx))))]
            if self.byzantine_algorithm is not None and self.byzantine:
                byz = [r for r, c in enumerate(cl) if c in self.byzantine]
                honest = [r for r, c in enumerate(cl) if c not in self.byzantine]
                groups = [(algorithm, honest), (self.byzantine_algorithm, byz)]
            results: list[Any] = [None] * len(idx)
            for alg, rows in groups:
                if not rows:
                    continue
                kw = {"tasks": [tasks[idx[r]] for r in rows]} if _takes_tasks(alg) else {}
                out = self.executor.train(
                    alg,
                    self.model,
                    params,
                    [datas[r] for r in rows],
                    [np.random.default_rng([self.seed, 0x7A1, jobs[idx[r]]]) for r in rows],
                    [epochs[idx[r]] for r in rows],
                    [self.client_states.get(cl[r]) for r in rows],
                    a.server_extra,
                    **kw,
                )
                for r, res in zip(rows, out, strict=True):
                    results[r] = res
            self._train_s += time.perf_counter() - t0
            for i, c, (res, new_state) in zip(idx, cl, results, strict=True):
                trained.append((i, c, res, new_state))
        if self.attack is not None and self.byzantine:
            trained = self._attack(trained, server.spec, jobs[0] if jobs else 0)
        for i, c, res, new_state in trained:  # one arrival per client, in dispatch order
            up = model_bytes + _nbytes(res.extra)
            # a straggler does less work in the time of a full job (it is slow); an
            # algorithm that counts its own work (fixed local steps, FedAMD) reports it
            work = getattr(res, "work", None)
            if work is None or a.partial[i]:
                work = res.num_examples * full
            t = self.system.timing(c, work, down, up, job=jobs[i])
            arrive = now + t.total
            update = Update(
                delta=res.delta,
                weight=float(res.num_examples),
                client_id=str(c),
                base_version=server.version,
                metrics=res.metrics,
            )
            ev = Arrival(arrive, c, jobs[i], update, dict(res.extra), new_state, up)
            push(arrive, ev)
        if pool is not None:
            pool.shutdown()
        return job + len(a.clients)

    def _attack(
        self, trained: list[tuple[int, int, Any, Any]], spec: Any, first_job: int
    ) -> list[tuple[int, int, Any, Any]]:
        """Replace the Byzantine clients' updates of this dispatch by the attack's, which sees
        every honest update of the dispatch (omniscient): the adversary hook, calling
        :meth:`fedagg.attacks.Attack.malicious` (see :mod:`fedagg.attacks`)."""
        byz = [k for k, (_, c, _, _) in enumerate(trained) if c in self.byzantine]
        if not byz:
            return trained
        flat = [spec.as_flat(trained[k][2].delta) for k in range(len(trained))]
        # the attackers see the honest updates that are finite (a diverged client's are not)
        honest_rows = [
            k for k in range(len(trained)) if k not in set(byz) and np.isfinite(flat[k]).all()
        ]
        dt = spec.dtype
        honest = (
            np.stack([flat[k] for k in honest_rows])
            if honest_rows
            else np.zeros((0, spec.size), dt)
        )
        if getattr(self.attack, "omniscient", False) and not honest_rows:
            return trained  # nothing to see: the attackers send their own updates
        own = np.stack([flat[k] for k in byz])
        if not np.isfinite(own).all():
            return trained  # the model diverged: nothing to attack, the rule refuses NaN
        rng = np.random.default_rng([self.seed, 0xBAD, first_job])
        rows = self.attack.malicious(honest, own, len(trained), len(byz), rng)
        out = list(trained)
        for k, row in zip(byz, rows, strict=True):
            i, c, res, st = out[k]
            bad = spec.unflatten(np.ascontiguousarray(row, dtype=dt))
            out[k] = (i, c, dataclasses.replace(res, delta=bad), st)
        return out

    def _record(
        self,
        stats: RoundStats,
        server: ServerState,
        wall0: float,
        traffic: list[int],
        force: bool = False,
    ) -> RoundRecord:
        last = stats.round + 1 == getattr(self.policy, "rounds", -1)
        evaluate = force or last or (stats.round + 1) % max(1, self.eval_every) == 0
        loss = acc = cacc = tloss = tacc = math.nan
        t0 = time.perf_counter()
        if evaluate:
            params = _as_dict(server.model)
            test = self.data.test if self.eval_data is None else self.eval_data
            loss, acc = self.model.evaluate(params, test.x, test.y)
            cacc = self._client_accuracy(params, stats.participants, stats.round)
            if self.eval_train:
                x, y = self._train_union()
                tloss, tacc = self.model.evaluate(params, x, y)
        self._eval_s += time.perf_counter() - t0
        return RoundRecord(
            stats=stats,
            test_loss=float(loss),
            test_accuracy=float(acc),
            client_accuracy=cacc,
            train_loss=float(tloss),
            train_accuracy=float(tacc),
            wall_time=time.perf_counter() - wall0,
            bytes_down=traffic[0],
            bytes_up=traffic[1],
        )

    def _train_union(self) -> tuple[Arr, Arr]:
        if self._union is None:
            cl = [self.data.clients[i] for i in range(len(self.data.clients))]
            self._union = (np.concatenate([c.x for c in cl]), np.concatenate([c.y for c in cl]))
        return self._union

    def _client_accuracy(
        self, params: dict[str, Arr], participants: Sequence[int], round_: int
    ) -> float:
        """Accuracy on the participants' own test sets, weighted by their size (if any), on a
        seeded sample of at most ``eval_clients`` of them."""
        tests = getattr(self.data, "client_tests", None)
        if tests is None or not participants or self.eval_clients == 0:
            return math.nan
        if len(participants) > self.eval_clients:
            rng = np.random.default_rng([self.seed, 0xE7A, round_])
            participants = sorted(rng.choice(participants, self.eval_clients, replace=False))
        correct = 0.0
        total = 0
        for c in participants:
            t = tests[c]
            if len(t):
                _, a = self.model.evaluate(params, t.x, t.y)
                correct += a * len(t)
                total += len(t)
        return correct / total if total else math.nan


def _takes_tasks(algorithm: Any) -> bool:
    return bool(getattr(algorithm, "takes_tasks", False))


def _nbytes(x: Any) -> int:
    """Bytes of the arrays in a (nested) dict payload."""
    if isinstance(x, np.ndarray):
        return int(x.nbytes)
    if isinstance(x, dict):
        return sum(_nbytes(v) for v in x.values())
    return 0


def _readonly(a: Arr) -> Arr:
    v = a.view()
    v.flags.writeable = False
    return v


def _server_of(state: Any) -> ServerState:
    server = state.server
    assert isinstance(server, ServerState)
    return server


def _as_dict(model: Any) -> dict[str, Arr]:
    if isinstance(model, dict):
        return model
    return {str(i): a for i, a in enumerate(model)}
