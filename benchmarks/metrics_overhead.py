"""What ``[deploy] metrics`` costs: round latency with the Prometheus endpoint off and on.

The same federation (the real service, the real clients, the in-memory transport: no network
noise; state in /dev/shm where there is one, so fsyncs cost little and rounds are short,
which makes a fixed per-event cost look as large as it can) runs with metrics off and with
metrics on (the endpoint served on 127.0.0.1, and scraped every ``--scrape`` seconds during
the run by a thread, as Prometheus would), in interleaved repetitions (off/on, then on/off,
...). Round latency = each round's dispatch-to-close time (``RoundStats.ended - started``),
the first rounds of each run dropped; per run its median and p90; the ratio on/off per
adjacent pair. Writes ``benchmarks/results/metrics_overhead.{md,json}``.

    python benchmarks/metrics_overhead.py            # ~2 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedagg import strategies
from fedagg.deploy import (
    Client,
    ClientKey,
    Federation,
    Keyring,
    Result,
    Server,
    ServerOptions,
    TaskContext,
)
from fedagg.deploy._memory import MemoryChannel, MemoryTransport
from fedagg.deploy._metrics import Metrics
from fedagg.sim import SyncPolicy

HERE = Path(__file__).resolve().parent


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def run_once(
    args: argparse.Namespace, metrics: bool, root: Path, keep: bool = False
) -> dict[str, Any]:
    """One federation; returns its round latencies (s) and scrape count."""
    names = [f"c{i}" for i in range(args.clients)]
    keys = {n: ClientKey(n, Ed25519PrivateKey.generate()) for n in names}
    ring = Keyring({n: keys[n].private.public_key() for n in names})
    d = args.params

    def train(model: Any, task: TaskContext) -> Result:
        delta = (task.rng().standard_normal(d) * 0.01).astype(np.float32)
        return Result(delta, 10.0, {"loss": 0.5})

    strategy = strategies.fedavg()
    policy = SyncPolicy(strategy=strategy, rounds=args.rounds, clients_per_round=args.clients)
    state = Path(tempfile.mkdtemp(dir=root))
    fed = Federation(policy, strategy.init([np.zeros(d, np.float32)]), num_clients=args.clients,
                     seed=1, directory=state, identity={"bench": "metrics"})  # fmt: skip
    opts = ServerOptions(listen="127.0.0.1:0", insecure=True, fsync=True,
                         metrics="127.0.0.1:0" if metrics else "")  # fmt: skip
    scrapes = [0]
    stop = threading.Event()
    rounds: list[Any] = []
    kept: list[Any] = []
    cpu: list[float] = []  # the process's CPU seconds at each round's close

    async def go() -> None:
        server = Server(fed, ring, opts, transport=MemoryTransport,
                        on_round=lambda r: cpu.append(time.process_time()))  # fmt: skip
        await server.start()
        scraper = None
        if server.metrics is not None:
            url = server.metrics.url

            def scrape() -> None:
                while not stop.wait(args.scrape):
                    with urllib.request.urlopen(url, timeout=5) as r:
                        r.read()
                    scrapes[0] += 1

            scraper = threading.Thread(target=scrape, daemon=True)
            scraper.start()
        svc = server.service
        if server.metrics is not None:
            kept.append(server.metrics.metrics)
        clients = [
            Client("memory", keys[n], train, insecure=True, retry_for=30.0, heartbeat=5.0,
                   channel=MemoryChannel(svc, max_message=svc.opt.chunk_bytes + 65536))
            for n in names
        ]  # fmt: skip
        tasks = [asyncio.create_task(c.run_async()) for c in clients]
        try:
            await asyncio.wait_for(server.wait(), 600)
            await asyncio.gather(*tasks)
            rounds.extend(server.stats.rounds)
        finally:
            stop.set()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.stop(0.1)
            if scraper is not None:
                scraper.join(10)

    asyncio.run(go())
    lat = [r.ended - r.started for r in rounds][args.drop :]
    used = cpu[args.drop :]
    cpu_per_round = (used[-1] - used[0]) / max(1, len(used) - 1)
    out = {"metrics": metrics, "latency": lat, "scrapes": scrapes[0], "cpu": cpu_per_round}
    if keep:
        out["metrics_obj"] = kept[0]
    return out


def hook_cost(args: argparse.Namespace, root: Path) -> dict[str, float]:
    """One more run with metrics on, its metrics hooks timed (not one of the timed runs):
    seconds in the hooks per round, and per scrape the time to render the exposition."""
    spent = [0.0]
    originals = {}
    for name in ("opened", "connections", "refused", "pushed", "effects"):
        fn = getattr(Metrics, name)
        originals[name] = fn

        def timed(self: Any, *a: Any, _fn: Any = fn) -> Any:
            t = time.perf_counter()
            try:
                return _fn(self, *a)
            finally:
                spent[0] += time.perf_counter() - t

        setattr(Metrics, name, timed)
    try:
        r = run_once(args, True, root, keep=True)
    finally:
        for name, fn in originals.items():
            setattr(Metrics, name, fn)
    rounds = args.rounds
    # the exposition a scrape renders, on a service like the one measured
    text_s = []
    for _ in range(50):
        t = time.perf_counter()
        r["metrics_obj"].text()
        text_s.append(time.perf_counter() - t)
    return {
        "hooks_per_round_s": spent[0] / rounds,
        "median_round_s": statistics.median(r["latency"]),
        "scrape_render_s": statistics.median(text_s),
    }


def render(res: dict[str, Any], path: Path) -> None:
    runs = res["runs"]
    off = [r for r in runs if not r["metrics"]]
    on = [r for r in runs if r["metrics"]]

    def per_run(rs: list[dict[str, Any]], q: float) -> list[float]:
        return [_pct(r["latency"], q) for r in rs]

    lines = [
        "# What `[deploy] metrics` costs: round latency, metrics off vs on",
        "",
        f"- machine: {res['machine']}; {res['when']}; 1-min load average "
        f"{res['load'][0]:.1f} at the start, {res['load'][1]:.1f} at the end (other work "
        "shared the 2 cores: run to run, round latency and CPU per round vary by +-10-30%, "
        "far more than 1%; the time spent inside the metrics hooks, below the table, is the "
        "direct measure of what metrics add)",
        f"- setting: {res['clients']} clients x {res['params']:,} float32 params, FedAvg, "
        f"{res['rounds']} rounds per run (the first {res['drop']} dropped), the real service "
        "and clients over the in-memory transport, state in "
        f"{res['state_fs']} (fsync on, a checkpoint every round); metrics on = the endpoint "
        f"on 127.0.0.1 scraped every {res['scrape']} s during the run "
        f"({statistics.median(r['scrapes'] for r in on):.0f} scrapes per run, median)",
        f"- {res['reps']} repetitions, interleaved (off/on, then on/off, ...); round latency = "
        "a round's dispatch-to-close time; per run its median and p90; ratio = on/off per "
        "adjacent pair (median [min-max] over the pairs), and of the medians over the runs",
        "",
        "| measure | metrics off | metrics on | on/off (medians over runs) | "
        "on/off per pair: median [min-max] |",
        "|---|---|---|---|---|",
    ]
    for label, q in (("round latency, median", 50), ("round latency, p90", 90)):
        a, b = per_run(off, q), per_run(on, q)
        pairs = [y / x for x, y in zip(a, b, strict=True)]
        lines.append(
            f"| {label} | {statistics.median(a) * 1e3:.2f} ms | "
            f"{statistics.median(b) * 1e3:.2f} ms | "
            f"{statistics.median(b) / statistics.median(a):.4f} | "
            f"{statistics.median(pairs):.4f} [{min(pairs):.3f}-{max(pairs):.3f}] |"
        )
    a, b = [r["cpu"] for r in off], [r["cpu"] for r in on]
    pairs = [y / x for x, y in zip(a, b, strict=True)]
    lines.append(
        f"| process CPU per round (all threads) | {statistics.median(a) * 1e3:.2f} ms | "
        f"{statistics.median(b) * 1e3:.2f} ms | {statistics.median(b) / statistics.median(a):.4f} "
        f"| {statistics.median(pairs):.4f} [{min(pairs):.3f}-{max(pairs):.3f}] |"
    )
    pooled_off = [x for r in off for x in r["latency"]]
    pooled_on = [x for r in on for x in r["latency"]]
    h = res["hooks"]
    lines += [
        f"| all rounds pooled, median | {statistics.median(pooled_off) * 1e3:.2f} ms | "
        f"{statistics.median(pooled_on) * 1e3:.2f} ms | "
        f"{statistics.median(pooled_on) / statistics.median(pooled_off):.4f} | |",
        "",
        "Time inside the metrics hooks, timed in one more run with metrics on (not one of the "
        f"runs above): {h['hooks_per_round_s'] * 1e6:.0f} µs per round, "
        f"{h['hooks_per_round_s'] / h['median_round_s'] * 100:.3f}% of that run's median "
        f"round ({h['median_round_s'] * 1e3:.1f} ms); rendering the exposition for a scrape "
        f"takes {h['scrape_render_s'] * 1e3:.2f} ms (on the HTTP thread).",
        "",
        f"Runtime {res['seconds'] / 60:.1f} min. Command: `{res['command']}`",
        "",
    ]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=8, help="pairs of runs (off and on)")
    ap.add_argument("--rounds", type=int, default=60, help="rounds per run")
    ap.add_argument("--drop", type=int, default=3, help="first rounds of each run dropped")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--params", type=int, default=100_000)
    ap.add_argument("--scrape", type=float, default=1.0, help="seconds between scrapes")
    ap.add_argument("--out", default=str(HERE / "results" / "metrics_overhead"))
    ap.add_argument("--render", metavar="JSON", help="only re-write the .md from a .json")
    args = ap.parse_args(argv)
    if args.render:
        src = Path(args.render)
        render(json.loads(src.read_text()), src.with_suffix(".md"))
        return 0
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    t0 = time.monotonic()
    load0 = os.getloadavg()[0]
    runs = []
    with tempfile.TemporaryDirectory(dir=base, prefix="fedagg-metrics-bench-") as tmp:
        root = Path(tmp)
        run_once(argparse.Namespace(**{**vars(args), "rounds": 4, "drop": 0}), True, root)
        for rep in range(args.reps):
            order = (False, True) if rep % 2 == 0 else (True, False)
            for on in order:
                r = run_once(args, on, root)
                runs.append(r)
                print(f"rep {rep} metrics {'on ' if on else 'off'}: median "
                      f"{statistics.median(r['latency']) * 1e3:.2f} ms, "
                      f"{r['cpu'] * 1e3:.2f} ms CPU/round, {r['scrapes']} scrapes",
                      flush=True)  # fmt: skip
        hooks = hook_cost(args, root)
    res = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Linux {platform.release()}, Python {platform.python_version()}",
        "when": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "clients": args.clients, "params": args.params, "rounds": args.rounds,
        "drop": args.drop, "reps": args.reps, "scrape": args.scrape,
        "state_fs": "/dev/shm (tmpfs)" if base is not None else "the temp directory",
        "seconds": time.monotonic() - t0,
        "command": "python benchmarks/metrics_overhead.py " + shlex.join(sys.argv[1:]),
        "runs": runs,
        "hooks": hooks,
        "load": [load0, os.getloadavg()[0]],
    }  # fmt: skip
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1))
    render(res, out.with_suffix(".md"))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
