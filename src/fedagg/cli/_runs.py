"""``fedagg runs``."""

from __future__ import annotations

import argparse
import sys

import fedagg
from fedagg.cli._common import (
    EXIT_ERROR,
    EXIT_OK,
    Command,
)


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


#: This module's subcommands (see :data:`fedagg.cli.COMMANDS`).
COMMANDS: dict[str, Command] = {
    "runs": Command(
        help="list the runs in the run database, or compare some side by side",
        description="List stored runs, or compare the final metrics of the given run ids.",
        configure=_configure_runs,
        run=_run_runs,
    ),
}
