"""The ``fedagg`` command line. The only module of fedagg that reads argv (or the environment).

Subcommands are registered in :data:`COMMANDS` (name -> :class:`Command`); each one adds its
options to its own sub-parser and runs from the parsed namespace, returning an exit code.

Crash tests: ``fedagg server`` and ``fedagg client`` take a fault-injection spec
``POINT[:N[:SECONDS]]`` (:mod:`fedagg.deploy._faults`) from the hidden ``--crash-at`` flag
or, without it, from the ``FEDAGG_CRASH_AT`` environment variable, and configure it before
they start: the process SIGKILLs itself at the N-th pass through that point.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import fedagg

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_STATE = 3  # the state directory cannot be used as it is (e.g. an unreadable state.db)


@dataclass(frozen=True, slots=True)
class Command:
    """A subcommand: one-line help, a function adding its options, and its handler."""

    help: str
    description: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------------------------
# fedagg demo
# --------------------------------------------------------------------------------------------


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--rounds", type=_positive_int, default=10, help="rounds per strategy (default: 10)"
    )
    p.add_argument(
        "--clients",
        type=_positive_int,
        default=20,
        help="number of simulated clients, at most 200 (default: 20)",
    )
    p.add_argument(
        "--per-round",
        type=_positive_int,
        default=10,
        help="clients sampled each round (default: 10)",
    )
    p.add_argument(
        "--no-bad-client",
        dest="bad_client",
        action="store_false",
        help="skip the client that sends a NaN update (in FedAvg round 2)",
    )


_DEMO_ROW = "{:<9} {:>5} {:>10} {:>9} {:>8} {:>8}"


def _demo_lines(r: Any) -> list[str]:
    """A demo round's table row, then a line per refused update."""
    row = _DEMO_ROW.format(r.strategy, r.round, f"{r.test_loss:.4f}",
                           f"{100 * r.test_accuracy:.1f}%", r.clients, f"{r.agg_ms:.2f}",
                           )  # fmt: skip
    return [row, *(f"  refused update from client {x.client_id}: {x.reason}" for x in r.refused)]


def _demo_summary(records: Sequence[Any]) -> str:
    """Each strategy's final test accuracy and loss, and how many updates were refused."""
    last = {r.strategy: r for r in records}
    parts = [f"{r.strategy} {100 * r.test_accuracy:.1f}% (loss {r.test_loss:.3f}) after "
             f"{r.round} rounds" for r in last.values()]  # fmt: skip
    refused = sum(len(r.refused) for r in records)
    return f"final test accuracy: {', '.join(parts)}; {refused} update(s) refused"


