"""FedBuff vs synchronous FedAvg in virtual time to a target accuracy (Nguyen et al., AISTATS
2022), with heavy-tailed client speeds.

N = 100 clients on MNIST-5k (Dirichlet alpha = 0.5 label split), multinomial logistic
regression, every client job = K_local fixed SGD steps (the same work for every client), so a
client's job time is its own draw from a heavy-tailed distribution (median 1 virtual time
unit; lognormal sigma, or Pareto). Both methods keep C clients training:

* sync FedAvg: C clients per round, the round waits for its slowest client;
* FedBuff: C clients training at once, each reporting client is replaced at once by an idle
  one (restart on arrival), the server steps every K folded updates with
  sum_i s(tau_i) delta_i / K (the paper's Algorithm 1, ``weights="identical"``), staleness
  weight s(tau) = 1 / sqrt(1 + tau). One sweep row weighs by sample count instead
  (``weights="examples"``: sum_i s(tau_i) n_i delta_i / sum_i n_i, fedagg's old default).

Both use the same server optimizer (server SGD lr 1 unless a sweep row says otherwise). We
measure the virtual time (and server steps, client updates) to first reach each target test
accuracy and the speed-up sync_time / fedbuff_time, for a headline setting and a
one-factor-at-a-time sweep around it (tail, concurrency, buffer, server optimizer, data split,
FedBuff's weighting).

Writes ``results/results.md``, ``results/results.json``, ``results/accuracy_vs_time.png``
(headline setting) and ``results/speedup_sweep.png``.

Usage (one command, ~6 minutes on 2 cores; ``--quick``: the headline setting, one seed):

    .venv/bin/python experiments/fedbuff/run.py
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from fedagg import clients, models, strategies
from fedagg import data as fdata
from fedagg.core.strategy import Strategy
from fedagg.policy import SyncPolicy, fedbuff
from fedagg.sim import Distribution, RoundRecord, Simulation, SystemModel

N = 100
STEPS, BATCH, LR = 10, 16, 0.05  # every job: K_local steps of B examples at local lr
TARGETS = (0.80, 0.85, 0.87, 0.88)
MAX_STEPS = 1000  # server steps cap per run (a sweep run also stops at the top target)
HORIZON = 400.0  # the headline runs go on to at least this virtual time (for the plot)
HERE = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Setting:
    """One comparison: the client speed tail, concurrency C, buffer K, server optimizer."""

    label: str
    tail: str = "lognormal"  # or "pareto"
    shape: float = 1.0  # lognormal sigma, or Pareto tail index a
    concurrency: int = 10
    buffer: int = 10
    server: str = "sgd"  # sgd (lr 1), fedavgm, fedadam
    partition: str = "dirichlet"
    weights: str = "identical"  # FedBuff's: the paper's 1/K, or "examples" (n_i / sum n_j)

    def strategy(self) -> Strategy:
        if self.server == "sgd":
            return strategies.fedavg(lr=1.0)
        if self.server == "fedavgm":
            return strategies.fedavgm(lr=1.0, momentum=0.9)
        if self.server == "fedadam":
            return strategies.fedadam(lr=0.01)
        raise ValueError(self.server)


HEADLINE = Setting("headline: lognormal sigma=1, C=10, K=10, server SGD lr 1")
SWEEP = [
    HEADLINE,
    replace(HEADLINE, label="lognormal sigma=0.5", shape=0.5),
    replace(HEADLINE, label="lognormal sigma=1.5", shape=1.5),
    replace(HEADLINE, label="Pareto a=1.5", tail="pareto", shape=1.5),
    replace(HEADLINE, label="C=20 (K=10)", concurrency=20),
    replace(HEADLINE, label="C=50 (K=10)", concurrency=50),
    replace(HEADLINE, label="K=5 (C=10)", buffer=5),
    replace(HEADLINE, label="K=20 (C=10)", buffer=20),
    replace(HEADLINE, label="server FedAvgM (lr 1, momentum 0.9)", server="fedavgm"),
    replace(HEADLINE, label="server FedAdam (lr 0.01)", server="fedadam"),
    replace(HEADLINE, label="IID split", partition="iid"),
    replace(HEADLINE, label="FedBuff weights=examples (n_i; old default)", weights="examples"),
]


def job_times(s: Setting, seed: int) -> np.ndarray:
    """Each client's job duration (virtual time units), median 1."""
    rng = np.random.default_rng([seed, 0xB0FF])
    if s.tail == "lognormal":
        return np.asarray(rng.lognormal(0.0, s.shape, N))
    # classic Pareto(x_m = 1, a), rescaled to median 1 (its median is 2 ** (1 / a))
    return np.asarray((1.0 + rng.pareto(s.shape, N)) / 2.0 ** (1.0 / s.shape))


