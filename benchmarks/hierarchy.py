"""Hierarchy benchmark: one host's aggregation data plane, and a 1M-client round projection.

Side by side in one run, on a float32 model of M parameters (default 16M = 64 MiB) and N
updates (default 24, cycled from a pool of 8 distinct ones, far larger than the L3 cache):

a. shared-memory plane (``ShmAggregator``) throughput vs shards S in {1, 2, 4} with 1 and 2
   worker processes (with S > W a worker owns several shards), next to the in-process fold
   (``fedagg.aggregators.mean``, one core), the workers' validated fold alone
   (``fold_validated``, one core) and the machine's read bandwidth;
b. partial-state merges along trees of fan-out 2..64 (``fedagg.core.tree.reduce_tree``, in
   process), and a parent merging child partials through the shared-memory plane;
c. shared memory vs a Unix-socket hand-off (``SocketAggregator``) and sharded TCP flows
   (``ShardReceiver`` / ``ShardSender``), same model, same updates;
d. a measured-then-modelled round time for 1,000,000 clients through a 3-level tree.

    python benchmarks/hierarchy.py              # full run (~3 min on 2 cores)
    python benchmarks/hierarchy.py --quick      # smoke run: M = 4M, N = 8
    python benchmarks/hierarchy.py --render results/hierarchy.json   # re-write .md/.png

Throughput counts update bytes folded: N * M * 4 / (time from the first submit until every
worker has folded the last update). Every figure is the best of ``--reps`` runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, Literal

import numba
import numpy as np

import fedagg
from _common import GIB, MIB, ForeignCpu, machine_info, measure_bandwidth, wait_for_idle
from _sockets import ShardReceiver, ShardSender, SocketAggregator
from fedagg.core import tree
from fedagg.plane import ShmAggregator, copy_peak, fold_validated, peak

Result = dict[str, Any]
SEED = 2025
POOL = 8
IN_PLACE = "shm, arrives in the slot"
INPROC = "in-process fold"
INPROC_FAST = "in-process validated fold"
NOISY = 0.10


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_pool(m: int, k: int) -> list[np.ndarray]:
    out = []
    for i in range(k):
        x = np.random.default_rng((SEED, i)).random(m, dtype=np.float32)
        x -= np.float32(0.5)
        out.append(x)
    return out


def weights(n: int) -> list[float]:
    return [float(w) for w in np.random.default_rng(SEED).integers(10, 1001, n)]


def _cpu_s(pids: list[int]) -> float:
    """CPU seconds used so far by processes ``pids`` (our workers), from /proc."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        except (OSError, IndexError, ValueError):
            continue
    return total / os.sysconf("SC_CLK_TCK")


def best_of(
    fn: Callable[[], float], reps: int, svc: Any = None
) -> tuple[float, list[float], float]:
    """(best, all, other processes' CPU share) of ``reps`` timed runs; ``fn`` returns its own
    time. The CPU share excludes this process and ``svc``'s workers."""
    pids = [p.pid for p in getattr(svc, "_procs", [])]
    t0, c0 = time.perf_counter(), _cpu_s(pids)
    with ForeignCpu() as f:
        ts = [fn() for _ in range(reps)]
    ours = (_cpu_s(pids) - c0) / ((time.perf_counter() - t0) * (os.cpu_count() or 1))
    return min(ts), ts, max(0.0, f.share - ours)


def spec_of(m: int) -> fedagg.ParamSpec:
    return fedagg.ParamSpec.from_arrays([np.zeros(m, np.float32)])


# -- a / c: data planes ------------------------------------------------------------------------


def time_service(
    svc: Any, pool: list[np.ndarray], n: int, reps: int, lease: bool = False
) -> tuple[float, list[float], float]:
    ws = weights(n)

    def one() -> float:
        svc.reset()
        t0 = time.perf_counter()
        for i in range(n):
            svc.submit(pool[i % len(pool)], ws[i])
        svc.flush()
        return time.perf_counter() - t0

    def in_place() -> float:
        """The update arrives in the slot (as a ``recv_into`` would put it): hand-off only."""
        svc.reset()
        t0 = time.perf_counter()
        for i in range(n):
            svc.commit(svc.lease(), ws[i])
        svc.flush()
        return time.perf_counter() - t0

    for i in range(4):  # warm-up: kernels loaded, pages mapped, every slot holds an update
        svc.submit(pool[i], 1.0)
    svc.flush()
    return best_of(in_place if lease else one, reps, svc)


def time_tcp(
    rx: ShardReceiver, spec: fedagg.ParamSpec, pool: list[np.ndarray], n: int, reps: int
) -> tuple[float, list[float], float]:
    ws = weights(n)

    def round_(k: int) -> float:
        errors: list[BaseException] = []

        def send() -> None:
            try:
                with ShardSender(rx.addrs, spec) as s:
                    for i in range(k):
                        s.send(pool[i % len(pool)], ws[i])
            except BaseException as e:
                errors.append(e)

        rx.reset()
        t0 = time.perf_counter()
        th = threading.Thread(target=send)
        th.start()
        res = rx.wait(k, timeout=120)
        th.join()
        dt = time.perf_counter() - t0
        if errors or any(e is not None for _, e in res):
            raise RuntimeError(f"TCP round failed: {errors} {res[:2]}")
        return dt

    round_(2)
    return best_of(lambda: round_(n), reps, rx)


