"""Prometheus metrics of a server or an edge aggregator: ``[deploy] metrics = "host:port"``.

:func:`attach` gives a :class:`~fedagg.deploy._service.FederationService` a :class:`Metrics`
(its own ``CollectorRegistry``: two servers in one process never share a metric) by putting
an observing :class:`~fedagg.deploy._progress.Progress` in its place: the metrics see the
events the progress lines see (connections, refusals, acknowledged uploads, the engine's
effects), on the event loop, at the cost of a counter increment or a histogram observation
each. Counts the service keeps anyway (uploads, duplicates, bytes, time in the policy) are
read only when Prometheus scrapes. :class:`MetricsEndpoint` serves ``/metrics`` over plain
HTTP on its own thread (``prometheus_client.start_http_server``); the server starts it before
it opens its state and stops it with the service. ``prometheus-client`` (the ``metrics``
extra) is imported only here, and only when metrics are on.

Every metric is listed in :data:`METRICS` (name, type, labels, meaning); docs/metrics.md
documents the same list (a test checks that they agree).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from fedagg.deploy._options import metrics_address
from fedagg.deploy._progress import Progress
from fedagg.deploy._transport import METHODS, CallError
from fedagg.errors import ConfigError

if TYPE_CHECKING:
    from collections.abc import Collection

    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

    from fedagg.deploy._fed import Effects
    from fedagg.deploy._service import FederationService, Session

__all__ = ["METRICS", "Metrics", "MetricsEndpoint", "attach", "serve_metrics"]

log = logging.getLogger("fedagg.server")

#: Every metric: (name as exposed, type, labels, meaning, where: "both", "server" or "edge").
METRICS: tuple[tuple[str, str, str, str, str], ...] = (
    ("fedagg_rounds_closed_total", "counter", "",
     "rounds closed in this federation (a restarted server starts from its state's)", "server"),
    ("fedagg_model_version", "gauge", "",
     "the global model's version (an edge: the newest version its clients got tasks for)",
     "both"),
    ("fedagg_uploads_accepted_total", "counter", "",
     "uploads made durable and acknowledged (an edge: its subtree's, partials' jobs included)",
     "both"),
    ("fedagg_uploads_duplicate_total", "counter", "",
     "re-sent uploads of accepted tasks, acknowledged again and not counted twice", "both"),
    ("fedagg_uploads_refused_total", "counter", "reason",
     "uploads (Push calls) refused, by status: invalid_argument, permission_denied, "
     "failed_precondition, resource_exhausted, unauthenticated, unavailable, ...", "both"),
    ("fedagg_requests_refused_total", "counter", "method",
     "requests of any kind refused, by method (Hello, Tasks, Pull, Push, Heartbeat, Report, "
     "other)", "both"),
    ("fedagg_updates_refused_total", "counter", "reason",
     "accepted updates the policy refused to fold (the round's refusals; at most 16 reasons, "
     "then other)", "server"),
    ("fedagg_received_bytes_total", "counter", "", "update bytes received in uploads", "both"),
    ("fedagg_sent_bytes_total", "counter", "", "model bytes sent in downloads (pulls)", "both"),
    ("fedagg_clients_registered", "gauge", "", "registered client keys", "both"),
    ("fedagg_clients_connected", "gauge", "",
     "clients with an open task stream, directly or through a connected edge", "both"),
    ("fedagg_edges_connected", "gauge", "", "edge aggregators below with an open task stream",
     "both"),
    ("fedagg_round_duration_seconds", "histogram", "",
     "each round's duration, from its start to its close", "server"),
    ("fedagg_upload_latency_seconds", "histogram", "",
     "each acknowledged upload (accepted or duplicate): from its call's start to its "
     "acknowledgement (the update durable)", "both"),
    ("fedagg_updates_folded_total", "counter", "", "updates folded into closed rounds",
     "server"),
    ("fedagg_folded_bytes_total", "counter", "",
     "bytes folded into closed rounds (updates folded x the model's size)", "server"),
    ("fedagg_fold_seconds_total", "counter", "",
     "seconds the engine spent in the policy: folding updates, closing rounds, the server "
     "optimizer (fold throughput: rate of folded bytes / rate of this)", "server"),
    ("fedagg_checkpoint_duration_seconds", "histogram", "",
     "each checkpoint written: serialize, write, fsync, record", "server"),
    ("fedagg_edge_forwards_total", "counter", "kind",
     "what an edge sends up to its parent (counted when ready to send; sent and retried "
     "until acknowledged), by kind: partial (a partial aggregate), relay (one relayed "
     "update), dropouts (only its clients' dropouts)", "edge"),
    ("fedagg_edge_forwarded_updates_total", "counter", "",
     "client updates an edge sent up (in partials or relayed)", "edge"),
)  # fmt: skip

ROUND_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
UPLOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
CHECKPOINT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
#: distinct policy refusal reasons kept as label values; the rest count as "other"
MAX_REASONS = 16


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigError(
            "deploy.metrics needs prometheus-client: pip install 'fedagg[metrics]' (or set "
            'deploy.metrics = "" for no metrics endpoint)'
        ) from None
    return prometheus_client


def _help(name: str) -> str:
    return next(m[3] for m in METRICS if m[0] == name)


class Metrics:
    """The metrics of one federation service, in a registry of its own (:attr:`registry`).
    Its hooks run on the service's event loop; a scrape reads it from the HTTP thread."""

    def __init__(self, service: FederationService, progress: Progress) -> None:
        prom = _prometheus()
        self.svc = service
        self.edge = service.serves is not None
        self.progress = progress  # the service's (observed) progress reports
        reg: Any = prom.CollectorRegistry()  # this service's own: no global registry
        self.registry: CollectorRegistry = reg

        def metric(kind: Any, name: str, labels: tuple[str, ...] = (), **kw: Any) -> Any:
            base = name.removesuffix("_total")
            return kind(base, _help(name), labels, registry=reg, **kw)

        self.connected = metric(prom.Gauge, "fedagg_clients_connected")
        self.edges_connected = metric(prom.Gauge, "fedagg_edges_connected")
        metric(prom.Gauge, "fedagg_clients_registered").set(len(service.keys.names))
        self.version = metric(prom.Gauge, "fedagg_model_version")
        self.version.set_function(self._version)
        self.uploads_refused = metric(prom.Counter, "fedagg_uploads_refused_total", ("reason",))
        self.requests_refused = metric(prom.Counter, "fedagg_requests_refused_total",
                                       ("method",))  # fmt: skip
        self.upload_s = metric(prom.Histogram, "fedagg_upload_latency_seconds",
                               buckets=UPLOAD_BUCKETS)  # fmt: skip
        if self.edge:
            self.forwards = metric(prom.Counter, "fedagg_edge_forwards_total", ("kind",))
            self.forwarded = metric(prom.Counter, "fedagg_edge_forwarded_updates_total")
        else:
            self.rounds = metric(prom.Counter, "fedagg_rounds_closed_total")
            self.updates_refused = metric(prom.Counter, "fedagg_updates_refused_total",
                                          ("reason",))  # fmt: skip
            self.folded = metric(prom.Counter, "fedagg_updates_folded_total")
            self.folded_bytes = metric(prom.Counter, "fedagg_folded_bytes_total")
            self.round_s = metric(prom.Histogram, "fedagg_round_duration_seconds",
                                  buckets=ROUND_BUCKETS)  # fmt: skip
            self.checkpoint_s = metric(prom.Histogram, "fedagg_checkpoint_duration_seconds",
                                       buckets=CHECKPOINT_BUCKETS)  # fmt: skip
        reg.register(_Counts(self, prom))
        prom.ProcessCollector(registry=reg)  # process_cpu_seconds_total, ..._memory_bytes
        self.reasons: set[str] = set()
        self.checkpoints = 0  # the engine's checkpoints (and their seconds) observed so far
        self.checkpoint_seconds = 0.0

    def _version(self) -> float:
        p = self.progress
        return float(max(p.top, 0) if self.edge else p.version)

    def text(self) -> str:
        """What a scrape of ``/metrics`` returns (the Prometheus text format)."""
        out: bytes = _prometheus().generate_latest(self.registry)
        return out.decode()

    # -- hooks (see _Observed) ---------------------------------------------------------------
    def opened(self) -> None:
        if not self.edge:  # the rounds closed before a restart, as the state says
            self.rounds.inc(self.progress.closed_at_open)

    def connections(self) -> None:
        svc = self.svc
        self.connected.set(svc.connected())
        self.edges_connected.set(sum(s.connected for s in svc.edge_sessions.values()))

    def refused(self, method: str, error: CallError) -> None:
        method = method if method in METHODS else "other"
        self.requests_refused.labels(method).inc()
        if method == "Push":
            self.uploads_refused.labels(error.status.name.lower()).inc()

    def pushed(self, duplicate: bool, seconds: float) -> None:
        self.upload_s.observe(seconds)

    def effects(self, effects: Effects) -> None:
        if self.edge:
            for fwd in effects.forward:
                kind = "relay" if fwd.relay is not None else "partial" if fwd.jobs else "dropouts"
                self.forwards.labels(kind).inc()
                self.forwarded.inc(len(fwd.jobs))
            return
        nbytes = self.svc.engine.spec.nbytes
        for r in effects.rounds:
            if r.round + 1 <= self.progress.closed_at_open:
                continue  # replayed at a restart: counted in the state's rounds
            self.rounds.inc()
            self.round_s.observe(max(0.0, r.ended - r.started))
            self.folded.inc(r.folded)
            self.folded_bytes.inc(r.folded * nbytes)
            for reason, n in getattr(r, "refusals", ()) or ():
                self.updates_refused.labels(self._reason(str(reason))).inc(n)
        self._checkpoints()

    def _reason(self, reason: str) -> str:
        if reason not in self.reasons and len(self.reasons) < MAX_REASONS:
            self.reasons.add(reason)
        return reason if reason in self.reasons else "other"

    def _checkpoints(self) -> None:
        """The checkpoints the engine wrote since the last look (after each engine step: one,
        normally; several share their step's time equally)."""
        eng = self.svc.engine
        n = int(getattr(eng, "checkpoints", 0)) - self.checkpoints
        if n <= 0:
            return
        total = float(getattr(eng, "timings", {}).get("checkpoint", 0.0))
        each = (total - self.checkpoint_seconds) / n
        for _ in range(n):
            self.checkpoint_s.observe(max(0.0, each))
        self.checkpoints += n
        self.checkpoint_seconds = total


