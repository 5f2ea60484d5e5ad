"""Reproduce FedAU's label-correlated participation setup (Wang & Ji, arXiv 2306.03401).

N = 250 clients; MNIST-5k (4,000 train / 1,000 test) split as in the FedAU code: each client
draws its label mix from Dir(0.1 * 1_10) and every label's examples are cut in proportion.
Client n participates with probability p_n = max(0.02, 0.1 * 10 * <label-dist_n, m>), with
m ~ Dir(0.1 * 1_10) drawn once, under three patterns: Bernoulli, Markov (max_on 0.05,
stationary p_n) and cyclic (period 100). Every available client of a round takes part.
Local training: I = 5 SGD steps of batch 16 at lr 0.1 from the global model; server lr 1;
multinomial logistic regression. Five aggregation weightings:

* FedAU, K = inf (cutoff 100000) and K = 50: online estimate of 1/p_n, divided by N;
* average participating: equal weights, divided by the number of participants;
* average all: equal weights, divided by N;
* known probability: the oracle 1/p_n, divided by N.

Writes ``results/results.md`` (test accuracy at the end and averaged over the last 10% of
rounds, mean and std over seeds; per-label recall; FedAU's estimate against 1/p_n),
``results/results.json`` and the plots ``results/test_accuracy.png`` and
``results/estimator.png``.

Usage (one command, ~9 min of CPU time; ``--quick``: 100 rounds, one seed, ~30 s):

    .venv/bin/python experiments/fedau/run.py
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
import numpy.typing as npt
from threadpoolctl import threadpool_limits

from fedagg import clients, models, strategies, weighting
from fedagg import data as fdata
from fedagg.policy import SyncPolicy
from fedagg.sim import Availability, Simulation, SystemModel

N = 250
LABELS = 10
DATA_ALPHA = 0.1  # Dirichlet concentration of each client's label mix
PART_ALPHA = 0.1  # Dirichlet concentration of m
P_MEAN, P_MIN = 0.1, 0.02
STEPS, BATCH, LR = 5, 16, 0.1
TAIL = 0.1  # "tail mean": test accuracy averaged over the last 10% of rounds
TOP_LABELS = 3  # per-label recall: the 3 most-seen labels against the other 7
PATTERNS = {
    "bernoulli": Availability("bernoulli"),
    "markov-0.05": Availability("markov", max_on=0.05),
    "cyclic-100": Availability("cyclic", period=100),
}
Maker = Callable[[npt.NDArray[np.float64]], Any]
METHODS: dict[str, Maker] = {
    "FedAU (K=inf)": lambda p: weighting.fedau(100_000),
    "FedAU (K=50)": lambda p: weighting.fedau(50),
    "average participating": lambda p: weighting.participating(),
    "average all": lambda p: weighting.all_clients(),
    "known probability": lambda p: weighting.known(p),
}
HERE = os.path.dirname(os.path.abspath(__file__))
_SPLIT, _PARTITION, _M = 1, 2, 3  # stream tags


# -- setup -------------------------------------------------------------------------------------
def fedau_partition(
    y: npt.NDArray[np.int64], n: int, alpha: float, rng: np.random.Generator
) -> tuple[list[npt.NDArray[np.int64]], int]:
    """FedAU's split (``util.partition``): client i's label mix q_i ~ Dir(alpha * 1_L); label
    c's examples go to the clients in proportion to q_ic (cumulative, rounded). Redraws until
    no client is empty; returns the parts and the number of redraws."""
    labels = int(y.max()) + 1
    for redraws in range(1000):
        q = rng.dirichlet(np.full(labels, alpha), n)  # (n, L)
        parts: list[list[int]] = [[] for _ in range(n)]
        for c in range(labels):
            idx = rng.permutation(np.flatnonzero(y == c))
            ends = np.round(len(idx) * np.cumsum(q[:, c]) / q[:, c].sum()).astype(np.int64)
            starts = np.concatenate([[0], ends[:-1]])
            for i in range(n):
                parts[i].extend(idx[starts[i] : ends[i]].tolist())
        if min(len(p) for p in parts) > 0:
            return [np.sort(np.array(p, dtype=np.int64)) for p in parts], redraws
    raise RuntimeError("no partition without empty clients in 1000 draws")


def setup(seed: int) -> tuple[fdata.FederatedData, npt.NDArray[np.float64], dict[str, Any]]:
    """The federation and the label-correlated participation probabilities for ``seed``."""
    train, test = fdata.split(fdata.mnist5k(), 0.2, np.random.default_rng([seed, _SPLIT]))
    parts, redraws = fedau_partition(
        train.y, N, DATA_ALPHA, np.random.default_rng([seed, _PARTITION])
    )
    fd = fdata.federate(
        train, parts, test=test, name="mnist5k/fedau-dirichlet", meta={"seed": seed}
    )
    hist = fd.histogram().astype(np.float64)
    dist = hist / hist.sum(axis=1, keepdims=True)
    m = np.random.default_rng([seed, _M]).dirichlet(np.full(LABELS, PART_ALPHA))
    p = np.maximum(P_MIN, P_MEAN * LABELS * dist @ m)
    # how often each label's examples are seen, relative to the mean: sum_n h_nc p_n / sum h_nc
    seen = (hist * p[:, None]).sum(axis=0) / hist.sum(axis=0)
    info = {
        "m": m.tolist(),
        "p_mean": float(p.mean()),
        "p_max": float(p.max()),
        "clients_at_p_min": int((p <= P_MIN).sum()),
        "client_sizes_min_median_max": [int(v) for v in np.percentile(hist.sum(1), [0, 50, 100])],
        "label_seen_rate": seen.tolist(),
        "partition_redraws": redraws,
    }
    return fd, p, info


# -- one run -----------------------------------------------------------------------------------
def run_one(
    fd: fdata.FederatedData,
    p: npt.NDArray[np.float64],
    info: dict[str, Any],
    pattern: str,
    method: str,
    seed: int,
    rounds: int,
    eval_every: int,
) -> dict[str, Any]:
    model = models.LogReg(fd.num_features, fd.num_classes)
    alg = clients.LocalSGD(batch_size=BATCH, lr=LR, steps=STEPS)
    system = SystemModel(N, seed=seed, availability=PATTERNS[pattern]).with_probabilities(p)
    st = strategies.fedavg()
    policy = SyncPolicy(st, rounds=rounds, clients_per_round=N, weighting=METHODS[method](p))
    result = Simulation(fd, model, alg, st, policy, system, seed=seed, eval_every=eval_every).run()
    rows = [r.row() for r in result.records]
    curve = [(int(r["round"]), float(r["test_accuracy"])) for r in rows]
    curve = [(t, a) for t, a in curve if math.isfinite(a)]
    tail = [a for t, a in curve if t > rounds * (1 - TAIL)]
    params = dict(result.server.model)
    recall = [
        float(model.evaluate(params, fd.test.x[fd.test.y == c], fd.test.y[fd.test.y == c])[1])
        for c in range(LABELS)
    ]
    top = np.argsort(info["label_seen_rate"])[::-1][:TOP_LABELS]
    rest = np.setdiff1d(np.arange(LABELS), top)
    out: dict[str, Any] = {
        "pattern": pattern,
        "method": method,
        "seed": seed,
        "final_test_accuracy": curve[-1][1],
        "tail_test_accuracy": float(np.mean(tail)),
        "final_test_loss": float(rows[-1]["test_loss"]),
        "participants_per_round": float(np.mean([r["folded"] for r in rows])),
        "recall": recall,
        "recall_top_labels": float(np.mean([recall[c] for c in top])),
        "recall_other_labels": float(np.mean([recall[c] for c in rest])),
        "curve": curve,
        "wall_s": result.wall_time,
    }
    state = getattr(result.policy_state, "weighting", None)
    if isinstance(state, weighting.IntervalState):
        seen = state.count > 0
        out["estimate"] = np.where(seen, state.mean, np.nan).tolist()
        out["estimate_times_p_median"] = float(np.median(state.mean[seen] * p[seen]))
    return out


# -- summaries ---------------------------------------------------------------------------------
def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    table = []
    for pattern in PATTERNS:
        for method in METHODS:
            mine = [r for r in runs if r["pattern"] == pattern and r["method"] == method]
            row: dict[str, Any] = {"pattern": pattern, "method": method, "seeds": len(mine)}
            for k in (
                "final_test_accuracy",
                "tail_test_accuracy",
                "recall_top_labels",
                "recall_other_labels",
                "participants_per_round",
            ):
                v = np.array([r[k] for r in mine], dtype=float)
                row[k] = float(v.mean())
                row[k + "_std"] = float(v.std())
            if "estimate_times_p_median" in mine[0]:
                row["estimate_times_p_median"] = float(
                    np.mean([r["estimate_times_p_median"] for r in mine])
                )
            table.append(row)
    return table


def gaps(runs: list[dict[str, Any]], a: str, b: str) -> dict[str, list[float]]:
    """Per pattern, the per-seed tail-accuracy difference a - b (points)."""
    out: dict[str, list[float]] = {}
    for pattern in PATTERNS:
        by = {
            (r["method"], r["seed"]): r["tail_test_accuracy"]
            for r in runs
            if r["pattern"] == pattern
        }
        seeds = sorted({s for _, s in by})
        out[pattern] = [100 * (by[(a, s)] - by[(b, s)]) for s in seeds]
    return out


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src"], cwd=HERE, capture_output=True, text=True
        )
        commit = out.stdout.strip() or "unknown"
        return commit + (" (src/ had uncommitted changes)" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--quick", action="store_true", help="100 rounds, one seed")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument(
        "--replot", action="store_true", help="rebuild results.md and the plots from results.json"
    )
    args = ap.parse_args()
    if args.replot:
        with open(os.path.join(args.out, "results.json")) as f:
            saved = json.load(f)
        infos = {int(k): v for k, v in saved["setups"].items()}
        write_markdown(saved["table"], saved["checks"], infos, saved, args.out)
        plot_accuracy(saved["runs"], saved["rounds"], args.out)
        plot_estimator(saved["runs"], infos, args.out)
        return 0
    rounds, seeds, every = (
        (100, 1, 10) if args.quick else (args.rounds, args.seeds, args.eval_every)
    )
    os.makedirs(args.out, exist_ok=True)
    threadpool_limits(1)  # small matrices: one BLAS thread is faster (and the cores are shared)
    commit = git_commit()  # at the start: the code this run imports
    t0, cpu0 = time.perf_counter(), time.process_time()
    runs, infos = [], {}
    for seed in range(seeds):
        fd, p, info = setup(seed)
        infos[seed] = {**info, "p": p.tolist()}
        print(
            f"seed {seed}: mean p {info['p_mean']:.3f}, max {info['p_max']:.3f}, "
            f"{info['clients_at_p_min']} clients at p_min; m = {np.round(info['m'], 2)}",
            flush=True,
        )
        for pattern in PATTERNS:
            for method in METHODS:
                r = run_one(fd, p, info, pattern, method, seed, rounds, every)
                runs.append(r)
                print(
                    f"  {pattern:<12} {method:<22} final {r['final_test_accuracy']:.3f}  "
                    f"tail {r['tail_test_accuracy']:.3f}  "
                    f"({r['participants_per_round']:.1f}/round, {r['wall_s']:.1f} s)",
                    flush=True,
                )
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    table = summarize(runs)
    checks = {
        "fedau_minus_participating": gaps(runs, "FedAU (K=inf)", "average participating"),
        "fedau_minus_known": gaps(runs, "FedAU (K=inf)", "known probability"),
        "fedau50_minus_participating": gaps(runs, "FedAU (K=50)", "average participating"),
    }
    meta = {
        "command": ".venv/bin/python experiments/fedau/run.py" + (" --quick" if args.quick else ""),
        "git_commit": commit,
        "wall_time_s": wall,
        "cpu_time_s": cpu,
        "rounds": rounds,
        "seeds": seeds,
        "eval_every": every,
        "setup": {
            "clients": N,
            "data": f"mnist5k 80/20 split, FedAU partition Dir({DATA_ALPHA})",
            "participation": f"p = max({P_MIN}, {P_MEAN}*{LABELS}*<dist, m>), "
            f"m ~ Dir({PART_ALPHA})",
            "model": "logreg",
            "local": {"steps": STEPS, "batch_size": BATCH, "lr": LR},
            "server_lr": 1.0,
        },
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({**meta, "setups": infos, "checks": checks, "table": table, "runs": runs}, f)
    write_markdown(table, checks, infos, meta, args.out)
    plot_accuracy(runs, rounds, args.out)
    plot_estimator(runs, infos, args.out)
    print(f"wall {wall / 60:.1f} min, CPU {cpu / 60:.1f} min", flush=True)
    return 0


# -- output ------------------------------------------------------------------------------------
def _pm(row: dict[str, Any], k: str) -> str:
    return f"{100 * row[k]:.1f} ± {100 * row[k + '_std']:.1f}"


def write_markdown(
    table: list[dict[str, Any]],
    checks: dict[str, dict[str, list[float]]],
    infos: dict[int, dict[str, Any]],
    meta: dict[str, Any],
    out: str,
) -> None:
    seeds, rounds = meta["seeds"], meta["rounds"]
    cell = {(r["pattern"], r["method"]): r for r in table}
    head = "| method | " + " | ".join(PATTERNS) + " |"
    sep = "|---" * (len(PATTERNS) + 1) + "|"
    lines = [
        "# FedAU reproduction (MNIST-5k, label-correlated participation)",
        "",
        f"Command: `{meta['command']}` (git commit `{meta['git_commit']}`, seeds 0..{seeds - 1}, "
        f"{rounds} rounds, {meta['wall_time_s'] / 60:.1f} min wall, "
        f"{meta['cpu_time_s'] / 60:.1f} min CPU on this shared 2-core machine).",
        "",
        f"{N} clients, FedAU's Dir({DATA_ALPHA}) label split of 4,000 MNIST-5k training "
        f"digits (1,000 held out for test); p_n = max({P_MIN}, {P_MEAN}·{LABELS}·⟨label mix, m⟩), "
        f"m ~ Dir({PART_ALPHA}) per seed; every available client participates; "
        f"I = {STEPS} local steps, batch {BATCH}, lr {LR}, server lr 1; logistic regression. "
        f"Accuracy in %, mean ± std over {seeds} seed(s) (the seed sets the split, m, the "
        "participation draws and the minibatches).",
        "",
        "Per seed: "
        + "; ".join(
            f"seed {s}: mean p {v['p_mean']:.3f}, max {v['p_max']:.2f}, "
            f"{v['clients_at_p_min']}/{N} clients at p_min"
            for s, v in infos.items()
        )
        + ".",
        "",
        f"## Test accuracy, mean over the last {TAIL:.0%} of rounds",
        "",
        head,
        sep,
    ]
    lines += [
        f"| {m} | " + " | ".join(_pm(cell[(pt, m)], "tail_test_accuracy") for pt in PATTERNS) + " |"
        for m in METHODS
    ]
    lines += ["", f"## Test accuracy after round {rounds}", "", head, sep]
    lines += [
        f"| {m} | "
        + " | ".join(_pm(cell[(pt, m)], "final_test_accuracy") for pt in PATTERNS)
        + " |"
        for m in METHODS
    ]
    lines += [
        "",
        "## Differences (tail accuracy, points; one value per seed)",
        "",
        "| comparison | " + " | ".join(PATTERNS) + " |",
        sep,
    ]
    names = {
        "fedau_minus_participating": "FedAU (K=inf) − average participating",
        "fedau50_minus_participating": "FedAU (K=50) − average participating",
        "fedau_minus_known": "FedAU (K=inf) − known probability",
    }
    for key, name in names.items():
        vals = [", ".join(f"{v:+.1f}" for v in checks[key][pt]) for pt in PATTERNS]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    lines += [
        "",
        f"## Where the bias shows: recall on the {TOP_LABELS} most-seen labels vs the others",
        "",
        "A label's *seen rate* is Σ_n h_nc p_n / Σ_n h_nc (how often its examples take part). "
        f"Recall (%) on the test digits of the {TOP_LABELS} labels with the highest rate vs the "
        f"other {LABELS - TOP_LABELS}, averaged over patterns and seeds.",
        "",
        "| method | most-seen labels | other labels |",
        "|---|---|---|",
    ]
    for m in METHODS:
        mine = [r for r in table if r["method"] == m]
        top = 100 * np.mean([r["recall_top_labels"] for r in mine])
        rest = 100 * np.mean([r["recall_other_labels"] for r in mine])
        lines.append(f"| {m} | {top:.1f} | {rest:.1f} |")
    lines += [
        "",
        "## FedAU's estimate of 1/p_n at the end of training",
        "",
        "Median over clients of ω̂_n · p_n (1 = unbiased estimate of 1/p_n), mean over seeds. "
        "With a cutoff K under Bernoulli participation the estimate tends to "
        "(1 − (1 − p)^K)/p, i.e. ω̂·p → 1 − (1 − p)^K (0.64 at p = 0.02, K = 50).",
        "",
        "| method | " + " | ".join(PATTERNS) + " |",
        sep,
    ]
    for m in ("FedAU (K=inf)", "FedAU (K=50)"):
        vals = [f"{cell[(pt, m)]['estimate_times_p_median']:.3f}" for pt in PATTERNS]
        lines.append(f"| {m} | " + " | ".join(vals) + " |")
    lines += [
        "",
        "Participants per round (mean): "
        + ", ".join(
            f"{pt} {cell[(pt, 'FedAU (K=inf)')]['participants_per_round']:.1f}" for pt in PATTERNS
        )
        + ".",
    ]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot_accuracy(runs: list[dict[str, Any]], rounds: int, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PATTERNS), figsize=(16, 4.8), sharey=True)
    for ax, pattern in zip(axes, PATTERNS, strict=True):
        for method in METHODS:
            mine = [r for r in runs if r["pattern"] == pattern and r["method"] == method]
            xs = np.array([t for t, _ in mine[0]["curve"]])
            ys = np.array([[a for _, a in r["curve"]] for r in mine])
            mean = ys.mean(axis=0)
            (line,) = ax.plot(xs, mean, label=method, lw=1.2)
            if len(mine) > 1:
                ax.fill_between(
                    xs, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.15
                )
        ax.set_title(f"{pattern} participation", fontsize=10)
        ax.set_xlabel("round")
        ax.set_ylim(0.5, 0.95)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (mean over seeds; band = min..max)")
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "test_accuracy.png"), dpi=90)
    plt.close(fig)


def plot_estimator(runs: list[dict[str, Any]], infos: dict[int, dict[str, Any]], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib import ticker

    fig, axes = plt.subplots(1, len(PATTERNS), figsize=(15, 4.6), sharey=True)
    p = np.array(infos[0]["p"])
    grid = np.geomspace(p.min(), p.max(), 100)
    for ax, pattern in zip(axes, PATTERNS, strict=True):
        for method, marker in (("FedAU (K=inf)", "o"), ("FedAU (K=50)", "x")):
            r = next(
                r
                for r in runs
                if r["seed"] == 0 and r["pattern"] == pattern and r["method"] == method
            )
            est = np.array(r["estimate"], dtype=float)
            ax.scatter(1 / p, est, s=12, marker=marker, alpha=0.6, label=method)
        ax.plot(1 / grid, 1 / grid, "k--", lw=1, label="1/p")
        ax.plot(
            1 / grid,
            [weighting.interval_limit(float(q), 50) for q in grid],
            "k:",
            lw=1,
            label="Bernoulli limit, K=50",
        )
        ax.set_xscale("log")
        ax.set_yscale("log")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_formatter(ticker.FormatStrFormatter("%g"))
            axis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("1 / p_n (true)")
        ax.set_title(f"{pattern}, seed 0", fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("FedAU estimate ω̂_n after the last round")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "estimator.png"), dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