def in_process(
    spec: fedagg.ParamSpec, pool: list[np.ndarray], n: int, reps: int, validated: bool = False
) -> tuple[float, list[float], float]:
    """One core (numba limited to one thread), one update at a time: ``Mean.fold`` (checked:
    undo copy and finiteness test), or the shared-memory workers' ``fold_validated``."""
    agg = fedagg.aggregators.mean()
    ws = weights(n)

    def fold(st: Any, i: int) -> None:
        x = pool[i % len(pool)]
        if validated:
            fold_validated(st, [x], [ws[i]], [1.0])
        else:
            agg.fold(st, fedagg.Update(delta=x, weight=ws[i]))

    def one() -> float:
        st = agg.init(spec)
        t0 = time.perf_counter()
        for i in range(n):
            fold(st, i)
        return time.perf_counter() - t0

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        fold(agg.init(spec), 0)
        return best_of(one, reps)
    finally:
        numba.set_num_threads(threads)


def receiver_passes(pool: list[np.ndarray], n: int, reps: int) -> Result:
    """The receiver's own pass alone, one core: ``copy_peak`` of an update into one of 4
    reused slot-sized buffers (``submit``), and ``peak`` of a slot (``commit``), in GB/s."""
    slots = [x.copy() for x in pool[:4]]  # reused, pages already mapped
    out: Result = {}
    for name, fn in (
        ("copy_peak", lambda i: copy_peak(slots[i % 4], pool[i % len(pool)])),
        ("peak", lambda i: peak(slots[i % 4])),
    ):
        fn(0)

        def one(fn: Callable[[int], object] = fn) -> float:
            t0 = time.perf_counter()
            for i in range(n):
                fn(i)
            return time.perf_counter() - t0

        best, _, foreign = best_of(one, reps)
        out[name] = {"GBps": n * pool[0].nbytes / best / 1e9, "foreign_cpu": foreign}
    return out


def fold_paths(svc: Any, run: Callable[[], Any]) -> tuple[Any, list[dict[str, int]]]:
    """``run()``'s result, and per worker the updates folded during it by the validated fast
    path (and in how many blocked passes) and by the checked path."""
    before = svc._fold_stats()
    res = run()
    after = svc._fold_stats()
    return res, [{k: a[k] - b[k] for k in a} for a, b in zip(after, before, strict=True)]


def check_equal(m: int) -> Result:
    """Every plane's result vs the in-process fold, bit for bit (small model, 6 updates)."""
    spec = spec_of(m)
    pool = make_pool(m, 6)
    ws = weights(6)
    out: Result = {}
    accs: tuple[Literal["float32"], Literal["float64"]] = ("float32", "float64")
    for acc in accs:
        agg = fedagg.aggregators.mean(acc)
        st = agg.init(spec)
        for x, w in zip(pool, ws, strict=True):
            agg.fold(st, fedagg.Update(delta=x, weight=w))
        ref = agg.finalize_flat(st).tobytes()
        with ShmAggregator(spec, shards=4, workers=2, accumulator=acc) as sa:
            for x, w in zip(pool, ws, strict=True):
                sa.submit(x, w)
            out[f"shm S=4 W=2 {acc}"] = sa.finalize_flat().tobytes() == ref
        with SocketAggregator(spec, shards=2, accumulator=acc) as so:
            for x, w in zip(pool, ws, strict=True):
                so.submit(x, w)
            out[f"unix S=2 {acc}"] = so.finalize_flat().tobytes() == ref
        with ShardReceiver(spec, shards=2, accumulator=acc) as rx:

            def send(rx: ShardReceiver = rx) -> None:
                with ShardSender(rx.addrs, spec) as snd:
                    for x, w in zip(pool, ws, strict=True):
                        snd.send(x, w)

            th = threading.Thread(target=send)
            th.start()
            rx.wait(len(pool))
            th.join()
            out[f"tcp S=2 {acc}"] = rx.finalize_flat().tobytes() == ref
    return out


# -- b: trees of partial states ----------------------------------------------------------------


def tree_bench(m: int, leaves: int, fanouts: list[int], reps: int) -> Result:
    spec = spec_of(m)
    agg = fedagg.aggregators.mean()
    x = make_pool(m, 1)[0]
    base = agg.fold(agg.init(spec), fedagg.Update(delta=x, weight=3.0))

    def copies() -> list[Any]:
        out = []
        for _ in range(leaves):
            s = agg.init(spec)
            s.acc[...] = base.acc
            s.weight, s.count = base.weight, base.count
            out.append(s)
        return out

    # the cost of one merge (acc += other.acc with the overflow check and undo copy)
    a, b = copies()[:2]
    agg.merge(a, b)
    t_merge = min(_timed(lambda: agg.merge(a, b)) for _ in range(5))
    rows = []
    for f in fanouts:
        ts = []
        for _ in range(reps):
            states = copies()
            t0 = time.perf_counter()
            tree.reduce_tree(agg, states, fanout=f)
            ts.append(time.perf_counter() - t0)
            del states
        depth = math.ceil(math.log(leaves, f) - 1e-9)
        rows.append(
            {
                "fanout": f,
                "depth": depth,
                "merges": leaves - 1,
                "serial_s": min(ts),
                "critical_path_merges": depth * (f - 1),
                "critical_path_s": depth * (f - 1) * t_merge,
            }
        )
    return {"m": m, "leaves": leaves, "t_merge_s": t_merge, "rows": rows}


