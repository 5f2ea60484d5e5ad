"""``fedagg runs``: list the runs of a run database, compare them, export them.

fedagg runs                      # every run: id, kind, name, status, rounds, accuracy
fedagg runs 2 3 4                # their final metrics side by side
fedagg runs 2 3 4 --diff         # the config keys that differ (dotted), a column a run
fedagg runs 2 3 --plot cmp.png   # accuracy vs round and vs virtual time, a line a run
fedagg runs 2 3 --csv            # their rounds as CSV on stdout (--csv FILE: to a file)
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import fedagg
from fedagg.cli._common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    Command,
)


def _configure_runs(p: argparse.ArgumentParser) -> None:
    p.add_argument("ids", nargs="*", type=int, help="runs to compare (default: list all)")
    p.add_argument("--db", default="runs/fedagg.db", help="run database (default: %(default)s)")
    p.add_argument(
        "--diff", action="store_true", help="print the config keys that differ between the runs"
    )
    p.add_argument(
        "--plot",
        metavar="FILE",
        help="write a PNG overlaying the runs' accuracy against round and against virtual time",
    )
    p.add_argument(
        "--csv",
        nargs="?",
        const="-",
        metavar="FILE",
        help="write the runs' rounds as CSV (run_id and every column) to FILE, or to stdout",
    )


def _cell(v: Any, width: int) -> str:
    if v is None:
        text = "-"
    elif isinstance(v, float):
        text = f"{v:.4f}" if math.isfinite(v) and abs(v) < 1e6 else f"{v:g}"
    else:
        text = str(v)
    return (text if len(text) <= width else text[: width - 1] + "~").rjust(width)


def _list(db: Any) -> None:
    print(
        f"{'id':>4}  {'kind':<8} {'name':<28} {'status':<11} {'rounds':>6}  {'final acc':>9}  "
        f"{'wall s':>8}  {'epsilon':>8}"
    )
    for r in db.runs():
        acc = r.summary.get("final_accuracy")
        acc_s = f"{acc:9.2%}" if isinstance(acc, float) else f"{'-':>9}"
        wall = r.summary.get("wall_time")
        wall_s = f"{wall:8.2f}" if isinstance(wall, float) else f"{'-':>8}"
        eps = db.final_epsilon(r.id)  # the run's DP epsilon so far ("-": no DP)
        eps_s = f"{'-':>8}" if eps is None else f"{eps:8.3g}"
        print(
            f"{r.id:>4}  {r.kind:<8} {r.name[:28]:<28} {r.status:<11} "
            f"{db.round_count(r.id):>6}  {acc_s}  {wall_s}  {eps_s}"
        )


def _compare(rows: list[dict[str, Any]]) -> None:
    keys = ["name", "kind", "status", "rounds", "final_accuracy", "best_accuracy", "final_loss",
            "virtual_time", "wall_time", "epsilon"]  # fmt: skip
    print(f"{'':<16}" + "".join(f"{'run ' + str(r['id']):>16}" for r in rows))
    for k in keys:
        print(f"{k:<16}" + "".join(" " + _cell(row.get(k), 15) for row in rows))


def _diff(db: Any, ids: Sequence[int]) -> None:
    from fedagg.runs import config_diff

    infos = [db.run(i) for i in ids]
    diff = config_diff([{"kind": r.kind, **r.config} for r in infos])
    if not diff:
        print(f"runs {', '.join(map(str, ids))}: the configs are identical")
        return
    width = max(len(k) for k, _ in diff)
    print(f"{'key':<{width}}" + "".join(f"{'run ' + str(i):>21}" for i in ids))
    for k, values in diff:
        print(f"{k:<{width}}" + "".join(" " + _cell(v, 20) for v in values))


def _csv(db: Any, ids: Sequence[int], target: str) -> None:
    from fedagg.runs import ROUND_COLUMNS, TEXT_COLUMNS

    columns = ["run_id", *ROUND_COLUMNS, *TEXT_COLUMNS]
    out = sys.stdout if target == "-" else open(target, "w", newline="")  # noqa: SIM115
    try:
        w = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        for i in ids:
            for row in db.rounds(i):
                w.writerow({"run_id": i, **{k: "" if v is None else v for k, v in row.items()}})
    finally:
        if out is not sys.stdout:
            out.close()


def _accuracy(row: Mapping[str, Any]) -> bool:
    v = row.get("test_accuracy")
    return isinstance(v, (int, float)) and not math.isnan(float(v))


def plot_runs(db: Any, ids: Sequence[int], path: str) -> None:
    """One PNG, two panels: test accuracy against round and against virtual time, a line a
    run, on a fixed [0, 1] axis with a dashed line at chance level (1 / num_classes, where
    the runs' summaries record it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    classes = set()
    for i in ids:
        info = db.run(i)
        n = info.summary.get("num_classes")
        if isinstance(n, int) and n > 1:
            classes.add(n)
        pts = [r for r in db.rounds(i) if _accuracy(r)]
        label = f"run {i}: {info.name[:24]} ({info.kind})"
        for ax, key in zip(axes, ("round", "virtual_time"), strict=True):
            ax.plot([r[key] for r in pts], [r["test_accuracy"] for r in pts], marker=".",
                    label=label)  # fmt: skip
    for ax, xlabel in zip(axes, ("round", "virtual time (s)"), strict=True):
        ax.set_ylim(0.0, 1.0)
        for n in sorted(classes):
            ax.axhline(1.0 / n, color="grey", linestyle="--", linewidth=1,
                       label=f"chance (1/{n})")  # fmt: skip
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[1].legend(loc="lower right", fontsize="small")
    fig.suptitle(f"runs {', '.join(map(str, ids))}")
    fig.tight_layout()
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _run_runs(args: argparse.Namespace) -> int:
    from fedagg.runs import RunDB

    if args.csv is not None and args.csv.isdigit():  # `runs --csv 1 2`: 1 is a run id
        args.ids = [int(args.csv), *args.ids]
        args.csv = "-"
    if args.plot is not None and args.plot.isdigit():
        print(f"fedagg runs: error: --plot needs a file name, not {args.plot}", file=sys.stderr)
        return EXIT_USAGE
    if not os.path.exists(args.db):
        print(f"fedagg runs: no run database at {args.db}", file=sys.stderr)
        return EXIT_ERROR
    try:
        with RunDB(args.db) as db:
            known = {r.id for r in db.runs()}
            unknown = [i for i in args.ids if i not in known]
            if unknown:
                have = f"runs {min(known)}..{max(known)}" if known else "no runs"
                print(
                    f"fedagg runs: error: no run {', '.join(map(str, unknown))} in {args.db} "
                    f"(it has {have})",
                    file=sys.stderr,
                )
                return EXIT_ERROR
            ids = args.ids or sorted(known)
            if args.csv is not None:
                _csv(db, ids, args.csv)
                if args.csv == "-":
                    return EXIT_OK  # stdout holds the CSV only
                print(f"csv: {args.csv} ({len(ids)} runs)")
            if args.plot:
                plot_runs(db, ids, args.plot)
                print(f"plot: {args.plot}")
            if args.diff:
                if len(ids) < 2:
                    print("fedagg runs: error: --diff needs two runs or more", file=sys.stderr)
                    return EXIT_ERROR
                _diff(db, ids)
            elif args.ids and not (args.plot or args.csv):
                _compare(db.compare(ids))
            elif not args.ids and not (args.plot or args.csv):
                _list(db)
    except fedagg.FedaggError as e:
        print(f"fedagg runs: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # stdout closed early (`fedagg runs --csv | head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except OSError as e:
        print(f"fedagg runs: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


#: This module's subcommands (see :data:`fedagg.cli.COMMANDS`).
COMMANDS: dict[str, Command] = {
    "runs": Command(
        help="list, compare, diff, plot or export the runs of the run database",
        description=(
            "List stored runs (simulated and deployed); compare the final metrics of the given "
            "run ids; --diff their configs; --plot an accuracy overlay; --csv their rounds."
        ),
        configure=_configure_runs,
        run=_run_runs,
    ),
}
