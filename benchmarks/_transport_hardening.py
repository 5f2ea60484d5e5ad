"""transport.py --baseline: the cost of the deployment hardening (issue 14), before vs after
in the same run (see transport.py's docstring)."""

from __future__ import annotations

import argparse
import itertools
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import GIB, MIB, machine_info, wait_for_idle
from _transport_run import HERE, OtherCpu, fedagg_run

# -- before/after: the cost of the deployment hardening (issue 14) -----------------------------

#: (key, label, unit, scale, higher is better): the metrics compared, as stored per repetition
HARDENING_METRICS = [
    ("latency_median", "round latency, median (10 params, 2 clients)", "ms", 1e3, False),
    ("latency_p90", "round latency, p90", "ms", 1e3, False),
    ("upload_fold_gibps", "upload + fold (transport.md's measure)", "GiB/s", 1.0, True),
    ("upload_apply_gibps", "upload + apply (read back, re-verify, fold)", "GiB/s", 1.0, True),
    ("many_round", "N=10 clients x 40 MB: round time", "s", 1.0, False),
]
TARGET = 1.05  # the hardening may add at most 5% (to a time; a rate may lose 1 - 1/1.05)


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=HERE.parent, capture_output=True, text=True, check=True, timeout=120
    ).stdout.strip()


def _rev_info(rev: str) -> dict[str, str]:
    sha = _git("rev-parse", "--verify", f"{rev}^{{commit}}")
    return {
        "rev": rev,
        "sha": sha,
        "subject": _git("log", "-1", "--format=%s", sha)[:160],
        "date": _git("log", "-1", "--format=%cI", sha),
    }


