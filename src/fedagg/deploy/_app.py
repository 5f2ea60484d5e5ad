"""Configs to running services: what ``fedagg server`` and ``fedagg client`` do.

A deployment config is a simulation config (the same ``data``, ``model``, ``client``,
``strategy`` and ``policy`` tables, built by the same functions) plus a ``[deploy]`` table for
the transport. The server builds the strategy and the policy exactly as the simulator does;
the built-in client trains exactly as a simulated client does (same data partition, same
algorithm, same per-job random stream).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives import serialization

from fedagg._checkpoint import dumps
from fedagg.clients import with_config
from fedagg.config import (
    build_aggregator,
    build_algorithm,
    build_data,
    build_model,
    build_policy,
    build_strategy,
    metrics_aggregator,
    resolve_config,
)
from fedagg.core.spec import ArrayTree
from fedagg.core.strategy import ServerState
from fedagg.deploy._auth import ClientKey, Keyring
from fedagg.deploy._bounds import bounded_strategy, bounds_of
from fedagg.deploy._canonical import canonical_strategy
from fedagg.deploy._client import Client, EvalFn, Result, TaskContext
from fedagg.deploy._evaluate import client_evaluator, server_evaluator, task_configs
from fedagg.deploy._evaluation import Evaluation
from fedagg.deploy._fed import Federation
from fedagg.deploy._files import private_state_dir, write_private
from fedagg.deploy._options import ServerOptions
from fedagg.deploy._receivers import plane_strategy
from fedagg.deploy._record import RunRecorder
from fedagg.deploy._secure_client import secure_expectations
from fedagg.deploy._server import Server
from fedagg.errors import ConfigError
from fedagg.policy import Policy, RoundStats

if TYPE_CHECKING:
    from fedagg.deploy._edge_server import EdgeServer

__all__ = [
    "EdgeResult",
    "ServeResult",
    "build_federation",
    "client_from_config",
    "config_evaluator",
    "config_trainer",
    "edge_scopes",
    "evaluation_from_config",
    "keyring_identities",
    "options_from_config",
    "serve",
    "serve_async",
    "serve_edge",
]

log = logging.getLogger("fedagg.server")


def _certs_dir(d: Mapping[str, Any], insecure: bool, side: str, needs: tuple[str, ...]) -> Path:
    """``deploy.certs``, checked for one side (server: ``server.pem``/``server.key``; client:
    ``ca.pem``). Insecure with certificates configured (any of ``needs`` exists) is refused:
    plaintext is never chosen silently over certificates that are there."""
    certs = Path(d["certs"]) if d["certs"] else None
    if insecure and certs is not None:
        present = [certs / n for n in needs if (certs / n).exists()]
        if present:
            raise ConfigError(
                f"--insecure (or deploy.insecure) turns TLS off for the {side}, but "
                f"certificates are configured ({present[0]} exists): drop --insecure to use "
                f'TLS, or set deploy.certs = "" to run without certificates'
            )
    if not insecure and certs is None:
        raise ConfigError(f"TLS needs deploy.certs (the {side}'s certificates), or --insecure")
    return certs or Path()


def edge_scopes(
    d: Mapping[str, Any], keyring: Keyring, edges: Keyring | None
) -> dict[str, set[int]]:
    """``deploy.edge_clients``: for each edge aggregator below this server (a name in
    ``deploy.edges``), the clients it may serve, by index: a list of client names, or ``"*"``
    for any. An edge not listed may serve none."""
    raw = d["edge_clients"]
    if not isinstance(raw, Mapping):
        raise ConfigError('deploy.edge_clients must be a table: edge name = ["client", ...] or "*"')
    if raw and edges is None:
        raise ConfigError("deploy.edge_clients needs deploy.edges (the edges' authorized keys)")
    scopes: dict[str, set[int]] = {}
    for name, clients in raw.items():
        if edges is None or name not in edges.index:
            raise ConfigError(f"deploy.edge_clients names {name!r}, not a key in deploy.edges")
        if clients == "*":
            scopes[name] = set(range(len(keyring.names)))
            continue
        if isinstance(clients, str) or not isinstance(clients, list):
            raise ConfigError(f'deploy.edge_clients.{name} must be a list of client names or "*"')
        unknown = [c for c in clients if c not in keyring.index]
        if unknown:
            raise ConfigError(f"deploy.edge_clients.{name} names unregistered clients: "
                              f"{unknown[:5]}")  # fmt: skip
        scopes[name] = {keyring.index[c] for c in clients}
    for name in edges.names if edges is not None else ():
        if name not in scopes:
            log.warning("edge %r has no deploy.edge_clients entry: it may serve no client", name)
    return scopes


@dataclass(frozen=True)
class ServeResult:
    server: ServerState
    rounds: list[RoundStats]
    replayed: int
    uploads: int
    duplicates: int
    refused: int
    receive_s: float  # upload handlers: checking, hashing and spooling chunks
    run_id: int | None = None  # the deployment's run in the run database ([output] db)


@dataclass(frozen=True)
class EdgeResult:
    """What an edge aggregator did: updates accepted from its subtree, forwards sent up."""

    uploads: int
    duplicates: int
    refused: int
    forwarded: int
    replayed: int


def _identity(cfg: Mapping[str, Any], server: ServerState) -> dict[str, str]:
    # where the config and its code live (code_path) may move with the project directory
    run = {k: v for k, v in cfg.items() if k not in ("deploy", "output", "code_path")}
    digest = hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()
    return {"config": digest, "spec": json.dumps(server.spec.to_dict()), "seed": str(cfg["seed"])}


def build_federation(
    config: Mapping[str, Any], directory: str | os.PathLike[str] | None = None,
    identities: Sequence[bytes] | None = None,
) -> Federation:  # fmt: skip
    """The server side of a config: model, strategy and policy as the simulator builds them.
    ``identities``: the clients' Ed25519 public keys (raw, the keyring's order), which secure
    aggregation checks their signatures with (:func:`keyring_identities`)."""

    cfg = resolve_config(config)
    d = cfg["deploy"]
    seed = int(cfg["seed"])
    directory = private_state_dir(directory or d["state"])  # 0700, its files 0600
    if cfg["client"]["algorithm"] in ("scaffold", "fedamd"):
        raise ConfigError(
            f"client algorithm {cfg['client']['algorithm']!r} sends server-side state "
            "(control variates, anchors) and runs in the simulator only"
        )
    # a model of your own (factory, or init with your train) needs no dataset on the server
    m = cfg["model"]
    own_model = bool(m["factory"]) or bool(m["init"] and cfg["client"]["train"])
    fd = None if own_model else build_data(cfg, seed)
    model = build_model(cfg, fd)
    num_clients = int(cfg["data"]["num_clients"]) if fd is None else len(fd.clients)
    strategy = build_strategy(cfg)
    if d["order"] not in ("arrival", "canonical"):
        raise ConfigError(f"deploy.order must be 'arrival' or 'canonical', got {d['order']!r}")
    # every client's claimed weight and update norm (issue 14, #6); warm once the window holds
    # bound_warmup clients, or half the clients of a smaller federation
    bounds = bounds_of(d, clients=num_clients)
    secure = cfg["secure_aggregation"]["kind"] != "none"
    if secure:
        if d["order"] == "canonical":
            raise ConfigError(
                "deploy.order = 'canonical' is for plaintext folds: under secure aggregation "
                "the server sums masked uploads (exact, in any order); use 'arrival'"
            )
        if int(d["checkpoint_updates"]) > 0:
            raise ConfigError(
                "deploy.checkpoint_updates > 0 checkpoints mid-round, which secure aggregation "
                "rounds do not support: set it to 0"
            )
        if bounds.enabled:
            log.info("deploy bounds (weight_cap, norm_cap, max_norm) do not apply to masked "
                     "uploads: [secure_aggregation] clip and max_weight bound them")  # fmt: skip
    elif bounds.enabled:
        strategy = bounded_strategy(strategy, bounds, canonical=d["order"] == "canonical")
    elif d["order"] == "canonical":
        strategy = canonical_strategy(strategy)
    server = strategy.init(model.init(seed))
    if int(d["receivers"]):  # the mean folded in receiver processes, over shared memory
        strategy = plane_strategy(strategy, int(d["receivers"]), server.spec,
                                  partials=bool(d["edges"]))  # fmt: skip
    policy: Policy = build_policy(cfg, strategy)
    return Federation(
        policy, server, num_clients=num_clients, seed=seed,
        directory=directory, epochs=int(cfg["client"]["epochs"]),
        checkpoint_every=int(d["checkpoint_every"]),
        checkpoint_updates=int(d["checkpoint_updates"]), identity=_identity(cfg, server),
        identities=identities,
    )  # fmt: skip


def keyring_identities(keyring: Keyring) -> list[bytes]:
    """The raw Ed25519 public keys of a keyring's clients, in index order."""
    raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
    return [keyring.keys[n].public_bytes(*raw) for n in keyring.names]


