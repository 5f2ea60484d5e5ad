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

Before/after (issue 14: "the hardening adds <= 5% to round latency and upload throughput"),
fedagg only, no Flower:

    .venv/bin/python benchmarks/transport.py --baseline 8acdf2a [--after worktree|REV] [--quick]
        [--reps 5] [--no-many] [--wait-idle S] [--note TEXT]

extracts ``src/`` of REV (``git archive``) into a temporary directory and runs the same server
and client scripts on each side's ``src/`` (``PYTHONPATH``; every process reports the
``fedagg.__file__`` it imported, checked), in the default setting (TLS, signed sha256 digest,
fsync), interleaved (before/after, then after/before, ...): round latency (1.), a 1 GiB
(``--quick``: 256 MiB) upload with the fold and with the engine's whole apply step, and the
N=10 round of (3.). Writes ``results/hardening.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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
    src: Path | None = None,
    algorithm: str = "sha256",
    ingest: str = "spool",
    durability: str = "fsync",
    streams: int = 1,
) -> dict[str, Any]:
    """One fedagg federation: server process + ``client_procs`` client processes.

    ``src``: run them on the ``fedagg`` in that ``src`` directory (``PYTHONPATH``, ahead of the
    venv's editable install); every process must report a ``fedagg/__init__.py`` under it.
    Keys and certificates are made by the ``fedagg`` this process imported."""
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
        if algorithm != "sha256" or ingest != "spool" or durability != "fsync":
            args += ["--digest-algorithm", algorithm, "--ingest", ingest]
            args += ["--durability", durability]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if src is not None:
            env["PYTHONPATH"] = str(src)
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
                    *["--streams", str(streams)],
                ],
                stdout=subprocess.PIPE,
                env=env,
            )
            for lo, hi in itertools.pairwise(per)
        ]
        try:
            deadline = time.monotonic() + timeout
            while True:  # the server ends the run; a client that failed ends it too
                try:
                    out = server.communicate(timeout=1.0)[0].decode()
                    break
                except subprocess.TimeoutExpired:
                    failed = [p.returncode for p in procs if p.poll() not in (None, 0)]
                    if failed or time.monotonic() > deadline:
                        why = f"a client exited with {failed[0]}" if failed else "timed out"
                        raise RuntimeError(f"the fedagg run failed: {why}") from None
            if server.returncode != 0:  # its traceback went to stderr; don't wait for clients
                raise RuntimeError(f"the fedagg server exited with {server.returncode}")
            reports: list[dict[str, Any]] = []
            client_files: list[str] = []
            for p in procs:
                lines = p.communicate(timeout=60)[0].decode().splitlines()
                reports += json.loads(lines[-1])
                client_files += [json.loads(x)["fedagg_file"] for x in lines if "fedagg_file" in x]
        finally:
            for p in [server, *procs]:
                if p.poll() is None:
                    p.kill()
        res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
        res["wall_s"] = time.perf_counter() - t0
        res["clients"] = reports
        res["client_fedagg_files"] = client_files
        if src is not None:
            want = (src / "fedagg" / "__init__.py").resolve()
            got = [res.get("fedagg_file"), *client_files]
            if len(client_files) != len(procs) or any(
                f is None or Path(f).resolve() != want for f in got
            ):
                raise RuntimeError(f"imported {got}, not {want}")
        return res


