"""FedFix vs synchronous and asynchronous FedAvg (Fraboni et al., JMLR 2023), scenario F-80.

M = 10 clients; client i's job takes tau_i = 1 - 0.8 i / 9 virtual time units (1.0 down to
0.2), obtained with K fixed local SGD steps of batch B and a compute speed of K B / tau_i
examples per unit (no latency, unlimited bandwidth). MNIST-5k split into 2 label shards per
client (equal sizes, so p_i = n_i / n = 1/M for every method), multinomial logistic
regression, server learning rate 1, equal virtual-time budget T for every method:

* FedAvg (sync): every round waits for all 10 clients (one round = 1 time unit);
* async FedAvg: a server step at every arrival, identical (omega = 1) or unbiased weights;
* FedFix-dt: a server step every dt, unbiased (p_i ceil(tau_i / dt)) or identical (p_i);
* FedBuff-c as in Fraboni's code (step after c arrivals, identical weights 1/c, the c clients
  restart with the new model), and Nguyen et al.'s variant (clients restart at once,
  s(tau) = 1 / sqrt(1 + tau)).

Writes ``results/results.md`` (loss and accuracy at T, server steps, staleness, oscillation
over the last quarter of the budget), ``results/results.json`` and the plots
``results/test_loss.png`` and ``results/test_accuracy.png``.

Usage (one command, ~5 minutes on 2 cores; ``--quick``: T = 15, one seed):

    .venv/bin/python experiments/fedfix/run.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from fedagg import clients, models, staleness, strategies
from fedagg import data as fdata
from fedagg.core.strategy import Strategy
from fedagg.policy import SyncPolicy, async_fedavg, fedbuff, fedfix
from fedagg.sim import Distribution, Simulation, SystemModel

M = 10
STEPS, BATCH, LR = 10, 64, 0.05  # local work: K steps of B examples, local learning rate
TAU = 1.0 - np.arange(M) * 0.8 / (M - 1)  # F-80
EPS = 1e-6  # jobs end EPS early, so a job due exactly at a window's end counts in it
BIG = 10**9  # "unbounded" server steps: the time budget stops every run
GRID = 0.05  # resolution of the common time grid used for the curves and oscillation
JSON_EVERY = 5  # results.json keeps every 5th grid point of the curves (0.25 time units)
LOSS_TARGET = 0.6  # "fast": the first time the test loss gets down to this
HERE = os.path.dirname(os.path.abspath(__file__))

Maker = Callable[[Strategy], Any]
METHODS: dict[str, Maker] = {
    "FedAvg (sync)": lambda st: SyncPolicy(st, rounds=BIG, clients_per_round=M),
    "Async FedAvg, identical": lambda st: async_fedavg(st, BIG, weights="identical"),
    "Async FedAvg, unbiased": lambda st: async_fedavg(st, BIG, weights="unbiased"),
    "FedFix-0.2, unbiased": lambda st: fedfix(st, BIG, window=0.2, weights="unbiased"),
    "FedFix-0.5, unbiased": lambda st: fedfix(st, BIG, window=0.5, weights="unbiased"),
    "FedFix-0.8, unbiased": lambda st: fedfix(st, BIG, window=0.8, weights="unbiased"),
    "FedFix-0.2, identical": lambda st: fedfix(st, BIG, window=0.2, weights="identical"),
    "FedFix-0.5, identical": lambda st: fedfix(st, BIG, window=0.5, weights="identical"),
    "FedFix-0.8, identical": lambda st: fedfix(st, BIG, window=0.8, weights="identical"),
    "FedBuff-5 (Fraboni)": lambda st: fedbuff(
        st, BIG, buffer=5, concurrency=M, restart="step", staleness=staleness.constant()
    ),
    "FedBuff-10 (Fraboni)": lambda st: fedbuff(
        st, BIG, buffer=10, concurrency=M, restart="step", staleness=staleness.constant()
    ),
    "FedBuff-5 (Nguyen)": lambda st: fedbuff(st, BIG, buffer=5, concurrency=M),
}
# the two panels of each plot: the paper's comparison, then the variants
PANELS = {
    "sync vs async vs FedFix (unbiased)": [
        "FedAvg (sync)",
        "Async FedAvg, identical",
        "Async FedAvg, unbiased",
        "FedFix-0.2, unbiased",
        "FedFix-0.5, unbiased",
        "FedFix-0.8, unbiased",
    ],
    "FedFix identical, FedBuff": [
        "FedAvg (sync)",
        "FedFix-0.5, unbiased",
        "FedFix-0.2, identical",
        "FedFix-0.5, identical",
        "FedFix-0.8, identical",
        "FedBuff-5 (Fraboni)",
        "FedBuff-10 (Fraboni)",
        "FedBuff-5 (Nguyen)",
    ],
}


def job_work(n: int) -> int:
    """Examples a job of STEPS batches of BATCH processes on n examples: what LocalSGD with
    fixed steps reports (epochs of ceil(n / BATCH) batches, the last possibly short)."""
    per = -(-n // BATCH)
    full, rest = divmod(STEPS, per)
    return full * n + min(rest * BATCH, n)


def system(seed: int, sizes: Any) -> SystemModel:
    """F-80: compute only (latency and transfer are negligible), job i lasts tau_i - EPS."""
    fast = Distribution("constant", 1e15)
    sm = SystemModel(
        M, seed=seed, downlink=fast, uplink=fast, latency=Distribution("constant", 0.0)
    )
    work = np.array([job_work(n) for n in sizes], dtype=np.float64)
    return sm.with_speeds(work / (TAU - EPS))


def run_one(name: str, seed: int, budget: float) -> dict[str, Any]:
    fd = fdata.load("mnist5k", num_clients=M, partition="shards", seed=seed)
    model = models.LogReg(fd.num_features, fd.num_classes)
    alg = clients.LocalSGD(epochs=1, batch_size=BATCH, lr=LR, steps=STEPS)
    st = strategies.fedavg(lr=1.0)
    policy = METHODS[name](st)
    simulation = Simulation(
        fd,
        model,
        alg,
        st,
        policy,
        system(seed, fd.sizes()),
        seed=seed,
        max_time=budget * (1 + 1e-8),  # the window ending at T closes a relative 1e-9 late
    )
    result = simulation.run()
    rows = [r.row() for r in result.records]
    times = np.array([r["virtual_time"] for r in rows])
    loss = np.array([r["test_loss"] for r in rows])
    acc = np.array([r["test_accuracy"] for r in rows])
    stale = np.array([r["staleness_mean"] for r in rows])
    folded = np.array([r["folded"] for r in rows], dtype=float)
    applied = np.array([r["applied"] for r in rows], dtype=bool)
    # the model in force at each grid time: the last server step at or before it (the initial
    # model before the first step, which every method shares)
    grid = np.arange(0.0, budget + GRID / 2, GRID)
    init_loss, init_acc = model.evaluate(model.init(seed), fd.test.x, fd.test.y)
    idx = np.searchsorted(times, grid + 1e-9, side="right") - 1
    g_loss = np.where(idx >= 0, loss[np.maximum(idx, 0)], init_loss)
    g_acc = np.where(idx >= 0, acc[np.maximum(idx, 0)], init_acc)
    tail = grid >= 0.75 * budget
    hit = np.flatnonzero(g_loss <= LOSS_TARGET)
    w = folded[applied]
    return {
        "method": name,
        "seed": seed,
        "final_test_loss": float(g_loss[-1]),
        "final_test_accuracy": float(g_acc[-1]),
        "server_steps": int(applied.sum()),
        "client_updates": int(result.client_updates),
        # mean staleness of the folded updates (each step's mean weighted by its size)
        "staleness_mean": float(np.sum(stale[applied] * w) / max(w.sum(), 1.0)),
        "staleness_max": int(max((r["staleness_max"] for r in rows), default=0)),
        "time_to_loss": float(grid[hit[0]]) if len(hit) else math.nan,
        "tail_mean_loss": float(g_loss[tail].mean()),
        "tail_max_loss": float(g_loss[tail].max()),
        # oscillation: the std of the test loss about its linear trend over the tail
        "tail_std_loss": float(np.std(g_loss[tail] - trend(grid[tail], g_loss[tail]))),
        "tail_min_accuracy": float(g_acc[tail].min()),
        "wall_s": result.wall_time,
        "curve_loss": [round(float(x), 5) for x in g_loss],
        "curve_accuracy": [round(float(x), 4) for x in g_acc],
    }


def trend(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The least-squares line through (x, y), evaluated at x."""
    a, b = np.polyfit(x, y, 1)
    return np.asarray(a * x + b)


