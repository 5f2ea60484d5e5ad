"""Byzantine-robust aggregation: fedagg's spooled rules vs Flower 1.42's aggregate functions.

Part 1, side by side at N = 100 updates x M = 1M float32 parameters (10 equal layers), f = 10
assumed Byzantine clients (and 10 actual ones), each (side, rule) in its own fresh process so
that peak RSS is per method:

    fedagg                               Flower 1.42 (flwr.server.strategy.aggregate)
    median()                             aggregate_median            (FedMedian)
    trimmed_mean(b = 0.1 N)              aggregate_trimmed_avg(0.1)  (FedTrimmedAvg)
    krum(f)                              aggregate_krum(f, 0)        (Krum)
    multi_krum(f, N - f)                 aggregate_krum(f, N - f)    (Krum, num_clients_to_keep)
    bulyan(f)                            aggregate_bulyan(f, aggregate_krum, to_keep=0) (Bulyan)
    geometric_median(), centered_clipping(), flag_aggregator()      (no Flower counterpart)

fedagg's time is the aggregation itself (every ``fold`` as the updates arrive, plus
``finalize_flat``; generating an update is not timed), Flower's the aggregate call on the
prepared ``[(ndarrays, num_examples)]`` list. Results are compared coordinate by coordinate and,
for Krum / Multi-Krum / Bulyan, by the set of selected updates. Every fedagg rule runs twice:
as installed, and with one thread (``OPENBLAS_NUM_THREADS=NUMBA_NUM_THREADS=1``: fedagg's
parallel numba kernels and its multi-threaded BLAS Gram product stall when other processes hold
the cores); median and Krum also with the disk spool.

Part 2, the case Flower cannot fit: N = 200 x M = 25M (20 GB of float32 updates on a 24 GiB
machine), fedagg spooling to disk (``spool=fedagg.spool.disk(dir)``), each update generated on
the fly and folded, never more than one in memory. Peak RSS (VmHWM) of the child, fold and
finalize wall times, the bytes read back from the spool and the read throughput.

    python benchmarks/robust.py               # full run (~30 min on 2 idle cores), writes results/
    python benchmarks/robust.py --quick       # smoke run: 20 x 100k side by side, 20 x 1M spooled
    python benchmarks/robust.py --wait-idle 1800   # wait for other processes before each run
    python benchmarks/robust.py --big-threads 1    # part 2 with one BLAS/numba thread
    python benchmarks/robust.py --render results/robust.json   # re-write the .md and .png

Updates are seeded per client index: honest client i is ``base + sigma_i * noise_i`` with
``sigma_i = 0.5 + i / N`` (distinct Krum scores), the last f are Byzantine,
``-3 base + 0.5 noise_i`` (a scaled sign flip, tightly clustered).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from _common import (
    FLOWER_ENV,
    GIB,
    MIB,
    ForeignCpu,
    emit,
    machine_info,
    peak_rss,
    reset_peak,
    rss,
    run_child,
    set_flower_env,
    trim_heap,
    wait_for_idle,
)

set_flower_env()  # before anything can import flwr

import numpy as np  # noqa: E402

SEED = 2025
LAYERS = 10
BETA = 0.1  # trimmed fraction per side: Flower's beta, fedagg's b = int(BETA * N)
CC_TAU, CC_ITERS = 10.0, 3
SAMPLE = 4096  # coordinates kept from every update to check the spooled results
NOISY = 0.10  # other processes' CPU share above which a run is flagged (and retried)
ATTEMPTS = 3  # with --wait-idle: runs of a disturbed measurement before it is kept as is
NO_RETRY_S = 600  # ... unless it took longer than this
BUDGET_S = 5.0  # repeat a measurement while the repeats took less than this (max 3)
SPEEDUP_TARGET = 5.0
#: Set to K (with FEDAGG_BENCH_THREADS, which the report reads) for the "K threads" rows.
THREAD_VARS = (
    "OPENBLAS_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "OMP_NUM_THREADS",
    "FEDAGG_BENCH_THREADS",
)
RSS_TARGET = 3 * GIB

Result = dict[str, Any]

#: rule -> (fedagg label, Flower label or None)
RULES: dict[str, tuple[str, str | None]] = {
    "median": ("median()", "FedMedian `aggregate_median`"),
    "trimmed_mean": ("trimmed_mean(b=0.1N)", "FedTrimmedAvg `aggregate_trimmed_avg(β=0.1)`"),
    "krum": ("krum(f)", "Krum `aggregate_krum(f, to_keep=0)`"),
    "multi_krum": ("multi_krum(f, m=N−f)", "MultiKrum `aggregate_krum(f, to_keep=N−f)`"),
    "bulyan": ("bulyan(f)", "Bulyan `aggregate_bulyan(f, aggregate_krum)`"),
    "rfa": ("geometric_median() (RFA, 4 iters)", None),
    "cc": (f"centered_clipping(τ={CC_TAU:g}, {CC_ITERS} iters)", None),
    "flag": ("flag_aggregator() (m=⌈N/2⌉)", None),
}
SELECTING = ("krum", "multi_krum", "bulyan")
DISK_SMALL = ("median", "krum")  # part 1 rules also run with the disk spool
BIG_RULES = ("median", "krum", "trimmed_mean", "bulyan", "flag")


def sizes(quick: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """(N, M) of part 1 and of part 2."""
    return ((20, 100_000), (20, 1_000_000)) if quick else ((100, 1_000_000), (200, 25_000_000))


def byzantine(n: int) -> int:
    return n // 10


# -- inputs ------------------------------------------------------------------------------------


def base_vector(m: int) -> np.ndarray:
    return np.random.default_rng((SEED, 0)).standard_normal(m, dtype=np.float32)


def make_update(i: int, n: int, base: np.ndarray) -> np.ndarray:
    """Client ``i``'s update (flat float32), the same in every process; no model-sized temp."""
    x = np.random.default_rng((SEED, 1, i)).standard_normal(base.size, dtype=np.float32)
    if i >= n - byzantine(n):  # -3 base + 0.5 noise
        x *= np.float32(-1 / 6)
        x += base
        x *= np.float32(-3)
    else:  # base + sigma_i noise
        x *= np.float32(0.5 + i / n)
        x += base
    return x