#: The fast data plane's settings (issue 20), each a fedagg_run: (key, label, options).
#: "fast": no TLS, no digest, no fsync (nothing durable before the ack); the secure ones:
#: TLS + a signed digest + a durable acknowledgement (fsync before it, or "retained").
_FAST = {"tls": False, "digest": False, "fsync": False, "adaptive_window": True}
_SECURE = {"tls": True, "digest": True, "fsync": True}
PLANE: list[tuple[str, str, dict[str, Any]]] = [
    ("fast", "no TLS/digest/fsync, S=1, spool", _FAST),
    ("fast-s2", "no TLS/digest/fsync, S=2, spool", {**_FAST, "streams": 2}),
    ("fast-s4", "no TLS/digest/fsync, S=4, spool", {**_FAST, "streams": 4}),
    ("fast-fold", "no TLS/digest/fsync, S=1, fold", {**_FAST, "ingest": "fold"}),
    ("fast-fold-s4", "no TLS/digest/fsync, S=4, fold", {**_FAST, "ingest": "fold", "streams": 4}),
    ("tls", "TLS, no digest/fsync, S=1, spool", {**_FAST, "tls": True}),
    ("sha256", "TLS, sha256, fsync, S=1, spool (the default before)", _SECURE),
    ("blake3", "TLS, BLAKE3, fsync, S=1, spool", {**_SECURE, "algorithm": "blake3"}),
    ("blake3-s2", "TLS, BLAKE3, fsync, S=2, spool", {**_SECURE, "algorithm": "blake3",
                                                      "streams": 2}),
    ("blake3-s4", "TLS, BLAKE3, fsync, S=4, spool", {**_SECURE, "algorithm": "blake3",
                                                      "streams": 4}),
    ("blake3-s4-fold", "TLS, BLAKE3, fsync, S=4, fold", {**_SECURE, "algorithm": "blake3",
                                                          "streams": 4, "ingest": "fold"}),
    ("secure", "TLS, BLAKE3, retained, S=4, fold", {**_SECURE, "algorithm": "blake3",
                                                     "streams": 4, "ingest": "fold",
                                                     "durability": "retained"}),
]  # fmt: skip


#: The secure path's new settings (the lead flips the defaults to them at merge).
SECURE_NEW = {"algorithm": "blake3", "ingest": "fold", "durability": "retained"}


def _cpu_between(samples: list[list[float]], t0: float, t1: float) -> float:
    """A process's CPU seconds between wall-clock times t0 and t1, from its (wall, CPU)
    samples (linear between samples)."""

    def at(t: float) -> float:
        prev = samples[0]
        for w, c in samples:
            if w >= t:
                if w == prev[0]:
                    return c
                return prev[1] + (c - prev[1]) * (t - prev[0]) / (w - prev[0])
            prev = [w, c]
        return prev[1]

    return at(t1) - at(t0) if samples else float("nan")


