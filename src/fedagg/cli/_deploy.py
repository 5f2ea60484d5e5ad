"""``fedagg certs``, ``keys``, ``server`` and ``client``: the deployment commands.

Crash tests: ``fedagg server`` and ``fedagg client`` take a fault-injection spec
``POINT[:N[:SECONDS]]`` (:mod:`fedagg.deploy._faults`) from the hidden ``--crash-at`` flag
or, without it, from the ``FEDAGG_CRASH_AT`` environment variable, and configure it before
they start: the process SIGKILLs itself at the N-th pass through that point.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import fedagg
from fedagg.cli._common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_STATE,
    EXIT_USAGE,
    Command,
    positive_int,
)

CRASH_ENV = "FEDAGG_CRASH_AT"


def _add_crash_at(p: argparse.ArgumentParser) -> None:
    # for crash tests only, hence hidden: see the module docstring and fedagg.deploy._faults
    p.add_argument("--crash-at", metavar="POINT[:N[:SECONDS]]", help=argparse.SUPPRESS)


def _add_logging(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging (to stderr)")
    g.add_argument("--quiet", action="store_true", help="warnings and errors only")
    g.add_argument(
        "--log-json", action="store_true",
        help="one JSON object per line (time, level, logger, message, and fields such as "
        "event, round, version, folded, refused, client)",
    )  # fmt: skip
    g.add_argument("--verbose", action="store_true", help="also fedagg's DEBUG lines")


def _configure_logging(args: argparse.Namespace) -> None:
    from fedagg.deploy import configure_logging

    configure_logging(quiet=args.quiet, json_lines=args.log_json, verbose=args.verbose)


def _say(args: argparse.Namespace, line: str) -> None:
    """A result line on stdout (none with --quiet)."""
    if not args.quiet:
        print(line, flush=True)


def _error(args: argparse.Namespace, command: str, e: Exception) -> None:
    """The error a command fails with: on stderr, as a JSON line with --log-json."""
    if args.log_json:
        import logging

        logging.getLogger(f"fedagg.{command}").error("error: %s", e, extra={"event": "error"})
    else:
        print(f"fedagg {command}: error: {e}", file=sys.stderr)


def _configure_faults(args: argparse.Namespace) -> None:
    """Fault injection from ``--crash-at``, else from $FEDAGG_CRASH_AT (raises ConfigError on
    a bad spec). The library itself never reads the environment for it."""
    import os

    from fedagg.deploy import configure_faults

    spec = args.crash_at if args.crash_at is not None else os.environ.get(CRASH_ENV, "")
    try:
        configure_faults(spec)
    except fedagg.ConfigError as e:
        source = "--crash-at" if args.crash_at is not None else CRASH_ENV
        raise fedagg.ConfigError(f"{source}: {e}") from None


def _configure_certs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "directory",
        help="what the server and clients read (deploy.certs): ca.pem, server.pem, server.key",
    )
    p.add_argument(
        "--ca-dir",
        help="where the CA's private key ca.key goes, outside DIRECTORY (default: "
        "DIRECTORY-ca beside it); keep it offline",
    )
    p.add_argument(
        "--host",
        action="append",
        help="a host name or IP the server is reached at (repeatable; default: localhost and "
        "127.0.0.1)",
    )
    p.add_argument("--days", type=positive_int, default=825, help="validity (default: 825)")


def _run_certs(args: argparse.Namespace) -> int:
    from fedagg.deploy import make_certs

    hosts = tuple(args.host) if args.host else ("localhost", "127.0.0.1")
    try:
        paths = make_certs(args.directory, hosts, args.days, ca_dir=args.ca_dir)
    except fedagg.FedaggError as e:
        print(f"fedagg certs: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"fedagg certs: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    for what, path in paths.items():
        print(f"{what:7s} {path}")
    print(f"give ca.pem to the clients; keep {paths['ca_key']} offline")
    stale = paths["cert"].parent / "ca.key"
    if stale.exists():
        print(
            f"warning: {stale} (an older CA's private key) is in the directory the server "
            "reads: move it offline",
            file=sys.stderr,
        )
    return EXIT_OK


def _configure_keys(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="where to write NAME.key files and authorized_keys")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--clients", type=positive_int, help="make client-000 .. client-(N-1)")
    g.add_argument("--name", action="append", help="a client name (repeatable)")


def _run_keys(args: argparse.Namespace) -> int:
    from fedagg.deploy import make_keys

    width = max(3, len(str(args.clients - 1))) if args.clients else 0
    names = args.name or [f"client-{i:0{width}d}" for i in range(args.clients)]
    try:
        auth = make_keys(args.directory, names)
    except fedagg.FedaggError as e:
        print(f"fedagg keys: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        print(f"fedagg keys: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{len(names)} client keys in {args.directory}; the server reads {auth}")
    return EXIT_OK


def _configure_server(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="TOML config: a simulation config plus a [deploy] table")
    p.add_argument("--listen", help="host:port (default: the config's deploy.listen)")
    p.add_argument("--state", help="state directory (default: the config's deploy.state)")
    p.add_argument(
        "--insecure", action="store_true", help="no TLS (on loopback or a trusted network only)"
    )
    p.add_argument("--rounds", type=positive_int, help="override the config's rounds")
    t = p.add_argument_group("aggregation tiers (an edge or intermediate aggregator)")
    t.add_argument("--parent", help="host:port of the parent: run as an edge aggregator")
    t.add_argument("--edge-key", help="this edge's private key (from 'fedagg keys')")
    t.add_argument("--serves", help="comma-separated client names of this edge's subtree")
    t.add_argument("--edges", help="authorized keys of the edge aggregators below this server")
    t.add_argument(
        "--edge-clients", action="append", metavar="EDGE=CLIENTS",
        help="the clients an edge below this server may serve: EDGE=client-000,client-001, or "
        "EDGE='*' for any; repeat per edge (deploy.edge_clients; an edge not given serves none)",
    )  # fmt: skip
    t.add_argument("--leaf-rule", help="a robust rule over this edge's own clients (e.g. krum)")
    _add_logging(p)
    _add_crash_at(p)


def _tier_overrides(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.parent:
        out["parent"] = args.parent
    if args.edge_key:
        out["edge_key"] = args.edge_key
    if args.serves:
        out["serves"] = [n.strip() for n in args.serves.split(",") if n.strip()]
    if args.edges:
        out["edges"] = args.edges
    if args.edge_clients:
        scopes: dict[str, Any] = {}
        for item in args.edge_clients:
            name, sep, clients = item.partition("=")
            if not sep or not name.strip():
                raise fedagg.ConfigError(
                    f"--edge-clients {item!r}: expected EDGE=client,client or EDGE=*"
                )
            names = [n.strip() for n in clients.split(",") if n.strip()]
            scopes[name.strip()] = "*" if names == ["*"] else names
        out["edge_clients"] = scopes
    if args.leaf_rule:
        out["leaf_rule"] = args.leaf_rule
    return out


def _run_server(args: argparse.Namespace) -> int:
    import os

    from fedagg import config, deploy

    _configure_logging(args)
    os.umask(0o077)  # whatever the server creates (state, checkpoints, spool) is private
    try:
        _configure_faults(args)
        cfg = config.load_config(args.config)
        if args.rounds is not None:
            cfg["rounds"] = args.rounds
        tier = _tier_overrides(args)
        if tier:
            cfg["deploy"] = {**cfg.get("deploy", {}), **tier}

        def started(server: Any) -> None:
            tls = "insecure" if server.opt.tls is None else "TLS"
            _say(args, f"fedagg server: listening on port {server.port} ({tls})")

        insecure = True if args.insecure else None
        if cfg.get("deploy", {}).get("parent"):
            edge = deploy.serve_edge(
                cfg, insecure=insecure, listen=args.listen, state=args.state, on_start=started
            )
            _say(
                args,
                f"fedagg server: edge aggregator finished ({edge.uploads} uploads, "
                f"{edge.forwarded} forwards to the parent, {edge.duplicates} retries "
                f"acknowledged, {edge.replayed} events replayed)",
            )
            return EXIT_OK
        result = deploy.serve(
            cfg, insecure=insecure, listen=args.listen, state=args.state, on_start=started
        )
    except fedagg.FedaggError as e:
        _error(args, "server", e)
        if isinstance(e, fedagg.StateError):
            return EXIT_STATE
        return EXIT_USAGE if isinstance(e, fedagg.ConfigError) else EXIT_ERROR
    applied = sum(r.applied for r in result.rounds)
    _say(
        args,
        f"fedagg server: finished at model version {result.server.version} "
        f"({applied} rounds applied, {result.uploads} uploads, {result.duplicates} retries "
        f"acknowledged, {result.refused} requests refused, {result.replayed} events replayed)",
    )
    return EXIT_OK


def _configure_client(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the federation's TOML config (data, model, client tables)")
    p.add_argument("--key", required=True, help="this client's private key (NAME.key)")
    p.add_argument("--server", help="host:port (default: the config's deploy.server)")
    p.add_argument("--insecure", action="store_true", help="no TLS (the server's must match)")
    p.add_argument("--retry-for", type=float, default=120.0, help="give up after (s)")
    _add_logging(p)
    _add_crash_at(p)


def _run_client(args: argparse.Namespace) -> int:
    from fedagg import config, deploy

    _configure_logging(args)
    try:
        _configure_faults(args)
        cfg = config.load_config(args.config)
        client = deploy.client_from_config(
            cfg, args.key, server=args.server, insecure=True if args.insecure else None,
            retry_for=args.retry_for,
        )  # fmt: skip
        report = client.run()
    except fedagg.FedaggError as e:
        _error(args, "client", e)
        return EXIT_USAGE if isinstance(e, fedagg.ConfigError) else EXIT_ERROR
    _say(
        args,
        f"fedagg client {client.key.name}: {report.tasks} tasks, {report.uploads} uploads, "
        f"{report.duplicates} acknowledged as retries, {report.skipped} skipped"
        + (f", {report.resent} kept updates sent again" if report.resent else ""),
    )
    return EXIT_OK


#: This module's subcommands (see :data:`fedagg.cli.COMMANDS`).
COMMANDS: dict[str, Command] = {
    "server": Command(
        help="serve a federation over gRPC (TLS and client keys on by default)",
        description=(
            "Run the federation a config describes over the network: the same strategy and "
            "round or async policy as 'fedagg simulate', with clients connecting over gRPC. "
            "State is durable in deploy.state: a restarted server resumes where it stopped."
        ),
        configure=_configure_server,
        run=_run_server,
    ),
    "client": Command(
        help="run a client: the config's train function (or built-in algorithm) on its data",
        description=(
            "Connect to a federation server, wait for tasks, train on this client's share "
            "of the config's data with [client] train (or the built-in [client] algorithm), "
            "evaluate when asked ([client] evaluate) and push the updates (signed with --key)."
        ),
        configure=_configure_client,
        run=_run_client,
    ),
    "certs": Command(
        help="create a private CA and a TLS certificate for the server",
        description=(
            "Write ca.pem, server.pem and server.key (ECDSA P-256) to DIRECTORY, and the "
            "CA's private key ca.key to a separate directory (--ca-dir, default "
            "DIRECTORY-ca): never into the one the server reads. Keys are mode 0600."
        ),
        configure=_configure_certs,
        run=_run_certs,
    ),
    "keys": Command(
        help="create Ed25519 client keys and the server's authorized_keys file",
        description="Write NAME.key (private, mode 0600) per client and authorized_keys.",
        configure=_configure_keys,
        run=_run_keys,
    ),
}
