"""Byzantine-robust aggregation on MNIST-5k: the qualitative version (spec §7 R3) of the
centered-clipping authors' CIFAR-10 table (R2), and the Flag Aggregator's random-attack test
(R6).

Main grid (R3): n = 25 IID clients, MLP (784-64-10), one minibatch gradient per round with
worker momentum beta in {0, 0.9} (``clients.WorkerMomentum``, batch 32), full participation,
server ``x <- x + agg(deltas)``. f = 5 Byzantine clients (f = 11 for IPM). Rules: mean, coordinate
median (CM), trimmed mean (TM, b = f), Krum, RFA, centered clipping (CC), Bulyan, Multi-Krum
(m = n - f) and the Flag Aggregator (FA). Attacks: none, sign flip (BF), label flip (LF),
Gaussian, ALIE, IPM (eps = 0.1), Min-Max and Min-Sum (unit_vec direction), plus BFx10 (-10 x own
update, a large-norm attack the mean cannot survive). Side runs: a small
lr sweep (fault-free mean), CC's tau sweep (which picks tau for the grid), the other two
Min-Max / Min-Sum directions for CC / CM / Krum, ALIE with the paper's z, and a diagnostic of
how far ALIE moves the coordinate median.

R6: p = 15 clients, f = 3 sending U[0,1)^d (``random``), FA (m = 8, lambda = 0) against the
mean, the fault-free mean and CM / Krum / Multi-Krum / Bulyan; and the paper's lambda sweep
(p = 7, f = 1, m = 4, lambda in {0, 1, 2, 4, ..., 64}). ``--only r6`` reruns just these and
merges them into an existing results.json.

Writes ``results/results.md``, ``results/results.json`` and PNG plots.

Usage (one command: ~25 CPU-minutes in 2 processes; ``--quick``: 10 rounds on a subset, under a
minute; ``--replot``: tables and plots again from results.json):

    .venv/bin/python experiments/robust/run.py
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import subprocess
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor, wait
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

RULES = ("Mean", "CM", "TM", "Krum", "RFA", "CC", "Bulyan", "MKrum", "FA")
ATTACKS = ("none", "BF", "BFx10", "LF", "Gauss", "ALIE", "IPM", "MinMax", "MinSum")
BETAS = (0.0, 0.9)
N, F, F_IPM = 25, 5, 11
TAU_GRAD = (0.1, 1.0, 10.0)  # CC radius on the gradient/momentum scale; tau = lr * this
TAU_ATTACKS = ("none", "BFx10", "ALIE", "IPM")  # KHJ's hard cases for CC + a large-norm one
DIR_RULES = ("CC", "CM", "Krum")
ALIE_PAPER_RULES = ("Mean", "CM", "TM", "Krum", "RFA", "CC")
LR_SWEEP = (0.1, 0.3, 0.5)
R6_P, R6_F, R6_M = 15, 3, 8
R6_RULES = ("Mean (fault-free)", "Mean", "FA", "FA unit", "FA 1 IRLS", "CM", "Krum", "MKrum",
            "Bulyan")  # fmt: skip
# the paper's lambda sweep: p = 7, f = 1, m = 4, lambda in {0, 1, 2, 4, ..., 64}
LAM_P, LAM_F, LAMBDAS = 7, 1, (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
LAST = 3  # final accuracy = mean of the last LAST evaluations


# --------------------------------------------------------------------------------------------
# Min-Max / Min-Sum computed from O(h) numbers per gamma (same search as fedagg.attacks)
# --------------------------------------------------------------------------------------------


class FastMinMaxSum:
    """``attacks.MinMax`` / ``attacks.MinSum`` with the same direction, bound and gamma search,
    but each candidate gamma is tested in O(h) instead of O(h d):
    ``|mu - gamma p - g_i|^2 = a_i + 2 gamma b_i + gamma^2 c`` with ``a_i = |g_i - mu|^2``,
    ``b_i = <g_i - mu, p>``, ``c = |p|^2``; the pairwise distances come from the centred
    Gram matrix. The first ``check`` calls also run ``fedagg.attacks.min_max_gamma`` /
    ``min_sum_gamma`` and record the differences in gamma (``check_diffs``)."""

    omniscient = True

    def __init__(self, kind: str, direction: str, check: int = 3) -> None:
        self.kind, self.direction, self.check = kind, direction, check
        self.gamma0, self.tol = 50.0, 1e-5  # fedagg.attacks defaults (the reference code's)
        self.gammas: list[float] = []
        self.check_diffs: list[float] = []

    def malicious(self, honest: Any, own: Any, n: int, f: int, rng: Any = None) -> Any:
        from fedagg import attacks

        g = np.asarray(honest, dtype=np.float64)
        mu = g.mean(axis=0)
        if self.direction == "unit_vec":
            norm = float(np.sqrt(mu @ mu))
            p = mu / norm if norm > 0 else np.zeros_like(mu)
        elif self.direction == "sign":
            p = np.sign(mu)
        else:
            p = g.std(axis=0)
        diff = g - mu
        k = diff @ diff.T
        a = np.diag(k).copy()
        b = diff @ p
        c = float(p @ p)
        d2 = np.maximum(a[:, None] + a[None, :] - 2.0 * k, 0.0)
        np.fill_diagonal(d2, 0.0)
        if self.kind == "min_max":
            bound = float(d2.max())

            def ok(gm: float) -> bool:
                return bool((a + 2.0 * gm * b + gm * gm * c).max() <= bound)
        else:
            bound = float(d2.sum(axis=1).min())

            def ok(gm: float) -> bool:
                return bool((a + 2.0 * gm * b + gm * gm * c).sum() <= bound)

        gamma = attacks.search_gamma(ok, self.gamma0, self.tol) if p.any() else 0.0
        if len(self.check_diffs) < self.check:
            ref_fn = attacks.min_max_gamma if self.kind == "min_max" else attacks.min_sum_gamma
            ref = ref_fn(honest, self.direction, self.gamma0, self.tol)  # type: ignore[arg-type]
            self.check_diffs.append(abs(ref - gamma))
        self.gammas.append(gamma)
        row = (mu - gamma * p).astype(np.asarray(honest).dtype)
        return np.tile(row, (f, 1))


# --------------------------------------------------------------------------------------------
# One simulation
# --------------------------------------------------------------------------------------------


@functools.cache
def _federation(n: int) -> Any:
    from fedagg import data as fdata

    return fdata.load("mnist5k", num_clients=n, partition="iid", seed=0)


def make_rule(rule: str, n: int, f: int, tau: float) -> Any:
    from fedagg import aggregators as A

    m_fa = math.ceil(n / 2)
    rules = {
        "Mean": A.mean,
        "Mean (fault-free)": A.mean,
        "CM": A.median,
        "TM": lambda: A.trimmed_mean(f),
        "Krum": lambda: A.krum(f),
        "RFA": A.geometric_median,
        "CC": lambda: A.centered_clipping(tau, 1),
        "Bulyan": lambda: A.bulyan(f),
        "MKrum": lambda: A.multi_krum(f, n - f),
        "FA": lambda: A.flag_aggregator(m_fa, 0.0, norm="median"),
        "FA unit": lambda: A.flag_aggregator(m_fa, 0.0, norm="unit"),
        "FA 1 IRLS": lambda: A.flag_aggregator(m_fa, 0.0, norm="median", iters=1),
    }
    if rule.startswith("FA lam="):  # the lambda sweep
        return A.flag_aggregator(m_fa, float(rule.split("=")[1]), norm="median")
    return rules[rule]()


def make_attack(attack: str, direction: str, z: str, alg: Any) -> tuple[Any, Any]:
    """(attack object, Byzantine client algorithm) for the simulator."""
    from fedagg import attacks

    if attack == "LF":
        return None, attacks.LabelFlip(alg, 10)
    table = {
        "none": lambda: None,
        "BF": lambda: attacks.attack("sign_flip", scale=1.0),
        "BFx10": lambda: attacks.attack("reverse"),  # sign_flip scale 10 (the FA repo's)
        "Gauss": lambda: attacks.attack("gaussian"),  # sigma = "own" (RFA's gauss)
        "ALIE": lambda: attacks.attack("alie", z=z, ddof=1),  # ddof 1: torch.std, as KHJ
        "IPM": lambda: attacks.attack("ipm", eps=0.1),
        "MinMax": lambda: FastMinMaxSum("min_max", direction),
        "MinSum": lambda: FastMinMaxSum("min_sum", direction),
        "random": lambda: attacks.attack("random"),
    }
    return table[attack](), None


def alie_diagnostic(lr: float, seed: int, rounds: tuple[int, ...]) -> list[dict[str, float]]:
    """Why ALIE is mild here: after ``r`` rounds of fault-free mean training (beta = 0), the
    norms of the honest mean ``mu`` and std ``sigma`` of 20 fresh honest updates, and how far
    5 ALIE rows move the coordinate median, and in which direction relative to ``mu``."""
    from threadpoolctl import threadpool_limits

    from fedagg import aggregators as A
    from fedagg import attacks, clients, models, sim, strategies
    from fedagg import policy as policies

    fd = _federation(N)
    model = models.MLP(fd.num_features, (64,), fd.num_classes)
    alg = clients.WorkerMomentum(lr=lr, batch_size=32, beta=0.0)
    out = []
    with threadpool_limits(1):
        for r in rounds:
            st = strategies.fedavg(aggregator=A.mean())
            pol = policies.SyncPolicy(st, rounds=r, clients_per_round=N)
            res = sim.Simulation(fd, model, alg, st, pol, sim.SystemModel(N, seed=0), seed=seed,
                                 eval_every=r).run()  # fmt: skip
            spec = res.server.spec
            params = spec.unflatten(res.server.params)
            rngs = [np.random.default_rng([seed, 0xD1A, i]) for i in range(N - F)]
            trained = alg.train_many(model, params, [fd.clients[i] for i in range(F, N)], rngs)
            g = np.stack([spec.as_flat(t.delta) for t, _ in trained]).astype(np.float64)
            mu, sd = g.mean(axis=0), g.std(axis=0, ddof=1)
            row = {"round": r, "mu_norm": _norm(mu), "sigma_norm": _norm(sd),
                   "cos_sigma_mu": _cos(sd, mu)}  # fmt: skip
            med0 = np.median(g, axis=0)
            for form in ("code", "paper"):
                bad = np.tile(mu - attacks.alie_z(N, F, form) * sd, (F, 1))
                shift = np.median(np.vstack([g, bad]), axis=0) - med0
                row[f"median_shift_norm_{form}"] = _norm(shift)
                row[f"cos_shift_mu_{form}"] = _cos(shift, mu)
            out.append(row)
    return out


def _norm(x: Any) -> float:
    return float(np.sqrt(x @ x))


def _cos(x: Any, y: Any) -> float:
    return float(x @ y / max(_norm(x) * _norm(y), 1e-300))


def simulate(task: dict[str, Any]) -> dict[str, Any]:
    """Run one configuration; returns the task with its accuracy curve and timings."""
    from threadpoolctl import threadpool_limits

    from fedagg import clients, models, sim, strategies
    from fedagg import policy as policies

    cpu0, wall0 = time.process_time(), time.perf_counter()
    n, f, rounds = task["n"], task["f"], task["rounds"]
    fd = _federation(n)
    model = models.MLP(fd.num_features, (64,), fd.num_classes)
    alg = clients.WorkerMomentum(lr=task["lr"], batch_size=32, beta=task["beta"])
    agg = make_rule(task["rule"], n, f, task.get("tau", 1.0))
    st = strategies.fedavg(task.get("server_lr", 1.0), aggregator=agg)
    policy = policies.SyncPolicy(st, rounds=rounds, clients_per_round=n)
    attacked = task["attack"] != "none" and task["rule"] != "Mean (fault-free)"
    atk, byz_alg = make_attack(task["attack"], task.get("direction", "unit_vec"),
                               task.get("z", "code"), alg)  # fmt: skip
    curve: list[tuple[int, float]] = []

    def on_round(rec: Any) -> None:
        if not math.isnan(rec.test_accuracy):
            curve.append((rec.stats.round + 1, float(rec.test_accuracy)))

    error = None
    with threadpool_limits(1):
        s = sim.Simulation(
            fd, model, alg, st, policy, sim.SystemModel(n, seed=0), seed=task["seed"],
            eval_every=task["eval_every"], on_round=on_round,
            byzantine=frozenset(range(f)) if attacked else frozenset(),
            attack=atk if attacked else None,
            byzantine_algorithm=byz_alg if attacked else None,
        )  # fmt: skip
        try:
            s.run()
        except Exception as e:  # a diverged model: record it, keep the rest of the grid going
            error = f"{type(e).__name__}: {e}"[:300]
    accs = [a for _, a in curve]
    out = dict(task)
    out["curve"] = curve
    out["error"] = error
    diverged = error is not None or not curve or curve[-1][0] < rounds
    out["final"] = math.nan if diverged else float(np.mean(accs[-LAST:]))
    half = accs[len(accs) // 2 :]
    out["last_half_mean"] = float(np.mean(half)) if half and not diverged else math.nan
    out["last_half_min"] = float(np.min(half)) if half and not diverged else math.nan
    if isinstance(atk, FastMinMaxSum) and atk.gammas:
        out["gamma_mean"] = float(np.mean(atk.gammas))
        out["gamma_check_max_diff"] = float(max(atk.check_diffs))
    out["cpu_s"] = time.process_time() - cpu0
    out["wall_s"] = time.perf_counter() - wall0
    return out


# --------------------------------------------------------------------------------------------
# The experiment plan
# --------------------------------------------------------------------------------------------


def base(args: argparse.Namespace, exp: str, **kw: Any) -> dict[str, Any]:
    t = {"exp": exp, "n": N, "f": F, "lr": args.lr, "seed": args.seed, "rounds": args.rounds,
         "eval_every": args.eval_every, "direction": "unit_vec", "z": "code"}  # fmt: skip
    t.update(kw)
    if t.get("attack") == "IPM":
        t["f"] = F_IPM
    return t


def grid_cells(quick: bool) -> list[tuple[str, str]]:
    rules = ("Mean", "CM", "CC", "FA") if quick else RULES
    atks = ("none", "BFx10", "ALIE", "IPM", "MinMax") if quick else ATTACKS
    return [(r, a) for r in rules for a in atks if not (r == "Bulyan" and a == "IPM")]


def plan(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(tasks that do not depend on tau, the tau sweep)."""
    q = args.quick
    taus = TAU_GRAD[1:] if q else TAU_GRAD
    sweep = [base(args, "tau", rule="CC", attack=a, beta=b, tau=args.lr * tg, tau_grad=tg)
             for b in BETAS for tg in taus for a in TAU_ATTACKS]  # fmt: skip
    tasks = [base(args, "grid", rule=r, attack=a, beta=b)
             for b in BETAS for r, a in grid_cells(q) if r != "CC"]  # fmt: skip
    for b in (0.0,) if q else BETAS:
        tasks += [base(args, "lr", rule="Mean", attack="none", beta=b, lr=lr)
                  for lr in LR_SWEEP if lr != args.lr]  # fmt: skip
        for rule in ("CM",) if q else ALIE_PAPER_RULES:
            if rule != "CC":
                tasks.append(base(args, "alie_paper", rule=rule, attack="ALIE", beta=b, z="paper"))
    tasks += [t for t in r6_tasks(args)
              if not q or (t["rule"] in ("Mean", "FA") and t["exp"] == "r6")]  # fmt: skip
    for b in (0.0,):
        for rule in ("CM",) if q else DIR_RULES:
            if rule == "CC":
                continue
            tasks += [base(args, "dir", rule=rule, attack=a, beta=b, direction=d)
                      for a in ("MinMax", "MinSum") for d in ("sign", "std")]  # fmt: skip
    return tasks, sweep