def _materialize(sha: str, into: Path) -> Path:
    """``src/`` of commit ``sha`` extracted into ``into`` (``git archive``: the repository's
    working tree, index and worktree list are not touched); returns ``into/src``."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.Popen(
        ["git", "archive", sha, "src"], cwd=HERE.parent, stdout=subprocess.PIPE
    )
    assert archive.stdout is not None
    try:
        subprocess.run(
            ["tar", "-x", "-C", str(into)], stdin=archive.stdout, check=True, timeout=300
        )
    finally:
        archive.stdout.close()
        if archive.wait(timeout=60) != 0:
            raise RuntimeError(f"git archive {sha} src failed")
    src = into / "src"
    if not (src / "fedagg" / "__init__.py").is_file():
        raise RuntimeError(f"{sha} has no src/fedagg")
    return src


def _steady_median(xs: list[float]) -> float:
    return statistics.median(xs[1:] if len(xs) > 1 else xs)


def hardening_latency(src: Path, rounds: int) -> dict[str, Any]:
    r = fedagg_run(10, 2, rounds, tls=True, digest=True, fsync=True, src=src, timeout=300)
    xs = r["round_s"][2:]  # after the first rounds (connection set-up, JIT)
    return {
        "latency_median": statistics.median(xs),
        "latency_p90": statistics.quantiles(xs, n=10)[-1],
        "round_s": r["round_s"],
        "fedagg_file": r["fedagg_file"],
    }


def hardening_upload(src: Path, nbytes: int, rounds: int = 3) -> dict[str, Any]:
    """One client pushing ``nbytes`` each round, default setting (TLS, signed sha256 digest,
    fsync, fixed window). Per round: the client's push (stream, server checks, spools, fsyncs,
    acknowledges), the fold alone, and the engine's policy time for the round ("apply": read
    the spooled update back, re-verify it where the code does, fold, close the round).
    Medians over the rounds after the first (cold) one."""
    r = fedagg_run(nbytes // 4, 1, rounds, tls=True, digest=True, fsync=True, src=src, timeout=900)
    c = r["clients"][0]
    pol = [t["policy"] for t in r["round_timings"]]
    apply = [b - a for a, b in itertools.pairwise([0.0, *pol])]
    push, fold = c["push_s"], r["folds"]
    k = min(len(push), len(fold), len(apply))
    up_fold = [push[i] + fold[i] for i in range(k)]
    up_apply = [push[i] + apply[i] for i in range(k)]
    return {
        "upload_fold_gibps": nbytes / GIB / _steady_median(up_fold),
        "upload_apply_gibps": nbytes / GIB / _steady_median(up_apply),
        "push_s": push,
        "fold_s": fold,
        "apply_s": apply,
        "pull_s": c["pull_s"],
        "round_s": r["round_s"],
        "round_timings": r["round_timings"],
        "bytes": nbytes,
    }


def hardening_many(src: Path, n: int, params: int, rounds: int = 4) -> dict[str, Any]:
    """N clients in 2 processes; the median of the rounds after the first (one round alone
    is a single sample, and its spread between runs was as wide as the effect measured)."""
    r = fedagg_run(
        params, n, rounds, tls=True, digest=True, fsync=True, client_procs=2, src=src,
        timeout=900,
    )  # fmt: skip
    return {
        "many_round": statistics.median(r["round_s"][1:]),
        "round_s": r["round_s"],
        "peak_rss": r["peak_rss"],
        "clients": n,
        "params": params,
    }


def _summary(before: list[float], after: list[float], higher_better: bool) -> dict[str, Any]:
    """Medians and ranges of both sides; the ratio after/before of each adjacent pair (one
    repetition ran both, back to back), and the cost: that ratio as a time (after/before for a
    time, before/after for a rate), with its median, IQR and range, against the 5% target."""
    ratios = [a / b for a, b in zip(after, before, strict=True)]
    cost = [1 / x if higher_better else x for x in ratios]
    q = statistics.quantiles(cost, n=4) if len(cost) > 1 else [cost[0]] * 3
    med = statistics.median(cost)
    if max(cost) <= TARGET:
        verdict = "met (every pair)"
    elif med <= TARGET:
        verdict = "met on the median (not in every pair)"
    elif min(cost) > TARGET:
        verdict = "NOT met (in every pair)"
    else:
        verdict = "not met on the median; pairs on both sides: inconclusive"
    return {
        "before": {
            "median": statistics.median(before),
            "min": min(before),
            "max": max(before),
            "all": before,
        },
        "after": {
            "median": statistics.median(after),
            "min": min(after),
            "max": max(after),
            "all": after,
        },
        "ratio_of_medians": statistics.median(after) / statistics.median(before),
        "pair_ratios": ratios,
        "cost": {"median": med, "q1": q[0], "q3": q[2], "min": min(cost), "max": max(cost)},
        "verdict": verdict,
    }


def summaries(runs: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for key, _label, _unit, _scale, higher in HARDENING_METRICS:
        side_vals = {
            side: [
                r[key]
                for r in sorted(runs, key=lambda r: r["rep"])
                if r["side"] == side and key in r
            ]
            for side in ("before", "after")
        }
        if side_vals["before"]:
            out[key] = _summary(side_vals["before"], side_vals["after"], higher)
    return out


def run_hardening(a: argparse.Namespace) -> None:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    reps = a.reps or 5
    nbytes = 256 * MIB if a.quick else GIB
    rounds = 50
    t_start = time.perf_counter()
    res: dict[str, Any] = {
        "machine": machine_info(),
        "command": "python " + shlex.join(sys.argv),
        "quick": a.quick,
        "reps": reps,
        "upload_bytes": nbytes,
        "latency_rounds": rounds,
        "many": None if a.no_many else {"clients": 10, "params": 10_000_000},
        "setting": "TLS, signed sha256 digest, fsync before the ack (the default)",
        "note": a.note,
    }
    res["before"] = _rev_info(a.baseline)
    with tempfile.TemporaryDirectory(prefix="fedagg-hardening-") as tmp:
        srcs = {"before": _materialize(res["before"]["sha"], Path(tmp) / "before")}
        if a.after == "worktree":
            srcs["after"] = (HERE.parent / "src").resolve()
            res["after"] = {
                **_rev_info("HEAD"),
                "rev": "worktree",
                "src_status_start": _git("status", "--porcelain", "src"),
            }
        else:
            res["after"] = _rev_info(a.after)
            srcs["after"] = _materialize(res["after"]["sha"], Path(tmp) / "after")
        for side in ("before", "after"):
            print(
                f"{side}: {res[side]['rev']} = {res[side]['sha'][:10]} "
                f"({res[side]['subject'][:70]}), PYTHONPATH={srcs[side]}",
                flush=True,
            )
            # warm-up (not measured): numba's caches of that tree, the page cache
            w = hardening_latency(srcs[side], 5)
            print(f"  warm-up ok, imported {w['fedagg_file']}", flush=True)
        kinds: list[tuple[str, Callable[[Path], dict[str, Any]]]] = [
            ("latency", lambda s: hardening_latency(s, rounds)),
            ("upload", lambda s: hardening_upload(s, nbytes)),
        ]
        if not a.no_many:
            kinds.append(("many", lambda s: hardening_many(s, 10, 10_000_000)))
        runs: list[dict[str, Any]] = []
        for rep in range(reps):
            order = ("before", "after") if rep % 2 == 0 else ("after", "before")  # ABBA...
            if a.wait_idle:
                wait_for_idle(a.wait_idle)
            for kind, fn in kinds:
                for side in order:
                    with OtherCpu() as oc:
                        t0 = time.perf_counter()
                        r = fn(srcs[side])
                    r.update(
                        rep=rep,
                        side=side,
                        kind=kind,
                        wall_s=time.perf_counter() - t0,
                        other_cpu=oc.share,
                    )
                    runs.append(r)
                    vals = ", ".join(f"{k}={r[k]:.4g}" for k, *_ in HARDENING_METRICS if k in r)
                    print(
                        f"  rep {rep} {kind:7s} {side:6s}: {vals} "
                        f"[{r['wall_s']:.0f} s, other CPU {oc.share:.0%}]",
                        flush=True,
                    )
        if a.after == "worktree":
            res["after"]["src_status_end"] = _git("status", "--porcelain", "src")
    res["runs"] = runs
    res["summary"] = summaries(runs)
    res["runtime_s"] = time.perf_counter() - t_start
    (out / "hardening.json").write_text(json.dumps(res, indent=1, default=str))
    render_hardening(res, out)
    print((out / "hardening.md").read_text())


def render_hardening(res: dict[str, Any], out: Path) -> None:
    m, b, af = res["machine"], res["before"], res["after"]
    after_desc = f"`{af['sha'][:10]}` ({af['subject'][:90]})"
    if af.get("rev") == "worktree":
        dirty = af.get("src_status_start") or af.get("src_status_end")
        after_desc = f"the working tree's `src/` at HEAD {after_desc}" + (
            "; **src/ had uncommitted changes**" if dirty else ", src/ clean"
        )
    up = res["upload_bytes"] / MIB
    lines = [
        "# Cost of the deployment hardening (issue 14): before vs after, same run",
        "",
    ]
    if res.get("note"):
        lines += [f"> {res['note']}", ""]
    lines += [
        f"- before: `{b['sha'][:10]}` ({b['subject'][:90]})",
        f"- after: {after_desc}",
        f"- machine: {m.get('model_name', '?')}, {m.get('cores', '?')} cores, "
        f"{m.get('ram_gib', '?')} GiB, Linux {m.get('kernel', '?')}, Python {m.get('python')}; "
        f"{m.get('date', '')}",
        f"- setting: {res['setting']}; real processes on 127.0.0.1, each side's server and "
        "clients importing that side's `src/` (`PYTHONPATH`, checked via `fedagg.__file__`)",
        f"- {res['reps']} repetitions, interleaved (before/after, then after/before, ...); "
        f"each row: median over repetitions [min-max]. Runtime {res['runtime_s'] / 60:.1f} min.",
        f"- measures: round latency = the server's dispatch-to-applied time of "
        f"{res['latency_rounds']} rounds (the first 2 dropped; median and p90 per run); "
        f"upload = one client, {up:.0f} MiB updates, 3 rounds, the median of rounds 2-3 of the "
        "client's push plus the server's fold (transport.md's measure) or plus the engine's "
        "whole apply step (read back, re-verify, fold)"
        + (
            "; N=10 clients x 10M params, 2 client processes, 4 rounds: the median of rounds 2-4"
            if res.get("many")
            else ""
        ),
        "- cost = after/before as a time (for a rate: before/after), per adjacent pair; "
        f"the target is cost <= {TARGET:.2f}",
        "",
        "| measure | before | after | after/before (medians) | cost: median [IQR] (min-max) "
        "| <= 5%? |",
        "|---|---|---|---|---|---|",
    ]
    for key, label, unit, scale, _hb in HARDENING_METRICS:
        sm = res["summary"].get(key)
        if sm is None:
            continue
        if key.startswith("upload"):
            label = label.replace("upload", f"{up:.0f} MiB upload", 1)

        def fmt(d: dict[str, float], sc: float = scale, u: str = unit) -> str:
            return f"{d['median'] * sc:.3g} {u} [{d['min'] * sc:.3g}-{d['max'] * sc:.3g}]"

        c = sm["cost"]
        lines.append(
            f"| {label} | {fmt(sm['before'])} | {fmt(sm['after'])} | "
            f"{sm['ratio_of_medians']:.3f} | {c['median']:.3f} [{c['q1']:.3f}-{c['q3']:.3f}] "
            f"({c['min']:.3f}-{c['max']:.3f}) | {sm['verdict']} |"
        )
    ups = [r for r in res["runs"] if r["kind"] == "upload"]
    if ups:
        lines += [
            "",
            f"Where the {up:.0f} MiB upload's time goes (median over the repetitions of each "
            "run's median over rounds 2-3, seconds): push = the client's upload until the "
            "durable acknowledgement; apply = the engine's policy step (read back, re-verify, "
            "fold, close the round); round = the server's dispatch-to-applied time (download, "
            "push, apply, the log's fsyncs and the checkpoint).",
            "",
            "| side | push | fold | apply | pull (download) | round |",
            "|---|---|---|---|---|---|",
        ]
        for side in ("before", "after"):
            rs = [r for r in ups if r["side"] == side]
            cells = [
                statistics.median(_steady_median(r[k]) for r in rs)
                for k in ("push_s", "fold_s", "apply_s", "pull_s", "round_s")
            ]
            lines.append(f"| {side} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    oc = [r["other_cpu"] for r in res["runs"]]
    lines += [
        "",
        f"Other processes used {statistics.median(oc):.0%} of the CPU during a median run "
        f"(max {max(oc):.0%}): on a shared machine the ranges are wide, and the pairwise cost "
        "is the number to read.",
        "",
        f"Command: `{res['command']}`",
        "",
    ]
    (out / "hardening.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [k for k in HARDENING_METRICS if k[0] in res["summary"]]
        fig, axs = plt.subplots(1, len(keys), figsize=(2.6 * len(keys), 3.4))
        for ax, (key, label, unit, scale, _hb) in zip(axs, keys, strict=True):
            sm = res["summary"][key]
            meds = [sm[s]["median"] * scale for s in ("before", "after")]
            lo = [meds[i] - sm[s]["min"] * scale for i, s in enumerate(("before", "after"))]
            hi = [sm[s]["max"] * scale - meds[i] for i, s in enumerate(("before", "after"))]
            ax.bar(
                ["before", "after"], meds, yerr=[lo, hi], capsize=4, color=["tab:gray", "tab:blue"]
            )
            ax.set_title(
                f"{label.split(' (')[0].split(':')[0]}\ncost x{sm['cost']['median']:.3f}",
                fontsize=8,
            )
            ax.set_ylabel(unit)
        fig.suptitle(
            f"issue 14 hardening: {b['sha'][:8]} vs {af['sha'][:8]} "
            f"(median of {res['reps']}, bars: min-max)",
            fontsize=9,
        )
        fig.tight_layout()
        fig.savefig(out / "hardening.png", dpi=120)
        plt.close(fig)
    except ImportError:
        pass