def shm_merge_rate(m: int, k: int, shards: int, workers: int, reps: int) -> Result:
    """A parent merging ``k`` child partials through the shared-memory plane."""
    spec = spec_of(m)
    agg = fedagg.aggregators.mean()
    part = agg.fold(agg.init(spec), fedagg.Update(delta=make_pool(m, 1)[0], weight=3.0))
    with ShmAggregator(spec, shards=shards, workers=workers, partials=True) as sa:
        sa.merge(part)
        sa.flush()

        def one() -> float:
            sa.reset()
            t0 = time.perf_counter()
            for _ in range(k):
                sa.merge(part)
            sa.flush()
            return time.perf_counter() - t0

        best, ts, foreign = best_of(one, reps, sa)
    return {
        "m": m,
        "partials": k,
        "shards": shards,
        "workers": workers,
        "best_s": best,
        "times": ts,
        "foreign_cpu": foreign,
        "GBps": k * m * 4 / best / 1e9,
    }


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


# -- d: the model ------------------------------------------------------------------------------

LINKS_GBPS = (10.0, 100.0)
CLIENTS, EDGES, INTERMEDIATES = 1_000_000, 1000, 32


def grpc_rates(path: Path = Path(__file__).parent / "results" / "transport.json") -> Result:
    """The deployed edge's ingest rate (update bytes/s through fedagg's gRPC server, folded),
    as ``benchmarks/transport.py`` measured it: 100 clients x 10M params pushing at once, with
    the settings of before issue 20 (TLS, signed sha256, fsync before each ack, spool) and
    the secure ones of after (TLS, signed BLAKE3, retained, fold); for the latter also the
    rate per second of the server's own CPU (what an edge whose clients are on other hosts
    would reach on one core: client and server share this machine's 2 cores); and the best
    1 GiB upload without TLS, digest or fsync (steady state)."""
    try:
        t = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    out: Result = {
        "grpc_from": f"`{t.get('command', '?')}` ({t.get('machine', {}).get('date', '?')})"
    }
    for r in t.get("many", []):
        if r.get("clients") != 100:
            continue
        rate = r.get("ingest_Bps") or r["clients"] * r["params"] * 4 / statistics.median(
            r["round_s"]
        )  # (a file of before the push window was measured: the round time)
        if not r.get("options"):
            out["grpc_default_Bps"] = rate
        else:
            out["grpc_secure_Bps"] = rate
            if r.get("ingest_Bps_per_server_core"):
                out["grpc_secure_core_Bps"] = r["ingest_Bps_per_server_core"]
    every = [u for u in t.get("plane", []) if "error" not in u and u["clients"] == 1]
    plane = [u for u in every if u["options"].get("transport", "grpc") == "grpc"]
    stream = [u for u in every if u["options"].get("transport") == "stream"
              and not (u["options"].get("tls") or u["options"].get("digest"))]  # fmt: skip
    if stream:  # the data port (plain): upload + fold, and per second of the server's CPU
        out["stream_fast_Bps"] = max(u["gib_per_s"] for u in stream) * GIB
        out["stream_fast_core_Bps"] = max(
            u["bytes"] / (u["server_cpu_s"] + u["fold_s"]) for u in stream
        )  # the fold after the push is the server's CPU too
    secure = [u for u in plane if u["options"].get("tls") and u["options"].get("digest")
              and u["options"].get("algorithm") == "blake3"]  # fmt: skip
    if secure and "grpc_secure_Bps" not in out:  # no many-clients row of the new settings
        best = max(secure, key=lambda u: u["gib_per_s"])
        out["grpc_secure_Bps"] = best["gib_per_s"] * GIB
        out["grpc_secure_from"] = best["setting"]
        out["grpc_secure_core_Bps"] = max(u["bytes"] / u["server_cpu_s"] for u in secure)
    before = [u for u in plane if u["key"] == "sha256"]
    if before and "grpc_default_Bps" not in out:  # no 100-client row: the 1 GiB upload's
        out["grpc_default_Bps"] = before[0]["gib_per_s"] * GIB
    fast = [u for u in plane if not (u["options"].get("tls") or u["options"].get("digest"))]
    if fast:
        out["grpc_fast_Bps"] = max(u["gib_per_s"] for u in fast) * GIB
    else:  # a file of before issue 20
        fast = [u for u in t.get("upload", []) if u.get("setting", "").startswith("fedagg, no TLS")]
        if fast:
            out["grpc_fast_Bps"] = fast[0]["gib_per_s"] * GIB
    return out


PLANES = (
    ("shm", "shm_Bps"),
    ("unix socket", "unix_Bps"),
    ("in-process, 1 core", "inproc_Bps"),
    ("fedagg gRPC edge, no TLS/digest/fsync", "grpc_fast_Bps"),
    ("fedagg gRPC edge, before (TLS, sha256, fsync, spool)", "grpc_default_Bps"),
    ("fedagg gRPC edge, secure (TLS, signed BLAKE3)", "grpc_secure_Bps"),
    ("fedagg gRPC edge, secure, server CPU only (1 core)", "grpc_secure_core_Bps"),
    ("fedagg data-port edge, no TLS/digest/fsync", "stream_fast_Bps"),
    (
        "fedagg data-port edge, no TLS/digest/fsync, server CPU only (1 core, fold included)",
        "stream_fast_core_Bps",
    ),
)


