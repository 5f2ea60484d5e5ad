"""The federation server: a :class:`~fedagg.deploy._service.FederationService` over a
:class:`~fedagg.deploy._fed.Federation`, served over gRPC (:mod:`fedagg.deploy._grpc`), and
its uploads also over the data port (:mod:`fedagg.deploy._stream`, ``data_listen``).

The service is transport-free (see :mod:`fedagg.deploy._transport`); the same service runs
in-process over :mod:`fedagg.deploy._memory`. The options are
:class:`~fedagg.deploy._options.ServerOptions`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any

from fedagg.deploy._auth import Keyring
from fedagg.deploy._engine import Engine, ServerStats
from fedagg.deploy._grpc import GrpcTransport
from fedagg.deploy._metrics import MetricsEndpoint, serve_metrics
from fedagg.deploy._options import ServerOptions, data_address
from fedagg.deploy._service import FederationService
from fedagg.deploy._stream import StreamTransport
from fedagg.deploy._transport import Service, Transport
from fedagg.policy import RoundStats

__all__ = ["Server"]

log = logging.getLogger("fedagg.server")


class Server:
    """Serve ``fed`` (an :class:`~fedagg.deploy._engine.Engine`) over gRPC (or another
    ``transport``, e.g. :class:`~fedagg.deploy._memory.MemoryTransport`):
    ``await server.start()``, then ``await server.wait()``."""

    def __init__(
        self,
        fed: Engine,
        keyring: Keyring,
        options: ServerOptions,
        *,
        on_round: Callable[[RoundStats], None] | None = None,
        edges: Keyring | None = None,
        serves: set[int] | None = None,
        edge_clients: Mapping[str, Collection[int]] | None = None,
        transport: Callable[[Service, ServerOptions], Transport] = GrpcTransport,
    ) -> None:
        self.service = FederationService(
            fed, keyring, options, on_round=on_round, edges=edges, serves=serves,
            edge_clients=edge_clients,
        )  # fmt: skip
        self.transport = transport(self.service, options)
        #: the data port (uploads over :mod:`fedagg.deploy._stream`) next to gRPC
        #: (``options.data_listen``; not with an in-process transport)
        self.data: StreamTransport | None = None
        tls = options.tls is not None
        if data_address(options.data_listen, options.listen, tls) and transport is GrpcTransport:
            self.data = StreamTransport(self.service, options)
        #: ``/metrics`` (``options.metrics``; see :mod:`fedagg.deploy._metrics`), once started
        self.metrics: MetricsEndpoint | None = None

    @property
    def fed(self) -> Engine:
        return self.service.engine

    @property
    def keys(self) -> Keyring:
        return self.service.keys

    @property
    def opt(self) -> ServerOptions:
        return self.service.opt

    @property
    def stats(self) -> ServerStats:
        return self.service.stats

    @property
    def port(self) -> int:
        return self.transport.port

    @property
    def data_port(self) -> int:
        """The data port (0: none)."""
        return self.data.port if self.data is not None else 0

    @property
    def nonces(self) -> Any:
        return self.service.admit.nonces

    @property
    def rate(self) -> Any:
        return self.service.admit.rate

    def connected(self) -> int:
        """Clients connected, directly or through a connected edge aggregator."""
        return self.service.connected()

    async def start(self) -> None:
        if self.opt.metrics and self.metrics is None:  # bound first: a bad address fails here
            self.metrics = serve_metrics(self.service, self.opt.metrics)
        try:
            effects = await self.service.open()
            await self.transport.start()
            if self.data is not None:
                try:
                    await self.data.start()
                except BaseException:
                    await self.transport.stop(0)
                    raise
                self.service.data_port = self.data.port
                log.info("uploads also on the data port %d (%s)", self.data.port,
                         "TLS" if self.opt.tls is not None else "no TLS")  # fmt: skip
            await self.service.run(effects)
        except BaseException:
            await self._stop_metrics()
            raise

    async def wait(self) -> None:
        await self.service.wait()

    async def drain(self, timeout: float) -> None:
        await self.service.drain(timeout)

    async def stop(self, grace: float = 1.0) -> None:
        try:
            if self.data is not None:
                await self.data.stop(grace)
            await self.transport.stop(grace)
            await self.service.stop()
        finally:
            await self._stop_metrics()

    async def _stop_metrics(self) -> None:
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
