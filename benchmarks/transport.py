"""Transport benchmark: fedagg's gRPC deployment vs Flower 1.42's deployment engine vs raw TCP.

Everything runs as real processes on 127.0.0.1: a server process and client processes for
fedagg (``_fedagg_server.py``, ``_fedagg_clients.py``: a zero model, FedAvg, sync rounds of
every client; clients answer each task with a constant delta, so the transport is what is
measured), SuperLink + SuperNodes + ServerApp + ClientApps for Flower (``_flower_transport.py``).

1. Upload + fold of a 1 GiB update, against raw TCP loopback (``sendall`` / ``recv_into`` of
   preallocated buffers between two processes). fedagg: the client's push time (stream, server
   checks every chunk, spools it, durable acknowledgement) plus the server's fold of the
   update; measured in its fastest setting (no TLS, no digest, no fsync) and its default one
   (TLS, signed sha256 digest, fsync before the ack).
2. Round latency, a 10-parameter model and 2 clients, 50 rounds (TLS and fsync on):
   the server's time from dispatching a round's tasks to applying its update (median, p90).
3. N clients each pushing a 10M-parameter update (40 MB), N in {10, 50, 100}: round time and
   the server process's peak RSS (VmHWM).

    .venv/bin/python benchmarks/transport.py [--quick] [--no-flower] [--wait-idle S]

Writes ``results/transport.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import itertools

from _common import FLOWER_ENV, GIB, MIB, machine_info, wait_for_idle

HERE = Path(__file__).resolve().parent
PY = sys.executable


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fedagg_run(
    params: int,
    clients: int,
    rounds: int,
    *,
    tls: bool,
    digest: bool,
    fsync: bool,
    client_procs: int = 1,
    adaptive_window: bool = False,
    timeout: float = 900,
) -> dict[str, Any]:
    """One fedagg federation: server process + ``client_procs`` client processes."""
    from fedagg.deploy import make_certs, make_keys

    with tempfile.TemporaryDirectory(dir=os.environ.get("FEDAGG_BENCH_TMP")) as tmp:
        d = Path(tmp)
        make_keys(d / "keys", [f"c{i:04d}" for i in range(clients)])
        if tls:
            make_certs(d / "certs")
        port = _free_port()
        args = [PY, str(HERE / "_fedagg_server.py"), str(d), str(port), str(params),
                str(clients), str(rounds)]  # fmt: skip
        args += ["--tls"] if tls else []
        args += [] if digest else ["--no-digest"]
        args += [] if fsync else ["--no-fsync"]
        args += ["--adaptive-window"] if adaptive_window else []
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        t0 = time.perf_counter()
        server = subprocess.Popen(args, stdout=subprocess.PIPE, env=env)
        per = [clients * i // client_procs for i in range(client_procs + 1)]
        procs = [
            subprocess.Popen(
                [
                    PY,
                    str(HERE / "_fedagg_clients.py"),
                    str(d),
                    str(port),
                    str(params),
                    str(lo),
                    str(hi - lo),
                    *(["--tls"] if tls else []),
                ],
                stdout=subprocess.PIPE,
                env=env,
            )
            for lo, hi in itertools.pairwise(per)
        ]
        try:
            out = server.communicate(timeout=timeout)[0].decode()
            reports: list[dict[str, Any]] = []
            for p in procs:
                reports += json.loads(p.communicate(timeout=60)[0].decode().splitlines()[-1])
        finally:
            for p in [server, *procs]:
                if p.poll() is None:
                    p.kill()
        res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        res["wall_s"] = time.perf_counter() - t0
        res["clients"] = reports
        return res


def bench_upload(nbytes: int) -> list[dict[str, Any]]:
    """Three rounds of one client; the first is cold (fresh memory everywhere), the last is
    the steady state of a running server, which is what the table reports."""
    rows = []
    for name, tls, digest, fsync, adaptive in [
        ("fedagg, no TLS, no digest, no fsync, adaptive window", False, False, False, True),
        ("fedagg, TLS, no digest, no fsync, adaptive window", True, False, False, True),
        ("fedagg default: TLS, sha256 digest, fsync, fixed window", True, True, True, False),
    ]:
        r = fedagg_run(
            nbytes // 4, 1, 3, tls=tls, digest=digest, fsync=fsync, adaptive_window=adaptive
        )
        c = r["clients"][0]
        row = {
            "setting": name,
            "bytes": nbytes,
            "push_s": c["push_s"][-1],
            "fold_s": r["folds"][-1],
            "pull_s": c["pull_s"][-1],
            "cold_push_s": c["push_s"][0],
            "cold_fold_s": r["folds"][0],
            "upload_fold_s": c["push_s"][-1] + r["folds"][-1],
        }
        row["gib_per_s"] = nbytes / GIB / row["upload_fold_s"]
        rows.append(row)
        print(f"  {name}: {row['gib_per_s']:.2f} GiB/s upload+fold", flush=True)
    return rows


def bench_latency(rounds: int) -> dict[str, Any]:
    r = fedagg_run(10, 2, rounds, tls=True, digest=True, fsync=True)
    xs = r["round_s"][2:]  # after the first rounds (connection set-up, JIT)
    q = statistics.quantiles(xs, n=10)
    return {
        "rounds": rounds,
        "median_s": statistics.median(xs),
        "p90_s": q[-1],
        "max_s": max(xs),
        "all_s": r["round_s"],
    }


def bench_many(ns: list[int], params: int) -> list[dict[str, Any]]:
    rows = []
    for n in ns:
        r = fedagg_run(params, n, 2, tls=True, digest=True, fsync=True, client_procs=2)
        rows.append(
            {
                "clients": n,
                "params": params,
                "round_s": r["round_s"],
                "peak_rss": r["peak_rss"],
                "timings": r["timings"],
            }
        )
        print(f"  {n} clients: rounds {r['round_s']}, peak RSS {r['peak_rss'] / MIB:.0f} MiB")
    return rows


def render(res: dict[str, Any], out: Path) -> None:
    tcp = res["raw_tcp"]["gib_per_s"]
    lines = [
        "# Transport: fedagg deployment vs Flower 1.42 deployment engine vs raw TCP",
        "",
        f"Machine: {res['machine'].get('cpu', '?')}, {res['machine'].get('cores', '?')} cores. "
        f"Raw TCP loopback: **{tcp:.2f} GiB/s** (best of 3, 1 GiB).",
        "",
        "## 1 GiB update: upload + fold",
        "",
        "Steady state (the third round of a running server; the first, cold round in brackets).",
        "",
        "| setting | upload+fold | GiB/s | of raw TCP | push | fold | pull (download) |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['setting']} | {r['upload_fold_s']:.2f} s | {r['gib_per_s']:.2f} | "
        f"{r['gib_per_s'] / tcp:.0%} | {r['push_s']:.2f} s ({r['cold_push_s']:.2f}) | "
        f"{r['fold_s']:.2f} s ({r['cold_fold_s']:.2f}) | {r['pull_s']:.2f} s |"
        for r in res["upload"]
    ]
    fl = res.get("flower", {}).get("upload")
    if fl:
        up = fl.get("upload_s") or float("nan")
        gb = fl.get("bytes", GIB) / GIB
        lines.append(
            f"| Flower 1.42 (insecure) {gb:.2f} GiB | {up:.2f} s | {gb / up:.2f} | "
            f"{gb / up / tcp:.0%} | | | |"
        )
    lat = res["latency"]
    lines += [
        "",
        "## Round latency: 10 parameters, 2 clients",
        "",
        "| system | median | p90 | max |",
        "|---|---|---|---|",
        f"| fedagg (TLS, signed, fsync + checkpoint each round) | {lat['median_s'] * 1e3:.1f} ms "
        f"| {lat['p90_s'] * 1e3:.1f} ms | {lat['max_s'] * 1e3:.1f} ms |",
    ]
    fl = res.get("flower", {}).get("latency")
    if fl:
        lines.append(
            f"| Flower 1.42 (insecure) | {fl.get('median_s', float('nan')) * 1e3:.0f} ms | "
            f"{fl.get('p90_s', float('nan')) * 1e3:.0f} ms | |"
        )
    lines += [
        "",
        "## N clients × 10M-parameter updates: round time and server peak RSS",
        "",
        "| system | clients | round time | server peak RSS |",
        "|---|---|---|---|",
    ]
    for r in res["many"]:
        lines.append(
            f"| fedagg | {r['clients']} | {r['round_s'][-1]:.2f} s | "
            f"{r['peak_rss'] / MIB:.0f} MiB |"
        )
    for r in res.get("flower", {}).get("many", []) or []:
        per = r.get("per_round_s") or [float("nan")]
        lines.append(
            f"| Flower 1.42 (SuperLink + ServerApp; SuperNodes took "
            f"{r.get('peak_rss_nodes_bytes', 0) / GIB:.1f} GiB more) | {r.get('n_clients')} | "
            f"{per[-1]:.2f} s | {r.get('peak_rss_server_bytes', 0) / MIB:.0f} MiB |"
        )
    lines += ["", f"Command: `{res['command']}`", ""]
    (out / "transport.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        ns = [r["clients"] for r in res["many"]]
        ax[0].plot(ns, [r["peak_rss"] / MIB for r in res["many"]], "o-", label="fedagg")
        frs = res.get("flower", {}).get("many", []) or []
        if frs:
            ax[0].plot(
                [r.get("n_clients") for r in frs],
                [r.get("peak_rss_server_bytes", 0) / MIB for r in frs], "s", label="Flower 1.42",
            )  # fmt: skip
        ax[0].set_xlabel("clients (10M params each)")
        ax[0].set_ylabel("server peak RSS (MiB)")
        ax[0].legend()
        names = [r["setting"].replace("fedagg", "").strip(", ") or "fedagg" for r in res["upload"]]
        ax[1].barh([*names, "raw TCP"], [r["gib_per_s"] for r in res["upload"]] + [tcp])
        ax[1].set_xlabel("1 GiB upload+fold (GiB/s)")
        fig.tight_layout()
        fig.savefig(out / "transport.png", dpi=120)
    except ImportError:
        pass


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 MiB, 10 rounds, N in {4, 8}")
    ap.add_argument("--no-flower", action="store_true")
    ap.add_argument("--wait-idle", type=float, default=0.0)
    ap.add_argument("--out", default=str(HERE / "results"))
    a = ap.parse_args(argv)
    os.environ.update(FLOWER_ENV)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    nbytes = 64 * MIB if a.quick else GIB
    rounds = 10 if a.quick else 50
    ns = [4, 8] if a.quick else [10, 50, 100]
    params = 1_000_000 if a.quick else 10_000_000
    import _flower_transport as flw

    res: dict[str, Any] = {"machine": machine_info(), "command": "python " + " ".join(sys.argv)}
    if a.wait_idle:
        wait_for_idle(a.wait_idle)
    res["raw_tcp"] = flw.raw_tcp_loopback(nbytes)
    print(f"raw TCP {res['raw_tcp']['gib_per_s']:.2f} GiB/s", flush=True)
    print("upload + fold:", flush=True)
    res["upload"] = bench_upload(nbytes)
    res["latency"] = bench_latency(rounds)
    print(f"latency: median {res['latency']['median_s'] * 1e3:.1f} ms", flush=True)
    print("many clients:", flush=True)
    res["many"] = bench_many(ns, params)
    if not a.no_flower:
        fl: dict[str, Any] = {}
        for key, fn in [
            ("upload", lambda: flw.flower_upload(nbytes)),
            ("latency", lambda: flw.flower_round_latency(rounds=min(rounds, 20))),
            # one SuperNode process tree per client costs ~0.7 GB here: only N=10 fits in
            # 16 GiB (N=25 was killed at 16.1 GiB; see results/flower_transport.json)
            ("many", lambda: [flw.flower_many_clients(min(ns), params, 2)]),
        ]:
            if a.wait_idle:
                wait_for_idle(a.wait_idle)
            try:
                fl[key] = fn()
            except Exception as e:  # recorded, not hidden
                fl[key] = {"error": f"{type(e).__name__}: {e}"}
            print(f"flower {key}: done", flush=True)
        res["flower"] = fl
    (out / "transport.json").write_text(json.dumps(res, indent=1, default=str))
    render(res, out)
    print((out / "transport.md").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