class _Reached(Exception):
    """Raised from on_round to stop a run once the top target is reached."""


def job_work(n: int) -> int:
    """Examples a job of STEPS batches of BATCH processes on n examples: what LocalSGD with
    fixed steps reports (epochs of ceil(n / BATCH) batches, the last possibly short)."""
    per = -(-n // BATCH)
    full, rest = divmod(STEPS, per)
    return full * n + min(rest * BATCH, n)


def run_one(s: Setting, method: str, seed: int, horizon: float) -> dict[str, Any]:
    """One run, until the top target is reached and the virtual time is at least
    ``horizon`` (or MAX_STEPS server steps)."""
    kw = {"alpha": 0.5} if s.partition == "dirichlet" else {}
    fd = fdata.load("mnist5k", num_clients=N, partition=s.partition, seed=seed, **kw)
    model = models.LogReg(fd.num_features, fd.num_classes)
    alg = clients.LocalSGD(epochs=1, batch_size=BATCH, lr=LR, steps=STEPS)
    fast = Distribution("constant", 1e15)
    system = SystemModel(
        N, seed=seed, downlink=fast, uplink=fast, latency=Distribution("constant", 0.0)
    ).with_speeds(np.array([job_work(n) for n in fd.sizes()], float) / job_times(s, seed))
    st = s.strategy()
    if method == "sync":
        policy: Any = SyncPolicy(st, rounds=MAX_STEPS, clients_per_round=s.concurrency)
    else:
        policy = fedbuff(
            st,
            MAX_STEPS,
            buffer=s.buffer,
            concurrency=s.concurrency,
            weights=s.weights,  # type: ignore[arg-type]
        )
    rows: list[dict[str, Any]] = []

    def on_round(rec: RoundRecord) -> None:
        rows.append(rec.row())
        reached = max(r["test_accuracy"] for r in rows) >= max(TARGETS)
        if reached and rec.stats.ended >= horizon:
            raise _Reached

    t0 = time.perf_counter()
    with contextlib.suppress(_Reached):
        Simulation(fd, model, alg, st, policy, system, seed=seed, on_round=on_round).run()
    wall = time.perf_counter() - t0
    times = np.array([r["virtual_time"] for r in rows])
    acc = np.array([r["test_accuracy"] for r in rows])
    folded = np.cumsum([r["folded"] for r in rows])
    out: dict[str, Any] = {
        "setting": s.label,
        "method": method,
        "seed": seed,
        "wall_s": wall,
        "curve_time": [round(float(t), 4) for t in times],
        "curve_accuracy": [round(float(a), 4) for a in acc],
    }
    for target in TARGETS:
        hit = np.flatnonzero(acc >= target)
        i = int(hit[0]) if len(hit) else -1
        stale = [r["staleness_mean"] for r in rows[: i + 1]] if i >= 0 else []
        sizes = [r["folded"] for r in rows[: i + 1]] if i >= 0 else []
        out[f"@{target}"] = {
            "time": float(times[i]) if i >= 0 else math.nan,
            "steps": i + 1 if i >= 0 else math.nan,
            "updates": int(folded[i]) if i >= 0 else math.nan,
            "staleness_mean": float(np.dot(stale, sizes) / max(sum(sizes), 1)) if i >= 0 else 0.0,
            "staleness_max": max((r["staleness_max"] for r in rows[: i + 1]), default=0),
        }
    return out


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


def summarize(runs: list[dict[str, Any]], settings: list[Setting]) -> list[dict[str, Any]]:
    """Per setting and target: each method's mean time/steps/updates, and the speed-up (the
    ratio of the mean times, and the per-seed ratios)."""
    table = []
    for s in settings:
        for target in TARGETS:
            key = f"@{target}"
            row: dict[str, Any] = {"setting": s.label, "target": target}
            for m in ("sync", "fedbuff"):
                mine = [r[key] for r in runs if r["setting"] == s.label and r["method"] == m]
                for k in ("time", "steps", "updates", "staleness_mean"):
                    row[f"{m}_{k}"] = float(np.mean([x[k] for x in mine]))
                row[f"{m}_staleness_max"] = max(x["staleness_max"] for x in mine)
            per_seed: list[float] = []
            for seed in sorted({r["seed"] for r in runs if r["setting"] == s.label}):
                t = {
                    r["method"]: r[key]["time"]
                    for r in runs
                    if r["setting"] == s.label and r["seed"] == seed
                }
                per_seed.append(t["sync"] / t["fedbuff"])
            row["speedup"] = row["sync_time"] / row["fedbuff_time"]
            row["speedup_per_seed"] = per_seed
            # speed-up = throughput ratio (updates per unit time, FedBuff / sync) x update
            # efficiency ratio (updates needed, sync / FedBuff)
            row["throughput_ratio"] = (row["fedbuff_updates"] / row["fedbuff_time"]) / (
                row["sync_updates"] / row["sync_time"]
            )
            row["update_ratio"] = row["sync_updates"] / row["fedbuff_updates"]
            table.append(row)
    return table


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="the headline setting, one seed")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    settings, seeds = ([HEADLINE], 1) if args.quick else (SWEEP, args.seeds)
    os.makedirs(args.out, exist_ok=True)
    threadpool_limits(1)  # small matrices: one BLAS thread is faster (and the cores are shared)
    commit = git_commit()  # the code as it was imported, before the runs
    t0 = time.perf_counter()
    runs = []
    for s in settings:
        for seed in range(seeds):
            for method in ("sync", "fedbuff"):
                r = run_one(s, method, seed, HORIZON if s == HEADLINE else 0.0)
                runs.append(r)
                hits = "  ".join(
                    f"{t:.2f}: {r[f'@{t}']['time']:7.1f} ({r[f'@{t}']['steps']})" for t in TARGETS
                )
                print(f"{s.label[:36]:<36} seed {seed} {method:<7} {hits}  ({r['wall_s']:.1f} s)")
    wall = time.perf_counter() - t0
    table = summarize(runs, settings)
    meta = {
        "command": ".venv/bin/python experiments/fedbuff/run.py"
        + (" --quick" if args.quick else ""),
        "git_commit": commit,
        "wall_time_s": wall,
        "seeds": seeds,
        "targets": TARGETS,
        "setup": {
            "clients": N,
            "data": "mnist5k, Dirichlet alpha=0.5 label split (IID in one sweep row)",
            "model": "logreg",
            "local": {"steps": STEPS, "batch_size": BATCH, "lr": LR},
            "staleness": "1/sqrt(1+tau)",
            "fedbuff_step": "sum_i s(tau_i) delta_i / K (weights='identical') unless a row "
            "says weights=examples",
            "restart": "arrival",
            "settings": [s.__dict__ for s in settings],
        },
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({**meta, "table": table, "runs": runs}, f)
    write_markdown(table, meta, args.out)
    plot(runs, table, settings, seeds, args.out)
    print(f"done in {wall / 60:.1f} min")
    return 0


def write_markdown(table: list[dict[str, Any]], meta: dict[str, Any], out: str) -> None:
    seeds = meta["seeds"]
    lines = [
        "# FedBuff vs synchronous FedAvg: virtual time to target accuracy",
        "",
        f"Command: `{meta['command']}` (git commit `{meta['git_commit']}`, seeds "
        f"0..{seeds - 1}, {meta['wall_time_s'] / 60:.1f} min on this machine).",
        "",
        f"MNIST-5k, {N} clients, Dirichlet alpha = 0.5 split, logistic regression, every job "
        f"{STEPS} local steps of batch {BATCH} at lr {LR}; job times drawn per client from the "
        "tail named in the setting (median 1 virtual time unit). Sync FedAvg: C clients per "
        "round. FedBuff: C clients training at once, restart on arrival, step every K updates "
        "adding sum s(tau_i) delta_i / K (the paper's rule; the row 'weights=examples' uses "
        "sum s(tau_i) n_i delta_i / sum n_i instead), s(tau) = 1/sqrt(1+tau). Times are the "
        "first evaluation (after every server step) at or above the target; values are "
        f"means over {seeds} seed(s). Speed-up = mean sync time / mean FedBuff time "
        "(per-seed ratios in brackets). Updates = client updates folded up to that step "
        f"(every update is the same work, {STEPS} x {BATCH} examples); staleness over the "
        "folded updates. The speed-up factors into the throughput ratio (updates per unit of "
        "virtual time, FedBuff / sync) "
        "times the update ratio (updates needed, sync / FedBuff).",
        "",
        "## Headline",
        "",
    ]
    lines += _table([r for r in table if r["setting"] == HEADLINE.label])
    rest = [r for r in table if r["setting"] != HEADLINE.label]
    if rest:
        lines += ["", "## Sweep (one factor changed from the headline setting)", ""]
        lines += _table(rest)
    lines += [
        "",
        "Plots: [`accuracy_vs_time.png`](accuracy_vs_time.png) (headline setting), "
        "[`speedup_sweep.png`](speedup_sweep.png) (speed-up per setting and target).",
    ]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| setting | target | sync time | FedBuff time | speed-up [per seed] "
        "| sync steps / updates | FedBuff steps / updates | throughput ratio "
        "| update ratio | FedBuff staleness mean / max |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines.extend(
        f"| {r['setting']} | {r['target']:.2f} | {r['sync_time']:.1f} | "
        f"{r['fedbuff_time']:.1f} | **{r['speedup']:.2f}×** "
        f"[{', '.join(f'{x:.1f}' for x in r['speedup_per_seed'])}] | "
        f"{r['sync_steps']:.1f} / {r['sync_updates']:.0f} | "
        f"{r['fedbuff_steps']:.1f} / {r['fedbuff_updates']:.0f} | "
        f"{r['throughput_ratio']:.2f} | {r['update_ratio']:.2f} | "
        f"{r['fedbuff_staleness_mean']:.2f} / {r['fedbuff_staleness_max']} |"
        for r in rows
    )
    return lines


