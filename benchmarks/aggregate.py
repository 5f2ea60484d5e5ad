"""Aggregation benchmark: fedagg's fold vs Flower 1.42's FedAvg vs the read-once memory bound.

For N in {10, 100, 1000} updates of M in {1M, 10M} float32 parameters (10 equal layers), it
times, side by side in one run, every method below in its own fresh process (so that peak RSS
is isolated), plus the read-once bound N*M*4 bytes / this machine's read bandwidth.

    python benchmarks/aggregate.py            # full run (~10 min on 2 cores), writes results/
    python benchmarks/aggregate.py --quick    # smoke run: N in {10, 100}, M = 1M
    python benchmarks/aggregate.py --out DIR  # write aggregate.{md,json,png} to DIR
    python benchmarks/aggregate.py --streaming  # (re)measure only the one-at-a-time section

Inputs are random float32 deltas in [-0.5, 0.5) with weights drawn from 10..1000. When all N
updates do not fit in RAM (N*M*4 > 8 GiB), a pool of 64 distinct updates (far larger than the
L3 cache) is cycled through instead and fed to fedagg in arriving batches of 64; Flower cannot
run there, as its API needs all N replies in memory at once.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable
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
    time_repeats,
    trim_heap,
    wait_for_idle,
)

set_flower_env()  # before anything can import flwr

import numpy as np  # noqa: E402

import _aggregate_stream  # noqa: E402

LAYERS = 10
SEED = 2025
POOL = 64
IN_RAM_LIMIT = 8 * GIB  # inputs larger than this are generated from a cycled pool
CHECK_N, CHECK_M = 50, 1_000_000
NOISE_BYTES = 1 * MIB  # RSS noise allowed on top of fedagg's 2-model state
NOISY = 0.10  # other processes' CPU share above which a row is flagged (and retried)
ATTEMPTS = 5  # with --wait-idle: runs of a disturbed measurement before it is kept as is

METHODS: dict[str, str] = {
    "fedagg_flat": "fedagg fold_many (flat buffers)",
    "fedagg_layers": "fedagg fold_many (10 layer arrays)",
    "fedagg_one": "fedagg fold (one at a time)",
    "flower_msg": "Flower FedAvg.aggregate_train (Message API)",
    "flower_legacy": "Flower legacy aggregate()",
    "flower_inplace": "Flower legacy aggregate_inplace()",
}
FEDAGG = ("fedagg_flat", "fedagg_layers", "fedagg_one")

Result = dict[str, Any]
Runner = Callable[..., Any]  # runs one aggregation; fedagg's takes an optional after_fold hook


# -- inputs ------------------------------------------------------------------------------------


def pool_size(n: int, m: int) -> int | None:
    """How many distinct updates to cycle through, or None when all N fit in RAM."""
    return POOL if n * m * 4 > IN_RAM_LIMIT else None


def layer_data(i: int, layer: int, size: int, out: np.ndarray | None = None) -> np.ndarray:
    """Layer ``layer`` of update ``i``: the same values whichever form the method needs."""
    rng = np.random.default_rng((SEED, i, layer))
    x = rng.random(dtype=np.float32, out=out) if out is not None else rng.random(size, np.float32)
    x -= np.float32(0.5)
    return x


def layers_of(i: int, m: int) -> list[np.ndarray]:
    return [layer_data(i, j, m // LAYERS) for j in range(LAYERS)]


def flat_of(i: int, m: int) -> np.ndarray:
    buf = np.empty(m, np.float32)
    size = m // LAYERS
    for j in range(LAYERS):
        layer_data(i, j, size, out=buf[j * size : (j + 1) * size])
    return buf


def weights(n: int) -> list[int]:
    return [int(w) for w in np.random.default_rng(SEED).integers(10, 1001, n)]


# -- methods: each returns a zero-argument runner over inputs built here ------------------------


def fedagg_runner(method: str, n: int, m: int, info: Result) -> Runner:
    import fedagg

    agg = fedagg.aggregators.mean()  # float32 accumulator, numba kernels, batch=64
    spec = fedagg.ParamSpec.from_arrays([np.empty(m // LAYERS, np.float32)] * LAYERS)

    pool = pool_size(n, m)
    k = pool or n
    bufs: list[Any] = [
        layers_of(i, m) if method == "fedagg_layers" else flat_of(i, m) for i in range(k)
    ]
    w = weights(n)
    updates = [fedagg.Update(delta=bufs[i % k], weight=w[i], client_id=str(i)) for i in range(n)]

    # Warm up the JIT (compile, or load from numba's cache) untimed, as round 1 of a real server
    # would: the kernels switch between serial and parallel variants by size, so warm up with
    # tiny updates and with real ones, one at a time and in a full batch.
    tiny = fedagg.ParamSpec.from_arrays([np.zeros(8, np.float32)] * LAYERS)
    small = [
        fedagg.Update(delta=np.ones(tiny.size, np.float32)),
        fedagg.Update(delta=[np.ones(8, np.float32)] * LAYERS),
    ]
    for sp, batch in ((tiny, small), (spec, updates[: agg.batch])):
        agg.finalize(agg.fold_many(agg.fold(agg.init(sp), batch[0]), batch))

    def run(after_fold: Callable[[], object] = lambda: None) -> Any:
        state = agg.init(spec)
        if method == "fedagg_one":
            for u in updates:
                state = agg.fold(state, u)
        elif pool:  # streaming: fold each batch as it arrives
            for lo in range(0, n, agg.batch):
                state = agg.fold_many(state, updates[lo : lo + agg.batch])
        else:
            state = agg.fold_many(state, updates)
        info["state_nbytes"] = state.nbytes()
        after_fold()
        return agg.finalize(state)

    return run


def flower_runner(method: str, n: int, m: int) -> Runner:
    w = weights(n)
    if method == "flower_msg":
        from flwr.app import (
            DEFAULT_TTL,
            ArrayRecord,
            Message,
            MessageType,
            Metadata,
            MetricRecord,
            RecordDict,
        )
        from flwr.serverapp.strategy import FedAvg

        replies = []
        for i in range(n):
            # What the ServerApp holds after receiving a reply: serialized .npy Arrays, a
            # MetricRecord with the weight, and reply metadata (as built from the wire).
            content = RecordDict(
                {
                    "arrays": ArrayRecord(layers_of(i, m)),
                    "metrics": MetricRecord({"num-examples": w[i]}),
                }
            )
            meta = Metadata(
                run_id=1,
                message_id=f"reply-{i}",
                src_node_id=i + 1,
                dst_node_id=0,
                reply_to_message_id=f"ins-{i}",
                group_id="1",
                created_at=time.time(),
                ttl=DEFAULT_TTL,
                message_type=MessageType.TRAIN,
            )
            replies.append(Message(content=content, metadata=meta))
        strategy = FedAvg()
        return lambda: strategy.aggregate_train(1, replies)
    if method == "flower_legacy":
        from flwr.server.strategy.aggregate import aggregate

        results = [(layers_of(i, m), w[i]) for i in range(n)]
        return lambda: aggregate(results)
    if method == "flower_inplace":
        from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
        from flwr.server.strategy.aggregate import aggregate_inplace

        ok = Status(code=Code.OK, message="")
        fit_results: list[Any] = [
            (None, FitRes(ok, ndarrays_to_parameters(layers_of(i, m)), w[i], {})) for i in range(n)
        ]
        return lambda: aggregate_inplace(fit_results)
    raise ValueError(method)


def to_layers(method: str, out: Any) -> list[np.ndarray]:
    """A method's result as a list of float arrays, layer by layer."""
    if method == "flower_msg":
        record = out[0]
        return [record[str(j)].numpy() for j in range(LAYERS)]
    return [np.asarray(a) for a in out]