def options_from_config(config: Mapping[str, Any], *, insecure: bool | None = None,
                        listen: str | None = None) -> ServerOptions:  # fmt: skip
    d = resolve_config(config)["deploy"]
    insecure = bool(d["insecure"]) if insecure is None else insecure
    tls = None
    certs = _certs_dir(d, insecure, "server", ("server.pem", "server.key"))
    if not insecure:
        if (certs / "ca.key").exists():
            log.warning(
                "the CA's private key %s is in the directory the server reads its certificate "
                "from: move it offline ('fedagg certs' now writes it to a separate directory)",
                certs / "ca.key",
            )
        try:
            tls = ((certs / "server.pem").read_bytes(), (certs / "server.key").read_bytes())
        except OSError as e:
            raise ConfigError(
                f"TLS needs {certs}/server.pem and server.key (make them with "
                f"'fedagg certs {certs}'), or run with --insecure: {e}"
            ) from e
    return ServerOptions(
        listen=listen or str(d["listen"]), tls=tls, insecure=insecure,
        chunk_bytes=int(float(d["chunk_mib"]) * (1 << 20)), queue=int(d["queue"]),
        client_timeout=float(d["client_timeout"]), heartbeat=float(d["heartbeat"]),
        wait_for=int(d["wait_for"]), rate=float(d["rate"]), burst=float(d["burst"]),
        skew=float(d["skew"]), fsync=bool(d["fsync"]), max_clients=int(d["max_clients"]),
        digest=bool(d["digest"]), max_uploads=int(d["max_uploads"]),
        adaptive_window=bool(d["adaptive_window"]), first_timeout=float(d["first_timeout"]),
        idle_timeout=float(d["idle_timeout"]), min_rate=float(d["min_rate_kib"]) * 1024,
        client_uploads=int(d["client_uploads"]), preauth=int(d["preauth"]),
        preauth_per_peer=int(d["preauth_per_peer"]), metrics=str(d["metrics"]),
        digest_algorithm=str(d["digest_algorithm"]), durability=str(d["durability"]),
        ingest=str(d["ingest"]), max_streams=int(d["max_streams"]),
        receivers=int(d["receivers"]), data_listen=str(d["data_listen"]),
    )  # fmt: skip