def sample_index(m: int) -> np.ndarray:
    return np.sort(np.random.default_rng((SEED, 2)).choice(m, min(SAMPLE, m), replace=False))


# -- fedagg ------------------------------------------------------------------------------------


class CountingStore:
    """A RowStore wrapper counting the bytes read back and the time spent reading."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.read_bytes = 0
        self.read_s = 0.0

    @property
    def rows(self) -> int:
        return int(self.inner.rows)

    def append(self, segments: Sequence[np.ndarray]) -> None:
        self.inner.append(segments)

    def read(self, c0: int, c1: int, out: np.ndarray, rows: Sequence[int] | None = None) -> Any:
        t0 = time.perf_counter()
        res = self.inner.read(c0, c1, out, rows)
        self.read_s += time.perf_counter() - t0
        self.read_bytes += out.nbytes
        return res

    def close(self) -> None:
        self.inner.close()


def fedagg_rule(rule: str, n: int, spool: Any = None) -> Any:
    import fedagg

    a, f = fedagg.aggregators, byzantine(n)
    kw = {} if spool is None else {"spool": spool}
    make: dict[str, Callable[[], Any]] = {
        "median": lambda: a.median(**kw),
        "trimmed_mean": lambda: a.trimmed_mean(int(BETA * n), **kw),
        "krum": lambda: a.krum(f, **kw),
        "multi_krum": lambda: a.multi_krum(f, n - f, **kw),
        "bulyan": lambda: a.bulyan(f, **kw),
        "rfa": lambda: a.geometric_median(**kw),
        "cc": lambda: a.centered_clipping(CC_TAU, CC_ITERS, **kw),
        "flag": lambda: a.flag_aggregator(**kw),
    }
    return make[rule]()


def proc_io() -> dict[str, int]:
    """This process's storage I/O counters (bytes actually read from / written to disk)."""
    with open("/proc/self/io") as fh:
        kv = dict(line.split(": ") for line in fh.read().splitlines())
    return {"read": int(kv["read_bytes"]), "write": int(kv["write_bytes"])}


