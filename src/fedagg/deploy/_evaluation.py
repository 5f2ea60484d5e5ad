"""Evaluation at the server: of the global model on held-out data (server-side), and by the
clients on their own data (federated evaluation). A helper of the
:class:`~fedagg.deploy._service.FederationService`, transport-free like it, outside the
event-sourced :class:`~fedagg.deploy._fed.Federation` (which never evaluates: evaluation
changes no federation state, is not logged and is not replayed).

* **Server-side**: every ``eval_every`` rounds and at the last, the model a round produced
  is evaluated on a worker thread (``server_eval(params) -> {metric: value}``), off the event
  loop: uploads go on meanwhile.
* **Federated**: every ``fed_every`` model versions (and at the last), up to ``fed_clients``
  clients connected directly to this server (0: all; a seeded sample) get an evaluation task
  (kind ``"evaluate"``, id :data:`~fedagg.deploy._evalwire.EVAL_BASE` + version). A client
  pulls that version, evaluates it and sends a ``Report``; when all have reported, or after
  ``timeout`` seconds, the reports are aggregated (``aggregate([(num_examples, metrics)])``,
  by default a weighted mean). An evaluation task is not a training job: the policy never
  sees it, and a client busy training reads it from its task stream after its training task
  (tasks are handled one at a time, in order). Clients behind an edge aggregator are not
  asked. Evaluation state is not durable: a restarted server does not redo an evaluation it
  had under way.

Results go to ``on_metrics(round, version, source, metrics)``, ``source`` ``"server"`` or
``"clients"``.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from fedagg.config import aggregate_metrics
from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._admission import parse
from fedagg.deploy._evalwire import eval_task_id, is_eval_task, report_body
from fedagg.deploy._transport import CallError, Status
from fedagg.deploy._upload import check_metrics

if TYPE_CHECKING:
    from fedagg.deploy._fed import Effects
    from fedagg.deploy._service import FederationService

__all__ = ["Evaluation", "Metrics", "ServerEval"]

log = logging.getLogger("fedagg.server")
Arr = npt.NDArray[Any]
Metrics = dict[str, float]
#: params (by name, read-only) -> metrics
ServerEval = Callable[[dict[str, Arr]], Mapping[str, float]]
Aggregate = Callable[[Sequence[tuple[float, Mapping[str, float]]]], Mapping[str, float]]
OnMetrics = Callable[[int, int, str, Metrics], None]


@dataclass
class _Open:
    """A federated evaluation under way."""

    round: int
    version: int
    model: Arr
    clients: frozenset[int]
    reports: dict[int, tuple[float, Metrics]] = field(default_factory=dict)
    timer: asyncio.TimerHandle | None = None


class Evaluation:
    """What the server evaluates, and when (see the module docstring)."""

    def __init__(
        self,
        *,
        server_eval: ServerEval | None = None,
        eval_every: int = 1,
        fed_every: int = 0,
        fed_clients: int = 0,
        timeout: float = 60.0,
        aggregate: Aggregate | None = None,
        on_metrics: OnMetrics | None = None,
    ) -> None:
        self.server_eval = server_eval
        self.eval_every = max(1, int(eval_every))
        self.fed_every = int(fed_every)
        self.fed_clients = int(fed_clients)
        self.timeout = float(timeout)
        self.aggregate: Aggregate = aggregate or aggregate_metrics
        self.on_metrics = on_metrics
        self.svc: FederationService | None = None
        self.open: dict[int, _Open] = {}  # by version
        self.asked: set[int] = set()  # versions evaluated by clients (at most once each)
        #: who reported, for the latest closed evaluations (a retry is then a duplicate)
        self.reported: dict[int, frozenset[int]] = {}
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="fedagg-eval")
        self._running: set[asyncio.Future[Any]] = set()
        #: every result, in order: (round, version, source, metrics)
        self.results: list[tuple[int, int, str, Metrics]] = []

    def attach(self, svc: FederationService) -> Evaluation:
        """Evaluate for ``svc`` (the root's service)."""
        self.svc = svc
        svc.evals = self
        return self

    # -- rounds closing (the service's apply, on the event loop) -------------------------------
    def after(self, effects: Effects) -> None:
        """Rounds closed: evaluate the models they produced that are due."""
        rounds = effects.rounds
        for i, r in enumerate(rounds):
            last = effects.finished and i == len(rounds) - 1
            if r.round not in effects.round_models:
                continue
            version, model = effects.round_models[r.round]
            if self.server_eval is not None and (last or (r.round + 1) % self.eval_every == 0):
                self._server(r.round, version, model)
            fed_due = r.applied and version % max(1, self.fed_every) == 0
            if self.fed_every > 0 and (last or fed_due) and version not in self.asked:
                self._ask(r.round, version, model)

    def _server(self, round_: int, version: int, model: Arr) -> None:
        assert self.svc is not None and self.server_eval is not None
        fn = self.server_eval
        params = _named(self.svc.engine.spec.unflatten(_readonly(model)))
        fut = asyncio.get_running_loop().run_in_executor(self._pool, fn, params)
        self._running.add(fut)

        def done(f: asyncio.Future[Any]) -> None:
            self._running.discard(f)
            if f.cancelled():
                return
            e = f.exception()
            if e is not None:
                log.error("evaluating model version %d failed: %s: %s", version,
                          type(e).__name__, e)  # fmt: skip
                return
            self._result(round_, version, "server", f.result())

        fut.add_done_callback(done)

    def _ask(self, round_: int, version: int, model: Arr) -> None:
        svc = self.svc
        assert svc is not None
        self.asked.add(version)
        ready = [
            c for c, s in enumerate(svc.sessions)
            if s.connected and s.queue is not None and c not in svc.route
        ]  # fmt: skip
        if 0 < self.fed_clients < len(ready):
            rng = np.random.default_rng([svc.engine.seed, 0xE7A1, version])
            ready = sorted(int(c) for c in rng.choice(ready, self.fed_clients, replace=False))
        if not ready:
            log.info("model version %d: no client connected to evaluate it", version)
            return
        ev = _Open(round_, version, model, frozenset(ready))
        self.open[version] = ev
        ev.timer = asyncio.get_running_loop().call_later(self.timeout, self._close, version)
        for c in ready:
            queue = svc.sessions[c].queue
            if queue is not None:
                queue.put_nowait(self.task_msg(ev))
        log.info("model version %d: %d clients asked to evaluate it", version, len(ready))

    def task_msg(self, ev: _Open) -> pb.Task:
        assert self.svc is not None
        return pb.Task(task=eval_task_id(ev.version), version=ev.version, epochs=0,
                       seed=self.svc.engine.seed, kind="evaluate")  # fmt: skip

    def tasks_of(self, session: Any, clients: Collection[int]) -> list[pb.Task]:
        """The evaluation tasks asked of the ``clients`` whose own task stream ``session`` is
        (not an edge's) and not yet reported: a task stream opening again gets them anew."""
        assert self.svc is not None
        mine = [c for c in clients if self.svc.sessions[c] is session]
        return [self.task_msg(ev) for c in mine for ev in self.open.values()
                if c in ev.clients and c not in ev.reports]  # fmt: skip

    def _close(self, version: int) -> None:
        ev = self.open.pop(version, None)
        if ev is None:
            return
        if ev.timer is not None:
            ev.timer.cancel()
        self.reported[version] = frozenset(ev.reports)
        for old in sorted(self.reported)[:-16]:
            del self.reported[old]
        missing = len(ev.clients) - len(ev.reports)
        if missing:
            log.info("model version %d: %d of %d clients did not report their evaluation",
                     version, missing, len(ev.clients))  # fmt: skip
        reports = [ev.reports[c] for c in sorted(ev.reports)]
        if not reports:
            return
        try:
            out = self.aggregate(reports)
        except Exception as e:  # the user's eval_metrics: say so, keep serving
            log.error("eval_metrics failed on the reports of version %d: %s: %s", version,
                      type(e).__name__, e)  # fmt: skip
            return
        self._result(ev.round, version, "clients", out)

    def _result(self, round_: int, version: int, source: str, metrics: Mapping[str, Any]) -> None:
        clean: Metrics = {}
        for k, v in metrics.items():
            try:
                clean[str(k)] = float(v)
            except (TypeError, ValueError):
                log.warning("%s evaluation metric %r = %r is not a number: left out", source,
                            k, v)  # fmt: skip
        if not clean:  # nothing measured (every report of weight 0, say)
            return
        self.results.append((round_, version, source, clean))
        shown = ", ".join(f"{k} {v:.4g}" for k, v in sorted(clean.items())[:6])
        log.info("round %d (version %d), %s evaluation: %s", round_ + 1, version, source, shown)
        if self.on_metrics is not None:
            self.on_metrics(round_, version, source, clean)

    # -- calls -------------------------------------------------------------------------------
    def pull(self, client: int, task: int) -> tuple[int, Arr]:
        """The model of evaluation task ``task`` for ``client``: (version, flat model)."""
        ev = self.open.get(task - eval_task_id(0))
        if ev is None:
            raise CallError(Status.FAILED_PRECONDITION, f"evaluation task {task} is not open")
        if client not in ev.clients:
            raise CallError(Status.PERMISSION_DENIED, f"evaluation task {task} is not yours")
        return ev.version, ev.model

    async def report(self, raw: bytes) -> pb.ReportReply:
        """A client's ``Report``: checked (bounded, finite, signed, an open evaluation task
        of that client, of that version) before it counts; a second report of a task is
        acknowledged as a duplicate and changes nothing."""
        svc = self.svc
        assert svc is not None
        req = parse(pb.ReportRequest, raw)
        if svc.below.is_edge(req.auth):
            raise CallError(Status.PERMISSION_DENIED, "edge aggregators do not evaluate")
        metrics = check_metrics(req.metrics)
        n = float(req.num_examples)
        client = svc.admit.verify(svc.keys, "Report", req.auth,
                                  report_body(req.task, req.version, n, metrics))  # fmt: skip
        if not (math.isfinite(n) and n >= 0):
            raise CallError(Status.INVALID_ARGUMENT, f"num_examples must be finite and >= 0, "
                            f"got {n}")  # fmt: skip
        if not is_eval_task(req.task):
            raise CallError(
                Status.FAILED_PRECONDITION,
                f"task {req.task} is a training task: its update goes by Push, not Report",
            )
        ev = self.open.get(req.task - eval_task_id(0))
        if ev is None and client in self.reported.get(req.task - eval_task_id(0), ()):
            return pb.ReportReply(task=req.task, duplicate=True)  # reported before it closed
        if ev is None:
            raise CallError(Status.FAILED_PRECONDITION,
                            f"evaluation task {req.task} is not open")  # fmt: skip
        if client not in ev.clients:
            raise CallError(Status.PERMISSION_DENIED, f"evaluation task {req.task} is not yours")
        if req.version != ev.version:
            raise CallError(Status.INVALID_ARGUMENT, f"evaluation task {req.task} is of version "
                            f"{ev.version}, not {req.version}")  # fmt: skip
        if client in ev.reports:
            return pb.ReportReply(task=req.task, duplicate=True)
        ev.reports[client] = (n, metrics)
        if len(ev.reports) == len(ev.clients):
            self._close(ev.version)
        return pb.ReportReply(task=req.task, duplicate=False)

    # -- the end -----------------------------------------------------------------------------
    async def drain(self) -> None:
        """Wait for the evaluations under way: server-side ones to finish, federated ones to
        be reported or time out."""
        while self._running or self.open:
            await asyncio.sleep(0.02)

    def close(self) -> None:
        for version in list(self.open):
            ev = self.open.pop(version)
            if ev.timer is not None:
                ev.timer.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)


def _readonly(a: Arr) -> Arr:
    v = a.view()
    v.flags.writeable = False
    return v


def _named(params: Any) -> dict[str, Arr]:
    if isinstance(params, dict):
        return params
    return {str(i): a for i, a in enumerate(params)}