async def serve_async(
    fed: Federation,
    keyring: Keyring,
    options: ServerOptions,
    *,
    on_round: Callable[[RoundStats], None] | None = None,
    on_start: Callable[[Server], None] | None = None,
    edges: Keyring | None = None,
    edge_clients: Mapping[str, set[int]] | None = None,
    evaluation: Evaluation | None = None,
    recorder: RunRecorder | None = None,
    task_config: Callable[[int], str] | None = None,
) -> ServeResult:
    """Run the server until the policy finishes; returns the final state. ``edge_clients``:
    the clients each of the ``edges`` may serve (:func:`edge_scopes`); ``evaluation``: what
    to evaluate (:func:`evaluation_from_config`); ``recorder``: the run database to record
    the deployment in; ``task_config``: each model version's client config, as it travels."""

    def each(r: RoundStats) -> None:
        if recorder is not None:
            recorder.round(r)
        if on_round is not None:
            on_round(r)

    server = Server(fed, keyring, options, on_round=each, edges=edges,
                    edge_clients=edge_clients)  # fmt: skip
    svc = server.service
    if task_config is not None:
        svc.task_config = task_config
    if evaluation is not None:
        evaluation.attach(svc)
        if recorder is not None and evaluation.on_metrics is None:
            evaluation.on_metrics = recorder.metrics
    if recorder is not None:
        recorder.bytes_in = lambda: svc.stats.bytes_in
    await server.start()
    status = "failed"
    try:
        if recorder is not None:  # the run the state names, or a new one (named there)
            keys = ("run_id", "run_db")
            meta = await svc.in_engine(lambda: {k: fed.store.meta(k) for k in keys})
            past = await svc.in_engine(fed.store.rounds)
            await svc.in_engine(fed.store.set_meta, recorder.bind(meta, past))
        if on_start is not None:
            on_start(server)
        await server.wait()
        if evaluation is not None:  # the last evaluations: reported, or timed out
            await evaluation.drain()
        await asyncio.sleep(0.2)  # let the streams deliver "finished"
        status = "finished"
    except (asyncio.CancelledError, KeyboardInterrupt):
        status = "interrupted"
        raise
    finally:
        await server.stop(grace=1.0)
        if evaluation is not None:
            evaluation.close()
        if recorder is not None:
            recorder.finish(status, {"client_updates": server.stats.uploads})
    st = server.stats
    return ServeResult(
        fed.server, st.rounds, fed.replayed, st.uploads, st.duplicates, st.refused, st.receive_s,
        recorder.run_id if recorder is not None else None,
    )  # fmt: skip


