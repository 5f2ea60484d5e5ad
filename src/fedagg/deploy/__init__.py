"""Deployment: the federation over a real network (gRPC), with the simulator's policies.

Server side::

    fed = deploy.build_federation(config, "state/")      # strategy + policy, as simulated
    deploy.serve(config)                                   # or: fedagg server CONFIG.toml

Client side (the user's training code)::

    def train(model, task):                                # model: arrays like the spec
        ...                                                # task.rng(): the job's stream
        return deploy.Result(delta, num_examples, {"loss": loss})

    key = deploy.ClientKey.load("keys/client-007.key")
    deploy.Client("server:7531", key, train, ca=open("certs/ca.pem", "rb").read()).run()

Aggregation tiers: the same server with ``deploy.parent = "host:port"`` is an edge (or
intermediate) aggregator, folding its subtree's updates into partial monoid states for its
parent (``deploy.serve_edge``; see :mod:`fedagg.deploy._edge`).

Structure: a transport-free federation service (:mod:`fedagg.deploy._service`) over an
engine (:class:`Federation` at the root, :class:`EdgeEngine` at an edge), served over gRPC
(:mod:`fedagg.deploy._grpc`) or in-process (:mod:`fedagg.deploy._memory`) through one small
call interface (:mod:`fedagg.deploy._transport`).

Security: TLS (``fedagg certs``) and Ed25519 client keys (``fedagg keys``) are on by default.
Durability: every accepted update is on disk and in the event log before it is acknowledged;
a restarted server resumes where it stopped (see :mod:`fedagg.deploy._fed`).
Operations: progress lines (``configure_logging``), ``read_status``/``format_status`` (what
``fedagg status`` shows, read without writing; see docs/deploy-operations.md).
"""

from fedagg.deploy._app import (
    EdgeResult,
    ServeResult,
    build_federation,
    client_from_config,
    config_evaluator,
    config_trainer,
    evaluation_from_config,
    options_from_config,
    serve,
    serve_async,
    serve_edge,
)
from fedagg.deploy._auth import ClientKey, Keyring, make_keys
from fedagg.deploy._canonical import Canonical, canonical_strategy
from fedagg.deploy._certs import make_certs
from fedagg.deploy._client import Client, ClientError, ClientReport, Result, TaskContext
from fedagg.deploy._edge import EdgeEngine
from fedagg.deploy._edge_server import EdgeServer, ParentLink
from fedagg.deploy._faults import Faults
from fedagg.deploy._faults import configure as configure_faults
from fedagg.deploy._fed import Federation, TaskInfo
from fedagg.deploy._log import JsonFormatter, configure_logging
from fedagg.deploy._options import PROTOCOL, ServerOptions
from fedagg.deploy._server import Server
from fedagg.deploy._status import format_status, read_status

__all__ = [
    "PROTOCOL",
    "Canonical",
    "Client",
    "ClientError",
    "ClientKey",
    "ClientReport",
    "EdgeEngine",
    "EdgeResult",
    "EdgeServer",
    "Faults",
    "Federation",
    "JsonFormatter",
    "Keyring",
    "ParentLink",
    "Result",
    "ServeResult",
    "Server",
    "ServerOptions",
    "TaskContext",
    "TaskInfo",
    "build_federation",
    "canonical_strategy",
    "client_from_config",
    "config_evaluator",
    "config_trainer",
    "configure_faults",
    "configure_logging",
    "evaluation_from_config",
    "format_status",
    "make_certs",
    "make_keys",
    "options_from_config",
    "read_status",
    "serve",
    "serve_async",
    "serve_edge",
]
