"""Receivers benchmark: the deployed root folding in P receiver processes through shared memory
(``[deploy] receivers = P``, :mod:`fedagg.deploy._receivers`) vs in its own process.

a. The engine alone (no network): a :class:`~fedagg.deploy.Federation` over a zero model of M
   float32 parameters (default 16M = 64 MiB), FedAvg, one round of N uploads (default 16)
   whose spool files are written (and page-cached) beforehand; each upload is logged and
   stepped as the server does (read back, checksum re-verified, folded; the round's close
   finalizes, applies and checkpoints: timed apart). Reported: update bytes through the
   engine per second of its steps (all but the closing one), the CPU seconds the engine's
   thread spent per GiB (what the server's process pays; the rest runs in the receivers), and
   the closing step. The final models are compared bit for bit.
b. The deployed server end to end (real processes on loopback, ``benchmarks/_fedagg_server.py``
   and ``_fedagg_clients.py`` as in ``transport.py``): K clients each pushing an update of M
   parameters, R rounds, in the fastest setting (no TLS, no digest, no fsync): the median
   round time after the first.

    python benchmarks/receivers.py [--quick] [--params M] [--uploads N]
    python benchmarks/receivers.py --render results/receivers.json   # re-write the .md

Writes ``results/receivers.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import GIB, MIB, machine_info, wait_for_idle
from fedagg import strategies
from fedagg.core.aggregate import Mean
from fedagg.core.spec import ParamSpec
from fedagg.deploy import Federation
from fedagg.deploy._receivers import plane_strategy
from fedagg.deploy._store import UploadRow, new_checksum
from fedagg.policy import SyncPolicy

HERE = Path(__file__).resolve().parent


def engine_run(
    params: int, uploads: int, receivers: int, reps: int, accumulator: str = "float32"
) -> dict[str, Any]:
    """``reps`` rounds of ``uploads`` logged and stepped arrivals; the best round counts."""
    spec = ParamSpec.from_arrays([np.zeros(params, np.float32)])
    strategy = strategies.fedavg(aggregator=Mean(accumulator))  # type: ignore[arg-type]
    strategy = plane_strategy(strategy, receivers, spec)
    policy = SyncPolicy(strategy=strategy, rounds=reps + 1, clients_per_round=uploads)
    server = strategy.init([np.zeros(params, np.float32)])
    rng = np.random.default_rng(7)
    pool = [(rng.standard_normal(params) * 1e-3).astype(np.float32) for _ in range(4)]
    with tempfile.TemporaryDirectory() as tmp:
        fed = Federation(policy, server, num_clients=uploads, seed=0, directory=tmp)
        try:
            fed.open()
            fed.step([r for r in fed.log([("start", 0.0, None, None, None, None)]) if r])
            fed.warmup()  # as the server does before it listens (the receivers start)
            walls, cpus, closes = [], [], []
            for _ in range(reps + 1):  # the first round warms up (receivers start, kernels)
                rows = []
                for task in sorted(fed.tasks.values(), key=lambda t: t.job):
                    x = pool[task.job % len(pool)]
                    path = fed.spool / f"{task.job:012d}-{task.client}.upd"
                    x.tofile(path)
                    xx = new_checksum()
                    xx.update(x.data)
                    rows.append(
                        UploadRow(
                            task.client,
                            task.job,
                            str(path),
                            1.0 + task.job % 5,
                            task.version,
                            {},
                            x.nbytes,
                            b"",
                            xx.digest(),
                        )
                    )
                wall = cpu = 0.0
                for i, up in enumerate(rows):
                    logged = [r for r in fed.log([("arrival", 1.0 + i, up.client, up.job, None,
                                                   up)]) if r]  # fmt: skip
                    t0, c0 = time.perf_counter(), time.thread_time()
                    fed.step(logged)
                    if i < len(rows) - 1:  # the last one closes the round: timed apart
                        wall += time.perf_counter() - t0
                        cpu += time.thread_time() - c0
                closes.append(time.perf_counter() - t0)
                walls.append(wall)
                cpus.append(cpu)
            assert fed.finished
            params_out = np.array(fed.server.params, copy=True)
        finally:
            fed.close()
    best = min(range(1, len(walls)), key=lambda k: walls[k])
    gib = (uploads - 1) * params * 4 / GIB
    return {
        "receivers": receivers,
        "accumulator": accumulator,
        "params": params,
        "uploads": uploads,
        "step_s": walls[best],
        "engine_cpu_s": cpus[best],
        "gib_per_s": gib / walls[best],
        "cpu_s_per_gib": cpus[best] / gib,
        "all_step_s": walls,
        "close_s": min(closes[1:]),
        "bits": params_out.tobytes(),
    }


def e2e_run(params: int, clients: int, rounds: int, receivers: int) -> dict[str, Any]:
    from _transport_run import fedagg_run

    args = ("--receivers", str(receivers)) if receivers else ()
    r = fedagg_run(params, clients, rounds, tls=False, digest=False, fsync=False,
                   client_procs=min(clients, 2), server_args=args)  # fmt: skip
    steady = r["round_s"][1:]
    return {
        "receivers": receivers,
        "params": params,
        "clients": clients,
        "rounds": rounds,
        "round_s": statistics.median(steady),
        "all_round_s": r["round_s"],
        "gib_per_s": clients * params * 4 / GIB / statistics.median(steady),
        "checksum": r["checksum"],
        "peak_rss": r["peak_rss"],
    }


def markdown(res: dict[str, Any]) -> str:
    a, b = res["engine"], res["e2e"]
    base = a[0]
    lines = [
        "# Receivers: the deployed root folding in P processes over shared memory",
        "",
        f"`{res['argv']}` on {res['machine'].get('model_name', '?')}, "
        f"{res['machine'].get('cpus', os.cpu_count())} CPUs; load average (1, 5, 15 min) "
        f"{', '.join(f'{x:.1f}' for x in res['loadavg'][0])} at the start, "
        f"{', '.join(f'{x:.1f}' for x in res['loadavg'][1])} at the end (other processes "
        "on the machine: the figures are only as steady as that).",
        "",
        f"## a. The engine alone: {base['uploads']} uploads of {base['params'] / 1e6:.1f}M "
        f"float32 parameters ({base['params'] * 4 / MIB:.0f} MiB), best of "
        f"{len(base['all_step_s']) - 1} rounds",
        "",
        "| fold in | arrival steps (s) | GiB/s through the engine | engine-thread CPU s/GiB "
        "| vs in-process | round close (s) | same bits |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in a:
        if r["receivers"] == 0:
            base = r
        who = "the server's process" if r["receivers"] == 0 else f"{r['receivers']} receivers"
        who += f", {r['accumulator']} accumulator"
        lines.append(
            f"| {who} | {r['step_s']:.3f} | {r['gib_per_s']:.2f} | {r['cpu_s_per_gib']:.3f} "
            f"| {r['gib_per_s'] / base['gib_per_s']:.2f}x speed, "
            f"{r['cpu_s_per_gib'] / base['cpu_s_per_gib']:.2f}x CPU | {r['close_s']:.3f} "
            f"| {r['same_bits']} |"
        )
    e0 = b[0]
    lines += [
        "",
        f"## b. End to end: {e0['clients']} clients each pushing {e0['params'] * 4 / MIB:.0f} "
        f"MiB, {e0['rounds']} rounds, no TLS, no digest, no fsync (median round after the "
        "first)",
        "",
        "| fold in | round (s) | GiB/s of uploads | vs in-process | server peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in b:
        who = "the server's process" if r["receivers"] == 0 else f"{r['receivers']} receivers"
        lines.append(
            f"| {who} | {r['round_s']:.3f} | {r['gib_per_s']:.2f} | "
            f"{e0['round_s'] / r['round_s']:.2f}x | {r['peak_rss'] / MIB:.0f} |"
        )
    lines += ["", res["note"], ""]
    return "\n".join(lines)


NOTE = (
    "Reading: with receivers the engine's thread reads each spooled update straight into a "
    "shared-memory slot, re-verifies its checksum and takes its max |x| (one pass); the "
    "receivers fold it (the accumulator's read-modify-write), each its coordinate shard, while "
    "the engine goes on. The server's process saves the fold: its CPU per GiB drops (the CPU "
    "ratio), most with the float64 accumulator, whose compensated fold is the costly part; "
    "the bits are the same in every row. Whether the wall time drops depends on free cores: "
    "the receivers, the engine's thread, the gRPC receive and (end to end) the clients share "
    "them. With the float32 accumulator the fold is a small part of an engine step, and on 2 "
    "busy cores handing it over costs more than it saves; end to end the upload's receive "
    "dominates a round either way."
)


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--params", type=int, default=0)
    ap.add_argument("--uploads", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--wait-idle", type=float, default=30.0)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--render", help="re-write the .md from this .json")
    a = ap.parse_args(argv)
    if a.render:
        res = json.loads(Path(a.render).read_text())
        res["note"] = NOTE
        Path(a.render).write_text(json.dumps(res, indent=1))
        Path(a.render).with_suffix(".md").write_text(markdown(res))
        return
    params = a.params or ((4 << 20) if a.quick else (16 << 20))
    uploads = 4 if a.quick else a.uploads
    waited = wait_for_idle(a.wait_idle)
    load0 = os.getloadavg()
    engine = []
    for acc, ps in (("float32", (0, 1, 2)), ("float64", (0, 2))):
        rows = []
        for p in ps:
            r = engine_run(params, uploads, p, 1 if a.quick else a.reps, acc)
            print(f"  engine, {acc}, receivers={p}: {r['gib_per_s']:.2f} GiB/s, "
                  f"{r['cpu_s_per_gib']:.3f} CPU s/GiB", flush=True)  # fmt: skip
            rows.append(r)
        ref = rows[0]["bits"]
        for r in rows:
            r["same_bits"] = r.pop("bits") == ref
        engine += rows
    e2e = []
    for p in (0, 2):
        r = e2e_run(params, 2 if a.quick else 4, 3 if a.quick else 5, p)
        print(f"  e2e, receivers={p}: round {r['round_s']:.3f} s", flush=True)
        e2e.append(r)
    res = {
        "argv": " ".join(["python", "benchmarks/receivers.py", *argv]),
        "machine": machine_info(),
        "engine": engine,
        "e2e": e2e,
        "note": NOTE,
        "waited_for_idle_s": waited,
        "loadavg": [load0, os.getloadavg()],
    }
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "receivers.json").write_text(json.dumps(res, indent=1))
    (out / "receivers.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main(sys.argv[1:])