def evaluation_from_config(config: Mapping[str, Any]) -> Evaluation:
    """What a root server evaluates: the global model every ``eval_every`` rounds on
    ``eval_data`` (or the dataset's test split), and, every ``[deploy] fed_eval_every``
    model versions, on its clients' own data (see :mod:`fedagg.deploy._evaluation`)."""
    cfg = resolve_config(config)
    d = cfg["deploy"]
    checks = {"eval_every": cfg["eval_every"], "deploy.fed_eval_every": d["fed_eval_every"],
              "deploy.fed_eval_clients": d["fed_eval_clients"]}  # fmt: skip
    for key, v in checks.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{key} must be an integer >= 0, got {v!r}")
    timeout = d["eval_timeout"]
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ConfigError(f"deploy.eval_timeout must be a number of seconds > 0, got {timeout!r}")
    server_eval = server_evaluator(cfg)
    if server_eval is None:
        log.info("no held-out data (eval_data, or a test split of [data]): the server does not "
                 "evaluate the model")  # fmt: skip
    return Evaluation(
        server_eval=server_eval, eval_every=int(cfg["eval_every"]),
        fed_every=int(d["fed_eval_every"]), fed_clients=int(d["fed_eval_clients"]),
        timeout=float(timeout), aggregate=metrics_aggregator(cfg),
    )  # fmt: skip


def serve(
    config: Mapping[str, Any],
    *,
    insecure: bool | None = None,
    listen: str | None = None,
    state: str | None = None,
    on_round: Callable[[RoundStats], None] | None = None,
    on_start: Callable[[Server], None] | None = None,
    db: str | os.PathLike[str] | None = None,
) -> ServeResult:
    """``fedagg server``: serve the federation a config describes; the final model is saved
    to ``<state>/final.npz``, its rounds and evaluations recorded in the run database ``db``
    (default: ``[output] db``; see :mod:`fedagg.deploy._record`)."""
    cfg = resolve_config(config)
    if cfg["deploy"]["parent"]:
        raise ConfigError("this config has a deploy.parent: run it with serve_edge")
    directory = state or cfg["deploy"]["state"]
    opts = options_from_config(cfg, insecure=insecure, listen=listen)
    keyring = Keyring.load(Path(cfg["deploy"]["keys"]) / "authorized_keys")
    edges = Keyring.load(cfg["deploy"]["edges"]) if cfg["deploy"]["edges"] else None
    scopes = edge_scopes(cfg["deploy"], keyring, edges)
    evaluation = evaluation_from_config(cfg)  # a bad eval_data, evaluate or schedule: now
    task_config = task_configs(cfg)
    fed = build_federation(cfg, directory, keyring_identities(keyring))
    if len(keyring.names) != fed.ctx.num_clients:
        raise ConfigError(
            f"{len(keyring.names)} registered client keys, but the config has "
            f"{fed.ctx.num_clients} clients (data.num_clients)"
        )
    recorder = RunRecorder(db or cfg["output"]["db"], str(cfg["name"]), int(cfg["seed"]), cfg,
                           model_bytes=fed.spec.nbytes)  # fmt: skip
    run = serve_async(fed, keyring, opts, on_round=on_round, on_start=on_start, edges=edges,
                      edge_clients=scopes, evaluation=evaluation, recorder=recorder,
                      task_config=task_config)  # fmt: skip
    result = asyncio.run(run)
    write_private(Path(directory) / "final.npz", dumps(result.server))
    return result