class _Counts:
    """What the service counts anyway, read at scrape time."""

    def __init__(self, metrics: Metrics, prom: Any) -> None:
        self.m = metrics
        self.family = prom.metrics_core.CounterMetricFamily

    def describe(self) -> list[Metric]:
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        svc = self.m.svc
        st = svc.stats
        values: dict[str, float] = {
            "fedagg_uploads_accepted_total": st.uploads,
            "fedagg_uploads_duplicate_total": st.duplicates,
            "fedagg_received_bytes_total": st.bytes_in,
            "fedagg_sent_bytes_total": st.bytes_out,
        }
        timings = getattr(svc.engine, "timings", None)
        if timings is not None and not self.m.edge:
            values["fedagg_fold_seconds_total"] = float(timings.get("policy", 0.0))
        for name, v in values.items():
            yield self.family(name.removesuffix("_total"), _help(name), value=v)


class _Observed(Progress):
    """The service's progress reports, also observed by its :class:`Metrics`."""

    metrics: Metrics

    def opened(self) -> None:
        super().opened()
        self.metrics.opened()

    def joined(self, s: Session, clients: Collection[int]) -> None:
        super().joined(s, clients)
        self.metrics.connections()

    def left(self, s: Session, clients: Collection[int]) -> None:
        super().left(s, clients)
        self.metrics.connections()

    def refused(self, method: str, peer: str, error: CallError) -> None:
        super().refused(method, peer, error)
        self.metrics.refused(method, error)

    def pushed(self, duplicate: bool, seconds: float) -> None:
        self.metrics.pushed(duplicate, seconds)

    def effects(self, effects: Effects) -> None:
        super().effects(effects)
        self.metrics.effects(effects)

    def settled(self) -> None:
        super().settled()
        self.metrics._checkpoints()