def r6_tasks(args: argparse.Namespace) -> list[dict[str, Any]]:
    """R6 and the lambda sweep."""
    tasks = [base(args, "r6", rule=rule, attack="random", beta=b, n=R6_P, f=R6_F)
             for b in BETAS for rule in R6_RULES]  # fmt: skip
    tasks += [base(args, "r6_lambda", rule=f"FA lam={lam:g}", lam=lam, attack="random", beta=b,
                   n=LAM_P, f=LAM_F) for b in BETAS for lam in LAMBDAS]  # fmt: skip
    tasks += [base(args, "r6_lambda", rule=rule, attack="random", beta=b, n=LAM_P, f=LAM_F)
              for b in BETAS for rule in ("Mean (fault-free)", "Mean")]  # fmt: skip
    return tasks


def rerun_r6(args: argparse.Namespace) -> int:
    """Rerun R6 and the lambda sweep; replace them in results.json; rewrite tables and plots."""
    path = os.path.join(args.out, "results.json")
    with open(path) as fh:
        saved = json.load(fh)
    t0 = time.perf_counter()
    tasks = r6_tasks(args)
    with ProcessPoolExecutor(args.jobs) as pool:
        new = list(pool.map(simulate, sorted(tasks, key=_cost, reverse=True)))
    for r in new:
        print(f"{r['exp']:<10} beta={r['beta']:<3} {r['rule']:<17} final {r['final']:.3f}")
    runs = [r for r in saved["runs"] if r["exp"] not in ("r6", "r6_lambda")] + new
    meta = saved["meta"]
    meta["r6_rerun"] = {"command": "python experiments/robust/run.py --only r6",
                        "commit": _commit(), "wall_s": time.perf_counter() - t0,
                        "cpu_s": sum(r["cpu_s"] for r in new)}  # fmt: skip
    with open(path, "w") as fh:
        json.dump({"meta": meta, "runs": runs}, fh, indent=1)
    write_markdown(runs, meta, args)
    plot(runs, meta, args.out)
    return 0