def plane_row(key: str, label: str, opts: dict[str, Any], nbytes: int, clients: int = 1,
              ) -> dict[str, Any]:  # fmt: skip
    """One setting: ``clients`` clients (each in its own process) pushing ``nbytes`` each
    round, 3 rounds; the last (steady state) is reported. push = the client's upload until
    acknowledged (wall; with several clients: first start to last acknowledgement); apply =
    the engine's policy time for the round (for a spooled upload: read back, re-verify, fold;
    folded on receive: the bookkeeping); CPU = each process's CPU seconds within the push."""
    with _OtherCpu() as oc:
        r = fedagg_run(nbytes // 4, clients, 3, client_procs=clients, **opts)
    last = [c["pushes"][-1] for c in r["clients"]]
    t0, t1 = min(p[0] for p in last), max(p[1] for p in last)
    pol = [t["policy"] for t in r["round_timings"]]
    apply_s = pol[-1] - pol[-2]
    push = t1 - t0
    server_cpu = _cpu_between(r["cpu_samples"], t0, t1)
    client_cpu = sum(p[2] for p in last)
    row = {
        "key": key,
        "setting": label,
        "options": opts,
        "clients": clients,
        "bytes": nbytes * clients,
        "push_s": push,
        "apply_s": apply_s,
        "fold_s": r["folds"][-1] if r["folds"] else None,
        "upload_apply_s": push + apply_s,
        "push_gib_per_s": nbytes * clients / GIB / push,
        "gib_per_s": nbytes * clients / GIB / (push + apply_s),
        "server_cpu_s": server_cpu,
        "client_cpu_s": client_cpu,
        "cores_busy": (server_cpu + client_cpu) / push,
        "all_push_s": [c["push_s"] for c in r["clients"]],
        "round_s": r["round_s"],
        "other_cpu": oc.share,
    }
    print(f"  {label}: push {push:.2f} s + apply {apply_s:.2f} s = {row['gib_per_s']:.2f} GiB/s;"
          f" CPU server {server_cpu:.2f} s, client {client_cpu:.2f} s [other {oc.share:.0%}]",
          flush=True)  # fmt: skip
    return row


def grpc_drain(nbytes: int, cases: list[tuple[int, str]]) -> list[dict[str, Any]]:
    """fedagg's client upload code against a gRPC server that only drains the streams
    (``_grpc_drain.py``): the ceiling Python gRPC sets here, per (streams, digest) case."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    server = subprocess.Popen([PY, str(HERE / "_grpc_drain.py"), "serve"], stdout=subprocess.PIPE,
                              env=env, text=True)  # fmt: skip
    rows = []
    try:
        assert server.stdout is not None
        port = server.stdout.readline().strip()
        for streams, digest in cases:
            out = subprocess.run(
                [PY, str(HERE / "_grpc_drain.py"), "push", port, str(nbytes), str(streams),
                 digest, "3", str(server.pid)],
                capture_output=True, text=True, env=env, timeout=600, check=True,
            ).stdout  # fmt: skip
            r = json.loads(out.strip().splitlines()[-1])
            r.update(streams=streams, digest=digest or "none", bytes=nbytes,
                     gib_per_s=nbytes / GIB / r["s"])  # fmt: skip
            rows.append(r)
            print(f"  gRPC drain S={streams} digest={digest or '-'}: {r['gib_per_s']:.2f} GiB/s "
                  f"(CPU server {r['server_cpu_s']:.2f} s, client {r['client_cpu_s']:.2f} s)",
                  flush=True)  # fmt: skip
    finally:
        server.kill()
        server.wait()
    return rows


def bench_plane(nbytes: int, only: set[str] | None = None) -> list[dict[str, Any]]:
    rows = []
    for key, label, opts in PLANE:
        if only and key not in only:
            continue
        try:
            rows.append(plane_row(key, label, opts, nbytes))
        except Exception as e:  # recorded, not hidden (e.g. a feature not on this branch)
            print(f"  {label}: FAILED {type(e).__name__}: {e}", flush=True)
            rows.append({"key": key, "setting": label, "options": opts, "error": str(e)})
    for key, label, opts in [
        ("two", "two clients at once, no TLS/digest/fsync, S=1, spool", _FAST),
        ("two-secure", "two clients at once, TLS, BLAKE3, retained, S=4, fold", PLANE[-1][2]),
    ]:
        if only and key not in only:
            continue
        try:
            rows.append(plane_row(key, label, opts, nbytes, clients=2))
        except Exception as e:
            print(f"  {label}: FAILED {type(e).__name__}: {e}", flush=True)
            rows.append({"key": key, "setting": label, "options": opts, "error": str(e)})
    return rows


def bench_latency(rounds: int, **opts: Any) -> dict[str, Any]:
    r = fedagg_run(10, 2, rounds, **{**_SECURE, **opts})
    xs = r["round_s"][2:]  # after the first rounds (connection set-up, JIT)
    q = statistics.quantiles(xs, n=10)
    return {
        "rounds": rounds,
        "median_s": statistics.median(xs),
        "p90_s": q[-1],
        "max_s": max(xs),
        "all_s": r["round_s"],
    }


def bench_many(ns: list[int], params: int, **opts: Any) -> list[dict[str, Any]]:
    rows = []
    for n in ns:
        r = fedagg_run(params, n, 2, client_procs=2, **{**_SECURE, **opts})
        rows.append(
            {
                "clients": n,
                "params": params,
                "round_s": r["round_s"],
                "peak_rss": r["peak_rss"],
                "timings": r["timings"],
                "options": opts,
                **_ingest(r, params * 4),
            }
        )
        print(f"  {n} clients: rounds {r['round_s']}, peak RSS {r['peak_rss'] / MIB:.0f} MiB")
    return rows


#: Issue 20's targets, as fractions of one raw TCP flow (1 GiB upload, the update folded).
TARGET_SECURE, TARGET_FAST = 0.35, 0.60


def _ok(x: float, target: float) -> str:
    return "met" if x >= target else "**not met**"


def plane_summary(res: dict[str, Any]) -> dict[str, Any]:
    """The headline fractions of raw TCP: the secure path (TLS + signed digest + durable ack)
    and the fast one (none of them), each its best row; two uploads at once vs one flow."""
    tcp = res["raw_tcp"]["gib_per_s"]
    rows = [r for r in res.get("plane", []) if "error" not in r]

    def best(pred: Any) -> dict[str, Any] | None:
        cands = [r for r in rows if r["clients"] == 1 and pred(r["options"])]
        return max(cands, key=lambda r: r["gib_per_s"]) if cands else None

    secure = best(lambda o: o.get("tls") and o.get("digest") and o.get("fsync"))
    fast = best(lambda o: not (o.get("tls") or o.get("digest") or o.get("fsync")))
    out: dict[str, Any] = {"raw_tcp_gib_per_s": tcp}
    for name, r, target in (("secure", secure, TARGET_SECURE), ("fast", fast, TARGET_FAST)):
        if r is not None:
            out[name] = {"key": r["key"], "setting": r["setting"],
                         "fraction": r["gib_per_s"] / tcp, "target": target}  # fmt: skip
    two = [r for r in rows if r["clients"] == 2]
    if two:
        r = max(two, key=lambda r: r["push_gib_per_s"])
        out["two"] = {"key": r["key"], "setting": r["setting"],
                      "fraction": r["push_gib_per_s"] / tcp, "target": 1.0}  # fmt: skip
    return out


def _ingest(r: dict[str, Any], nbytes: int) -> dict[str, Any]:
    """The server's ingest in a run's last round: update bytes over the window from the first
    push's start to the last push's acknowledgement (other clients may still be downloading
    the model in it: a conservative rate), and the server's CPU seconds in that window."""
    last = [c["pushes"][-1] for c in r["clients"] if c.get("pushes")]
    if not last:
        return {}
    t0, t1 = min(p[0] for p in last), max(p[1] for p in last)
    cpu = _cpu_between(r["cpu_samples"], t0, t1)
    return {
        "push_window_s": t1 - t0,
        "ingest_Bps": len(last) * nbytes / (t1 - t0),
        "ingest_server_cpu_s": cpu,
        "ingest_Bps_per_server_core": len(last) * nbytes / cpu,
        "client_cpu_s": sum(p[2] for p in last),
    }


def render(res: dict[str, Any], out: Path) -> None:
    tcp = res["raw_tcp"]["gib_per_s"]
    end = res.get("raw_tcp_end", {}).get("gib_per_s")
    lines = [
        "# Transport: fedagg deployment vs Flower 1.42 deployment engine vs raw TCP",
        "",
        f"Machine: {res['machine'].get('model_name', res['machine'].get('cpu', '?'))}, "
        f"{res['machine'].get('cores', '?')} cores (client and server share them). Raw TCP "
        f"loopback, one flow: **{tcp:.2f} GiB/s** (best of 3, 1 GiB, at the start of the run"
        + (f"; {end:.2f} GiB/s at its end" if end else "")
        + ").",
        "",
    ]
    if res.get("plane"):
        sm = plane_summary(res)
        lines += [
            f"## {res['plane'][0].get('bytes', GIB) / GIB:g} GiB update: upload until "
            "acknowledged, then in the aggregate (issue 20)",
            "",
            "One client, 3 rounds, the last (steady state) reported. push = the client's upload "
            "until the server acknowledges it; apply = the engine's step for the round (a "
            "spooled update: read back, re-verify, fold; folded on receive: bookkeeping); "
            "GiB/s = 1 GiB / (push + apply). CPU = each process's CPU seconds (all threads) "
            "within the push; cores busy = (server + client CPU) / push (2 cores here); "
            "other = the share of the machine other processes used meanwhile. S = parallel "
            "streams; fold/spool = `ingest`; fsync/retained = `durability`.",
            "",
            "| setting | push | apply | GiB/s | of raw TCP | push alone GiB/s | server CPU | "
            "client CPU | cores busy | other |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in res["plane"]:
            if "error" in r:
                lines.append(f"| {r['setting']} | failed: {r['error'][:120]} | | | | | | | | |")
                continue
            who = f" ({r['clients']} clients)" if r["clients"] > 1 else ""
            lines.append(
                f"| {r['setting']}{who} | {r['push_s']:.2f} s | {r['apply_s']:.2f} s | "
                f"{r['gib_per_s']:.2f} | {r['gib_per_s'] / tcp:.0%} | {r['push_gib_per_s']:.2f} "
                f"| {r['server_cpu_s']:.2f} s | {r['client_cpu_s']:.2f} s | "
                f"{r['cores_busy']:.2f} | {r['other_cpu']:.0%} |"
            )
        if res.get("drain"):
            lines += [
                "",
                "The ceiling Python gRPC sets here: fedagg's client upload code against a gRPC "
                "server that only drains the streams (`_grpc_drain.py`: no checks, no spool, no "
                "fold, no TLS), best of 3:",
                "",
                "| streams | client digest | GiB/s | of raw TCP | server CPU | client CPU |",
                "|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {d['streams']} | {d['digest']} | {d['gib_per_s']:.2f} | "
                f"{d['gib_per_s'] / tcp:.0%} | {d['server_cpu_s']:.2f} s | "
                f"{d['client_cpu_s']:.2f} s |"
                for d in res["drain"]
            ]
        lines += ["", "Against the targets (fractions of one raw TCP flow, this run):", ""]
        for name, what in [
            ("secure", "secure path (TLS + signed digest + durable ack)"),
            ("fast", "without TLS, digest and durability"),
            ("two", "two uploads at once (push alone) vs one raw TCP flow"),
        ]:
            x = sm.get(name)
            if x:
                lines.append(f"- {what}: **{x['fraction']:.0%}** ({x['setting']}), target "
                             f"{x['target']:.0%}: {_ok(x['fraction'], x['target'])}")  # fmt: skip
        if res.get("plane_notes"):
            lines += ["", *res["plane_notes"]]
        lines.append("")
    if res.get("upload"):
        lines += [
            "## 1 GiB update: upload + fold (the settings of before issue 20)",
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
    if fl and "error" not in fl:
        up = fl.get("upload_s") or float("nan")
        gb = fl.get("bytes", GIB) / GIB
        lines += [
            "",
            f"Flower 1.42 (insecure), {gb:.2f} GiB upload: {up:.2f} s = {gb / up:.2f} GiB/s, "
            f"{gb / up / tcp:.1%} of raw TCP.",
        ]
    lines += [
        "",
        "## Round latency: 10 parameters, 2 clients",
        "",
        "| system | median | p90 | max |",
        "|---|---|---|---|",
    ]
    for key, what in [
        ("latency", "fedagg (TLS, signed sha256, fsync + checkpoint each round)"),
        ("latency_secure", "fedagg (TLS, signed BLAKE3, retained, fold)"),
    ]:
        lat = res.get(key)
        if lat:
            lines.append(
                f"| {what} | {lat['median_s'] * 1e3:.1f} ms | {lat['p90_s'] * 1e3:.1f} ms | "
                f"{lat['max_s'] * 1e3:.1f} ms |"
            )
    fl = res.get("flower", {}).get("latency")
    if fl and "error" not in fl:
        lines.append(
            f"| Flower 1.42 (insecure) | {fl.get('median_s', float('nan')) * 1e3:.0f} ms | "
            f"{fl.get('p90_s', float('nan')) * 1e3:.0f} ms | |"
        )
    lines += [
        "",
        "## N clients × 10M-parameter updates: round time and server peak RSS",
        "",
        "| system | clients | round time | ingest (push window) | server CPU in it | "
        "server peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["many"]:
        o = r.get("options") or {}
        what = ", ".join(f"{k}={v}" for k, v in o.items()) or "TLS, sha256, fsync, spool"
        ing = (
            f"{r['ingest_Bps'] / 1e9:.2f} GB/s in {r['push_window_s']:.2f} s"
            if "ingest_Bps" in r
            else ""
        )
        cpu = f"{r['ingest_server_cpu_s']:.2f} s" if "ingest_Bps" in r else ""
        lines.append(
            f"| fedagg ({what}) | {r['clients']} | {r['round_s'][-1]:.2f} s | {ing} | {cpu} | "
            f"{r['peak_rss'] / MIB:.0f} MiB |"
        )
    for r in res.get("flower", {}).get("many", []) or []:
        if "error" in r:
            continue
        per = r.get("per_round_s") or [float("nan")]
        lines.append(
            f"| Flower 1.42 (SuperLink + ServerApp; SuperNodes took "
            f"{r.get('peak_rss_nodes_bytes', 0) / GIB:.1f} GiB more) | {r.get('n_clients')} | "
            f"{per[-1]:.2f} s | | | {r.get('peak_rss_server_bytes', 0) / MIB:.0f} MiB |"
        )
    if res.get("flower_from"):
        lines += ["", f"Flower's rows: {res['flower_from']}"]
    lines += ["", f"Command: `{res['command']}`", ""]
    (out / "transport.md").write_text("\n".join(lines))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [r for r in res.get("plane", []) if "error" not in r]
        fig, ax = plt.subplots(1, 2, figsize=(13, 0.32 * len(rows) + 2.2),
                               gridspec_kw={"width_ratios": [2.2, 1]})  # fmt: skip
        names = [r["setting"] + (" (2 clients)" if r["clients"] == 2 else "") for r in rows]
        ys = range(len(rows))
        ax[0].barh(ys, [r["gib_per_s"] for r in rows], color="tab:blue",
                   label="upload + apply (in the aggregate)")  # fmt: skip
        ax[0].barh(ys, [r["push_gib_per_s"] for r in rows], color="none", edgecolor="k",
                   label="push alone")  # fmt: skip
        ax[0].set_yticks(list(ys), names, fontsize=7)
        ax[0].invert_yaxis()
        for frac, style in ((1.0, "-"), (TARGET_FAST, "--"), (TARGET_SECURE, ":")):
            ax[0].axvline(tcp * frac, color="tab:red", ls=style, lw=1,
                          label=f"{frac:.0%} of raw TCP ({tcp:.2f} GiB/s)")  # fmt: skip
        ax[0].set_xlabel("1 GiB update (GiB/s)")
        ax[0].legend(fontsize=7, loc="lower right")
        srv = [r["server_cpu_s"] / r["push_s"] for r in rows]
        ax[1].barh(ys, srv, label="server")
        ax[1].barh(ys, [r["client_cpu_s"] / r["push_s"] for r in rows], left=srv, label="client")
        ax[1].axvline(res["machine"].get("cores", 2), color="k", lw=1)
        ax[1].set_yticks(list(ys), [""] * len(rows))
        ax[1].invert_yaxis()
        ax[1].set_xlabel("cores busy during the push")
        ax[1].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "transport.png", dpi=120)
        plt.close(fig)
    except ImportError:
        pass


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


class _OtherCpu:
    """Share of the machine's CPU used by processes other than this one and its (reaped)
    children while the block ran: how disturbed a measurement was."""

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self) -> _OtherCpu:
        from _common import _busy_s

        self._busy_s = _busy_s
        self._t, self._b, self._o = time.perf_counter(), _busy_s(), self._own()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t
        other = (self._busy_s() - self._b) - (self._own() - self._o)
        self.share = max(0.0, other / (wall * (os.cpu_count() or 1)))


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


def _summaries(runs: list[dict[str, Any]]) -> dict[str, Any]:
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
                    with _OtherCpu() as oc:
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
    res["summary"] = _summaries(runs)
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


def main(argv: list[str]) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="64 MiB, 10 rounds, N in {4, 8} (with --baseline: 256 MiB uploads)",
    )
    ap.add_argument("--no-flower", action="store_true")
    ap.add_argument("--flower-from", metavar="JSON", help="with --no-flower: Flower's rows of "
                    "an earlier transport.json")  # fmt: skip
    ap.add_argument("--only", metavar="KEYS", help="only these settings of the 1 GiB table "
                    "(comma-separated keys of PLANE, 'two', 'two-secure')")  # fmt: skip
    ap.add_argument("--plane-only", action="store_true", help="only the 1 GiB table")
    ap.add_argument("--notes", metavar="FILE", help="a paragraph for the 1 GiB table")
    ap.add_argument("--wait-idle", type=float, default=0.0)
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--baseline", metavar="REV",
                    help="compare REV's src/ (before) with --after's, fedagg only; writes "
                    "results/hardening.{json,md,png}")  # fmt: skip
    ap.add_argument(
        "--after",
        default="worktree",
        metavar="REV",
        help="with --baseline: 'worktree' (this checkout's src/) or a revision",
    )
    ap.add_argument("--reps", type=int, default=0, help="with --baseline: repetitions (5)")
    ap.add_argument("--no-many", action="store_true", help="with --baseline: skip N=10")
    ap.add_argument("--note", default="", help="with --baseline: a line for the report")
    ap.add_argument("--render", metavar="JSON", help="re-write hardening.md/.png from JSON")
    a = ap.parse_args(argv)
    if a.render:
        res = json.loads(Path(a.render).read_text())
        res["summary"] = _summaries(res["runs"])
        render_hardening(res, Path(a.out))
        return
    if a.baseline:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on kill too
        run_hardening(a)
        return
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
    print("1 GiB upload, the data plane's settings:", flush=True)
    only = set(a.only.split(",")) if a.only else None
    res["drain"] = grpc_drain(nbytes, [(1, ""), (2, ""), (4, ""), (1, "blake3"), (1, "sha256")])
    res["plane"] = bench_plane(nbytes, only)
    res["raw_tcp_end"] = flw.raw_tcp_loopback(nbytes)
    print(f"raw TCP (again) {res['raw_tcp_end']['gib_per_s']:.2f} GiB/s", flush=True)
    if a.notes:
        res["plane_notes"] = [Path(a.notes).read_text().strip()]
    if not a.plane_only:
        res["latency"] = bench_latency(rounds)
        print(f"latency: median {res['latency']['median_s'] * 1e3:.1f} ms", flush=True)
        res["latency_secure"] = bench_latency(rounds, **SECURE_NEW)
        print(f"latency (new): median {res['latency_secure']['median_s'] * 1e3:.1f} ms")
        print("many clients:", flush=True)
        res["many"] = bench_many(ns, params, **SECURE_NEW)
        res["many"] += bench_many(ns[-1:], params)  # the settings of before, N = 100
    else:
        res["many"] = []
    if a.no_flower and a.flower_from:  # Flower's figures of an earlier run, said so
        old = json.loads(Path(a.flower_from).read_text())
        if "flower" in old:
            res["flower"] = old["flower"]
            res["flower_from"] = (
                f"from an earlier run of this benchmark (`{a.flower_from}`, raw TCP "
                f"{old['raw_tcp']['gib_per_s']:.2f} GiB/s then), not re-measured."
            )
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
