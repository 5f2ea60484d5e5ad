"""Reproduce FedAMD's anchor-sampling comparison (Wu et al., ICML 2023) on MNIST-5k.

N = 20 clients, 10 sampled per round (the same seeded stream for every method), K = 10 local
steps of batch 64, server lr 1, T = 200 rounds, a one-hidden-layer MLP (784-64-10, ReLU) in
place of the paper's LeNet on Fashion-MNIST. Two label splits (Dirichlet alpha = 0.1, and
pathological 2 label shards per client) and two local learning rates (0.01, the paper's,
and 0.05), the same for every method:

* FedAvg: K local SGD steps;
* SCAFFOLD: K local steps with control variates (option II, from zero);
* FedAMD, anchor probability p = 0.2 (the paper's): an initial full-gradient pass over all
  clients, then each sampled client is an anchor (full local gradient, no model update) with
  probability p, else a miner (K recursive variance-reduced steps seeded with d_t); the server
  adds the plain mean of the miners' deltas, as the reference code does;
* FedAMD, p = 0.5: an ablation (fresher anchors, fewer miners);
* FedAMD, p = 0.2, weights=examples: the miners' deltas weighted by sample count instead
  (fedagg's rule before the plain mean became the default), for comparison.

Writes ``results/results.md`` (rounds and gradient work to 80/85/90% test accuracy, final
and tail accuracy, traffic), ``results/results.json`` and the plots
``results/test_accuracy.png`` (per round) and ``results/accuracy_vs_work.png``.

Usage (one command, ~6 min of CPU time; ``--quick``: 20 rounds, one seed, ~20 s):

    .venv/bin/python experiments/fedamd/run.py
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from fedagg import clients, models, sim, strategies
from fedagg import data as fdata
from fedagg.policy import FedAMDPolicy, SyncPolicy
from fedagg.sim import Simulation, SystemModel

N, PER_ROUND = 20, 10
STEPS, BATCH = 10, 64
HIDDEN = (64,)
TARGETS = (0.80, 0.85, 0.90)
TAIL = 0.1  # tail accuracy: mean over the evaluations in the last 10% of rounds
FROM = 50  # the spec's check: FedAMD at or above FedAvg "from round ~50 on"
PARTITIONS = {
    "dirichlet-0.1": {"partition": "dirichlet", "alpha": 0.1},
    "shards-2": {"partition": "shards", "shards_per_client": 2},
}
LRS = (0.01, 0.05)
METHODS = ("FedAvg", "SCAFFOLD", "FedAMD p=0.2", "FedAMD p=0.5", "FedAMD p=0.2 weights=examples")
HERE = os.path.dirname(os.path.abspath(__file__))


def sgd_examples(n: int, batch: int, steps: int) -> int:
    """Examples in ``steps`` minibatches that walk permutations of ``n`` examples in batches of
    ``batch`` (the last one of each pass may be smaller): the engine's and FedAMD's schedule."""
    if n == 0:
        return 0
    sizes = [batch] * (n // batch) + ([n % batch] if n % batch else [])
    return sum(sizes[i % len(sizes)] for i in range(steps))


class CountingExecutor(sim.LocalExecutor):
    """The in-process executor, counting per-example gradient evaluations: a local SGD step
    costs its batch, a FedAMD miner step two (both points, one batch), an anchor its data."""

    def __init__(self) -> None:
        super().__init__()
        self.grads = 0
        self.anchors = 0

    def train(
        self,
        algorithm: Any,
        model: Any,
        params: Any,
        datas: Sequence[Any],
        rngs: Any,
        epochs: Any,
        states: Any,
        server_state: Any,
    ) -> list[tuple[Any, Any]]:
        role = server_state.get("role") if isinstance(server_state, dict) else None
        for d in datas:
            n = len(d)
            if role == "anchor":
                self.grads += n
                self.anchors += 1
            else:
                self.grads += (2 if role == "miner" else 1) * sgd_examples(n, BATCH, STEPS)
        return super().train(algorithm, model, params, datas, rngs, epochs, states, server_state)


def build(method: str, lr: float, rounds: int) -> tuple[Any, Any, Any]:
    st = strategies.fedavg()
    if method == "FedAvg":
        alg = clients.LocalSGD(batch_size=BATCH, lr=lr, steps=STEPS)
        return st, alg, SyncPolicy(st, rounds, PER_ROUND)
    if method == "SCAFFOLD":
        alg = clients.Scaffold(batch_size=BATCH, lr=lr, steps=STEPS)
        return st, alg, SyncPolicy(st, rounds, PER_ROUND, scaffold=True)
    # "FedAMD p=<p>" (the plain mean of the miners, the reference's), or with
    # " weights=examples" the mean weighted by the miners' sample counts
    p = float(method.split()[1].removeprefix("p="))
    weights = "examples" if method.endswith("weights=examples") else "identical"
    alg = clients.FedAMD(steps=STEPS, batch_size=BATCH, lr=lr)
    return st, alg, FedAMDPolicy(st, rounds, PER_ROUND, anchor_prob=p, weights=weights)


def run_one(
    fd: fdata.FederatedData, method: str, lr: float, seed: int, rounds: int, every: int
) -> dict[str, Any]:
    st, alg, policy = build(method, lr, rounds)
    model = models.MLP(fd.num_features, HIDDEN, fd.num_classes)
    ex = CountingExecutor()
    work: list[int] = []
    result = Simulation(
        fd,
        model,
        alg,
        st,
        policy,
        SystemModel(N, seed=seed),
        seed=seed,
        executor=ex,
        eval_every=every,
        on_round=lambda rec: work.append(ex.grads),  # dispatches up to this round's
    ).run()
    rows = [r.row() for r in result.records]
    curve = [
        (int(r["round"]), float(r["test_accuracy"]), int(w))
        for r, w in zip(rows, work, strict=True)
        if math.isfinite(r["test_accuracy"])
    ]
    to_target = {}
    for target in TARGETS:
        hit = next((c for c in curve if c[1] >= target), None)
        to_target[f"{target:.2f}"] = None if hit is None else {"round": hit[0], "grads": hit[2]}
    tail = [a for t, a, _ in curve if t > rounds * (1 - TAIL)]
    extra = {}
    if method.startswith("FedAMD"):
        extra["cos_direction_gradient"] = direction_cosine(result, fd, model)
    return {
        "method": method,
        "lr": lr,
        "seed": seed,
        "final_test_accuracy": curve[-1][1],
        "tail_test_accuracy": float(np.mean(tail)),
        "best_test_accuracy": max(a for _, a, _ in curve),
        "to_target": to_target,
        "grads_total": work[-1],
        "anchors": ex.anchors,
        "rounds_without_update": sum(1 for r in rows if not r["applied"]),
        "megabytes": sum(r["bytes_down"] + r["bytes_up"] for r in rows) / 1e6,
        "participants": [list(r.stats.participants) for r in result.records],
        "curve": curve,
        "wall_s": result.wall_time,
        **extra,
    }


def direction_cosine(result: Any, fd: fdata.FederatedData, model: Any) -> float:
    """cos(d_T, grad F(x_T)): how well FedAMD's stored-anchor direction d = S / N matches
    the true full gradient (mean of the clients' full local gradients) at the final model."""
    spec = result.server.spec
    params = dict(result.server.model)
    grad = sum(spec.as_flat(model.loss_and_grad(params, c.x, c.y)[1]) for c in fd.clients) / N
    d = result.policy_state.anchor_sum / N
    return float(grad @ d / (np.linalg.norm(grad) * np.linalg.norm(d)))


def same_stream(runs: list[dict[str, Any]]) -> bool:
    """Whether, round for round, FedAMD's miners are a subset of the clients FedAvg (and
    SCAFFOLD) sampled: the methods see one sampling stream."""
    ok = True
    for r in runs:
        if not r["method"].startswith("FedAMD"):
            continue
        ref = next(
            x
            for x in runs
            if x["method"] == "FedAvg"
            and (x["partition"], x["lr"], x["seed"]) == (r["partition"], r["lr"], r["seed"])
        )
        pairs = zip(r["participants"], ref["participants"], strict=True)
        ok &= all(set(a) <= set(b) for a, b in pairs)
    return ok


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
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="20 rounds, one seed")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument(
        "--replot", action="store_true", help="rebuild results.md and the plots from results.json"
    )
    args = ap.parse_args()
    if args.replot:
        with open(os.path.join(args.out, "results.json")) as f:
            saved = json.load(f)
        write_markdown(saved["runs"], saved, args.out)
        plot(saved["runs"], args.out, by_work=False)
        plot(saved["runs"], args.out, by_work=True)
        return 0
    rounds, seeds, every = (20, 1, 5) if args.quick else (args.rounds, args.seeds, args.eval_every)
    os.makedirs(args.out, exist_ok=True)
    threadpool_limits(1)  # small matrices: one BLAS thread is faster (and the cores are shared)
    commit = git_commit()  # at the start: the code this run imports
    t0, cpu0 = time.perf_counter(), time.process_time()
    runs = []
    for part, kw in PARTITIONS.items():
        for seed in range(seeds):
            fd = fdata.load("mnist5k", num_clients=N, seed=seed, **kw)
            for lr in LRS:
                for method in METHODS:
                    r = {"partition": part, **run_one(fd, method, lr, seed, rounds, every)}
                    runs.append(r)
                    hits = " ".join(
                        f"{k}@{'-' if v is None else v['round']}" for k, v in r["to_target"].items()
                    )
                    print(
                        f"{part:<13} seed {seed} lr {lr:<5} {method:<29} "
                        f"final {r['final_test_accuracy']:.3f} tail {r['tail_test_accuracy']:.3f}"
                        f"  {hits}  ({r['wall_s']:.1f} s)",
                        flush=True,
                    )
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    meta = {
        "command": ".venv/bin/python experiments/fedamd/run.py"
        + (" --quick" if args.quick else ""),
        "git_commit": commit,
        "wall_time_s": wall,
        "cpu_time_s": cpu,
        "rounds": rounds,
        "seeds": seeds,
        "eval_every": every,
        "same_sampling_stream": same_stream(runs),
        "setup": {
            "clients": N,
            "clients_per_round": PER_ROUND,
            "data": "mnist5k 80/20 split (fedagg.data.load, seed = run seed)",
            "partitions": PARTITIONS,
            "model": f"MLP 784-{HIDDEN[0]}-10 relu",
            "local": {"steps": STEPS, "batch_size": BATCH, "lrs": list(LRS)},
            "server_lr": 1.0,
            "targets": list(TARGETS),
        },
    }
    for r in runs:
        del r["participants"]
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({**meta, "runs": runs}, f)
    write_markdown(runs, meta, args.out)
    plot(runs, args.out, by_work=False)
    plot(runs, args.out, by_work=True)
    print(f"wall {wall / 60:.1f} min, CPU {cpu / 60:.1f} min", flush=True)
    return 0