# -- child modes -------------------------------------------------------------------------------


def child_one(method: str, n: int, m: int) -> Result:
    info: Result = {"method": method, "n": n, "m": m, "pool": pool_size(n, m)}
    t0 = time.perf_counter()
    run = fedagg_runner(method, n, m, info) if method in FEDAGG else flower_runner(method, n, m)
    info["gen_s"] = time.perf_counter() - t0
    trim_heap()
    base = rss()
    if method in FEDAGG:  # an untimed pass that splits fedagg's peak into fold and finalize
        reset_peak()
        fold_peak: list[int] = []
        run(lambda: fold_peak.append(peak_rss()))
        info["fold_above_inputs"] = fold_peak[0] - base
        trim_heap()
    reset_peak()
    big = info["pool"] is not None  # 40 GB of folding: one repeat
    with ForeignCpu() as foreign:
        times = time_repeats(
            run, min_reps=1 if big else 3, max_reps=1 if big else 9, budget_s=0 if big else 2.0
        )
    peak = peak_rss()
    model = m * 4
    info.update(
        times=times,
        best=min(times),
        median=statistics.median(times),
        rss_inputs=base,
        peak_rss=peak,
        above_inputs=peak - base,
        beyond_model=peak - base - model,
        model_bytes=model,
        process_maxrss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        foreign_cpu=foreign.share,
    )
    return info