def plot(
    runs: list[dict[str, Any]],
    table: list[dict[str, Any]],
    settings: list[Setting],
    seeds: int,
    out: str,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = min(seeds, 3)
    fig, axes = plt.subplots(1, shown, figsize=(6 * shown, 4.5), squeeze=False)
    for seed in range(shown):
        ax = axes[0][seed]
        for method, color in (("sync", "black"), ("fedbuff", "tab:blue")):
            (r,) = (
                x
                for x in runs
                if x["setting"] == HEADLINE.label and x["method"] == method and x["seed"] == seed
            )
            name = "sync FedAvg (C=10)" if method == "sync" else "FedBuff (C=10, K=10)"
            ax.plot(r["curve_time"], r["curve_accuracy"], color=color, lw=1, label=name)
        for t in TARGETS:
            ax.axhline(t, color="gray", lw=0.5, ls=":")
        ax.set_ylim(0.5, 0.92)
        ax.set_xlim(0, HORIZON)
        ax.set_xlabel("virtual time (median job = 1)")
        ax.set_ylabel("test accuracy")
        ax.set_title(f"headline setting, seed {seed}", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_vs_time.png"), dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(11, 0.45 * len(settings) + 1.5))
    ys = np.arange(len(settings))
    h = 0.8 / len(TARGETS)
    for j, target in enumerate(TARGETS):
        vals = [
            next(r["speedup"] for r in table if r["setting"] == s.label and r["target"] == target)
            for s in settings
        ]
        ax.barh(ys + (j - (len(TARGETS) - 1) / 2) * h, vals, height=h, label=f"target {target:.2f}")
    ax.axvline(3.0, color="red", lw=1, ls="--", label="3×")
    ax.set_xscale("log")
    ax.set_xticks([1, 2, 3, 5, 10, 20], ["1", "2", "3", "5", "10", "20"])
    ax.set_yticks(ys, [s.label for s in settings], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up in virtual time to target (sync / FedBuff)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "speedup_sweep.png"), dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