def tau_tasks(args: argparse.Namespace, tau_grad: float) -> list[dict[str, Any]]:
    """The CC tasks that need the chosen tau (the sweep's cells are reused for the grid)."""
    tau = args.lr * tau_grad
    tasks = [base(args, "grid", rule="CC", attack=a, beta=b, tau=tau, tau_grad=tau_grad)
             for b in BETAS for r, a in grid_cells(args.quick)
             if r == "CC" and a not in TAU_ATTACKS]  # fmt: skip
    if not args.quick:
        tasks += [base(args, "dir", rule="CC", attack=a, beta=0.0, direction=d, tau=tau,
                       tau_grad=tau_grad)
                  for a in ("MinMax", "MinSum") for d in ("sign", "std")]  # fmt: skip
        tasks += [base(args, "alie_paper", rule="CC", attack="ALIE", beta=b, z="paper", tau=tau,
                       tau_grad=tau_grad) for b in BETAS]  # fmt: skip
    return tasks


def choose_tau(sweep: list[dict[str, Any]]) -> tuple[float, dict[float, float]]:
    """The tau (gradient scale) with the best worst case over TAU_ATTACKS, averaged over beta."""
    score: dict[float, float] = {}
    for tg in sorted({r["tau_grad"] for r in sweep}):
        worst = [min(_nan0(r["final"]) for r in sweep if r["tau_grad"] == tg and r["beta"] == b)
                 for b in BETAS]  # fmt: skip
        score[tg] = float(np.mean(worst))
    best = max(score, key=lambda t: (score[t], t))
    return best, score