SCALARS = (
    "final_test_loss",
    "final_test_accuracy",
    "server_steps",
    "client_updates",
    "staleness_mean",
    "staleness_max",
    "time_to_loss",
    "tail_mean_loss",
    "tail_max_loss",
    "tail_std_loss",
    "tail_min_accuracy",
)


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and standard deviation over the seeds of every scalar, per method."""
    table = []
    for name in METHODS:
        mine = [r for r in runs if r["method"] == name]
        row: dict[str, Any] = {"method": name, "seeds": len(mine)}
        for k in SCALARS:
            v = np.array([r[k] for r in mine], dtype=float)
            row[k] = float(v.mean())
            row[k + "_std"] = float(v.std())
        table.append(row)
    return table


def git_commit() -> str:
    """The short commit of HEAD, with "-dirty" if src/ differs from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", ":(top)src"], cwd=HERE)
    except OSError:
        return "unknown"
    return (head or "unknown") + ("-dirty" if dirty.returncode == 1 else "")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--time", type=float, default=100.0, help="virtual-time budget T")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="T = 15, one seed")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    budget, seeds = (15.0, 1) if args.quick else (args.time, args.seeds)
    os.makedirs(args.out, exist_ok=True)
    threadpool_limits(1)  # small matrices: one BLAS thread is faster (and the cores are shared)
    commit = git_commit()  # the code as it was imported, before the runs
    t0 = time.perf_counter()
    runs = []
    for seed in range(seeds):
        for name in METHODS:
            r = run_one(name, seed, budget)
            runs.append(r)
            print(
                f"seed {seed} {name:<24} loss {r['final_test_loss']:.4f}  "
                f"acc {r['final_test_accuracy']:.3f}  steps {r['server_steps']:5d}  "
                f"tail max {r['tail_max_loss']:.4f}  ({r['wall_s']:.1f} s)",
                flush=True,
            )
    wall = time.perf_counter() - t0
    table = summarize(runs)
    command = ".venv/bin/python experiments/fedfix/run.py" + (" --quick" if args.quick else "")
    meta = {
        "command": command,
        "git_commit": commit,
        "wall_time_s": wall,
        "budget": budget,
        "seeds": seeds,
        "grid_step": GRID,
        "json_curve_step": GRID * JSON_EVERY,
        "setup": {
            "clients": M,
            "tau": TAU.tolist(),
            "data": "mnist5k, shards partition (2 label shards of 200 examples per client)",
            "model": "logreg",
            "local": {"steps": STEPS, "batch_size": BATCH, "lr": LR},
            "server_lr": 1.0,
        },
    }
    checks = paper_checks(runs, seeds)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        stored = [  # the curves at a coarser step, to keep the file small
            {**r, "curve_loss": r["curve_loss"][::JSON_EVERY],
             "curve_accuracy": r["curve_accuracy"][::JSON_EVERY]}
            for r in runs
        ]  # fmt: skip
        json.dump({**meta, "checks": checks, "table": table, "runs": stored}, f)
    write_markdown(table, checks, meta, args.out)
    plot(runs, budget, seeds, args.out)
    print(f"done in {wall / 60:.1f} min")
    return 0


