"""Reproduce the FedProx paper's synthetic-data setup (Li et al., MLSys 2020, Fig. 1-2).

Synthetic-IID, Synthetic(0,0), (0.5,0.5) and (1,1); 30 devices, 10 per round, E = 20 local
epochs, batch 10, lr 0.01, 200 rounds, multinomial logistic regression; stragglers
s in {0, 0.5, 0.9}. Three methods per setting, as in the paper:

* FedAvg: drops the stragglers;
* FedProx mu=0: keeps the stragglers' partial work (1..E-1 epochs);
* FedProx mu=1: the same, with the proximal term.

Writes ``results/results.md`` (final and worst training loss, final test accuracy) and one
plot of training loss per round for each dataset and straggler rate.

Usage (one command, ~10 minutes on 2 cores; ``--quick`` runs 40 rounds):

    .venv/bin/python experiments/fedprox/run.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

from fedagg import sim

DATASETS = {"iid": (0.0, 0.0, True), "(0,0)": (0.0, 0.0, False),
            "(0.5,0.5)": (0.5, 0.5, False), "(1,1)": (1.0, 1.0, False)}  # fmt: skip
STRAGGLERS = (0.0, 0.5, 0.9)
METHODS = {  # name: (client algorithm, mu, straggler mode)
    "FedAvg": ("fedavg", 0.0, "drop"),
    "FedProx mu=0": ("fedprox", 0.0, "partial"),
    "FedProx mu=1": ("fedprox", 1.0, "partial"),
}
HERE = os.path.dirname(os.path.abspath(__file__))


def config(ds: str, s: float, method: str, rounds: int, seed: int) -> dict[str, Any]:
    alpha, beta, iid = DATASETS[ds]
    alg, mu, mode = METHODS[method]
    return {
        "name": f"fedprox-{ds}-s{s}-{method}",
        "seed": seed,
        "rounds": rounds,
        "eval_every": 1,
        "eval_train": True,
        "data": {
            "name": "synthetic",
            "iid": iid,
            "num_clients": 30,
            "partition": "natural",
            "alpha": alpha,
            "beta": beta,
        },
        "model": {"name": "logreg"},
        "client": {"algorithm": alg, "epochs": 20, "batch_size": 10, "lr": 0.01, "mu": mu},
        "strategy": {"name": "fedavg"},
        "policy": {"clients_per_round": 10, "stragglers": s, "straggler_mode": mode},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="40 rounds")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    rounds = 40 if args.quick else args.rounds
    os.makedirs(args.out, exist_ok=True)
    curves: dict[str, list[float]] = {}
    table: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for ds in DATASETS:
        for s in STRAGGLERS:
            for method in METHODS:
                cfg = config(ds, s, method, rounds, args.seed)
                result, _ = sim.run_config(cfg)
                rows = [r.row() for r in result.records]
                losses = [float(r["train_loss"]) for r in rows]
                curves[f"{ds}|{s}|{method}"] = losses
                finite = [x for x in losses if math.isfinite(x)]
                table.append({
                    "dataset": ds, "stragglers": s, "method": method,
                    "final_train_loss": losses[-1],
                    "max_train_loss_last_half": max(finite[len(finite) // 2:], default=math.nan),
                    "final_test_accuracy": rows[-1]["test_accuracy"],
                    "wall_s": result.wall_time,
                })  # fmt: skip
                print(f"{ds:>10} s={s:<4} {method:<13} train loss {losses[-1]:8.4f}  "
                      f"test acc {rows[-1]['test_accuracy']:.3f}  ({result.wall_time:.1f} s)",
                      flush=True)  # fmt: skip
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"table": table, "curves": curves, "rounds": rounds, "seed": args.seed}, f)
    write_markdown(table, rounds, args, time.perf_counter() - t0)
    plot(curves, args.out)
    return 0


def write_markdown(table: list[dict[str, Any]], rounds: int, args: Any, wall: float) -> None:
    lines = [
        "# FedProx reproduction (synthetic data)",
        "",
        f"Command: `.venv/bin/python experiments/fedprox/run.py"
        f"{' --quick' if args.quick else ''}` (seed {args.seed}, {rounds} rounds, "
        f"{wall / 60:.1f} min on this machine).",
        "",
        "30 devices, 10 per round, E=20, batch 10, lr 0.01, multinomial logistic regression. "
        "Training loss = loss of the global model over all devices' training data.",
        "",
        "| dataset | stragglers | method | final train loss | worst train loss (last half) "
        "| final test acc |",
        "|---|---|---|---|---|---|",
    ]
    lines.extend(
        f"| {r['dataset']} | {r['stragglers']:.0%} | {r['method']} | "
        f"{r['final_train_loss']:.4f} | {r['max_train_loss_last_half']:.4f} | "
        f"{r['final_test_accuracy']:.3f} |"
        for r in table
    )
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(curves: dict[str, list[float]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(STRAGGLERS), len(DATASETS), figsize=(16, 10), sharex=True)
    for j, ds in enumerate(DATASETS):
        for i, s in enumerate(STRAGGLERS):
            ax = axes[i][j]
            for method in METHODS:
                ys = curves[f"{ds}|{s}|{method}"]
                ax.plot(range(1, len(ys) + 1), ys, label=method, lw=1)
            ax.set_title(f"Synthetic {ds}, {s:.0%} stragglers", fontsize=9)
            ax.set_yscale("log")
            if i == len(STRAGGLERS) - 1:
                ax.set_xlabel("round")
            if j == 0:
                ax.set_ylabel("training loss")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "training_loss.png"), dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
