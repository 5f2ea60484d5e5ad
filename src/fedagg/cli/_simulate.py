"""``fedagg simulate``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import fedagg
from fedagg.cli._common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    Command,
    non_negative_int,
    positive_int,
)


def _configure_simulate(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML config (default: the embedded MNIST-5k run)")
    p.add_argument("--rounds", type=positive_int, help="override the config's rounds")
    p.add_argument("--seed", type=non_negative_int, help="override the config's seed")
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


#: This module's subcommands (see :data:`fedagg.cli.COMMANDS`).
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
}