def child_check() -> Result:
    """Every method on one small config, compared with a float64 reference and with Flower."""
    n, m = CHECK_N, CHECK_M
    w = np.array(weights(n), np.float64)
    ref = [np.zeros(m // LAYERS) for _ in range(LAYERS)]
    for i in range(n):
        for j, x in enumerate(layers_of(i, m)):
            ref[j] += w[i] * x
    ref = [r / w.sum() for r in ref]
    outs: dict[str, list[np.ndarray]] = {}
    for method in METHODS:
        info: Result = {}
        run = fedagg_runner(method, n, m, info) if method in FEDAGG else flower_runner(method, n, m)
        outs[method] = to_layers(method, run())

    def rel(a: list[np.ndarray], b: list[np.ndarray]) -> float:
        """max |a - b| / max |b| over all coordinates."""
        num = max(
            float(np.max(np.abs(x.astype(np.float64) - y))) for x, y in zip(a, b, strict=True)
        )
        return num / max(float(np.max(np.abs(y))) for y in b)

    flower = outs["flower_msg"]
    return {
        "n": n,
        "m": m,
        "vs_float64": {k: rel(v, ref) for k, v in outs.items()},
        "vs_flower_msg": {k: rel(v, flower) for k, v in outs.items()},
    }


# -- driver ------------------------------------------------------------------------------------


def fmt_bytes(b: float) -> str:
    return f"{b / GIB:.2f} GiB" if abs(b) >= GIB else f"{b / MIB:.0f} MiB"


def fmt_m(m: int) -> str:
    return f"{m // 1_000_000}M"


def drive(args: argparse.Namespace) -> None:
    script = Path(__file__).resolve()
    out_dir = Path(args.out) if args.out else script.parent / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    ns = (10, 100) if args.quick else (10, 100, 1000)
    ms = (1_000_000,) if args.quick else (1_000_000, 10_000_000)
    configs = [(n, m) for m in ms for n in ns]

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    waited = 0.0

    def measure(child_args: list[str]) -> Result:
        """Run a measuring child; with --wait-idle, on an idle machine (retried if disturbed)."""
        nonlocal waited
        for attempt in range(1, ATTEMPTS + 1 if args.wait_idle > 0 else 2):
            if args.wait_idle > 0:
                w = wait_for_idle(args.wait_idle)
                waited += w
                if w > 5:
                    log(f"  (waited {w:.0f}s for other processes to go idle)")
            r = run_child(script, child_args)
            r["attempts"] = attempt
            if r.get("foreign_cpu", 0.0) <= NOISY:
                break
            log(f"  other processes took {r['foreign_cpu']:.0%} of the CPU (attempt {attempt})")
        return r

    t_start = time.perf_counter()
    log("measuring read bandwidth")
    bw_runs = [measure(["--bandwidth"])]
    log(f"  {bw_runs[0]['numba'] / 1e9:.1f} GB/s (numba), {bw_runs[0]['numpy'] / 1e9:.1f} (numpy)")
    log("correctness check")
    check = run_child(script, ["--check"])
    rows: list[Result] = []
    for n, m in configs:
        for method, label in METHODS.items():
            if method not in FEDAGG and pool_size(n, m):
                gb = n * m * 4 / 1e9
                why = f"cannot run (needs all N={n} replies in RAM, ~{gb:.0f} GB)"
                rows.append({"method": method, "n": n, "m": m, "skipped": why})
                log(f"N={n} M={fmt_m(m)} {label}: {why}")
                continue
            r = measure(["--one", method, str(n), str(m)])
            rows.append(r)
            log(
                f"N={n} M={fmt_m(m)} {label}: best {r['best']:.4f}s median {r['median']:.4f}s, "
                f"peak {fmt_bytes(r['peak_rss'])}, +{fmt_bytes(r['above_inputs'])} over inputs"
            )
    log("measuring read bandwidth again")
    bw_runs.append(measure(["--bandwidth"]))
    bw = max(b["numba"] for b in bw_runs)
    bw_np = max(b["numpy"] for b in bw_runs)

    env = " ".join(f"{k}={v}" for k, v in FLOWER_ENV.items())
    argv = " ".join(["python", "benchmarks/aggregate.py", *sys.argv[1:]])
    report: Result = {
        "command": f"{env} {argv}",
        "machine": {**machine_info(), "flwr": flower_version()},
        "bandwidth": {"runs": bw_runs, "numba_Bps": bw, "numpy_Bps": bw_np},
        "check": check,
        "rows": rows,
        "wall_s": time.perf_counter() - t_start,
        "waited_s": waited,
    }
    write(report, out_dir)
    log(f"done in {report['wall_s']:.0f}s; wrote {out_dir}/aggregate.{{md,json,png}}")


def drive_streaming(args: argparse.Namespace) -> None:
    """Measure the one-at-a-time section into the existing report (the main table stays)."""
    script = Path(__file__).resolve()
    out_dir = Path(args.out) if args.out else script.parent / "results"
    report = json.loads((out_dir / "aggregate.json").read_text())

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def measure(child_args: list[str]) -> Result:
        if args.wait_idle > 0:
            wait_for_idle(args.wait_idle)
        return run_child(script, child_args)

    only = set(args.stream_methods.split(",")) if args.stream_methods else None
    section = _aggregate_stream.drive(measure, log, only, report.get("streaming"))
    if only is not None:
        section["command_extra"] = f" --stream-methods {args.stream_methods}"
    section["machine"] = {**machine_info(), "flwr": flower_version()}
    report["streaming"] = section
    write(report, out_dir)
    log(f"done in {section['wall_s']:.0f}s; wrote {out_dir}/aggregate.{{md,json,png}}")


def write(report: Result, out_dir: Path) -> None:
    """Write aggregate.{json,md,png} from a report (fresh, or re-read with --render)."""
    configs = list(dict.fromkeys((r["n"], r["m"]) for r in report["rows"]))
    report.setdefault("waited_s", 0.0)
    report["targets"] = targets(report)
    (out_dir / "aggregate.json").write_text(json.dumps(report, indent=1))
    (out_dir / "aggregate.md").write_text(markdown(report, configs))
    plot(report, configs, out_dir / "aggregate.png")


def flower_version() -> str:
    from importlib.metadata import version

    return version("flwr")


def find(report: Result, method: str, n: int, m: int) -> Result | None:
    for r in report["rows"]:
        if (r["method"], r["n"], r["m"]) == (method, n, m) and "skipped" not in r:
            return r
    return None


def targets(report: Result) -> list[Result]:
    bw = report["bandwidth"]["numba_Bps"]
    out: list[Result] = []
    n, m = 100, 10_000_000
    fa, fl = find(report, "fedagg_flat", n, m), find(report, "flower_msg", n, m)

    def disturbed(*rs: Result) -> str:
        worst = max(r["foreign_cpu"] for r in rs)
        return f" († other processes took {worst:.0%} of the CPU)" if worst > NOISY else ""

    if fa is not None:
        ratio = fa["best"] / (n * m * 4 / bw)
        out.append(
            {
                "target": "N=100, M=10M: fedagg fold_many <= 1.5x the read-once bound",
                "value": f"{ratio:.2f}x ({fa['best']:.3f}s vs {n * m * 4 / bw:.3f}s)"
                + disturbed(fa),
                "met": ratio <= 1.5,
            }
        )
    if fa is not None and fl is not None:
        ratio = fl["best"] / fa["best"]
        out.append(
            {
                "target": "N=100, M=10M: fedagg fold_many >= 4x faster than "
                "Flower FedAvg.aggregate_train",
                "value": f"{ratio:.1f}x ({fl['best']:.3f}s vs {fa['best']:.3f}s)"
                + disturbed(fa, fl),
                "met": ratio >= 4,
            }
        )
    fed = [r for r in report["rows"] if r["method"] in FEDAGG and "skipped" not in r]
    if fed:
        # state.nbytes() must fit in 2 models; the measured RSS growth may add NOISE_BYTES of
        # process noise (Python objects, allocator slack). Phases: folding (the state only),
        # then the whole aggregation, finalize included, less the one model it returns.
        state = max(r["state_nbytes"] / r["model_bytes"] for r in fed)
        phases = (
            ("while folding", lambda r: float(r["fold_above_inputs"])),
            ("whole aggregation, finalize included", lambda r: float(r["beyond_model"])),
        )
        for phase, beyond in phases:
            per_method = []
            worst_over = -math.inf
            for method in FEDAGG:
                rows = [r for r in fed if r["method"] == method]
                w = max(rows, key=lambda r: beyond(r) - 2 * r["model_bytes"])
                extra = beyond(w) - 2 * w["model_bytes"]
                worst_over = max(worst_over, extra)
                per_method.append(
                    f"{METHODS[method]} {beyond(w) / w['model_bytes']:.2f}x "
                    f"({extra / MIB:+.2f} MiB vs 2 models, N={w['n']}, M={fmt_m(w['m'])})"
                )
            out.append(
                {
                    "target": f"fedagg memory beyond the model <= 2x model size, all N, {phase} "
                    f"(<= {NOISE_BYTES // MIB} MiB of measurement noise allowed)",
                    "value": f"state.nbytes() = {state:.2f}x; worst measured: "
                    + "; ".join(per_method),
                    "met": state <= 2.0 and worst_over <= NOISE_BYTES,
                }
            )
    if "streaming" in report:
        out += _aggregate_stream.targets(report["streaming"])
    return out


def markdown(report: Result, configs: list[tuple[int, int]]) -> str:
    mach, bw = report["machine"], report["bandwidth"]
    bps, bps_np = bw["numba_Bps"], bw["numpy_Bps"]
    runs = ", ".join(f"{b['numba'] / 1e9:.1f}" for b in bw["runs"])
    lines = [
        "# Aggregation: fedagg fold vs Flower 1.42 FedAvg vs the read-once bound",
        "",
        f"- Command: `{report['command']}` (or `make bench`): "
        f"{(report['wall_s'] - report['waited_s']) / 60:.1f} min of measuring"
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
        f"- Read bandwidth: **{bps / 1e9:.1f} GB/s** (numba multi-threaded read kernel, best of "
        f"{int(bw['runs'][0]['repeats'])} over a {bw['runs'][0]['buffer_bytes'] / GIB:.0f} GiB "
        f"float32 buffer; runs at start/end: {runs} GB/s); numpy `x.sum()` 1 thread: "
        f"{bps_np / 1e9:.1f} GB/s",
        "- Read-once bound = N·M·4 bytes ÷ read bandwidth. Updates are random float32, 10 equal "
        "layers, weights 10..1000. Every (config, method) runs in a fresh process; time is the "
        "whole aggregation (fedagg: `init` + `fold_many`/`fold` + `finalize`; Flower: "
        "`aggregate_train`/`aggregate`, not message construction).",
        "- Memory: *peak* is the process's peak RSS during aggregation; *above inputs* = peak − "
        "RSS right after the inputs were built; *beyond model* = above inputs − one model "
        "(the aggregate itself), in units of the model size; *… while folding*: fedagg's RSS "
        "growth up to the end of its folds, before `finalize` (an untimed extra pass). "
        "fedagg folds updates as they arrive "
        "and needs none of them after; every Flower API needs all N updates in memory at once.",
        foreign_line(report),
        "",
        "| N | M | method | inputs | best s | median s | reps | ÷ bound | ÷ fedagg flat "
        "| peak RSS | above inputs | beyond model | … while folding |",
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n, m in configs:
        bound = n * m * 4 / bps
        base = find(report, "fedagg_flat", n, m)
        pool = pool_size(n, m)
        src = f"pool of {pool}, cycled" if pool else "all N in RAM"
        lines.append(
            f"| {n} | {fmt_m(m)} | **read-once bound** ({bps / 1e9:.1f} GB/s) | | "
            f"**{bound:.4f}** | | | 1.00 | | | | | |"
        )
        lines.append(
            f"| {n} | {fmt_m(m)} | numpy `x.sum()` 1 thread ({bps_np / 1e9:.1f} GB/s) | | "
            f"{n * m * 4 / bps_np:.4f} | | | {bps / bps_np:.2f} | | | | | |"
        )
        for method, label in METHODS.items():
            r = next(r for r in report["rows"] if (r["method"], r["n"], r["m"]) == (method, n, m))
            if "skipped" in r:
                lines.append(f"| {n} | {fmt_m(m)} | {label} | — | {r['skipped']} ||||||||")
                continue
            rel = f"{r['best'] / base['best']:.2f}" if base and method != "fedagg_flat" else ""
            how = src + (" (batches of 64)" if pool and method != "fedagg_one" else "")
            fold = f"{r['fold_above_inputs'] / r['model_bytes']:.2f}×" if method in FEDAGG else ""
            if r["foreign_cpu"] > NOISY:
                label += " †"
            lines.append(
                f"| {n} | {fmt_m(m)} | {label} | {how} | {r['best']:.4f} | {r['median']:.4f} | "
                f"{len(r['times'])} | {r['best'] / bound:.2f} | {rel} | "
                f"{fmt_bytes(r['peak_rss'])} | {fmt_bytes(r['above_inputs'])} | "
                f"{r['beyond_model'] / r['model_bytes']:.2f}× | {fold} |"
            )
    chk = report["check"]
    lines += [
        "",
        "## Targets",
        "",
        *(
            f"- {'MET' if t['met'] else 'NOT MET'}: {t['target']}: {t['value']}"
            for t in report["targets"]
        ),
        "",
        f"## Correctness (N={chk['n']}, M={fmt_m(chk['m'])})",
        "",
        "max |a − b| / max |b| over all coordinates, against a float64 reference and against "
        "Flower's `FedAvg.aggregate_train`:",
        "",
        "| method | vs float64 | vs Flower aggregate_train | within 1e-5 of Flower |",
        "|---|---:|---:|---|",
    ]
    for method, label in METHODS.items():
        a, b = chk["vs_float64"][method], chk["vs_flower_msg"][method]
        lines.append(f"| {label} | {a:.1e} | {b:.1e} | {'yes' if b <= 1e-5 else 'NO'} |")
    if "streaming" in report:
        lines += _aggregate_stream.markdown(report["streaming"])
    lines.append("")
    return "\n".join(lines)


def foreign_line(report: Result) -> str:
    shares = [r["foreign_cpu"] for r in report["rows"] if "skipped" not in r]
    noisy = sum(x > NOISY for x in shares)
    return (
        f"- Other processes' share of the CPU during the timed sections: median "
        f"{statistics.median(shares):.0%}, max {max(shares):.0%}; "
        + (
            f"{noisy} rows (marked †) above {NOISY:.0%}: their times are inflated."
            if noisy
            else "the machine was otherwise idle."
        )
    )


def plot(report: Result, configs: list[tuple[int, int]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ms = sorted({m for _, m in configs}, reverse=True)
    extra = 1 if "streaming" in report else 0
    fig, axes = plt.subplots(
        1, len(ms) + extra, figsize=(6.5 * (len(ms) + extra), 5), squeeze=False
    )
    bps = report["bandwidth"]["numba_Bps"]
    if extra:
        _aggregate_stream.plot(report["streaming"], axes[0][-1])
    for ax, m in zip(axes[0], ms, strict=False):
        ns = sorted(n for n, mm in configs if mm == m)
        ax.plot(ns, [n * m * 4 / bps for n in ns], "k--", lw=2, label="read-once bound")
        for method, label in METHODS.items():
            pts = [(r["n"], r["best"]) for n in ns if (r := find(report, method, n, m))]
            if pts:
                style = "-o" if method in FEDAGG else "-s"
                ax.plot(*zip(*pts, strict=True), style, label=label, ms=5)
            noisy = [
                (r["n"], r["best"])
                for n in ns
                if (r := find(report, method, n, m)) and r["foreign_cpu"] > NOISY
            ]
            if noisy:
                ax.plot(*zip(*noisy, strict=True), "x", color="red", ms=10)
        for n in ns:
            if pool_size(n, m):
                ax.annotate(
                    f"N={n}: pool of {POOL}",
                    (n, n * m * 4 / bps),
                    fontsize=8,
                    xytext=(-90, 12),
                    textcoords="offset points",
                )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="N updates",
            ylabel="best time (s)",
            title=f"M = {fmt_m(m)} float32 params (10 layers)",
        )
        ax.grid(True, which="both", alpha=0.3)
        disturbed = any(r.get("foreign_cpu", 0) > NOISY for r in report["rows"])
        title = "red x: run disturbed by other processes" if disturbed else None
        ax.legend(fontsize=7, title=title, title_fontsize=7)
    fig.suptitle(
        f"Weighted-mean aggregation, {report['machine']['model_name']}, "
        f"{report['machine']['cores']} cores, read {bps / 1e9:.1f} GB/s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: N in {10, 100}, M = 1M")
    p.add_argument("--out", metavar="DIR", help="output directory (default: benchmarks/results)")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="S",
        help="before each measurement, wait up to S seconds for other processes to go idle",
    )
    p.add_argument("--render", metavar="JSON", help="only re-write the .md/.png of a .json")
    p.add_argument(
        "--streaming",
        action="store_true",
        help="measure only the one-at-a-time section, into the existing aggregate.json",
    )
    p.add_argument(
        "--stream-methods",
        metavar="M,M",
        help="with --streaming: re-measure only these rows (stream, stream_undo1, stream_undo, "
        "prebuilt, flower_msg); the others are kept from aggregate.json, marked",
    )
    p.add_argument("--one", nargs=3, metavar=("METHOD", "N", "M"), help=argparse.SUPPRESS)
    p.add_argument("--stream-one", nargs=3, metavar=("METHOD", "N", "M"), help=argparse.SUPPRESS)
    p.add_argument("--bandwidth", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        method, n, m = args.one
        emit(child_one(method, int(n), int(m)))
    elif args.stream_one:
        method, n, m = args.stream_one
        emit(
            _aggregate_stream.child(
                method,
                int(n),
                int(m),
                layers_of=layers_of,
                weights=weights,
                flower_runner=flower_runner,
            )
        )
    elif args.streaming:
        drive_streaming(args)
    elif args.bandwidth:
        from _common import measure_bandwidth

        emit(measure_bandwidth())
    elif args.check:
        emit(child_check())
    elif args.render:
        path = Path(args.render)
        write(json.loads(path.read_text()), Path(args.out) if args.out else path.parent)
    else:
        drive(args)


if __name__ == "__main__":
    main()