def _run_demo(args: argparse.Namespace) -> int:
    from fedagg import demo  # imported here so that `fedagg --help` stays fast

    try:
        demo.check_settings(args.seed, args.rounds, args.clients, args.per_round)
    except fedagg.ConfigError as e:
        print(f"fedagg demo: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"fedagg {fedagg.__version__} demo: softmax regression on scikit-learn digits "
        f"(8x8 images, {round(100 * demo.TEST_FRACTION)}% held out for testing)"
    )
    print(
        f"{args.clients} clients with Dirichlet(alpha={demo.ALPHA}) label skew, "
        f"{args.per_round} sampled per round, {demo.LOCAL_EPOCHS} local epochs of SGD "
        f"(batch {demo.BATCH_SIZE}, lr {demo.CLIENT_LR}); seed {args.seed}"
    )
    print(
        f"FedAvg, then FedAdam (server lr {demo.FEDADAM_LR}, tau {demo.FEDADAM_TAU}, "
        "paper flavor), each from the same all-zero model"
    )
    print()
    header = ("strategy", "round", "test loss", "test acc", "clients", "agg ms")
    print(_DEMO_ROW.format(*header), flush=True)

    def show(record: demo.RoundRecord) -> None:
        print("\n".join(_demo_lines(record)), flush=True)

    start = time.perf_counter()
    try:
        records = demo.run_demo(
            seed=args.seed,
            rounds=args.rounds,
            clients=args.clients,
            per_round=args.per_round,
            inject_bad=args.bad_client,
            on_record=show,
        )
    except fedagg.ConfigError as e:
        print(f"fedagg demo: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as e:
        print(f"fedagg demo: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print()
    print(_demo_summary(records))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


# --------------------------------------------------------------------------------------------
# fedagg simulate / fedagg runs
# --------------------------------------------------------------------------------------------


def _configure_simulate(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML config (default: the embedded MNIST-5k run)")
    p.add_argument("--rounds", type=_positive_int, help="override the config's rounds")
    p.add_argument("--seed", type=_non_negative_int, help="override the config's seed")
    p.add_argument("--db", help="run database (default: the config's output.db)")
    p.add_argument("--plots", help="directory for PNG plots (default: the config's output.plots)")
    p.add_argument("--no-plots", action="store_true", help="do not write plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _progress(total: int, enabled: bool) -> Callable[[Any], None]:
    def show(rec: Any) -> None:
        if not enabled:
            return
        done = rec.stats.round + 1
        width = 30
        bar = "#" * (width * done // total) + "-" * (width - width * done // total)
        acc = rec.test_accuracy
        acc_s = "   -  " if acc != acc else f"{acc:6.2%}"
        line = f"[{bar}] round {done}/{total}  acc {acc_s}  virtual {rec.stats.ended:9.1f} s"
        if sys.stderr.isatty():  # redraw in place
            print("\r" + line, end="\n" if done == total else "", file=sys.stderr, flush=True)
        elif done == total or done % max(1, total // 10) == 0:  # a log: a line per tenth
            print(line, file=sys.stderr, flush=True)

    return show


def _run_simulate(args: argparse.Namespace) -> int:
    from fedagg import sim

    try:
        cfg = sim.load_config(args.config) if args.config else sim.resolve_config()
        if args.rounds is not None:
            cfg["rounds"] = args.rounds
        if args.seed is not None:
            cfg["seed"] = args.seed
        db_path = args.db or cfg["output"]["db"]
        plots = None if args.no_plots else (args.plots or cfg["output"]["plots"])
        print(
            f"fedagg {fedagg.__version__} simulate: {cfg['name']} -- {cfg['data']['name']} "
            f"across {cfg['data']['num_clients']} clients ({cfg['data']['partition']}), "
            f"{cfg['policy']['clients_per_round']} per round, {cfg['rounds']} rounds, "
            f"{cfg['client']['algorithm']} clients, {cfg['strategy']['name']} server; "
            f"seed {cfg['seed']}"
        )
        with sim.RunDB(db_path) as db:
            result, run_id = sim.run_config(
                cfg, on_round=_progress(int(cfg["rounds"]), not args.quiet), db=db
            )
    except fedagg.FedaggError as e:
        print(f"fedagg simulate: error: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, fedagg.ConfigError) else EXIT_ERROR
    except (ValueError, TypeError) as e:  # a config value of the wrong type, e.g. rounds = "x"
        print(f"fedagg simulate: error: invalid config value: {e}", file=sys.stderr)
        return EXIT_USAGE
    rows = [r.row() for r in result.records]
    print()
    print(sim.format_table(rows, every=max(1, len(rows) // 20)))
    print()
    ups = result.client_updates / result.wall_time if result.wall_time else 0.0
    print(
        f"run {run_id} in {db_path}: final test accuracy {rows[-1]['test_accuracy']:.2%}, "
        f"{result.client_updates} client updates in {result.wall_time:.2f} s wall "
        f"({ups:,.0f} updates/s), {rows[-1]['virtual_time']:.1f} s virtual"
    )
    if plots:
        for f in sim.plot_run(rows, plots, f"run{run_id}-{cfg['name']}"):
            print(f"plot: {f}")
    return EXIT_OK


def _configure_runs(p: argparse.ArgumentParser) -> None:
    p.add_argument("ids", nargs="*", type=int, help="runs to compare (default: list all)")
    p.add_argument("--db", default="runs/fedagg.db", help="run database (default: %(default)s)")


def _run_runs(args: argparse.Namespace) -> int:
    import os

    from fedagg import sim

    if not os.path.exists(args.db):
        print(f"fedagg runs: no run database at {args.db}", file=sys.stderr)
        return EXIT_ERROR
    try:
        with sim.RunDB(args.db) as db:
            if not args.ids:
                print(
                    f"{'id':>4}  {'name':<28} {'status':<9} {'rounds':>6}  {'final acc':>9}  "
                    f"{'wall s':>8}"
                )
                for r in db.runs():
                    acc = r.summary.get("final_accuracy")
                    acc_s = f"{acc:9.2%}" if isinstance(acc, float) else f"{'-':>9}"
                    wall = r.summary.get("wall_time")
                    wall_s = f"{wall:8.2f}" if isinstance(wall, float) else f"{'-':>8}"
                    print(
                        f"{r.id:>4}  {r.name[:28]:<28} {r.status:<9} "
                        f"{r.summary.get('rounds', 0):>6}  {acc_s}  {wall_s}"
                    )
                return EXIT_OK
            rows = db.compare(args.ids)
    except fedagg.FedaggError as e:
        print(f"fedagg runs: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    keys = ["name", "status", "rounds", "final_accuracy", "best_accuracy", "final_loss",
            "virtual_time", "wall_time"]  # fmt: skip
    print(f"{'':<16}" + "".join(f"{'run ' + str(r['id']):>16}" for r in rows))
    for k in keys:
        cells = []
        for row in rows:
            v = row.get(k)
            cells.append(f"{v:>16.4f}" if isinstance(v, float) else f"{str(v)[:15]:>16}")
        print(f"{k:<16}" + "".join(cells))
    return EXIT_OK


#: Every subcommand, in the order ``fedagg --help`` lists them.
COMMANDS: dict[str, Command] = {
    "simulate": Command(
        help="run a virtual-clock federation from a TOML config (default: MNIST-5k, 100 clients)",
        description=(
            "Simulate a federation on this machine in virtual time: clients with modelled "
            "compute, links and availability train on their data; the server folds their "
            "updates as they arrive. Metrics per round go to the run database and to PNG plots."
        ),
        configure=_configure_simulate,
        run=_run_simulate,
    ),
    "runs": Command(
        help="list the runs in the run database, or compare some side by side",
        description="List stored runs, or compare the final metrics of the given run ids.",
        configure=_configure_runs,
        run=_run_runs,
    ),
    "demo": Command(
        help="federated training demo: FedAvg and FedAdam on the digits dataset",
        description=(
            "Simulated clients train a softmax regression on a non-IID share of scikit-learn's "
            "bundled digits dataset and send model deltas; the server folds them as they "
            "arrive, for a few rounds of FedAvg and then FedAdam, and prints test loss and "
            "accuracy per round. One client sends a NaN update, which is refused."
        ),
        configure=_configure_demo,
        run=_run_demo,
    ),
}


# --------------------------------------------------------------------------------------------
# fedagg certs / keys / server / client (deployment)
# --------------------------------------------------------------------------------------------

CRASH_ENV = "FEDAGG_CRASH_AT"


def _add_crash_at(p: argparse.ArgumentParser) -> None:
    # for crash tests only, hence hidden: see the module docstring and fedagg.deploy._faults
    p.add_argument("--crash-at", metavar="POINT[:N[:SECONDS]]", help=argparse.SUPPRESS)


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
    p.add_argument("--days", type=_positive_int, default=825, help="validity (default: 825)")


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
    g.add_argument("--clients", type=_positive_int, help="make client-000 .. client-(N-1)")
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
    p.add_argument("--rounds", type=_positive_int, help="override the config's rounds")
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
    import logging
    import os

    from fedagg import config, deploy

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
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
            print(f"fedagg server: listening on port {server.port} ({tls})", flush=True)

        insecure = True if args.insecure else None
        if cfg.get("deploy", {}).get("parent"):
            edge = deploy.serve_edge(
                cfg, insecure=insecure, listen=args.listen, state=args.state, on_start=started
            )
            print(
                f"fedagg server: edge aggregator finished ({edge.uploads} uploads, "
                f"{edge.forwarded} forwards to the parent, {edge.duplicates} retries "
                f"acknowledged, {edge.replayed} events replayed)"
            )
            return EXIT_OK
        result = deploy.serve(
            cfg, insecure=insecure, listen=args.listen, state=args.state, on_start=started
        )
    except fedagg.FedaggError as e:
        print(f"fedagg server: error: {e}", file=sys.stderr)
        if isinstance(e, fedagg.StateError):
            return EXIT_STATE
        return EXIT_USAGE if isinstance(e, fedagg.ConfigError) else EXIT_ERROR
    applied = sum(r.applied for r in result.rounds)
    print(
        f"fedagg server: finished at model version {result.server.version} "
        f"({applied} rounds applied, {result.uploads} uploads, {result.duplicates} retries "
        f"acknowledged, {result.refused} requests refused, {result.replayed} events replayed)"
    )
    return EXIT_OK


def _configure_client(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="the federation's TOML config (data, model, client tables)")
    p.add_argument("--key", required=True, help="this client's private key (NAME.key)")
    p.add_argument("--server", help="host:port (default: the config's deploy.server)")
    p.add_argument("--insecure", action="store_true", help="no TLS (the server's must match)")
    p.add_argument("--retry-for", type=float, default=120.0, help="give up after (s)")
    _add_crash_at(p)


def _run_client(args: argparse.Namespace) -> int:
    from fedagg import config, deploy

    try:
        _configure_faults(args)
        cfg = config.load_config(args.config)
        client = deploy.client_from_config(
            cfg, args.key, server=args.server, insecure=True if args.insecure else None,
            retry_for=args.retry_for,
        )  # fmt: skip
        report = client.run()
    except fedagg.FedaggError as e:
        print(f"fedagg client: error: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, fedagg.ConfigError) else EXIT_ERROR
    print(
        f"fedagg client {client.key.name}: {report.tasks} tasks, {report.uploads} uploads, "
        f"{report.duplicates} acknowledged as retries, {report.skipped} skipped"
    )
    return EXIT_OK


COMMANDS.update(
    {
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
            help="run a built-in client: the simulator's client algorithm on its own data",
            description=(
                "Connect to a federation server, wait for tasks, train on this client's share "
                "of the config's data and push the updates (signed with --key)."
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
)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="fedagg",
        description="fedagg: federated learning with fast, lean, trustworthy model-update "
        "aggregation.",
        epilog="Run 'fedagg <command> --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"fedagg {fedagg.__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="<command>")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.description)
        cmd.configure(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedagg`` command line with ``argv`` (default: ``sys.argv[1:]``); return the
    exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return COMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