def child_fedagg(
    rule: str, n: int, m: int, spool_dir: str | None, out_path: str, single: bool
) -> Result:
    import fedagg

    stores: list[CountingStore] = []
    spool = None
    if spool_dir:
        disk = fedagg.spool.disk(spool_dir)

        def spool(d: int, dtype: Any) -> CountingStore:
            stores.append(CountingStore(disk(d, dtype)))
            return stores[-1]

    agg = fedagg_rule(rule, n, spool)
    spec = fedagg.ParamSpec.from_arrays([np.zeros(m // LAYERS, np.float32)] * LAYERS)

    # Warm up untimed (numba kernels compiled or loaded from cache, BLAS threads started).
    tiny = fedagg.ParamSpec.from_arrays([np.zeros(64, np.float32)])
    warm = fedagg_rule(rule, n)
    s = warm.init(tiny)
    for i in range(n):
        s = warm.fold(s, fedagg.Update(delta=make_update(i, n, np.ones(64, np.float32)), weight=1))
    warm.finalize_flat(s)
    del s

    base = base_vector(m)
    idx = sample_index(m)
    sample = np.empty((n, idx.size), np.float32)
    trim_heap()
    rss0 = rss()
    info: Result = {"side": "fedagg", "rule": rule, "n": n, "m": m, "f": byzantine(n)}
    info["spool"] = "disk" if spool_dir else "memory"
    info["threads"] = int(os.environ.get("FEDAGG_BENCH_THREADS", "0"))
    fold_t, fin_t, gen_t, fold_peaks, fin_peaks = [], [], [], [], []
    state = out = None
    with ForeignCpu() as foreign:
        while not fold_t or (
            not single and len(fold_t) < 3 and sum(fold_t) + sum(fin_t) < BUDGET_S
        ):
            state = out = None
            trim_heap()
            reset_peak()
            io0 = proc_io()
            tf = tg = 0.0
            state = agg.init(spec)
            for i in range(n):
                t0 = time.perf_counter()
                x = make_update(i, n, base)
                sample[i] = x[idx]
                t1 = time.perf_counter()
                state = agg.fold(state, fedagg.Update(delta=x, weight=1.0, client_id=f"c{i}"))
                tf += time.perf_counter() - t1
                tg += t1 - t0
                del x
            fold_peaks.append(peak_rss())
            io1 = proc_io()
            reset_peak()
            t0 = time.perf_counter()
            out = agg.finalize_flat(state)
            fin_t.append(time.perf_counter() - t0)
            fin_peaks.append(peak_rss())
            io2 = proc_io()
            fold_t.append(tf)
            gen_t.append(tg)
    times = [a + b for a, b in zip(fold_t, fin_t, strict=True)]
    best = int(np.argmin(times))
    spool_bytes = 0 if spool_dir else n * m * 4  # the in-memory spool holds one copy of each
    peak = max(max(fold_peaks), max(fin_peaks))
    info.update(
        times=times,
        best=times[best],
        fold_s=fold_t[best],
        finalize_s=fin_t[best],
        gen_s=gen_t[best],
        rss_base=rss0,
        peak_rss=peak,
        fold_peak_rss=max(fold_peaks),
        finalize_peak_rss=max(fin_peaks),
        above_base=peak - rss0,
        spool_bytes=spool_bytes,
        beyond_updates=peak - rss0 - spool_bytes,
        update_bytes=n * m * 4,
        foreign_cpu=foreign.share,
        disk_written=io1["write"] - io0["write"],
        disk_read_finalize=io2["read"] - io1["read"],
    )
    if stores:
        st = stores[-1]
        info.update(spool_read_bytes=st.read_bytes, spool_read_s=st.read_s)
    assert out is not None and state is not None
    info["sample_check"] = sample_check(rule, n, out[idx], sample)
    if rule in SELECTING and not single:  # an extra (untimed) pass: which updates were chosen
        info["selected"] = [int(i) for i in agg.select(state)]
    np.save(out_path, out)
    if spool_dir:
        state.store.close()
    return info


def sample_check(rule: str, n: int, got: np.ndarray, sample: np.ndarray) -> Result:
    """Check the result on the sampled coordinates against numpy (median, trimmed mean) or
    identify the chosen update (Krum)."""
    x = sample.astype(np.float64)
    if rule == "median":
        ref = np.median(x, axis=0).astype(np.float32)
    elif rule == "trimmed_mean":
        b = min(int(BETA * n), (n - 1) // 2)
        ref = np.sort(x, axis=0)[b : n - b].mean(axis=0).astype(np.float32)
    elif rule == "krum":
        hits = [i for i in range(n) if np.array_equal(sample[i], got)]
        return {"what": "result equals update #", "value": hits}
    else:
        return {}
    return {"what": "max ulps vs numpy on the sample", "value": max_ulps(got, ref)}


def max_ulps(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b) / np.spacing(np.abs(b))))


# -- Flower ------------------------------------------------------------------------------------


def child_flower(rule: str, n: int, m: int, out_path: str) -> Result:
    import flwr.server.strategy.aggregate as fa

    f = byzantine(n)
    t0 = time.perf_counter()
    base = base_vector(m)
    results = [(np.split(make_update(i, n, base), LAYERS), 1) for i in range(n)]
    del base
    gen_s = time.perf_counter() - t0

    # Record which updates Flower selects (cheap wrappers around its module-level helpers).
    picked: list[list[int]] = []
    ids = {id(w): i for i, (w, _) in enumerate(results)}
    if rule == "multi_krum":
        orig_aggregate = fa.aggregate

        def aggregate(res: list[tuple[Any, int]]) -> Any:
            picked.append([ids[id(w)] for w, _ in res])
            return orig_aggregate(res)

        fa.aggregate = aggregate  # type: ignore[assignment]
    if rule == "bulyan":
        orig_find = fa._find_reference_weights

        def find(ref: Any, weights: Any) -> int:
            j: int = orig_find(ref, weights)
            picked.append([ids[id(weights[j])]])
            return j

        fa._find_reference_weights = find  # type: ignore[assignment]

    run: dict[str, Callable[[], Any]] = {
        "median": lambda: fa.aggregate_median(results),
        "trimmed_mean": lambda: fa.aggregate_trimmed_avg(results, BETA),
        "krum": lambda: fa.aggregate_krum(results, f, 0),
        "multi_krum": lambda: fa.aggregate_krum(results, f, n - f),
        "bulyan": lambda: fa.aggregate_bulyan(
            list(results), f, aggregation_rule=fa.aggregate_krum, to_keep=0
        ),
    }
    trim_heap()
    rss0 = rss()
    reset_peak()
    times: list[float] = []
    out = None
    with ForeignCpu() as foreign:
        while not times or (len(times) < 3 and sum(times) < BUDGET_S):
            picked.clear()
            out = None
            t0 = time.perf_counter()
            out = run[rule]()
            times.append(time.perf_counter() - t0)
    peak = peak_rss()
    info: Result = {
        "side": "flower",
        "rule": rule,
        "n": n,
        "m": m,
        "f": f,
        "gen_s": gen_s,
        "times": times,
        "best": min(times),
        "rss_base": rss0,
        "peak_rss": peak,
        "above_base": peak - rss0,
        "beyond_updates": peak - rss0,  # the updates are in rss_base already
        "update_bytes": n * m * 4,
        "foreign_cpu": foreign.share,
    }
    assert out is not None
    if rule == "krum":
        info["selected"] = [next(i for i, (w, _) in enumerate(results) if w is out)]
    elif rule in SELECTING:
        info["selected"] = sorted(i for p in picked for i in p)
    np.save(out_path, np.concatenate(out).astype(np.float32))
    return info


# -- driver ------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def fmt_bytes(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if abs(b) >= GIB else f"{b / MIB:.0f} MiB"


def fmt_m(m: int) -> str:
    return f"{m // 1_000_000}M" if m >= 1_000_000 else f"{m // 1000}k"


def fmt_s(s: float) -> str:
    return f"{s:.3f}" if s < 10 else f"{s:.1f}"


def compare(a: np.ndarray, b: np.ndarray) -> Result:
    """fedagg's result ``a`` against Flower's ``b``."""
    diff = np.abs(a.astype(np.float64) - b)
    scale = np.abs(b).max()
    return {
        "max_rel_diff": float(diff.max() / scale),
        "max_ulps": max_ulps(a, b),
        "equal_frac": float(np.mean(a == b)),
        "n_diff": int(np.count_nonzero(diff > 1e-5 * scale)),  # more than a rounding apart
    }


def drive(args: argparse.Namespace) -> None:
    script = Path(__file__).resolve()
    out_dir = Path(args.out) if args.out else script.parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    (n1, m1), (n2, m2) = sizes(args.quick)
    tmp = Path(tempfile.mkdtemp(prefix="fedagg-robust-", dir=args.tmp))
    waited = 0.0

    def measure(child_args: list[str], threads: int = 0) -> Result:
        """Run a measuring child (``threads`` > 0: BLAS and numba limited to that many); with
        --wait-idle, once other processes are idle, re-run if it was disturbed anyway."""
        nonlocal waited
        r: Result = {}
        saved = {k: os.environ.pop(k, None) for k in THREAD_VARS}
        if threads:
            os.environ.update(dict.fromkeys(THREAD_VARS, str(threads)))
        try:
            for attempt in range(1, ATTEMPTS + 1 if args.wait_idle > 0 else 2):
                idle = True
                if args.wait_idle > 0:
                    w = wait_for_idle(args.wait_idle)
                    waited += w
                    idle = w < args.wait_idle
                    if w > 5:
                        log(f"  (waited {w:.0f}s for other processes to go idle)")
                t0 = time.perf_counter()
                r = run_child(script, child_args, timeout_s=4 * 3600)
                r["attempts"] = attempt
                if r["foreign_cpu"] <= NOISY or not idle or time.perf_counter() - t0 > NO_RETRY_S:
                    break
                log(f"  other processes took {r['foreign_cpu']:.0%} of the CPU (attempt {attempt})")
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None)
                if v is not None:
                    os.environ[k] = v
        return r

    # A terminated run still deletes its spool directory (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t_start = time.perf_counter()
    small: list[Result] = []
    big: list[Result] = []
    try:
        if args.part in ("all", "small"):
            for rule in RULES:
                fed = tmp / f"fedagg-{rule}.npy"
                r = measure(["--fedagg", rule, str(n1), str(m1), str(fed)])
                small.append(r)
                log(
                    f"N={n1} M={fmt_m(m1)} fedagg {rule}: {r['best']:.3f}s "
                    f"(fold {r['fold_s']:.3f} + finalize {r['finalize_s']:.3f}), peak "
                    f"{fmt_bytes(r['peak_rss'])}, beyond updates {fmt_bytes(r['beyond_updates'])}"
                )
                variants: list[tuple[list[str], int]] = [([], 1)]
                if rule in DISK_SMALL:
                    variants.append((["--spool", str(tmp)], 0))
                for extra, threads in variants:
                    path = str(tmp / f"fedagg-{rule}-v.npy")
                    d = measure(["--fedagg", rule, str(n1), str(m1), path, *extra], threads)
                    d["vs_memory"] = compare(np.load(path), np.load(fed))
                    small.append(d)
                    log(
                        f"N={n1} M={fmt_m(m1)} fedagg {rule} ({variant_label(d)}): "
                        f"{d['best']:.3f}s (fold {d['fold_s']:.3f} + finalize "
                        f"{d['finalize_s']:.3f}), peak {fmt_bytes(d['peak_rss'])}"
                    )
                if RULES[rule][1] is None:
                    continue
                flp = tmp / f"flower-{rule}.npy"
                fl = measure(["--flower", rule, str(n1), str(m1), str(flp)])
                r["vs_flower"] = fl["vs_fedagg"] = compare(np.load(fed), np.load(flp))
                if rule in SELECTING:
                    r["same_selection"] = r["selected"] == fl["selected"]
                small.append(fl)
                log(
                    f"N={n1} M={fmt_m(m1)} Flower {rule}: {fl['best']:.3f}s, peak "
                    f"{fmt_bytes(fl['peak_rss'])}, +{fmt_bytes(fl['above_base'])} over inputs; "
                    f"speed-up {fl['best'] / r['best']:.1f}x, max rel diff "
                    f"{r['vs_flower']['max_rel_diff']:.1e}"
                    + (f", same selection: {r['same_selection']}" if rule in SELECTING else "")
                )
        if args.part in ("all", "big"):
            free = shutil.disk_usage(tmp).free
            if free < 1.5 * n2 * m2 * 4:
                raise SystemExit(f"{tmp}: {free / 1e9:.0f} GB free, the spool needs more")
            for rule in BIG_RULES:
                path = str(tmp / f"big-{rule}.npy")
                r = measure(
                    ["--fedagg", rule, str(n2), str(m2), path, "--spool", str(tmp), "--single"],
                    args.big_threads,
                )
                Path(path).unlink()
                big.append(r)
                log(
                    f"N={n2} M={fmt_m(m2)} fedagg {rule} ({variant_label(r)}): "
                    f"fold {r['fold_s']:.1f}s + "
                    f"finalize {r['finalize_s']:.1f}s, peak RSS {fmt_bytes(r['peak_rss'])}, "
                    f"read {r['spool_read_bytes'] / 1e9:.1f} GB, "
                    f"{r['spool_read_bytes'] / r['finalize_s'] / 1e9:.3f} GB/s"
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    env = " ".join(f"{k}={v}" for k, v in FLOWER_ENV.items())
    argv = " ".join(["python", "benchmarks/robust.py", *sys.argv[1:]])
    report: Result = {
        "command": f"{env} {argv}",
        "machine": {**machine_info(), "flwr": flower_version()},
        "quick": args.quick,
        "small": {"n": n1, "m": m1, "f": byzantine(n1), "rows": small},
        "big": {"n": n2, "m": m2, "f": byzantine(n2), "rows": big},
        "wall_s": time.perf_counter() - t_start,
        "waited_s": waited,
    }
    write(report, out_dir)
    log(f"done in {report['wall_s'] / 60:.1f} min; wrote {out_dir}/robust.{{md,json,png}}")


def flower_version() -> str:
    from importlib.metadata import version

    return version("flwr")


# -- report ------------------------------------------------------------------------------------


def row(
    rows: list[Result], side: str, rule: str, spool: str = "memory", threads: int = 0
) -> Result | None:
    for r in rows:
        if (r["side"], r["rule"], r.get("spool", "memory"), r.get("threads", 0)) == (
            side,
            rule,
            spool,
            threads,
        ):
            return r
    return None


def variant_label(r: Result) -> str:
    """How a fedagg row was run: its spool, and its thread limit if any."""
    out = "disk spool" if r.get("spool") == "disk" else "memory spool"
    if r.get("threads"):
        out += f", {r['threads']} thread" + ("s" if r["threads"] > 1 else "")
    return out


def flower_need(report: Result, rule: str) -> float | None:
    """Flower's peak RSS for the part-2 size, extrapolated from its part-1 ratio
    (peak RSS above its inputs per input byte): inputs x (1 + ratio)."""
    fl = row(report["small"]["rows"], "flower", rule)
    if fl is None:
        return None
    big = report["big"]
    return float(big["n"] * big["m"] * 4 * (1 + fl["above_base"] / fl["update_bytes"]))


def targets(report: Result) -> list[Result]:
    out: list[Result] = []
    rows = report["small"]["rows"]
    n, m = report["small"]["n"], report["small"]["m"]
    for rule, threads in (("krum", 0), ("bulyan", 0), ("krum", 1), ("bulyan", 1)):
        fa, fl = row(rows, "fedagg", rule, "memory", threads), row(rows, "flower", rule)
        if fa is None or fl is None:
            continue
        ratio = fl["best"] / fa["best"]
        how = " (1 thread)" if threads else ""
        out.append(
            {
                "target": f"N={n}, M={fmt_m(m)}: fedagg {rule}{how} >= {SPEEDUP_TARGET:g}x "
                f"faster than Flower's {RULES[rule][1]}",
                "value": f"{ratio:.1f}x ({fl['best']:.2f}s vs {fa['best']:.2f}s)"
                + disturbed(fa, fl),
                "met": ratio >= SPEEDUP_TARGET,
            }
        )
    big = report["big"]
    if big["rows"]:
        worst = max(big["rows"], key=lambda r: r["peak_rss"])
        out.append(
            {
                "target": f"N={big['n']}, M={fmt_m(big['m'])} (disk spool): peak RSS < "
                f"{RSS_TARGET / GIB:g} GiB for every rule",
                "value": f"worst {fmt_bytes(worst['peak_rss'])} ({worst['rule']})",
                "met": worst["peak_rss"] < RSS_TARGET,
            }
        )
    return out


def disturbed(*rs: Result) -> str:
    worst = max(r["foreign_cpu"] for r in rs)
    return f" († other processes took {worst:.0%} of the CPU)" if worst > NOISY else ""


def dagger(r: Result) -> str:
    return " †" if r["foreign_cpu"] > NOISY else ""


def markdown(report: Result) -> str:
    mach = report["machine"]
    sm, big = report["small"], report["big"]
    all_rows = sm["rows"] + big["rows"]
    shares = [r["foreign_cpu"] for r in all_rows]
    noisy = sum(s > NOISY for s in shares)
    minutes = (report["wall_s"] - report["waited_s"]) / 60
    lines = [
        "# Byzantine-robust aggregation: fedagg vs Flower 1.42",
        "",
        f"- Command: `{report['command']}`: {minutes:.0f} min of measuring"
        + (
            f" (+{report['waited_s'] / 60:.0f} min waiting for other processes to go idle)"
            if report["waited_s"] > 60
            else ""
        ),
        f"- Date: {mach['date']}; fedagg git {mach['git']}",
        f"- CPU: {mach['model_name']} ({mach.get('hypervisor_vendor', '?')} guest), "
        f"{mach['cores']} cores, L3 {mach.get('l3_cache', '?')}, RAM {mach['ram_gib']} GiB, "
        f"Linux {mach['kernel']}",
        f"- Python {mach['python']}, numpy {mach['numpy']}, numba {mach['numba']} "
        f"({mach['numba_threads']} threads), flwr {mach['flwr']}",
        "- Other processes' share of the CPU during the measured sections: "
        + (
            f"median {statistics.median(shares):.0%}, max {max(shares):.0%}; "
            + (
                f"{noisy} rows (marked †) above {NOISY:.0%}: their times are inflated."
                if noisy
                else "the machine was otherwise idle."
            )
            if shares
            else "—"
        ),
        "",
    ]
    if sm["rows"]:
        lines += small_table(report)
    if big["rows"]:
        lines += big_table(report)
    lines += [
        "## Targets",
        "",
        *(
            f"- {'MET' if t['met'] else 'NOT MET'}: {t['target']}: {t['value']}"
            for t in targets(report)
        ),
        "",
    ]
    return "\n".join(lines)


def small_table(report: Result) -> list[str]:
    sm = report["small"]
    n, m, f = sm["n"], sm["m"], sm["f"]
    rows = sm["rows"]
    lines = [
        f"## N = {n} updates × M = {fmt_m(m)} float32 parameters, f = {f}",
        "",
        f"{n - f} honest updates `base + σᵢ·noise` (σᵢ = 0.5 + i/N) and {f} Byzantine ones "
        "`−3·base + 0.5·noise`, 10 equal layers. Each (side, rule) runs in a fresh process. "
        "fedagg: every `fold` as the updates arrive (each copied into the in-memory spool, or "
        "the disk spool) + `finalize_flat`; generating an update is not timed. Flower: the "
        "aggregate call on the prepared `[(ndarrays, 1)]` list. Time: best of up to 3 runs "
        f"(while they take < {BUDGET_S:g} s). *Peak RSS*: the process's VmHWM during the "
        "aggregation. *Working memory*: peak − RSS before aggregating − the updates themselves "
        f"({fmt_bytes(n * m * 4)}: Flower's input list, fedagg's in-memory spool; the disk "
        "spool keeps none in RAM). *Max rel diff*: max |fedagg − Flower| / max |Flower| over "
        "all coordinates (for the median also in float32 ulps of Flower's value). Rows "
        "*1 thread* ran fedagg with `OPENBLAS_NUM_THREADS=1 NUMBA_NUM_THREADS=1 "
        "OMP_NUM_THREADS=1`: by default its fold checks each update with a parallel numba "
        "kernel and its Gram matrix is one multi-threaded BLAS product, and both stall when "
        "other processes hold the cores (Flower's functions are single-threaded numpy); "
        "rows *disk spool* with `spool=fedagg.spool.disk(dir)`; both are compared with the "
        "default row above them.",
        "",
        "| rule | fedagg | Flower | fedagg s | Flower s | speed-up | fedagg fold + finalize s "
        "| fedagg peak RSS | Flower peak RSS | fedagg working mem | Flower working mem "
        "| max rel diff | same selection |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for rule, (fa_label, fl_label) in RULES.items():
        for spool, threads in (("memory", 0), ("memory", 1), ("disk", 0)):
            fa = row(rows, "fedagg", rule, spool, threads)
            if fa is None:
                continue
            fl = row(rows, "flower", rule)
            label = f"`{fa_label}`"
            if spool == "disk" or threads:
                label += f" ({variant_label(fa)})"
            label += dagger(fa)
            cmp = fa.get("vs_flower")
            same = spool == "disk" or threads > 0  # the Flower columns were given on the row above
            if same:
                v = fa["vs_memory"]
                cmp_s = f"{v['max_rel_diff']:.0e} vs the row above"
            elif cmp:
                cmp_s = f"{cmp['max_rel_diff']:.1e}"
                if rule == "median":
                    cmp_s += f" ({cmp['max_ulps']:.0f} ulp)"
                if cmp.get("n_diff"):
                    cmp_s += f" ({cmp['n_diff']} of {m:,} coords ‡)"
            else:
                cmp_s = "—"
            speedup = f"**{fl['best'] / fa['best']:.1f}×**" if fl else "—"
            sel = ""
            if rule in SELECTING and not same and fl is not None:
                sel = "yes" if fa.get("same_selection") else "**NO**"
                sel += f" ({len(fa['selected'])})"
            fl_name = (fl_label or "—") + (dagger(fl) if fl else "")
            lines.append(
                f"| {rule} | {label} | {'″' if same and fl else fl_name} "
                f"| {fmt_s(fa['best'])} | {fmt_s(fl['best']) if fl and not same else '—'} "
                f"| {speedup} "
                f"| {fmt_s(fa['fold_s'])} + {fmt_s(fa['finalize_s'])} "
                f"| {fmt_bytes(fa['peak_rss'])} "
                f"| {fmt_bytes(fl['peak_rss']) if fl and not same else '—'} "
                f"| {fmt_bytes(fa['beyond_updates'])} "
                f"| {fmt_bytes(fl['beyond_updates']) if fl and not same else '—'} "
                f"| {cmp_s} | {sel} |"
            )
    lines += [
        "",
        "Selections are compared as sets of update indices (Krum: the one chosen; Multi-Krum: "
        f"the N − f = {n - f} averaged; Bulyan: the θ = N − 2f = {n - 2 * f} picked by repeated "
        "Krum). fedagg computes in float64 and rounds once; Flower stays in float32 (medians "
        "and trimmed means differ by at most a rounding, Multi-Krum's mean by a few).",
        "",
        "‡ Coordinates more than 1e-5 (relative) apart. In Bulyan's last stage (per coordinate, "
        "the mean of the β = θ − 2f selected values closest to their median) these are near-ties: "
        "the β-th and (β+1)-th closest values are equally far from the median to within float32 "
        "rounding (e.g. 1.05157208 vs 1.05157209), so Flower's float32 distances and fedagg's "
        "float64 ones keep different values there; everywhere else the results agree to a "
        "rounding.",
        "",
    ]
    return lines


def big_table(report: Result) -> list[str]:
    big = report["big"]
    n, m, f = big["n"], big["m"], big["f"]
    gb = n * m * 4 / 1e9
    ram = report["machine"]["ram_gib"]
    lines = [
        f"## N = {n} × M = {fmt_m(m)} ({gb:.3g} GB of updates), disk spool, f = {f}",
        "",
        f"Each update is generated (seeded, not timed) and folded into "
        "`spool=fedagg.spool.disk(dir)` as it arrives, one at a time; then `finalize_flat` "
        "reads the spool back in coordinate blocks. One run per rule, each in a fresh process; "
        "*fold GB/s*: the updates' bytes ÷ fold time (copied to the spool file, which the "
        "kernel writes back to disk in the background). "
        "*Peak RSS* is the child's VmHWM over the whole run (fold and finalize), the update "
        f"being folded ({fmt_bytes(m * 4)}) and the common base vector of the generator "
        f"({fmt_bytes(m * 4)}) included. *Spool read*: bytes `finalize` read back from the "
        "spool; *GB/s*: those bytes ÷ finalize time (the whole finalize, compute included) and "
        "÷ the time spent in `store.read` alone; *from disk*: what the kernel actually fetched "
        "from storage during finalize (the rest came from the page cache).",
        "",
        "| rule | fold s | fold GB/s | finalize s | total s | peak RSS | peak while folding "
        "| peak in finalize | spool read | GB/s (finalize) | GB/s (store.read) | from disk "
        "| check |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in big["rows"]:
        chk = r.get("sample_check") or {}
        if chk.get("what", "").startswith("max ulps"):
            check = f"{chk['value']:.0f} ulps vs numpy on {SAMPLE} sampled coordinates"
        elif chk:
            check = "result = update #" + ", #".join(map(str, chk["value"]))
        else:
            check = ""
        rb = r["spool_read_bytes"]
        lines.append(
            f"| `{RULES[r['rule']][0]}`{dagger(r)}"
            + (f" ({r['threads']} thread)" if r.get("threads") else "")
            + f" | {r['fold_s']:.1f} | {r['update_bytes'] / r['fold_s'] / 1e9:.2f} "
            f"| {r['finalize_s']:.1f} "
            f"| {r['fold_s'] + r['finalize_s']:.1f} | **{fmt_bytes(r['peak_rss'])}** "
            f"| {fmt_bytes(r['fold_peak_rss'])} | {fmt_bytes(r['finalize_peak_rss'])} "
            f"| {rb / 1e9:.1f} GB | {rb / r['finalize_s'] / 1e9:.2f} "
            f"| {rb / max(r['spool_read_s'], 1e-9) / 1e9:.2f} "
            f"| {r['disk_read_finalize'] / 1e9:.1f} GB | {check} |"
        )
    needs = []
    for rule in dict.fromkeys(r["rule"] for r in big["rows"]):
        need = flower_need(report, rule)
        if need is None:
            continue
        where = (
            f"more than the machine's {ram} GiB"
            if need > ram * GIB
            else f"within {ram - need / GIB:.1f} GiB of all the machine's RAM, before the OS, "
            "the Python process and the serialized replies"
        )
        needs.append(f"{RULES[rule][1]} {need / (n * m * 4):.1f}× ≈ {need / GIB:.1f} GiB, " + where)
    fits = n * m * 4 * 2 < ram * GIB
    lines += [
        "",
        (
            "Smoke-run size: Flower fits here. At the full size (N = 200 × M = 25M, 20 GB) it "
            "cannot. "
            if fits
            else "**Flower cannot run this case here.** "
        )
        + f"Each of its aggregate functions takes all {n} updates as in-memory ndarrays: "
        f"{gb:.3g} GB ({n * m * 4 / GIB:.1f} GiB) resident before it starts, on a {ram} GiB "
        "machine without swap; a ServerApp receives them as serialized replies first (≥ 2× "
        "while converting). Each function's peak RSS, measured in the "
        f"N = {report['small']['n']} run as a multiple of its inputs and scaled to this size: "
        + ("; ".join(needs) if needs else "—")
        + ". (Krum, MultiKrum and Bulyan copy all updates into one matrix in "
        "`_compute_distances`; FedMedian and FedTrimmedAvg stack each layer with `np.asarray`.)"
        + ("" if fits else " It was not run: it would only exhaust the machine's memory."),
        "",
    ]
    return lines


def plot(report: Result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sm, big = report["small"], report["big"]
    panels = [p for p in (sm, big) if p["rows"]]
    fig, axes = plt.subplots(1, len(panels), figsize=(7.5 * len(panels), 5), squeeze=False)
    ax_list = list(axes[0])
    if sm["rows"]:
        ax = ax_list.pop(0)
        rules = [r for r in RULES if row(sm["rows"], "fedagg", r)]
        xs = np.arange(len(rules))
        w = 0.2
        series = (
            ("fedagg", "memory", 0, "fedagg"),
            ("fedagg", "memory", 1, "fedagg, 1 thread"),
            ("fedagg", "disk", 0, "fedagg, disk spool"),
            ("flower", "memory", 0, "Flower 1.42"),
        )
        for k, (side, spool, threads, label) in enumerate(series):
            pts = [(x, r["best"]) for x, rule in zip(xs, rules, strict=True)
                   if (r := row(sm["rows"], side, rule, spool, threads))]  # fmt: skip
            if pts:
                px, py = zip(*pts, strict=True)
                ax.bar(np.array(px) + (k - 1.5) * w, py, w, label=label)
        for x, rule in zip(xs, rules, strict=True):
            fa, fl = row(sm["rows"], "fedagg", rule), row(sm["rows"], "flower", rule)
            if fa and fl:
                ax.annotate(
                    f"{fl['best'] / fa['best']:.1f}×",
                    (x + 1.5 * w, fl["best"]),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                )
        ax.set_xticks(xs, rules, rotation=20)
        ax.set(
            yscale="log",
            ylabel="aggregation time (s), log scale",
            title=f"N = {sm['n']} × M = {fmt_m(sm['m'])} float32, f = {sm['f']} "
            "(labels: Flower ÷ fedagg)",
        )
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    if big["rows"]:
        ax = ax_list.pop(0)
        rules = [r["rule"] for r in big["rows"]]
        xs = np.arange(len(rules))
        fold = [r["fold_s"] for r in big["rows"]]
        fin = [r["finalize_s"] for r in big["rows"]]
        ax.bar(xs - 0.2, fold, 0.4, label="fold (write spool)")
        ax.bar(xs + 0.2, fin, 0.4, label="finalize (read spool in blocks)")
        for x, r in zip(xs, big["rows"], strict=True):
            ax.annotate(
                f"peak RSS\n{fmt_bytes(r['peak_rss'])}",
                (x + 0.2, r["finalize_s"]),
                ha="center",
                va="bottom",
                fontsize=8,
            )
        ax.set_xticks(xs, rules)
        ax.set(
            yscale="log",
            ylabel="wall time (s), log scale",
            title=f"fedagg, disk spool: N = {big['n']} × M = {fmt_m(big['m'])} "
            f"({big['n'] * big['m'] * 4 / 1e9:.0f} GB), f = {big['f']}; Flower cannot run",
        )
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        ax.margins(y=0.25)
    mach = report["machine"]
    fig.suptitle(f"Byzantine-robust aggregation, {mach['model_name']}, {mach['cores']} cores")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write(report: Result, out_dir: Path, name: str = "robust") -> None:
    report["targets"] = targets(report)
    (out_dir / f"{name}.json").write_text(json.dumps(report, indent=1))
    (out_dir / f"{name}.md").write_text(markdown(report))
    plot(report, out_dir / f"{name}.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 20 x 100k side by side, 20 x 1M spooled"
    )
    p.add_argument("--out", metavar="DIR", help="output directory (default: benchmarks/results)")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="S",
        help="before each measurement, wait up to S seconds for other processes to go idle",
    )
    p.add_argument(
        "--part", choices=("all", "small", "big"), default="all", help="run only one part"
    )
    p.add_argument(
        "--big-threads",
        type=int,
        default=0,
        metavar="K",
        help="part 2: limit fedagg's BLAS and numba threads to K (default: all cores)",
    )
    p.add_argument("--tmp", metavar="DIR", help="where to spool (default: the system temp dir)")
    p.add_argument("--render", metavar="JSON", help="only re-write the .md/.png of a .json")
    p.add_argument("--fedagg", nargs=4, metavar=("RULE", "N", "M", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--flower", nargs=4, metavar=("RULE", "N", "M", "OUT"), help=argparse.SUPPRESS)
    p.add_argument("--spool", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--single", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.fedagg:
        rule, n, m, out = args.fedagg
        emit(child_fedagg(rule, int(n), int(m), args.spool, out, args.single))
    elif args.flower:
        rule, n, m, out = args.flower
        emit(child_flower(rule, int(n), int(m), out))
    elif args.render:
        path = Path(args.render)
        report = json.loads(path.read_text())
        out = Path(args.out) if args.out else path.parent
        out.mkdir(parents=True, exist_ok=True)
        write(report, out, path.stem)
    else:
        drive(args)


if __name__ == "__main__":
    main()