# -- output ------------------------------------------------------------------------------------
def _mine(runs: list[dict[str, Any]], part: str, lr: float, method: str) -> list[dict[str, Any]]:
    return [r for r in runs if (r["partition"], r["lr"], r["method"]) == (part, lr, method)]


def write_markdown(runs: list[dict[str, Any]], meta: dict[str, Any], out: str) -> None:
    seeds, rounds = meta["seeds"], meta["rounds"]
    tcols = " | ".join(f"rounds to {t:.0%}" for t in TARGETS)
    lines = [
        "# FedAMD reproduction (MNIST-5k, MLP, 20 clients, 10 per round)",
        "",
        f"Command: `{meta['command']}` (git commit `{meta['git_commit']}`, seeds 0..{seeds - 1}, "
        f"{rounds} rounds, {meta['wall_time_s'] / 60:.1f} min wall, "
        f"{meta['cpu_time_s'] / 60:.1f} min CPU on this shared 2-core machine).",
        "",
        f"K = {STEPS} local steps, batch {BATCH}, server lr 1, MLP 784-{HIDDEN[0]}-10; every "
        "method sees the same clients each round (FedAMD's miners are a subset of FedAvg's "
        f"sampled clients in every round: {meta['same_sampling_stream']}). Test accuracy in %, "
        f"evaluated every {meta['eval_every']} rounds. Per-seed values are separated by '/'; "
        "'—' = target not reached within the rounds. *Grads to 85%* counts per-example gradient "
        "evaluations (millions) up to that round: a local SGD step costs its batch, a FedAMD "
        "miner step two gradients on its batch, an anchor its whole local set; FedAMD's "
        f"initial pass over all {N} clients is included. Anchor rounds move no model; FedAMD "
        "rounds in which every sampled client became an anchor are counted in *no-update "
        "rounds*. FedAMD's server adds the plain mean of its miners' deltas, as the reference "
        "code does; *weights=examples* weighs them by sample count instead.",
        "",
        f"| split | lr | method | {tcols} | grads to 85% (M) | final acc | mean acc from "
        f"round {FROM} | tail acc "
        "| total grads (M) | traffic (MB) | no-update rounds | cos(d_T, ∇F(x_T)) |",
        "|---" * (11 + len(TARGETS)) + "|",
    ]
    for part in PARTITIONS:
        for lr in LRS:
            for method in METHODS:
                mine = _mine(runs, part, lr, method)
                if not mine:
                    continue
                cells = []
                for t in TARGETS:
                    hits = [r["to_target"][f"{t:.2f}"] for r in mine]
                    cells.append(" / ".join("—" if h is None else str(h["round"]) for h in hits))
                g85 = [r["to_target"]["0.85"] for r in mine]
                g85s = " / ".join("—" if h is None else f"{h['grads'] / 1e6:.2f}" for h in g85)
                fin = " / ".join(f"{100 * r['final_test_accuracy']:.1f}" for r in mine)
                tail = np.mean([r["tail_test_accuracy"] for r in mine])
                late = np.mean([np.mean([c[1] for c in r["curve"] if c[0] >= FROM]) for r in mine])
                grads = np.mean([r["grads_total"] for r in mine]) / 1e6
                mb = np.mean([r["megabytes"] for r in mine])
                stuck = " / ".join(str(r["rounds_without_update"]) for r in mine)
                cos = " / ".join(
                    f"{r['cos_direction_gradient']:.2f}"
                    for r in mine
                    if "cos_direction_gradient" in r
                )
                lines.append(
                    f"| {part} | {lr} | {method} | " + " | ".join(cells) + f" | {g85s} | {fin} "
                    f"| {100 * late:.1f} "
                    f"| {100 * tail:.1f} | {grads:.2f} | {mb:.0f} | {stuck} | {cos} |"
                )
    lines += [
        "",
        f"*Mean acc from round {FROM}*: mean over the evaluations from round {FROM} on and over "
        "seeds (the spec's check: FedAMD at or above FedAvg from round ~50 on). "
        "*Tail acc*: mean over the evaluations in the last 10% of rounds and over seeds. "
        "*cos(d_T, ∇F(x_T))*: cosine between FedAMD's direction d = (1/N) Σ_i v_i (the stored "
        "anchors) and the true full gradient at the final model; 1 would mean fresh anchors.",
    ]
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def plot(runs: list[dict[str, Any]], out: str, by_work: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(LRS), len(PARTITIONS), figsize=(13, 9), sharey=True, squeeze=False)
    for j, part in enumerate(PARTITIONS):
        for i, lr in enumerate(LRS):
            ax = axes[i][j]
            for method in METHODS:
                mine = _mine(runs, part, lr, method)
                x_idx = 2 if by_work else 0
                xs = np.array([c[x_idx] for c in mine[0]["curve"]], dtype=float)
                if by_work:
                    xs = np.mean([[c[2] for c in r["curve"]] for r in mine], axis=0) / 1e6
                ys = np.array([[c[1] for c in r["curve"]] for r in mine])
                (line,) = ax.plot(xs, ys.mean(axis=0), label=method, lw=1.2)
                if len(mine) > 1:
                    ax.fill_between(
                        xs, ys.min(axis=0), ys.max(axis=0), color=line.get_color(), alpha=0.15
                    )
            ax.set_title(f"{part}, local lr {lr}", fontsize=10)
            ax.set_ylim(0.5, 0.96)
            ax.grid(alpha=0.3)
            if i == len(LRS) - 1:
                ax.set_xlabel("per-example gradient evaluations (millions)" if by_work else "round")
            if j == 0:
                ax.set_ylabel("test accuracy (mean over seeds; band = min..max)")
    axes[0][0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    name = "accuracy_vs_work.png" if by_work else "test_accuracy.png"
    fig.savefig(os.path.join(out, name), dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