def serve_edge(
    config: Mapping[str, Any],
    *,
    insecure: bool | None = None,
    listen: str | None = None,
    state: str | None = None,
    on_start: Callable[[EdgeServer], None] | None = None,
) -> EdgeResult:
    """``fedagg server`` with ``deploy.parent`` set: run an edge (or intermediate) aggregator
    until its parent says the federation is over."""
    from fedagg.deploy._edge import EdgeEngine
    from fedagg.deploy._edge_server import EdgeServer, ParentLink

    cfg = resolve_config(config)
    d = cfg["deploy"]
    if not d["parent"] or not d["edge_key"]:
        raise ConfigError("an edge aggregator needs deploy.parent and deploy.edge_key")
    insecure = bool(d["insecure"]) if insecure is None else insecure
    opts = options_from_config(cfg, insecure=insecure, listen=listen)
    certs = _certs_dir(d, insecure, "link to the parent", ("ca.pem",))
    keyring = Keyring.load(Path(d["keys"]) / "authorized_keys")
    edges = Keyring.load(d["edges"]) if d["edges"] else None
    scopes = edge_scopes(d, keyring, edges)
    unknown = [n for n in d["serves"] if n not in keyring.index]
    if unknown:
        raise ConfigError(f"deploy.serves names unregistered clients: {unknown[:5]}")
    serves = {keyring.index[n] for n in d["serves"]} or set(range(len(keyring.names)))
    if int(d["receivers"]):
        log.warning("deploy.receivers applies to the root server: this edge folds its "
                    "subtree's updates in its own process")  # fmt: skip
    mode = d["edge_mode"]
    if mode == "auto":
        mode = "aggregate" if cfg["policy"]["kind"] == "sync" else "relay"
    seed = int(cfg["seed"])
    fd = build_data(cfg, seed)
    spec = build_strategy(cfg).init(build_model(cfg, fd).init(seed)).spec
    leaf = None
    if d["leaf_rule"]:
        leaf = build_aggregator({**cfg["strategy"], "aggregator": d["leaf_rule"]})
    # its clients' claimed weights and update norms, bounded before they are folded into a
    # partial (aggregate mode; relayed updates are bounded by the root), warm once the window
    # holds bound_warmup clients or half of this edge's subtree (issue 14, #6)
    bounds = bounds_of(d, clients=len(serves))
    engine = EdgeEngine(
        build_strategy(cfg).aggregator, spec, num_clients=len(keyring.names),
        directory=private_state_dir(state or d["state"]), mode=mode,
        flush_after=float(d["flush_after"]), leaf_rule=leaf,
        bounds=bounds if bounds.enabled else None,
    )  # fmt: skip
    ca = None
    if not insecure:
        try:
            ca = (certs / "ca.pem").read_bytes()
        except OSError as e:
            raise ConfigError(f"TLS needs the CA certificate {certs / 'ca.pem'} ({e})") from e
    # an edge holds accepted updates for its parent: it keeps trying it for as long as it runs
    link = ParentLink(str(d["parent"]), ClientKey.load(d["edge_key"]), sorted(serves), ca=ca,
                      insecure=insecure, retry_for=math.inf)  # fmt: skip

    async def run() -> EdgeResult:
        server = EdgeServer(engine, keyring, opts, link, edges=edges, serves=serves,
                            edge_clients=scopes)  # fmt: skip
        await server.start()
        if on_start is not None:
            on_start(server)
        try:
            await server.wait()
            await server.drain(min(10.0, opts.client_timeout))
        finally:
            await server.stop(grace=1.0)
        st = server.stats
        return EdgeResult(st.uploads, st.duplicates, st.refused, engine.forwarded,
                          engine.replayed)  # fmt: skip

    return asyncio.run(run())


