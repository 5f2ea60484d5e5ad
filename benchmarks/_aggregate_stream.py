"""The streaming rows of ``benchmarks/aggregate.py``: one update at a time, with work in between.

A server folds each update as it arrives, with other work (receiving, parsing, building the
next one) in between; folding pre-built updates back to back keeps a parallel kernel's threads
hot and hides its wake-up stalls. Here each update (10 layer arrays, random float32, the same
values as the main table's) is built just before it is folded, and only ``init`` + the folds
+ ``finalize`` are timed. Rows, all in one run (``aggregate.py --streaming``):

* ``stream``: ``Mean.fold`` as it is now (the streaming fold: scan, then fold, serially);
* ``stream_undo1``: the checked kernel with the undo copy that ``fold`` used before
  (``fold_many([u], undo=True)``), with ``numba.set_num_threads(1)``: the single-threaded kernel;
* ``stream_undo``: the same kernel with numba's default threads (the old ``fold``);
* ``prebuilt``: ``Mean.fold`` of updates built beforehand, folded back to back;
* ``flower_msg``: Flower's ``FedAvg.aggregate_train`` over all N replies held in memory.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

from _common import ForeignCpu

Result = dict[str, Any]

SCENARIOS: dict[tuple[int, int], tuple[str, ...]] = {
    (100, 10_000_000): ("stream", "stream_undo1", "prebuilt"),
    (40, 5_000_000): ("stream", "stream_undo1", "stream_undo", "prebuilt", "flower_msg"),
}
LABELS = {
    "stream": "fedagg `fold`, each update built just before it is folded",
    "stream_undo1": "old checked kernel (undo copy), built just before, 1 thread",
    "stream_undo": "old checked kernel (undo copy), built just before, default threads",
    "prebuilt": "fedagg `fold`, pre-built updates back to back",
    "flower_msg": "Flower FedAvg.aggregate_train (all N replies in memory)",
}
REPS = 3
#: rounds over every row, alternating, so that a burst of load from other jobs hits each row
#: about alike; a row keeps its best round
ROUNDS = 3


def child(
    method: str,
    n: int,
    m: int,
    *,
    layers_of: Callable[[int, int], Any],
    weights: Callable[[int], list[int]],
    flower_runner: Callable[[str, int, int], Callable[[], Any]],
) -> Result:
    info: Result = {"method": method, "n": n, "m": m}
    if method == "flower_msg":
        run = flower_runner(method, n, m)
        times = []
        with ForeignCpu() as foreign:
            for _ in range(REPS):
                t0 = time.perf_counter()
                run()
                times.append(time.perf_counter() - t0)
        return {**info, "times": times, "best": min(times), "foreign_cpu": foreign.share}

    import numba
    import numpy as np

    import fedagg

    if method == "stream_undo1":
        numba.set_num_threads(1)
    agg = fedagg.aggregators.mean()
    spec = fedagg.ParamSpec.from_arrays([np.empty(m // 10, np.float32)] * 10)
    w = weights(n)
    built = [layers_of(i, m) for i in range(n)] if method == "prebuilt" else None

    def fold(state: Any, u: Any) -> None:
        if method.startswith("stream_undo"):
            agg.fold_many(state, [u], undo=True)
        else:
            agg.fold(state, u)

    def run(count: int) -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        state = agg.init(spec)
        busy = time.perf_counter() - t0
        per: list[float] = []
        for i in range(count):
            delta = built[i] if built is not None else layers_of(i, m)  # the work in between
            u = fedagg.Update(delta=delta, weight=w[i], client_id=str(i))
            t0 = time.perf_counter()
            fold(state, u)
            per.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        agg.finalize(state)
        return busy + sum(per) + time.perf_counter() - t0, per

    run(2)  # load the kernels (compile or read numba's cache), untimed
    times, per_fold = [], []
    with ForeignCpu() as foreign:
        for _ in range(REPS):
            t, per = run(n)
            times.append(t)
            per_fold += per
    return {
        **info,
        "times": times,
        "best": min(times),
        "fold_median_ms": statistics.median(per_fold) * 1e3,
        "fold_max_ms": max(per_fold) * 1e3,
        "foreign_cpu": foreign.share,
        "loadavg": os.getloadavg()[0],
    }


def drive(
    measure: Callable[[list[str]], Result],
    log: Callable[[str], None],
    only: set[str] | None = None,
    old: Result | None = None,
) -> Result:
    """Measure every row (each in a fresh process, between two bandwidth measurements);
    ``only``: just these methods, the other rows kept from ``old`` (an earlier section, said
    so in the page)."""
    t_start = time.perf_counter()
    bw = [measure(["--bandwidth"])]
    best: dict[tuple[str, int, int], Result] = {}
    for rnd in range(ROUNDS):
        for (n, m), methods in SCENARIOS.items():
            for method in methods:
                if only is not None and method not in only:
                    continue
                r = measure(["--stream-one", method, str(n), str(m)])
                key = (method, n, m)
                r["round_bests"] = best[key]["round_bests"] if key in best else []
                r["round_bests"].append(r["best"])
                if key not in best or r["best"] < best[key]["best"]:
                    best[key] = r
                else:
                    best[key]["round_bests"] = r["round_bests"]
                log(
                    f"round {rnd + 1}: N={n} M={m // 1_000_000}M {LABELS[method]}: {r['best']:.3f}s"
                )
        bw.append(measure(["--bandwidth"]))
    rows = list(best.values())
    kept = []
    if only is not None and old is not None:
        kept = [r for r in old["rows"] if r["method"] not in only]
        for r in kept:
            r["kept_from"] = old["machine"]["git"]
        rows = kept + rows
    return {
        "kept": sorted({r["method"] for r in kept}),
        "bandwidth_runs": bw,
        "numba_Bps": max(b["numba"] for b in bw),
        "rows": rows,
        "loadavg": os.getloadavg(),
        "wall_s": time.perf_counter() - t_start,
    }


def _row(section: Result, method: str, n: int, m: int) -> Result | None:
    for r in section["rows"]:
        if (r["method"], r["n"], r["m"]) == (method, n, m):
            return r
    return None


def targets(section: Result) -> list[Result]:
    out: list[Result] = []
    bps = section["numba_Bps"]
    n, m = 100, 10_000_000
    s = _row(section, "stream", n, m)
    if s is not None:
        ratio = s["best"] / (n * m * 4 / bps)
        out.append(
            {
                "target": "N=100, M=10M, one at a time with work in between: fedagg fold <= 3.5x "
                "the read-once bound",
                "value": f"{ratio:.2f}x ({s['best']:.3f}s vs {n * m * 4 / bps:.3f}s)",
                "met": ratio <= 3.5,
            }
        )
    worst = []
    for n, m in SCENARIOS:
        s, one = _row(section, "stream", n, m), _row(section, "stream_undo1", n, m)
        if s is not None and one is not None:
            worst.append((s["best"] / one["best"], n, m, s["best"], one["best"]))
    if worst:
        out.append(
            {
                "target": "one at a time with work in between: never slower than the "
                "single-threaded kernel",
                "value": "; ".join(
                    f"N={n}, M={m // 1_000_000}M: {r:.2f}x its time ({a:.3f}s vs {b:.3f}s)"
                    for r, n, m, a, b in worst
                ),
                "met": all(r <= 1.0 for r, *_ in worst),
            }
        )
    n, m = 40, 5_000_000
    s, fl = _row(section, "stream", n, m), _row(section, "flower_msg", n, m)
    if s is not None and fl is not None:
        ratio = fl["best"] / s["best"]
        out.append(
            {
                "target": "N=40, M=5M, one at a time with work in between: >= 2x faster than "
                "Flower FedAvg.aggregate_train (all updates held)",
                "value": f"{ratio:.1f}x ({fl['best']:.3f}s vs {s['best']:.3f}s)",
                "met": ratio >= 2,
            }
        )
    return out


def markdown(section: Result) -> list[str]:
    bps = section["numba_Bps"]
    m_ = section["machine"]
    load = ", ".join(f"{x:.1f}" for x in section["loadavg"])
    lines = [
        "",
        "## One update at a time, with work in between (`--streaming`)",
        "",
        "- Command: `FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 python "
        f"benchmarks/aggregate.py --streaming{section.get('command_extra', '')}`",
        f"- Measured {m_['date']}, fedagg git {m_['git']}, in "
        f"{section['wall_s'] / 60:.1f} min; numba {m_['numba']} "
        f"({m_['numba_threads']} threads). Load average at the end (1, 5, 15 min): {load}: the "
        "2 cores were shared with other jobs, so every ratio below compares rows of this one "
        "run.",
        f"- Read bandwidth in this run: **{bps / 1e9:.1f} GB/s** (runs: "
        + ", ".join(f"{b['numba'] / 1e9:.1f}" for b in section["bandwidth_runs"])
        + " GB/s).",
        "- Each update (10 layer arrays) is built just before it is folded, except in the "
        "pre-built row; time = `init` + the folds + `finalize` (building excluded), best of "
        f"{REPS} in each of {ROUNDS} rounds that alternate the rows (each round's best in the "
        "last column); per-fold median and max over the best round's repeats.",
    ]
    if section.get("kept"):
        lines.append(
            "- Not re-measured in this run (kept from the earlier run at git "
            + ", ".join(sorted({r["kept_from"] for r in section["rows"] if "kept_from" in r}))
            + ", so not comparable with the bound above): "
            + ", ".join(LABELS[k] for k in section["kept"])
            + " (marked *)."
        )
    lines += [
        "",
        "| N | M | method | best s | ÷ bound | fold median ms | fold max ms | other CPU | rounds |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---|",
    ]
    for n, m in SCENARIOS:
        bound = n * m * 4 / bps
        lines.append(
            f"| {n} | {m // 1_000_000}M | **read-once bound** | **{bound:.3f}** | 1.00 | | | | |"
        )
        for r in section["rows"]:
            if (r["n"], r["m"]) != (n, m):
                continue
            med = f"{r['fold_median_ms']:.1f}" if "fold_median_ms" in r else ""
            mx = f"{r['fold_max_ms']:.1f}" if "fold_max_ms" in r else ""
            rounds = ", ".join(f"{t:.3f}" for t in r.get("round_bests", [r["best"]]))
            star = " *" if "kept_from" in r else ""
            lines.append(
                f"| {n} | {m // 1_000_000}M | {LABELS[r['method']]}{star} | {r['best']:.3f} | "
                f"{r['best'] / bound:.2f} | {med} | {mx} | {r['foreign_cpu']:.0%} | {rounds} |"
            )
    return lines


def plot(section: Result, ax: Any) -> None:
    """Bars: each row's time over the read-once bound, per scenario (log scale)."""
    bps = section["numba_Bps"]
    names = list(LABELS)
    width = 0.8 / len(names)
    for k, method in enumerate(names):
        xs, ys = [], []
        for j, (n, m) in enumerate(SCENARIOS):
            r = _row(section, method, n, m)
            if r is not None:
                xs.append(j + (k - len(names) / 2 + 0.5) * width)
                ys.append(r["best"] / (n * m * 4 / bps))
        if xs:
            ax.bar(xs, ys, width, label=LABELS[method].replace("`", ""))
    ax.axhline(3.5, color="k", ls="--", lw=1, label="target: 3.5x the bound (N=100, M=10M)")
    ax.set_xticks(range(len(SCENARIOS)), [f"N={n}, M={m // 1_000_000}M" for n, m in SCENARIOS])
    ax.set(yscale="log", ylabel="best time / read-once bound")
    ax.set_title("one at a time, each update built just before its fold", fontsize=10)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    ax.legend(fontsize=6)