def attach(service: FederationService) -> Metrics:
    """Give ``service`` (not yet opened) its metrics; returns them (no endpoint: see
    :func:`serve_metrics`)."""
    if service.progress.opened_ok:
        raise RuntimeError("attach metrics before the service opens its state")
    observed = _Observed(service)
    observed.metrics = metrics = Metrics(service, observed)
    service.progress = observed
    return metrics


def _loopback(host: str) -> bool:
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    addrs = {str(info[4][0]).split("%")[0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a).is_loopback for a in addrs)


class MetricsEndpoint:
    """``/metrics`` over HTTP at ``address`` (``deploy.metrics``), on a thread of its own;
    :meth:`stop` closes it. A port it cannot bind is a :class:`ConfigError` naming
    ``deploy.metrics``; an address that is not loopback is served, with a warning."""

    def __init__(self, metrics: Metrics, address: str) -> None:
        host, port = metrics_address(address)
        prom = _prometheus()
        self.metrics = metrics
        try:
            self.httpd, self.thread = prom.start_http_server(port, host, metrics.registry)
        except OSError as e:
            raise ConfigError(
                f"deploy.metrics = {address!r}: cannot serve metrics there: {e}"
            ) from None
        self.port = int(self.httpd.server_port)
        self._stopped = threading.Lock()
        where = f"[{host}]" if ":" in host else host
        self.url = f"http://{where}:{self.port}/metrics"
        role = "edge" if metrics.edge else "server"
        log.info("Prometheus metrics of this %s at %s", role, self.url,
                 extra={"event": "metrics", "url": self.url})  # fmt: skip
        if not _loopback(host):
            log.warning(
                "deploy.metrics = %r is not a loopback address: /metrics is plain HTTP with no "
                "authentication, readable by anyone who can reach it (bind it to 127.0.0.1 and "
                "scrape through a tunnel or a proxy that authenticates)",
                address,
                extra={"event": "metrics_exposed", "address": address},
            )

    def stop(self) -> None:
        """Stop serving (blocks up to half a second: the HTTP thread's poll)."""
        if not self._stopped.acquire(blocking=False):
            return
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5.0)


def serve_metrics(service: FederationService, address: str) -> MetricsEndpoint:
    """:func:`attach` metrics to ``service`` and serve them at ``address``."""
    metrics_address(address)  # a bad value, before anything is attached
    return MetricsEndpoint(attach(service), address)