def paper_checks(runs: list[dict[str, Any]], seeds: int) -> list[str]:
    """The paper's qualitative claims, checked seed by seed."""

    def get(name: str, key: str) -> list[float]:
        return [
            r[key] for s in range(seeds) for r in runs if r["method"] == name and r["seed"] == s
        ]

    def count(a: list[float], b: list[float]) -> str:
        a, b = np.nan_to_num(a, nan=np.inf), np.nan_to_num(b, nan=np.inf)  # nan: not reached
        return f"{int(np.sum(a < b))}/{seeds} seeds"

    sync, fix, asy = "FedAvg (sync)", "FedFix-0.5, unbiased", "Async FedAvg, identical"
    out = [
        f"FedFix-0.5 (unbiased) test loss at T < sync FedAvg's: "
        f"{count(get(fix, 'final_test_loss'), get(sync, 'final_test_loss'))}",
        f"FedFix-0.5 (unbiased) tail std of test loss < async FedAvg (identical)'s: "
        f"{count(get(fix, 'tail_std_loss'), get(asy, 'tail_std_loss'))}",
        f"FedFix-0.5 (unbiased) tail worst test loss < async FedAvg (identical)'s: "
        f"{count(get(fix, 'tail_max_loss'), get(asy, 'tail_max_loss'))}",
        f"async FedAvg (identical) reaches test loss {LOSS_TARGET} before sync FedAvg: "
        f"{count(get(asy, 'time_to_loss'), get(sync, 'time_to_loss'))}",
    ]
    out.extend(
        f"{name} test loss at T < sync FedAvg's: "
        f"{count(get(name, 'final_test_loss'), get(sync, 'final_test_loss'))}"
        for name in ("FedFix-0.2, unbiased", "FedFix-0.8, unbiased")
    )
    return out


def pm(row: dict[str, Any], key: str, fmt: str) -> str:
    if math.isnan(row[key]):
        return "not reached"  # in at least one seed
    s = format(row[key], fmt)
    if row["seeds"] > 1:
        s += " ± " + format(row[key + "_std"], fmt)
    return s


