"""The server's options (the ``[deploy]`` config table) and its fixed limits."""

from __future__ import annotations

from dataclasses import dataclass

from fedagg.errors import ConfigError

__all__ = [
    "EDGE_PER_CLIENT",
    "MAX_METRICS",
    "MAX_METRIC_NAME",
    "MAX_REQUEST",
    "MIN_CHUNK",
    "OPENING_PER_CALLER",
    "PROTOCOL",
    "ServerOptions",
    "data_address",
    "metrics_address",
]

PROTOCOL = 1

#: An upload's metrics: at most MAX_METRICS, each named by 1 to MAX_METRIC_NAME characters of
#: ``A-Z a-z 0-9 _ . : / -``, each a finite float. They are checked before anything else is
#: done for the upload (its signature, spool file, state DB row), so a header stuffed with
#: metrics costs the server nothing. (Module constants: the ``[deploy]`` table has no limits
#: section.)
MAX_METRICS = 64
MAX_METRIC_NAME = 64
#: The first message of an RPC (an upload's header, not its data) is at most MAX_REQUEST
#: bytes; one signed by an edge aggregator's name may carry per-client lists (the clients it
#: serves, their tasks, a partial's jobs with their clients' signatures and metrics):
#: EDGE_PER_CLIENT more bytes per client in its scope (``deploy.edge_clients``). Checked on
#: the raw bytes, before parsing. (gRPC's message limit, ``chunk_bytes`` + 64 KiB, caps it.)
MAX_REQUEST = 16 * 1024
#: RPCs one caller may have opening at once (credentials checked, first message not yet read
#: and authenticated): each may make gRPC hold up to its message limit.
OPENING_PER_CALLER = 8
#: An upload's data comes in chunks of at most ``chunk_bytes``, split where the client likes
#: (at its arrays' ends, say): at most ``nbytes / min(MIN_CHUNK, chunk_bytes)`` + 2 per array
#: of the model + 8 of them, so tiny chunks cannot multiply the per-message cost of an upload.
MIN_CHUNK = 64 * 1024
EDGE_PER_CLIENT = 6 * 1024


def metrics_address(value: str) -> tuple[str, int]:
    """``deploy.metrics`` (``host:port``, ``[v6]:port``) as ``(host, port)``; port 0 picks a
    free one. Anything else is a :class:`~fedagg.errors.ConfigError` naming the key."""
    host, sep, port = str(value).rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    bad = not sep or not host or not port.isdigit() or int(port) > 65535
    if bad or any(c.isspace() or c in "/[]@" for c in host):
        raise ConfigError(
            f'deploy.metrics must be host:port (e.g. "127.0.0.1:9464"), or "" for no '
            f"metrics endpoint; got {value!r}"
        )
    return host, int(port)


def data_address(data_listen: str, listen: str, tls: bool = False) -> tuple[str, int] | None:
    """Where the stream transport listens: ``data_listen`` (``"host:port"``; ``"auto"``:
    ``listen``'s host, a free port, none if ``listen`` is no ``host:port`` or the server runs
    TLS (``tls``: clients with ``transport = "auto"`` do not use the data port under TLS, see
    ``_client.TLS_STREAM``, so it is not opened unless asked for); ``""``: nowhere, None)."""
    if not data_listen or (data_listen == "auto" and tls):
        return None
    value = listen if data_listen == "auto" else data_listen
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    bad = not sep or not host or not port.isdigit() or int(port) > 65535
    if bad or any(c.isspace() or c in "/[]@" for c in host):
        if data_listen == "auto":
            return None
        raise ConfigError(
            f'deploy.data_listen must be "auto", "" (off) or host:port; got {data_listen!r}'
        )
    return host, 0 if data_listen == "auto" else int(port)


