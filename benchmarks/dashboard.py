"""The dashboard on a large run database: 100 runs x 1000 rounds.

Builds the database (every round column filled, refusals on some rounds, a 60-key config a
run), serves it with ``fedagg.dashboard`` in this process, and times each page and JSON
endpoint over HTTP (median and max of repeated GETs, the response size); then, if headless
Chromium is available, each page in the browser from navigation start to the charts drawn
(``data-ready-at``, which the page sets when it finished). Writes
benchmarks/results/dashboard.md and dashboard.json.

    .venv/bin/python benchmarks/dashboard.py [--runs 100] [--rounds 1000]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from _common import machine_info
from fedagg.dashboard import Dashboard, make_server
from fedagg.runs import ROUND_COLUMNS, RunDB

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results"


def config(i: int) -> dict[str, Any]:
    return {
        "name": f"run-{i}",
        "seed": i,
        "rounds": 1000,
        "eval_every": 1,
        "data": {
            "name": "mnist",
            "num_clients": 100 + i,
            "partition": "dirichlet",
            "alpha": 0.1 * (1 + i % 5),
            "batch": 32,
        },
        "model": {"kind": "mlp", "hidden": [128, 64], "dtype": "float32"},
        "client": {
            "epochs": 1 + i % 3,
            "batch_size": 32,
            "lr": 0.01 * (1 + i % 4),
            "momentum": 0.9,
            "weight_decay": 0.0,
        },
        "policy": {
            "kind": ["sync", "fedbuff", "fedasync"][i % 3],
            "clients_per_round": 10,
            "buffer": 10,
            "concurrency": 20,
            "staleness": "polynomial",
            "a": 0.5,
        },
        "strategy": {
            "aggregator": ["mean", "krum", "median", "trimmed_mean"][i % 4],
            "f": 2,
            "optimizer": "fedadam",
            "server_lr": 0.01,
            "beta1": 0.9,
            "beta2": 0.99,
        },
        "system": {"latency": "lognormal", "mu": 0.0, "sigma": 1.0, "dropout": 0.05},
        "output": {"db": "runs/fedagg.db", "plots": "runs/plots"},
        **{f"extra_{k}": k * i for k in range(20)},
    }


def build(path: Path, runs: int, rounds: int) -> None:
    rng = random.Random(0)
    with RunDB(path) as db:
        ids = [
            db.start_run(
                f"run-{i}", seed=i, config=config(i), kind="deploy" if i % 4 == 0 else "simulate"
            )
            for i in range(runs)
        ]
    con = sqlite3.connect(path)
    cols = ", ".join(ROUND_COLUMNS)
    marks = ", ".join("?" for _ in ROUND_COLUMNS)
    with con:
        for rid in ids:
            rows = []
            acc, t = 0.1, 0.0
            for r in range(1, rounds + 1):
                acc += (0.95 - acc) * 0.01 + rng.gauss(0, 0.003)
                t += rng.expovariate(1.0)
                folded = rng.randint(7, 10)
                row = {
                    "round": r,
                    "version": r,
                    "virtual_time": t,
                    "wall_time": t / 50,
                    "test_loss": -math.log(max(acc, 1e-3)),
                    "test_accuracy": acc,
                    "client_loss": -math.log(max(acc, 1e-3)) * 1.1,
                    "client_accuracy": acc * 0.98,
                    "train_loss": None,
                    "train_accuracy": None,
                    "selected": 10,
                    "dispatched": 10,
                    "folded": folded,
                    "dropped": 10 - folded,
                    "refused": rng.randint(0, 1),
                    "late": 0,
                    "applied": 1,
                    "bytes_down": 10 * 400_000,
                    "bytes_up": folded * 400_000,
                    "staleness_mean": rng.random() * 2,
                    "staleness_max": rng.randint(0, 5),
                }
                rows.append(
                    (
                        rid,
                        *[row[c] for c in ROUND_COLUMNS],
                        "non-finite values: 1" if row["refused"] else None,
                    )
                )
            con.executemany(
                f"INSERT INTO rounds (run_id, {cols}, refusals) VALUES (?, {marks}, ?)", rows
            )
            con.execute(
                "UPDATE runs SET status = 'finished', ended = started + 60, summary = ? "
                "WHERE id = ?",
                (json.dumps({"rounds": rounds, "final_accuracy": acc}), rid),
            )
    con.close()


def get(url: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as r:
        body = r.read()
        assert r.status == 200, (url, r.status)
    return time.perf_counter() - t0, len(body)


def browser_times(base: str, pages: list[tuple[str, str]], reps: int) -> dict[str, float] | str:
    sys.path.insert(0, str(ROOT))
    from tests.dashboard.browser import browser_paths, make_driver, rendered

    paths = browser_paths()
    if isinstance(paths, str):
        return paths
    driver = make_driver()
    out = {}
    try:
        for label, page in pages:
            times = []
            for _ in range(reps + 1):
                driver.get(base + page)
                assert rendered(driver, 30) != "error", page
                times.append(
                    float(driver.find_element("tag name", "body").get_attribute("data-ready-at"))
                )
            out[label] = statistics.median(times[1:]) / 1000  # the first warms the caches
    finally:
        driver.quit()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedagg-dash-bench-") as tmp:
        db = Path(tmp) / "runs.db"
        t0 = time.perf_counter()
        build(db, args.runs, args.rounds)
        built = time.perf_counter() - t0
        size = db.stat().st_size
        server = make_server(Dashboard(db), "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_address[1]}"
        mid = args.runs // 2
        five = ",".join(str(i) for i in range(1, 6))
        twelve = ",".join(str(i) for i in range(1, 13))
        endpoints = [
            ("page /", "/"),
            (f"page /runs/{mid}", f"/runs/{mid}"),
            ("page /compare (5 runs)", f"/compare?ids={five}"),
            ("page /live", "/live"),
            ("/api/runs", "/api/runs"),
            ("/api/runs?kind=deploy&name=run-1", "/api/runs?kind=deploy&name=run-1"),
            (f"/api/runs/{mid}", f"/api/runs/{mid}"),
            (f"/api/runs/{mid}/rounds", f"/api/runs/{mid}/rounds"),
            ("/api/compare (5 runs)", f"/api/compare?ids={five}"),
            ("/api/compare (12 runs)", f"/api/compare?ids={twelve}"),
        ]
        rows = []
        for label, url in endpoints:
            get(base + url)
            times, n = zip(*(get(base + url) for _ in range(args.reps)), strict=True)
            rows.append(
                {
                    "what": label,
                    "median_s": statistics.median(times),
                    "max_s": max(times),
                    "bytes": n[0],
                }
            )
            print(
                f"{label:40s} median {rows[-1]['median_s'] * 1000:8.1f} ms  "
                f"max {rows[-1]['max_s'] * 1000:8.1f} ms  {n[0]:>9,} B"
            )
        pages = [
            ("runs", "/"),
            (f"run {mid}", f"/runs/{mid}"),
            ("compare (5 runs)", f"/compare?ids={five}"),
            ("compare (12 runs)", f"/compare?ids={twelve}"),
        ]
        browser = browser_times(base, pages, 5)
        print("browser:", browser)
        server.shutdown()
    info = machine_info()
    result = {
        "runs": args.runs,
        "rounds": args.rounds,
        "db_bytes": size,
        "build_s": built,
        "endpoints": rows,
        "browser": browser,
        "machine": info,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "dashboard.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Dashboard: {args.runs} runs x {args.rounds} rounds",
        "",
        f"- Date: {info['date']}; git {info['git']}",
        f"- Machine: {info.get('model_name', '?')} ({info['cores']} cores), Python "
        f"{info['python']}",
        f"- Database: {size / 2**20:.1f} MiB, {args.runs * args.rounds:,} rounds (built in "
        f"{built:.1f} s)",
        "- Command: `.venv/bin/python benchmarks/dashboard.py`",
        "",
        "## Server: each page and endpoint over HTTP (loopback)",
        "",
        f"Wall time of a GET (urllib, {args.reps} repetitions after one warm-up).",
        "",
        "| page / endpoint | median ms | max ms | bytes |",
        "|---|--:|--:|--:|",
        *[
            f"| `{r['what']}` | {r['median_s'] * 1000:.1f} | {r['max_s'] * 1000:.1f} | "
            f"{r['bytes']:,} |"
            for r in rows
        ],
        "",
        "## Browser: navigation start to the page drawn (headless Chromium)",
        "",
    ]
    if isinstance(browser, str):
        lines.append(f"Not measured: {browser}.")
    else:
        lines += [
            "Median of 5 loads after one warm-up: HTML, script, the JSON fetches and "
            "every SVG chart drawn (`data-ready-at`, from `performance.now()`).",
            "",
            "| page | seconds |",
            "|---|--:|",
            *[f"| {k} | {v:.3f} |" for k, v in browser.items()],
        ]
    (OUT / "dashboard.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT / 'dashboard.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