def write_markdown(
    table: list[dict[str, Any]], checks: list[str], meta: dict[str, Any], out: str
) -> None:
    budget, seeds = meta["budget"], meta["seeds"]
    spread = "mean ± std over seeds" if seeds > 1 else "one seed"
    lines = [
        "# FedFix reproduction (Fraboni et al., JMLR 2023): F-80, M = 10",
        "",
        f"Command: `{meta['command']}` (git commit `{meta['git_commit']}`, seeds "
        f"0..{seeds - 1}, budget T = {budget:g} virtual time units, "
        f"{meta['wall_time_s'] / 60:.1f} min on this machine).",
        "",
        f"MNIST-5k, 2 label shards per client, logistic regression, {STEPS} local steps of "
        f"batch {BATCH} at lr {LR}, server lr 1; client i's job lasts 1 - 0.8 i / 9. "
        f"Values are {spread}. Loss and accuracy are on the 1000-example global test set, "
        "for the model in force at time T. *Tail* = the last quarter of the budget "
        f"[{0.75 * budget:g}, {budget:g}], sampled every {GRID} time units (the model in "
        "force at each sample): its mean, worst (max) and standard deviation of the test "
        "loss (about its linear trend), and its worst accuracy. Staleness: server steps "
        "between the model a client trained from and the step its update was folded in, over "
        "all folded updates.",
        "",
        "| method | test loss at T | test acc at T | server steps | updates | mean staleness "
        f"| max staleness | time to loss {LOSS_TARGET} | tail mean loss | tail max loss "
        "| tail std loss (detrended) | tail min acc |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines.extend(
        f"| {r['method']} | {pm(r, 'final_test_loss', '.4f')} | "
        f"{pm(r, 'final_test_accuracy', '.3f')} | {r['server_steps']:.0f} | "
        f"{r['client_updates']:.0f} | {r['staleness_mean']:.2f} | "
        f"{r['staleness_max']:.0f} | {pm(r, 'time_to_loss', '.2f')} | "
        f"{pm(r, 'tail_mean_loss', '.4f')} | "
        f"{pm(r, 'tail_max_loss', '.4f')} | {pm(r, 'tail_std_loss', '.4f')} | "
        f"{pm(r, 'tail_min_accuracy', '.3f')} |"
        for r in table
    )
    lines += ["", "Checks of the paper's claims, seed by seed:", ""]
    lines += [f"- {c}" for c in checks]
    lines += [
        "",
        "Plots: [`test_loss.png`](test_loss.png), [`test_accuracy.png`](test_accuracy.png) "
        "(left: mean over seeds on the time grid; right: the last quarter of the budget, "
        "seed 0 alone, to show the oscillation that averaging hides).",
    ]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


COLORS = {
    "FedAvg (sync)": "black",
    "Async FedAvg, identical": "tab:orange",
    "Async FedAvg, unbiased": "tab:red",
    "FedFix-0.2, unbiased": "tab:blue",
    "FedFix-0.5, unbiased": "tab:green",
    "FedFix-0.8, unbiased": "tab:purple",
    "FedFix-0.2, identical": "tab:blue",
    "FedFix-0.5, identical": "tab:green",
    "FedFix-0.8, identical": "tab:purple",
    "FedBuff-5 (Fraboni)": "tab:brown",
    "FedBuff-10 (Fraboni)": "tab:gray",
    "FedBuff-5 (Nguyen)": "tab:pink",
}


def plot(runs: list[dict[str, Any]], budget: float, seeds: int, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.arange(0.0, budget + GRID / 2, GRID)
    tail = grid >= 0.75 * budget
    for key, label, fname in (
        ("curve_loss", "test loss", "test_loss.png"),
        ("curve_accuracy", "test accuracy", "test_accuracy.png"),
    ):
        fig, axes = plt.subplots(len(PANELS), 2, figsize=(14, 9))
        for i, (title, names) in enumerate(PANELS.items()):
            for name in names:
                mine = [r[key] for r in runs if r["method"] == name]
                ls = "--" if "identical" in name or "Nguyen" in name else "-"
                kw = {"color": COLORS[name], "ls": ls, "lw": 1.0, "label": name}
                axes[i][0].plot(grid, np.mean(mine, axis=0), **kw)
                axes[i][1].plot(grid[tail], np.asarray(mine[0])[tail], **kw)
            mean = f"mean of {seeds} seeds" if seeds > 1 else "seed 0"
            axes[i][0].set_title(f"{title} ({mean})", fontsize=10)
            axes[i][1].set_title(f"{title}: last quarter, seed 0 alone", fontsize=10)
            for ax in axes[i]:
                ax.set_xlabel("virtual time")
                ax.set_ylabel(label)
                ax.grid(alpha=0.3, which="both")
                if key == "curve_loss":
                    ax.set_yscale("log")
            if key == "curve_accuracy":
                axes[i][0].set_ylim(0.5, 0.95)
            axes[i][0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, fname), dpi=90)
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