def projection(rates: Result) -> list[Result]:
    """Round time of a 3-level tree (see FORMULA) for each model, link speed and edge plane."""
    rows = []
    c = CLIENTS // EDGES
    e_i = math.ceil(EDGES / INTERMEDIATES)
    for m in (1_000_000, 10_000_000):
        b = m * 4
        t_merge = rates["merge_s_per_byte"] * b
        t_fin = rates["finalize_s_per_byte"] * b
        for gbps in LINKS_GBPS:
            link = gbps * 1e9 / 8
            for plane, key in PLANES:
                if key not in rates:
                    continue
                r_edge = rates[key]
                t_edge = max(c * b / link, c * b / r_edge) + b / r_edge
                t_int = max(e_i * b / link, e_i * t_merge) + t_merge
                t_root = max(INTERMEDIATES * b / link, INTERMEDIATES * t_merge) + t_merge + t_fin
                rows.append(
                    {
                        "m": m,
                        "link_gbps": gbps,
                        "edge_plane": plane,
                        "edge_rate_GBps": r_edge / 1e9,
                        "t_edge_s": t_edge,
                        "t_int_s": t_int,
                        "t_root_s": t_root,
                        "t_round_s": t_edge + t_int + t_root,
                        "edge_bound": "network"
                        if c * b / link >= c * b / r_edge
                        else "aggregation",
                    }
                )
    return rows


FORMULA = """
C   = clients per edge        = 1,000,000 / 1000 = 1000
E_i = edges per intermediate  = ceil(1000 / 32) = 32
I   = intermediates           = 32
B   = M * 4 bytes (a float32 update; also a float32 partial's accumulator)
L   = each host's ingress link (bytes/s)
R_edge = the edge's aggregation rate, hand-off included (measured, update bytes/s)
t_merge(B), t_fin(B) = measured merge and finalize times

T_edge  = max(C*B / L, C*B / R_edge) + B / R_edge      fold on arrival, + the last fold
T_int   = max(E_i*B / L, E_i*t_merge) + t_merge        merge partials as they arrive
T_root  = max(I*B / L, I*t_merge) + t_merge + t_fin
T_round = T_edge + T_int + T_root                      the critical path

Assumptions: every update is ready when the round starts (no training time, no
stragglers, no model download); edges and intermediates run on separate hosts, in
parallel, each with its own ingress link L; nodes fold/merge as bytes arrive (pipelined
with the link) and forward a partial only when complete (a synchronous round); no
protocol, TLS or serialization overhead; per-host rates are this 2-core machine's.
"""


# -- driver ------------------------------------------------------------------------------------