def _nan0(x: float) -> float:
    return 0.0 if math.isnan(x) else x


def _cost(t: dict[str, Any]) -> float:
    """A rough cost, to start the slow runs first."""
    agg = {"Bulyan": 3.0, "CM": 1.3, "MKrum": 1.3, "RFA": 1.3, "CC": 1.5, "FA": 1.4}
    return t["n"] * agg.get(t["rule"], 1.0)


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=2, help="worker processes")
    ap.add_argument("--quick", action="store_true", help="10 rounds on a subset (smoke test)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--replot", action="store_true", help="rewrite md + plots from results.json")
    ap.add_argument("--only", choices=("r6",), help="rerun R6 + the lambda sweep only (merged)")
    args = ap.parse_args()
    if args.replot:
        with open(os.path.join(args.out, "results.json")) as fh:
            saved = json.load(fh)
        args.quick = saved["meta"]["command"].endswith("--quick")
        write_markdown(saved["runs"], saved["meta"], args)
        plot(saved["runs"], saved["meta"], args.out)
        return 0
    if args.quick:
        args.rounds = 10
    args.eval_every = max(1, args.rounds // 20)
    if args.only == "r6":
        return rerun_r6(args)
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    tasks, sweep = plan(args)
    done: list[dict[str, Any]] = []

    def report(fut: Future[dict[str, Any]]) -> None:
        r = fut.result()
        done.append(r)
        extra = f" tau_grad={r['tau_grad']:g}" if "tau_grad" in r else ""
        print(f"[{len(done):3d}] {r['exp']:<10} beta={r['beta']:<3} {r['rule']:<17} "
              f"{r['attack']:<6} {r['direction']:<8} z={r['z']:<5}{extra}  final "
              f"{r['final']:.3f}  ({r['wall_s']:.0f} s wall, {r['cpu_s']:.0f} s cpu)"
              f"{'  ' + r['error'] if r['error'] else ''}", flush=True)  # fmt: skip

    with ProcessPoolExecutor(args.jobs) as pool:
        sweep_futs = [pool.submit(simulate, t) for t in sweep]
        futs = [pool.submit(simulate, t) for t in sorted(tasks, key=_cost, reverse=True)]
        for fu in sweep_futs + futs:
            fu.add_done_callback(report)
        wait(sweep_futs)
        sweep_res = [fu.result() for fu in sweep_futs]
        tau_grad, tau_score = choose_tau(sweep_res)
        print(f"chosen CC tau: lr * {tau_grad:g} = {args.lr * tau_grad:g}", flush=True)
        more = [pool.submit(simulate, t) for t in tau_tasks(args, tau_grad)]
        for fu in more:
            fu.add_done_callback(report)
        diag_rounds = (1, 10) if args.quick else (1, 100)
        diag = pool.submit(alie_diagnostic, args.lr, args.seed, diag_rounds)
        wait([*futs, *more, diag])
    results = [fu.result() for fu in sweep_futs + futs + more]
    wall = time.perf_counter() - t0
    cpu = sum(r["cpu_s"] for r in results)
    meta = {
        "command": "python experiments/robust/run.py" + (" --quick" if args.quick else ""),
        "commit": _commit(),
        "rounds": args.rounds, "lr": args.lr, "seed": args.seed, "jobs": args.jobs,
        "eval_every": args.eval_every, "last_evals_averaged": LAST,
        "tau_grad": tau_grad, "tau": args.lr * tau_grad, "tau_score": tau_score,
        "alie_z": _alie_z(), "alie_diagnostic": diag.result(), "wall_s": wall, "cpu_s": cpu,
    }  # fmt: skip
    with open(os.path.join(args.out, "results.json"), "w") as fh:
        json.dump({"meta": meta, "runs": results}, fh, indent=1)
    write_markdown(results, meta, args)
    plot(results, meta, args.out)
    print(f"done: {len(results)} runs, {wall / 60:.1f} min wall, {cpu / 60:.1f} min cpu")
    return 0


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                             capture_output=True, text=True, check=True)  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _alie_z() -> dict[str, float]:
    from fedagg import attacks

    return {f"{form} (n={N}, f={F})": attacks.alie_z(N, F, form) for form in ("code", "paper")}


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------