@dataclass(frozen=True)
class ServerOptions:
    """How the server listens, authenticates and limits (the ``[deploy]`` config table).

    Args:
        listen: ``host:port`` (port 0 picks a free one; see :attr:`Server.port`).
        tls: ``(cert_pem, key_pem)`` bytes, or None to run without TLS (needs
            ``insecure=True``: there is no silent fallback).
        chunk_bytes: the largest data chunk accepted in an upload (and sent in a pull).
        queue: accepted events waiting for the engine; beyond it, uploads wait (backpressure).
        client_timeout: seconds a client with open tasks may stay disconnected before its
            tasks count as dropped out.
        heartbeat: seconds between keep-alives on an idle task stream.
        wait_for: clients that must be connected before the first round (0: all).
        rate, burst: per-client request rate limit (token bucket; rate 0 disables it).
        skew: allowed clock skew of signed requests, seconds (also the nonce memory).
        fsync: fsync each spooled upload before acknowledging it (durable across a power
            loss, not only a process crash).
        max_clients: refuse a keyring larger than this.
        max_uploads: uploads received at once, and models sent at once; more wait (held back
            by gRPC flow control), so the server's memory does not grow with the number of
            clients.
        adaptive_window: let gRPC grow each stream's flow-control window (BDP probing):
            faster for a few large uploads, but memory then grows with concurrent clients.
        digest: require a signed sha256 of every upload's bytes (end-to-end payload
            authenticity, also through a TLS-terminating proxy). It costs a hash pass on
            both sides (~1 GB/s per core); with TLS end to end, turning it off loses nothing
            in transit (the channel authenticates every byte).
        first_timeout: seconds an RPC may take to send its first message (an upload's
            header), which is read, size-capped (:data:`MAX_REQUEST`) and authenticated
            before the RPC takes a slot, a file or a thread.
        idle_timeout: seconds an upload holding a slot may go without sending a message.
        min_rate: progress floor of an upload holding a slot, bytes/s: it must end within
            ``idle_timeout + nbytes / min_rate`` seconds of taking its slot.
        client_uploads: slots one client (or one edge's partials) may hold at once, out of
            ``max_uploads``; beyond, an upload is refused (RESOURCE_EXHAUSTED: clients retry
            later). 2: an upload and a concurrent retry of it (after a lost connection).
        preauth: RPCs opening at once (call credentials verified, first message not yet
            read and authenticated), over all peers; beyond, a new RPC is refused at once
            (RESOURCE_EXHAUSTED: clients retry) and costs nothing. A call without valid call
            credentials (see :mod:`fedagg.deploy._calls`) is refused before it opens.
        preauth_per_peer: the same, per peer IP address, so one host cannot take them all
            (and :data:`OPENING_PER_CALLER` per caller).
        digest_algorithm: the signed digest's hash, ``"sha256"`` or ``"blake3"``.
        durability: ``"fsync"``: an upload is acknowledged once durable (its spool fsynced
            if ``fsync``, its log row committed); ``"retained"``: once logged, its spool
            synced in groups in the background, the client keeping the update until the
            committed watermark covers its task (and pushing it again if, after a crash,
            the server gives it the same task again).
        ingest: ``"fold"``: fold each checked chunk into the aggregate as it arrives (a
            decomposable aggregator in arrival order), rolled back exactly if the upload
            fails; ``"spool"``: spool the whole upload, then fold it.
        max_streams: the most parallel streams (shards) one upload may be split across.
        receivers: processes the root folds its uploads in, through the shared-memory plane
            (:mod:`fedagg.deploy._receivers`); 0: in the server's process.
        data_listen: where the stream transport for uploads listens (the data port,
            :mod:`fedagg.deploy._stream`, advertised in ``HelloReply.data_port``):
            ``"auto"``: ``listen``'s host, a free port, without TLS only (under TLS
            clients upload over gRPC by default: no data port unless ``"host:port"``);
            ``"host:port"``; ``""``: none (uploads over gRPC only).
        metrics: ``host:port`` to serve Prometheus metrics on (``/metrics``, plain HTTP,
            unauthenticated: keep it on loopback), or ``""`` for none (see
            :mod:`fedagg.deploy._metrics`).
    """

    listen: str = "127.0.0.1:7531"
    tls: tuple[bytes, bytes] | None = None
    insecure: bool = False
    chunk_bytes: int = 4 << 20
    queue: int = 64
    client_timeout: float = 30.0
    heartbeat: float = 10.0
    wait_for: int = 0
    rate: float = 50.0
    burst: float = 200.0
    skew: float = 60.0
    fsync: bool = True
    max_clients: int = 100_000
    max_uploads: int = 8
    adaptive_window: bool = False
    digest: bool = True
    first_timeout: float = 10.0
    idle_timeout: float = 30.0
    min_rate: float = 64 * 1024.0
    client_uploads: int = 2
    preauth: int = 64
    preauth_per_peer: int = 32
    metrics: str = ""
    digest_algorithm: str = "blake3"
    durability: str = "retained"
    ingest: str = "spool"
    max_streams: int = 8
    receivers: int = 0
    data_listen: str = "auto"

    def __post_init__(self) -> None:
        if self.tls is None and not self.insecure:
            raise ConfigError("TLS is on by default: give certificates, or insecure=True")
        if self.chunk_bytes < 4096 or self.chunk_bytes > (64 << 20):
            raise ConfigError("chunk_bytes must be in [4 KiB, 64 MiB]")
        if self.queue < 1 or self.client_timeout <= 0 or self.heartbeat <= 0:
            raise ConfigError("queue, client_timeout and heartbeat must be > 0")
        if self.max_uploads < 1 or self.client_uploads < 1:
            raise ConfigError("max_uploads and client_uploads must be >= 1")
        if not (self.first_timeout > 0 and self.idle_timeout > 0 and self.min_rate > 0):
            raise ConfigError("first_timeout, idle_timeout and min_rate must be > 0")
        if self.preauth < 1 or self.preauth_per_peer < 1:
            raise ConfigError("preauth and preauth_per_peer must be >= 1")
        if self.metrics:
            metrics_address(self.metrics)  # a ConfigError naming deploy.metrics
        if self.digest_algorithm not in ("sha256", "blake3"):
            raise ConfigError("digest_algorithm must be sha256 or blake3")
        if self.durability not in ("fsync", "retained"):
            raise ConfigError("durability must be fsync or retained")
        if self.ingest not in ("fold", "spool"):
            raise ConfigError("ingest must be fold or spool")
        if not 1 <= self.max_streams <= 64:
            raise ConfigError("max_streams must be in [1, 64]")
        if not 0 <= self.receivers <= 64:
            raise ConfigError("receivers must be in [0, 64]")
        data_address(self.data_listen, self.listen)  # a ConfigError naming deploy.data_listen