def drive(args: argparse.Namespace) -> Result:
    m, n, reps = (4_000_000, 8, 2) if args.quick else (args.m, args.n, args.reps)
    spec = spec_of(m)
    t_start = time.perf_counter()
    log(f"model {m / 1e6:.0f}M float32 params ({m * 4 / MIB:.0f} MiB), {n} updates, best of {reps}")
    log("read bandwidth")
    bw = measure_bandwidth(gib=0.5, repeats=5)
    log(f"  {bw['numba'] / 1e9:.1f} GB/s (numba), {bw['numpy'] / 1e9:.1f} (numpy, 1 core)")
    log("bit-identity check")
    check = check_equal(200_003)
    log(f"  {check}")
    pool = make_pool(m, POOL)
    total = n * m * 4
    rows: list[Result] = []

    def idle() -> None:
        if args.wait_idle > 0:
            waited = wait_for_idle(args.wait_idle)
            if waited > 5:
                log(f"  (waited {waited:.0f}s for other processes to go idle)")

    def add(
        plane: str,
        s: int,
        w: int,
        res: tuple[float, list[float], float],
        paths: list[dict[str, int]] | None = None,
    ) -> None:
        best, ts, foreign = res
        rows.append(
            {
                "plane": plane,
                "shards": s,
                "workers": w,
                "best_s": best,
                "times": ts,
                "GBps": total / best / 1e9,
                "updates_per_s": n / best,
                "foreign_cpu": foreign,
                # per worker, during the timed runs and their warm-up: updates folded by
                # the validated fast path, in how many blocked passes, and by the checked path
                "fold_paths": paths,
            }
        )
        log(
            f"  {plane} S={s} W={w}: {total / best / 1e9:.2f} GB/s, {n / best:.1f} updates/s "
            f"(other processes {foreign:.0%})"
        )

    log("in-process fold (one core)")
    idle()
    add(INPROC, 1, 1, in_process(spec, pool, n, reps))
    idle()
    add(INPROC_FAST, 1, 1, in_process(spec, pool, n, reps, validated=True))
    log("the receiver's pass alone (one core)")
    idle()
    passes = receiver_passes(pool, n, reps)
    log(f"  copy_peak {passes['copy_peak']['GBps']:.2f} GB/s, peak {passes['peak']['GBps']:.2f}")
    for s, w in ((1, 1), (2, 1), (2, 2), (4, 1), (4, 2)):
        log(f"shared memory S={s} W={w}")
        idle()
        with ShmAggregator(spec, shards=s, workers=w, slots=4) as sa:
            add("shm", s, w, *fold_paths(sa, partial(time_service, sa, pool, n, reps)))
            if (s, w) in ((1, 1), (2, 2)):
                idle()
                run = partial(time_service, sa, pool, n, reps, lease=True)
                add(IN_PLACE, s, w, *fold_paths(sa, run))
        if (s, w) in ((1, 1), (2, 2)):
            log(f"unix socket S={s} W={w}")
            idle()
            with SocketAggregator(spec, shards=s, workers=w) as so:
                add("unix socket", s, w, *fold_paths(so, partial(time_service, so, pool, n, reps)))
            log(f"sharded TCP S={s}")
            idle()
            with ShardReceiver(spec, shards=s) as rx:
                add(
                    "tcp sharded", s, s, *fold_paths(rx, partial(time_tcp, rx, spec, pool, n, reps))
                )
    del pool

    log("trees of partial states")
    idle()
    trees = tree_bench(2_000_000 if not args.quick else 500_000, 64, [2, 4, 8, 16, 64], reps)
    for r in trees["rows"]:
        log(f"  fan-out {r['fanout']}: {r['serial_s']:.3f}s serial, depth {r['depth']}")
    merge_shm = [shm_merge_rate(m, max(4, n // 2), s, w, reps) for s, w in ((1, 1), (2, 2))]
    for r in merge_shm:
        log(f"  shm merge S={r['shards']}: {r['GBps']:.2f} GB/s")

    log("round-time model inputs (1M and 10M params)")
    agg = fedagg.aggregators.mean()
    fin = []
    for mm in (1_000_000, 10_000_000):
        st = agg.fold(agg.init(spec_of(mm)), fedagg.Update(delta=np.ones(mm, np.float32)))
        agg.finalize_flat(st)
        fin.append(min(_timed(partial(agg.finalize_flat, st)) for _ in range(3)) / (mm * 4))

    def best_rate(plane: str) -> float:
        return float(max(r["GBps"] for r in rows if r["plane"] == plane)) * 1e9

    rates = {
        "shm_Bps": best_rate("shm"),
        "unix_Bps": best_rate("unix socket"),
        "tcp_Bps": best_rate("tcp sharded"),
        "inproc_Bps": best_rate(INPROC),
        "merge_s_per_byte": trees["t_merge_s"] / (trees["m"] * 4),
        "finalize_s_per_byte": max(fin),
        **grpc_rates(),
    }
    argv = " ".join(["python", "benchmarks/hierarchy.py", *sys.argv[1:]])
    return {
        "command": argv,
        "machine": machine_info(),
        "bandwidth": bw,
        "m": m,
        "n": n,
        "reps": reps,
        "check": check,
        "rows": rows,
        "receiver_passes": passes,
        "trees": trees,
        "merge_shm": merge_shm,
        "rates": rates,
        "projection": projection(rates),
        "wall_s": time.perf_counter() - t_start,
    }


# -- output ------------------------------------------------------------------------------------


def _pick(report: Result, plane: str, configs: tuple[tuple[int, int], ...]) -> Result:
    rows = [r for r in report["rows"] if r["plane"] == plane]
    return max((r for r in rows if (r["shards"], r["workers"]) in configs), key=lambda r: r["GBps"])


def ratio(report: Result) -> tuple[float, float, Result, Result, Result]:
    """shm / socket with the copy into the slot, and with the update arriving in the slot."""
    both = ((1, 1), (2, 2))
    shm, inp = _pick(report, "shm", both), _pick(report, IN_PLACE, both)
    sock = _pick(report, "unix socket", both)
    return shm["GBps"] / sock["GBps"], inp["GBps"] / sock["GBps"], shm, inp, sock


def _header(report: Result) -> list[str]:
    mach, bw, m, n = report["machine"], report["bandwidth"], report["m"], report["n"]
    foreign = [r["foreign_cpu"] for r in report["rows"]]
    noisy = max(foreign) > NOISY
    return [
        "# Hierarchy: one host's data plane (shared memory vs sockets), 1M-client projection",
        "",
        f"- Command: `{report['command']}` ({report['wall_s'] / 60:.1f} min)",
        f"- Date: {mach['date']}; fedagg git {mach['git']}",
        f"- CPU: {mach['model_name']} ({mach.get('hypervisor_vendor', '?')} guest), "
        f"{mach['cores']} cores, L3 {mach.get('l3_cache', '?')}, RAM {mach['ram_gib']} GiB, "
        f"Linux {mach['kernel']}; Python {mach['python']}, numpy {mach['numpy']}, "
        f"numba {mach['numba']}",
        f"- Model: {m / 1e6:g}M float32 parameters ({m * 4 / MIB:.0f} MiB), {n} updates per run "
        f"(cycled from {POOL} distinct ones), weights 10..1000; best of {report['reps']} runs. "
        "Throughput = update bytes folded ÷ (first submit → last fold done). Workers are "
        "started with `forkserver`, 1 numba thread each; 4 slots.",
        f"- Raw memory-bandwidth bound (`_common.measure_bandwidth`): read "
        f"**{bw['numba'] / 1e9:.1f} GB/s** (numba, {int(bw['threads'])} threads), "
        f"{bw['numpy'] / 1e9:.1f} GB/s (numpy `x.sum()`, 1 core); measured in this run.",
        f"- Other processes' share of the CPU during the timed runs: median "
        f"{statistics.median(foreign):.0%}, max {max(foreign):.0%}"
        + (
            ". **The machine was shared with other jobs: every figure is depressed and noisy.**"
            if noisy
            else "."
        ),
        "- Bit-identity (6 updates, 200k params, vs the in-process `mean` fold): "
        + ", ".join(
            f"{k}: {'identical' if v else 'DIFFERENT'}" for k, v in report["check"].items()
        ),
        "",
    ]


def markdown(report: Result) -> str:
    bw, rows = report["bandwidth"], report["rows"]
    inproc = next(r for r in rows if r["plane"] == INPROC)
    lines = [
        *_header(report),
        "## a. Shared-memory plane vs shards and workers; c. vs the socket planes",
        "",
        "| plane | S | W | best s | GB/s | updates/s | ÷ in-process | read bound ÷ | other CPU "
        "| fold path |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    lines += [
        f"| {r['plane']} | {r['shards']} | {r['workers']} | {r['best_s']:.3f} | "
        f"{r['GBps']:.2f} | {r['updates_per_s']:.1f} | {r['GBps'] / inproc['GBps']:.2f} | "
        f"{bw['numba'] / 1e9 / r['GBps']:.1f} | {r['foreign_cpu']:.0%} | {_path(r)} |"
        for r in rows
    ]
    q, q_in, shm, inp, sock = ratio(report)
    fast = next(r for r in rows if r["plane"] == INPROC_FAST)
    rp = report["receiver_passes"]
    lines += [
        "",
        f"**Shared memory vs Unix-socket hand-off: {q:.2f}× with the receiver's copy into the "
        f"slot, {q_in:.2f}× when the update arrives in the slot** (target ≥ 3×: "
        f"{'MET' if max(q, q_in) >= 3 else 'NOT MET'}). shm S={shm['shards']} W={shm['workers']} "
        f"{shm['GBps']:.2f} GB/s; arriving in the slot S={inp['shards']} W={inp['workers']} "
        f"{inp['GBps']:.2f} GB/s; Unix socket S={sock['shards']} W={sock['workers']} "
        f"{sock['GBps']:.2f} GB/s.",
        "",
        "- *in-process fold*: `Mean.fold`, one update at a time, numba limited to one thread "
        "(the checked fold: an undo copy of the accumulator and a finiteness test of every "
        "coordinate, so a bad update can be refused with no change). *in-process validated "
        "fold*: the workers' `fold_validated` on the same updates, one thread: the fold alone, "
        "with no hand-off and no receiver pass.",
        "- *shm*: `submit` copies the update from the receiver's memory into a slot (one pass "
        "fused with the NaN/Inf and max|x| check, `copy_peak`), then hands the slot index to "
        "the workers.",
        "- *shm, arrives in the slot*: `lease` + `commit`: the update is already in the slot, as "
        "when the receiver `recv_into`s the slot; `commit` pays the check (one read pass, "
        "`peak`) and the hand-off. This is LIFL's comparison: in both planes the update first "
        "lands in the receiver's memory; the socket plane then moves it again.",
        "- *unix socket*: the receiver checks the update (one read pass) and `sendall`s each "
        "worker its shards; each worker `recv_into`s a buffer it preallocated, then folds.",
        "- *tcp sharded*: a sender thread in this process sends shard i on TCP connection i to "
        "worker i (127.0.0.1), which `recv_into`s and reports max|x|; the receiver admits the "
        "update and the workers fold (two-phase, so a refused update changes no shard).",
        "",
        "Every worker, shared-memory and socket alike, folds an update the receiver has already "
        "validated (finite values, and a running bound sum|w·s|·max|x| far from float32's range) "
        "with the same `fold_validated`: `acc[lo:hi] += w·x[lo:hi]` in float32 (numba, one "
        "thread, no undo copy, no second finiteness test; updates queued behind each other go "
        "in one cache-blocked pass), with `Mean`'s weight and count bookkeeping, bit-identical "
        "to `Mean.fold`. So the shm / socket ratio isolates the hand-off. `Mean.fold` itself "
        "(checked, with a snapshot) runs only for updates the receiver's bound says could "
        "overflow float32. *fold path*: updates folded per blocked pass by the workers during "
        "the timed runs and their warm-up, and how many took the checked path.",
        "",
        f"Each plane is a pipeline of two stages on the 2 cores: the receiver's pass and the "
        f"workers' fold. Alone, on one core: `copy_peak` {rp['copy_peak']['GBps']:.2f} GB/s "
        f"(*shm*), `peak` {rp['peak']['GBps']:.2f} GB/s (*arrives in the slot*), "
        f"`fold_validated` {fast['GBps']:.2f} GB/s. Both stages stream model-sized buffers "
        f"({report['m'] * 4 / MIB:.0f} MiB; L3 {report['machine'].get('l3_cache', '?')}), so "
        f"run together they share the memory bandwidth and the plane runs below its slower "
        f"stage.",
        "",
        "## b. Trees of partial states",
        "",
    ]
    tr = report["trees"]
    lines += [
        f"{tr['leaves']} leaf partials of {tr['m'] / 1e6:g}M float32 params merged by "
        "`fedagg.core.tree.reduce_tree` in one process (serially: always leaves − 1 merges), "
        "and the critical path if each level's nodes merge in parallel on their own hosts: "
        f"depth × (fan-out − 1) merges × t_merge = {tr['t_merge_s'] * 1e3:.2f} ms (measured).",
        "",
        "Mean.merge allocates a group head's undo buffer on its first merge (fresh pages), "
        "so low fan-outs (more heads) pay more page faults in the serial time.",
        "",
        "| fan-out | depth | merges (serial) | serial s | merges on critical path | "
        "critical path s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['fanout']} | {r['depth']} | {r['merges']} | {r['serial_s']:.3f} | "
        f"{r['critical_path_merges']} | {r['critical_path_s']:.3f} |"
        for r in tr["rows"]
    ]
    lines += [
        "",
        "A parent merging model-sized child partials through the shared-memory plane:",
        "",
    ]
    lines += [
        f"- S={r['shards']} W={r['workers']}: {r['partials']} partials in {r['best_s']:.3f}s = "
        f"**{r['GBps']:.2f} GB/s** of partial bytes"
        for r in report["merge_shm"]
    ]
    rates = report["rates"]
    per_m = 4e6 * 1e3  # seconds per byte -> ms per 1M float32 params
    lines += [
        "",
        "## d. Projection: 1,000,000 clients, root ← 32 intermediates ← 1000 edges ← 1000 each",
        "",
        f"Measured in this run: edge aggregation rate (hand-off included) shm "
        f"{rates['shm_Bps'] / 1e9:.2f} GB/s, Unix socket {rates['unix_Bps'] / 1e9:.2f} GB/s, "
        f"sharded TCP {rates['tcp_Bps'] / 1e9:.2f} GB/s, in-process fold "
        f"{rates['inproc_Bps'] / 1e9:.2f} GB/s; merge {rates['merge_s_per_byte'] * per_m:.2f} ms "
        f"and finalize {rates['finalize_s_per_byte'] * per_m:.2f} ms per 1M params.",
        "",
        "The deployed edge (`fedagg server --parent`, gRPC) is bounded by its ingest rate as "
        f"`benchmarks/transport.py` measured it (by {rates.get('grpc_from', '?')}; "
        "`results/transport.json`, not in this file's run: see the shares of other processes' "
        "CPU there; one 1 GiB upload, "
        "upload + fold, steady state, or 100 clients x 10M params pushing at once where that "
        "row exists; clients and server share this machine's 2 cores): "
        + (
            f"{rates['grpc_default_Bps'] / 1e9:.3f} GB/s with the settings of before issue 20 "
            "(TLS, signed sha256, fsync before each ack, spool), "
            if "grpc_default_Bps" in rates
            else ""
        )
        + (
            f"{rates['grpc_secure_Bps'] / 1e9:.3f} GB/s with the secure ones of after (TLS, "
            "signed BLAKE3"
            + (
                f"; the best secure 1 GiB upload: {rates['grpc_secure_from']}"
                if "grpc_secure_from" in rates
                else "; 100 clients"
            )
            + "), "
            if "grpc_secure_Bps" in rates
            else ""
        )
        + (
            f"{rates['grpc_secure_core_Bps'] / 1e9:.3f} GB/s per second of the server's own CPU "
            "(an edge whose clients are elsewhere, on one core), "
            if "grpc_secure_core_Bps" in rates
            else ""
        )
        + (
            f"{rates['grpc_fast_Bps'] / 1e9:.2f} GB/s without TLS, digest or fsync (one 1 GiB "
            "upload, steady state)."
            if "grpc_fast_Bps" in rates
            else ""
        )
        + (
            f" Over the data port (`data_listen`, the framed TCP transport for uploads, no TLS, "
            f"digest or fsync): {rates['stream_fast_Bps'] / 1e9:.2f} GB/s, and "
            f"{rates['stream_fast_core_Bps'] / 1e9:.2f} GB/s per second of the server's own CPU "
            "with the fold after the upload counted. Every rate is a 1 GiB upload's: an edge "
            "taking 1000 uploads of 4 MB pays a per-upload cost (a connection, a signed header, "
            "a log commit) that this projection leaves out."
            if "stream_fast_Bps" in rates
            else ""
        ),
        "",
        "| params | link per host | edge plane | edge GB/s | edge bound by | T_edge s | T_int s "
        "| T_root s | **T_round s** |",
        "|---:|---:|---|---:|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['m'] / 1e6:g}M | {r['link_gbps']:g} Gb/s | {r['edge_plane']} | "
        f"{r['edge_rate_GBps']:.2f} | {r['edge_bound']} | {r['t_edge_s']:.3f} | "
        f"{r['t_int_s']:.3f} | {r['t_root_s']:.3f} | **{r['t_round_s']:.2f}** |"
        for r in report["projection"]
    ]
    lines += ["", "Model:", "", "```", FORMULA.strip(), "```", ""]
    return "\n".join(lines)


def _path(r: Result) -> str:
    paths = r.get("fold_paths")
    if not paths:
        return "–"
    v = sum(p["validated"] for p in paths)
    k = sum(p["validated_passes"] for p in paths)
    c = sum(p["checked"] for p in paths)
    return f"validated, {v / max(1, k):.2f}/pass" + (f"; {c} checked" if c else "; 0 checked")


def plot(report: Result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["rows"]
    bw = report["bandwidth"]["numba"] / 1e9
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(17, 5))
    for w, style in ((1, "-o"), (2, "-s")):
        pts = sorted(
            (r["shards"], r["GBps"]) for r in rows if r["plane"] == "shm" and r["workers"] == w
        )
        a.plot(*zip(*pts, strict=True), style, label=f"shm, {w} worker(s)")
    for plane, mk in (("unix socket", "^"), ("tcp sharded", "v")):
        pts = sorted((r["shards"], r["GBps"]) for r in rows if r["plane"] == plane)
        a.plot(*zip(*pts, strict=True), "--" + mk, label=f"{plane} (W=S)")
    inproc = next(r for r in rows if r["plane"] == INPROC)["GBps"]
    a.axhline(inproc, color="gray", ls=":", label=f"in-process fold, 1 core ({inproc:.1f})")
    fast = next((r["GBps"] for r in rows if r["plane"] == INPROC_FAST), None)
    if fast is not None:
        a.axhline(fast, color="gray", ls="-.", label=f"validated fold alone, 1 core ({fast:.1f})")
    for s_w, mk in (((1, 1), "*"), ((2, 2), "P")):
        pts = [r for r in rows if r["plane"] == IN_PLACE and (r["shards"], r["workers"]) == s_w]
        if pts:
            a.plot([s_w[0]], [pts[0]["GBps"]], mk, ms=10, label=f"shm, arrives in slot, W={s_w[1]}")
    a.axhline(bw, color="k", ls="--", label=f"read bandwidth ({bw:.1f})")
    a.set(
        xlabel="shards S",
        ylabel="GB/s of update bytes folded",
        xticks=[1, 2, 4],
        title=f"a/c. {report['m'] / 1e6:g}M float32 params, {report['n']} updates",
    )
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
    tr = report["trees"]["rows"]
    f = [r["fanout"] for r in tr]
    b.plot(f, [r["serial_s"] for r in tr], "-o", label="serial, one process (reduce_tree)")
    b.plot(f, [r["critical_path_s"] for r in tr], "-s", label="critical path, levels in parallel")
    b.set(
        xscale="log",
        xlabel="fan-out",
        ylabel="s",
        xticks=f,
        xticklabels=[str(x) for x in f],
        title=f"b. {report['trees']['leaves']} partials of {report['trees']['m'] / 1e6:g}M params",
    )
    b.legend(fontsize=7)
    b.grid(alpha=0.3)
    proj = [r for r in report["projection"] if r["edge_plane"] != "in-process, 1 core"]
    labels = [
        f"{r['m'] / 1e6:g}M\n{r['link_gbps']:g}Gb/s\n{r['edge_plane'].split()[0]}" for r in proj
    ]
    x = np.arange(len(proj))
    bottom = np.zeros(len(proj))
    for key, lab in (("t_edge_s", "edge"), ("t_int_s", "intermediate"), ("t_root_s", "root")):
        v = np.array([r[key] for r in proj])
        c.bar(x, v, bottom=bottom, label=lab)
        bottom += v
    c.set(
        xticks=x,
        yscale="log",
        ylabel="round time (s, modelled)",
        title="d. 1M clients, 1000 edges, 32 intermediates",
    )
    c.set_xticklabels(labels, fontsize=7)
    c.legend(fontsize=7)
    fig.suptitle(
        f"fedagg hierarchy data plane, {report['machine']['model_name']}, "
        f"{report['machine']['cores']} cores"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(report: Result, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "hierarchy.json").write_text(json.dumps(report, indent=1))
    (out_dir / "hierarchy.md").write_text(markdown(report))
    plot(report, out_dir / "hierarchy.png")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: M = 4M, N = 8")
    p.add_argument("--m", type=int, default=16 * MIB // 1, help="model parameters (float32)")
    p.add_argument("--n", type=int, default=24, help="updates per timed run")
    p.add_argument("--reps", type=int, default=3, help="timed runs per configuration")
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0,
        metavar="S",
        help="before each measurement, wait up to S seconds for other processes to go idle",
    )
    p.add_argument("--out", metavar="DIR", help="output directory (default: benchmarks/results)")
    p.add_argument("--render", metavar="JSON", help="only re-write the .md/.png of a .json")
    args = p.parse_args()
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results"
    if args.render:
        report = json.loads(Path(args.render).read_text())
        report["rates"] = {k: v for k, v in report["rates"].items()
                           if not k.startswith(("grpc", "stream"))}  # fmt: skip
        report["rates"].update(grpc_rates())  # this transport.json's, no older ones
        report["projection"] = projection(report["rates"])
        again = (
            "`; re-rendered with the gRPC edge rows by "
            f"`python benchmarks/hierarchy.py --render {args.render}"
        )
        if "re-rendered" not in report["command"]:
            report["command"] += again
        write(report, out)
        return
    report = drive(args)
    write(report, out)
    q, q_in, *_ = ratio(report)
    log(f"done in {report['wall_s']:.0f}s; shm / socket = {q:.2f}x (in place {q_in:.2f}x)")


if __name__ == "__main__":
    main()