# R2 (spec §7): KHJ's CIFAR-10 / ResNet-20 final accuracy, beta = 0 / 0.9
R2 = {
    "none": {"Mean": (86.2, 89.7)},
    "BF": {"CM": (82.3, 88.7), "CC": (82.3, 89.0), "Krum": (76.5, 64.1), "RFA": (82.1, 89.0),
           "TM": (81.9, 88.9)},
    "LF": {"CM": (78.9, 88.3), "CC": (82.4, 89.0), "Krum": (77.0, 6.4), "RFA": (82.3, 89.0),
           "TM": (79.5, 88.0)},
    "ALIE": {"CM": (24.0, 50.8), "CC": (66.6, 86.6), "Krum": (26.0, 52.3), "RFA": (31.1, 50.5),
             "TM": (45.4, 49.7)},
    "IPM": {"CM": (12.5, 50.0), "CC": (82.5, 89.1), "Krum": (9.9, 10.6), "RFA": (10.6, 42.8),
            "TM": (12.6, 51.0)},
}  # fmt: skip


def _pct(x: float) -> str:
    return "div" if math.isnan(x) else f"{100 * x:.1f}"


def _opt(x: float | None) -> str:
    return "-" if x is None else _pct(x)


def _find(results: list[dict[str, Any]], **kw: Any) -> dict[str, Any] | None:
    for r in results:
        if all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def grid_value(results: list[dict[str, Any]], rule: str, attack: str, beta: float,
               tau_grad: float) -> float | None:  # fmt: skip
    if rule == "CC":
        exp = "tau" if attack in TAU_ATTACKS else "grid"
        r = _find(results, exp=exp, rule=rule, attack=attack, beta=beta, tau_grad=tau_grad)
    else:
        r = _find(results, exp="grid", rule=rule, attack=attack, beta=beta)
    return None if r is None else r["final"]