def config_trainer(config: Mapping[str, Any]) -> Callable[[ArrayTree, TaskContext], Any]:
    """The client's train function: the simulator's client (the built-in algorithm, with the
    task's per-task config, or your ``[client] train`` given the task as the client received
    it), on this client's share of ``[data]`` (None with ``data.name = "none"``)."""

    cfg = resolve_config(config)
    seed = int(cfg["seed"])
    fd = build_data(cfg, seed)
    model = build_model(cfg, fd)
    algorithm = build_algorithm(cfg)
    yours = bool(getattr(algorithm, "takes_tasks", False))
    if fd is None and not yours:
        raise ConfigError(
            "data.name = 'none' gives the client no data: the built-in client algorithms need "
            'a dataset; name your train function in [client] train = "module:function"'
        )

    states: dict[int, Any] = {}  # a stateful algorithm's client state (worker momentum)

    def train(params: ArrayTree, task: TaskContext) -> Any:
        named = params if isinstance(params, dict) else {str(i): a for i, a in enumerate(params)}
        data = None if fd is None else fd.clients[task.client_index]
        if yours:
            res, _ = algorithm.train(model, named, data, task.rng(), epochs=task.epochs,
                                     task=task)  # fmt: skip
        else:
            alg = with_config(algorithm, task.config)  # e.g. a scheduled lr
            res, states[task.client_index] = alg.train(
                model, named, data, task.rng(), epochs=task.epochs,
                state=states.get(task.client_index),
            )  # fmt: skip
        return Result(res.delta, float(res.num_examples), dict(res.metrics))

    return train


def client_from_config(
    config: Mapping[str, Any],
    key: str | os.PathLike[str],
    *,
    server: str | None = None,
    insecure: bool | None = None,
    train: Callable[[ArrayTree, TaskContext], Any] | None = None,
    evaluate: EvalFn | None = None,
    retry_for: float = 120.0,
) -> Client:
    """``fedagg client``: a client of the federation a config describes, with the config's
    train function (:func:`config_trainer`) and evaluate function (:func:`config_evaluator`)
    unless ``train`` / ``evaluate`` are given."""
    cfg = resolve_config(config)
    d = cfg["deploy"]
    insecure = bool(d["insecure"]) if insecure is None else insecure
    ca = None
    certs = _certs_dir(d, insecure, "client", ("ca.pem",))
    if not insecure:
        path = certs / "ca.pem"
        try:
            ca = path.read_bytes()
        except OSError as e:
            raise ConfigError(f"TLS needs the CA certificate {path} ({e}), or --insecure") from e
    # the federation's keyring, if this client has it: its peers' identities (the trusted PKI
    # secure aggregation checks signatures with; without it, secure rounds are refused)
    ring = Path(d["keys"]) / "authorized_keys" if d["keys"] else None
    keyring = Keyring.load(ring) if ring is not None and ring.exists() else None
    return Client(
        server or str(d["server"]), ClientKey.load(key), train or config_trainer(cfg), ca=ca,
        insecure=insecure, retry_for=retry_for, evaluate=evaluate or config_evaluator(cfg),
        keyring=keyring, expect=secure_expectations(cfg), streams=int(d["streams"]),
        transport=str(d["transport"]),
    )  # fmt: skip


def config_evaluator(config: Mapping[str, Any]) -> EvalFn:
    """The built-in client's evaluate function, for federated evaluation tasks:
    ``[client] evaluate(params, data, task)`` if the config names one, else the model's own
    (loss, accuracy), on this client's test split (``client_tests``) if the dataset has one,
    else on its training share; weighted by the number of examples. The dataset is loaded at
    the first evaluation."""
    return client_evaluator(resolve_config(config))