def write_markdown(results: list[dict[str, Any]], meta: dict[str, Any], args: Any) -> None:
    tg = meta["tau_grad"]
    cells = grid_cells(args.quick)
    rules = [r for r in RULES if any(c[0] == r for c in cells)]
    atks = [a for a in ATTACKS if any(c[1] == a for c in cells)]
    z = meta["alie_z"]
    L = [
        "# Byzantine-robust aggregation on MNIST-5k (spec §7 R2/R3, R6)",
        "",
        f"Command: `.venv/bin/{meta['command']}` (commit {meta['commit']}, seed {meta['seed']}, "
        f"{meta['rounds']} rounds, {meta['jobs']} worker processes; "
        f"{meta['wall_s'] / 60:.1f} min wall, {meta['cpu_s'] / 60:.1f} min CPU in total on this "
        "shared 2-core machine).",
        "",
        f"MNIST-5k (4,000 train / 1,000 test), n = {N} IID clients, MLP 784-64-10, "
        f"`WorkerMomentum(lr={meta['lr']}, batch_size=32, beta)`: one minibatch gradient per "
        "round, the client sends -lr x momentum; full participation; server x <- x + agg. "
        f"f = {F} Byzantine clients (f = {F_IPM} for IPM). Accuracy: global test set, mean of "
        f"the last {LAST} evaluations (every {meta['eval_every']} rounds), in %. "
        "`div` = the run diverged (non-finite updates).",
        "",
        f"Rules: TM b = f; Krum m = 1; Multi-Krum (MKrum) m = n - f; RFA = smoothed Weiszfeld, "
        f"maxiter 4; CC one iteration, tau = lr x {tg:g} = {meta['tau']:g} (chosen by the sweep "
        f"below); Bulyan (n/a for IPM: needs n >= 4f + 3); FA m = ceil(n/2) = {math.ceil(N / 2)}, "
        'lambda = 0, 3 IRLS iterations, norm = "median" (the unit-vector aggregate rescaled '
        "by the median update norm).",
        "",
        f"Attacks: BF = -own update; LF = labels y -> 9 - y; Gauss = N(0, std(own)^2 I) "
        f"(RFA's); ALIE = mu - z sigma (coordinate-wise, sigma with ddof 1), z from the KHJ code "
        f"formula Phi^-1((n-f-s)/(n-f)), s = floor(n/2+1) - f: z = "
        f"{z[f'code (n={N}, f={F})']:.4f}; IPM = -0.1 mu; MinMax / MinSum = mu - gamma "
        "mu/|mu| (unit_vec), gamma by the reference search (gamma0 = 50, tol 1e-5).",
        "",
    ]
    for b in BETAS:
        L += [f"## Final test accuracy, beta = {b}", "",
              "| rule | " + " | ".join(atks) + " |", "|---" * (len(atks) + 1) + "|"]  # fmt: skip
        for rule in rules:
            row = []
            for a in atks:
                v = grid_value(results, rule, a, b, tg)
                row.append("n/a" if v is None else _pct(v))
            L.append(f"| {rule} | " + " | ".join(row) + " |")
        L.append("")
    L += ["## Reference (R2): KHJ, CIFAR-10 / ResNet-20, beta = 0 / 0.9 (ours alongside)", "",
          "| attack | rule | R2 beta=0 | ours beta=0 | R2 beta=0.9 | ours beta=0.9 |",
          "|---|---|---|---|---|---|"]  # fmt: skip
    for a, per in R2.items():
        for rule, (r0, r9) in per.items():
            o0 = grid_value(results, rule, a, 0.0, tg)
            o9 = grid_value(results, rule, a, 0.9, tg)
            if o0 is None and o9 is None:
                continue
            L.append(f"| {a} | {rule} | {r0} | {_opt(o0)} | {r9} | "
                     f"{_opt(o9)} |")  # fmt: skip
    L += ["", "## CC radius sweep (tau = lr x tau_grad; picks the grid's tau)", "",
          "Score = worst accuracy over " + " / ".join(TAU_ATTACKS) + ", averaged over beta "
          "(ties: the larger tau). With tau_grad = 100 (KHJ's tau) CC would never clip an honest "
          "update here (they lie ~0.1-0.6 from the centre), i.e. it would equal the mean except "
          "against large-norm attacks.", "",
          "| tau_grad | tau | beta | " + " | ".join(TAU_ATTACKS) + " | score |",
          "|---" * (len(TAU_ATTACKS) + 4) + "|"]  # fmt: skip
    tau_score = {float(k): v for k, v in meta["tau_score"].items()}  # JSON keys are strings
    for t in sorted(tau_score):
        for b in BETAS:
            vals = [_find(results, exp="tau", tau_grad=t, beta=b, attack=a) for a in TAU_ATTACKS]
            L.append(f"| {t:g} | {meta['lr'] * t:g} | {b} | "
                     + " | ".join(_pct(v["final"]) if v else "-" for v in vals)
                     + f" | {100 * tau_score[t]:.1f} |")  # fmt: skip
    L += [
        "",
        "## Min-Max / Min-Sum perturbation directions (beta = 0)",
        "",
        "gamma = mean over rounds of the gamma found; check = largest |gamma - "
        "fedagg.attacks.min_*_gamma| over the first 3 rounds of each run.",
        "",
        "| rule | attack | unit_vec | sign | std |",
        "|---|---|---|---|---|",
    ]
    for rule in DIR_RULES:
        for a in ("MinMax", "MinSum"):
            row = []
            for d in ("unit_vec", "sign", "std"):
                exp = "grid" if d == "unit_vec" else "dir"
                kw: dict[str, Any] = {"tau_grad": tg} if rule == "CC" else {}
                r = _find(results, exp=exp, rule=rule, attack=a, beta=0.0, direction=d, **kw)
                row.append("-" if r is None else f"{_pct(r['final'])} (gamma "
                           f"{r.get('gamma_mean', math.nan):.3g}, check "
                           f"{r.get('gamma_check_max_diff', math.nan):.1g})")  # fmt: skip
            L.append(f"| {rule} | {a} | " + " | ".join(row) + " |")
    L += ["", f"## ALIE with the paper's z = {z[f'paper (n={N}, f={F})']:.4f} vs the code's "
          f"z = {z[f'code (n={N}, f={F})']:.4f}", "",
          "| rule | code z, beta=0 | paper z, beta=0 | code z, beta=0.9 | paper z, beta=0.9 |",
          "|---|---|---|---|---|"]  # fmt: skip
    for rule in ALIE_PAPER_RULES:
        row = []
        for b in BETAS:
            row.append(_opt(grid_value(results, rule, "ALIE", b, tg)))
            kw = {"tau_grad": tg} if rule == "CC" else {}
            r = _find(results, exp="alie_paper", rule=rule, beta=b, **kw)
            row.append("-" if r is None else _pct(r["final"]))
        L.append(f"| {rule} | " + " | ".join(row) + " |")
    L += ["", "## Why ALIE is mild here (beta = 0; 20 fresh honest updates after r fault-free "
          "rounds)", "",
          "shift = how far the 5 ALIE rows move the coordinate median of the 20 honest updates.",
          "", "| round | ‖mu‖ | ‖sigma‖ | cos(sigma, mu) | ‖shift‖, code z | cos(shift, mu) | "
          "‖shift‖, paper z | cos(shift, mu) |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for d in meta.get("alie_diagnostic", []):
        L.append(f"| {d['round']} | {d['mu_norm']:.3f} | {d['sigma_norm']:.3f} | "
                 f"{d['cos_sigma_mu']:.3f} | {d['median_shift_norm_code']:.3f} | "
                 f"{d['cos_shift_mu_code']:.3f} | {d['median_shift_norm_paper']:.3f} | "
                 f"{d['cos_shift_mu_paper']:.3f} |")  # fmt: skip
    L += [
        "",
        "## Learning-rate check (fault-free mean)",
        "",
        "| lr | beta | final acc |",
        "|---|---|---|",
    ]
    for b in BETAS:
        for lr in sorted(set(LR_SWEEP) | {meta["lr"]}):
            if lr == meta["lr"]:
                r = _find(results, exp="grid", rule="Mean", attack="none", beta=b)
            else:
                r = _find(results, exp="lr", lr=lr, beta=b)
            if r is not None:
                L.append(f"| {lr:g} | {b} | {_pct(r['final'])} |")
    L += [
        "",
        f"## R6: Flag Aggregator, p = {R6_P}, f = {R6_F}, random attack U[0,1)^d",
        "",
        f'FA: m = {R6_M}, lambda = 0. "FA" = norm median, 3 IRLS iterations; "FA unit" = '
        'the reference\'s unit-vector aggregate with server lr 1; "FA 1 IRLS" = the '
        "reference's single IRLS step. Same client setup as above. Final = mean of the last "
        f"{LAST} evaluations; last-half mean / min = over the evaluations of the second half "
        "(FA's accuracy oscillates).",
        "",
        "| rule | beta | final | last-half mean | last-half min |",
        "|---|---|---|---|---|",
    ]
    for b in BETAS:
        for rule in R6_RULES:
            r = _find(results, exp="r6", rule=rule, beta=b)
            if r is not None:
                L.append(f"| {rule} | {b} | {_pct(r['final'])} | "
                         f"{_pct(r['last_half_mean'])} | {_pct(r['last_half_min'])} |")  # fmt: skip
    L += [
        "",
        f"## R6b: the Flag paper's lambda sweep, p = {LAM_P}, f = {LAM_F}, m = "
        f"{math.ceil(LAM_P / 2)}, random attack",
        "",
        'FA with norm "median", 3 IRLS iterations; lambda weighs the pairwise term '
        "lambda / (p (p - 1)) sum_ij sqrt(|1 - ||Y^T (g_i - g_j)||^2|), active from the first "
        "IRLS step.",
        "",
        "| rule | beta | final | last-half mean | last-half min |",
        "|---|---|---|---|---|",
    ]
    for b in BETAS:
        for rule in ("Mean (fault-free)", "Mean", *(f"FA lam={lam:g}" for lam in LAMBDAS)):
            r = _find(results, exp="r6_lambda", rule=rule, beta=b)
            if r is not None:
                L.append(f"| {rule} | {b} | {_pct(r['final'])} | "
                         f"{_pct(r['last_half_mean'])} | {_pct(r['last_half_min'])} |")  # fmt: skip
    if "r6_rerun" in meta:
        rr = meta["r6_rerun"]
        L += ["", f"R6 and R6b were rerun with `{rr['command']}` at commit {rr['commit']} "
              f"({rr['wall_s'] / 60:.1f} min wall); the other tables are from the full "
              "run."]  # fmt: skip
    errs = [r for r in results if r["error"]]
    if errs:
        L += ["", "## Runs that stopped with an error", ""]
        L += [f"- {r['exp']} {r['rule']} {r['attack']} beta={r['beta']}: {r['error']}"
              for r in errs]  # fmt: skip
    with open(os.path.join(args.out, "results.md"), "w") as fh:
        fh.write("\n".join(L) + "\n")


def plot(results: list[dict[str, Any]], meta: dict[str, Any], out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tg = meta["tau_grad"]
    rules = [r for r in RULES if any(x["rule"] == r and x["exp"] in ("grid", "tau")
                                     for x in results)]  # fmt: skip
    atks = [a for a in ATTACKS if any(x["attack"] == a and x["exp"] == "grid" for x in results)]
    fig, axes = plt.subplots(1, len(BETAS), figsize=(7 * len(BETAS), 0.5 * len(rules) + 2))
    for ax, b in zip(axes, BETAS, strict=True):
        m = np.full((len(rules), len(atks)), np.nan)
        for i, rule in enumerate(rules):
            for j, a in enumerate(atks):
                v = grid_value(results, rule, a, b, tg)
                m[i, j] = np.nan if v is None else 100 * v
        cmap = matplotlib.colormaps["RdYlGn"].copy()
        cmap.set_bad("lightgrey")
        ax.imshow(np.ma.masked_invalid(m), cmap=cmap, vmin=10, vmax=95, aspect="auto")
        for i in range(len(rules)):
            for j in range(len(atks)):
                v = grid_value(results, rules[i], atks[j], b, tg)
                txt = "n/a" if v is None else _pct(v)
                ax.text(j, i, txt, ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(atks)), atks)
        ax.set_yticks(range(len(rules)), rules)
        ax.set_title(f"final test accuracy (%), worker momentum beta = {b}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "heatmap.png"), dpi=90)
    plt.close(fig)

    for b in BETAS:
        fig, axes = plt.subplots(2, (len(atks) + 1) // 2, figsize=(16, 7), sharey=True,
                                 squeeze=False)  # fmt: skip
        for ax, a in zip(axes.flat, atks, strict=False):
            for rule in rules:
                kw = {"tau_grad": tg} if rule == "CC" else {}
                exp = "tau" if rule == "CC" and a in TAU_ATTACKS else "grid"
                r = _find(results, exp=exp, rule=rule, attack=a, beta=b, **kw)
                if r is not None and r["curve"]:
                    xs, ys = zip(*r["curve"], strict=True)
                    ax.plot(xs, ys, label=rule, lw=1, color=f"C{RULES.index(rule)}")
            ax.set_title(f"{a}, beta = {b}", fontsize=9)
            ax.set_ylim(0, 1)
            ax.set_xlabel("round")
        for ax in list(axes.flat)[len(atks) :]:
            ax.axis("off")
        axes[0][0].set_ylabel("test accuracy")
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, f"curves_beta{b}.png"), dpi=80)
        plt.close(fig)

    fig, axes = plt.subplots(1, len(BETAS), figsize=(12, 4.5), sharey=True)
    for ax, b in zip(axes, BETAS, strict=True):
        for rule in R6_RULES:
            r = _find(results, exp="r6", rule=rule, beta=b)
            if r is not None and r["curve"]:
                xs, ys = zip(*r["curve"], strict=True)
                style = "--" if rule == "Mean (fault-free)" else "-"
                lw = 1.5 if rule.startswith(("FA", "Mean")) else 1
                ax.plot(xs, ys, style, label=rule, lw=lw, color=f"C{R6_RULES.index(rule)}")
        ax.set_title(f"R6: p = {R6_P}, f = {R6_F}, random attack, beta = {b}")
        ax.set_xlabel("round")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "flag_aggregator_r6.png"), dpi=90)
    plt.close(fig)

    lam_runs = [r for r in results if r["exp"] == "r6_lambda"]
    if lam_runs:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i, b in enumerate(BETAS):
            pts = sorted((r["lam"], 100 * r["final"]) for r in lam_runs
                         if r["beta"] == b and "lam" in r)  # fmt: skip
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot([max(x, 0.5) for x in xs], ys, "o-", color=f"C{i}", label=f"FA, beta={b}")
            for rule, style in (("Mean (fault-free)", "--"), ("Mean", ":")):
                r = _find(lam_runs, rule=rule, beta=b)
                if r is not None and not math.isnan(r["final"]):
                    ax.axhline(100 * r["final"], ls=style, color=f"C{i}", lw=1,
                               label=f"{rule}, beta={b}")  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xlabel("lambda (0 plotted at 0.5)")
        ax.set_ylabel("final test accuracy (%)")
        ax.set_title(f"Flag Aggregator lambda sweep, p = {LAM_P}, f = {LAM_F}, random attack")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "flag_lambda_sweep.png"), dpi=90)
        plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
