"""Transport benchmark: fedagg's gRPC deployment vs Flower 1.42's deployment engine vs raw TCP.

Everything runs as real processes on 127.0.0.1: a server process and client processes for
fedagg (``_fedagg_server.py``, ``_fedagg_clients.py``: a zero model, FedAvg, sync rounds of
every client; clients answer each task with a constant delta, so the transport is what is
measured), SuperLink + SuperNodes + ServerApp + ClientApps for Flower (``_flower_transport.py``).

1. A 1 GiB update, against raw TCP loopback (``sendall`` / ``recv_into`` of preallocated
   buffers between two processes, measured at the start and the end of the same run): the
   client's push (until the server acknowledges it) plus the engine's step that puts it in the
   aggregate, for each setting of the data plane (issue 20, :data:`PLANE`): no TLS / TLS,
   no digest / signed sha256 / signed BLAKE3, S = 1, 2, 4 parallel streams, ``ingest`` =
   spool / fold, ``durability`` = fsync / retained, and two clients uploading at once; with
   each process's CPU seconds within the push (client and server share the machine's cores:
   what bounds each figure), and the ceiling Python gRPC sets (``_grpc_drain.py``: the same
   client code against a server that only drains the streams).
2. Round latency, a 10-parameter model and 2 clients, 50 rounds (TLS, signed digest, fsync;
   and the new secure settings: BLAKE3, retained, fold):
   the server's time from dispatching a round's tasks to applying its update (median, p90).
3. N clients each pushing a 10M-parameter update (40 MB), N in {10, 50, 100}: round time,
   the server's ingest over the push window (hierarchy.py's edge rate) and the server
   process's peak RSS (VmHWM); the new secure settings, and those of before at N = 100.

    .venv/bin/python benchmarks/transport.py [--quick] [--no-flower [--flower-from JSON]]
        [--wait-idle S] [--only KEYS] [--plane-only] [--notes FILE]

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
import signal
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import FLOWER_ENV, GIB, MIB, machine_info, wait_for_idle
from _transport_hardening import render_hardening, run_hardening, summaries
from _transport_run import HERE, PY, OtherCpu, cpu_between, fedagg_run

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
    ("default", "TLS, BLAKE3, retained, S=2, spool (the defaults)",
     {**_SECURE, "algorithm": "blake3", "streams": 2, "durability": "retained"}),
    ("secure", "TLS, BLAKE3, retained, S=4, fold", {**_SECURE, "algorithm": "blake3",
                                                     "streams": 4, "ingest": "fold",
                                                     "durability": "retained"}),
    # what "retained" acknowledges after: the log row committed (fsynced), the spool written
    # but not synced (without the background committer's load): its ack, until i20-durable
    ("retained-proxy", "TLS, BLAKE3, ack at the log commit (spool not synced), S=4, fold",
     {**_SECURE, "algorithm": "blake3", "streams": 4, "ingest": "fold", "fsync": False}),
    # the stream transport (the data port, deploy/_stream.py) for the uploads, next to gRPC
    ("stream-fast", "data port: no TLS/digest/fsync, S=1, spool",
     {**_FAST, "transport": "stream"}),
    ("stream-fast-s2", "data port: no TLS/digest/fsync, S=2, spool",
     {**_FAST, "streams": 2, "transport": "stream"}),
    ("stream-default", "data port: TLS, BLAKE3, retained, S=2, spool (the defaults)",
     {**_SECURE, "algorithm": "blake3", "durability": "retained", "streams": 2,
      "transport": "stream"}),
    ("default", "TLS, BLAKE3, retained, S=2, spool (the defaults, over gRPC)",
     {**_SECURE, "algorithm": "blake3", "durability": "retained", "streams": 2}),
]  # fmt: skip


#: The secure path's new settings (the lead flips the defaults to them at merge).
SECURE_NEW = {"algorithm": "blake3", "ingest": "fold", "durability": "retained"}


PLANE_ROUNDS = [3]  # rounds per 1 GiB row (--plane-rounds): the last is reported


def plane_row(key: str, label: str, opts: dict[str, Any], nbytes: int, clients: int = 1,
              ) -> dict[str, Any]:  # fmt: skip
    """One setting: ``clients`` clients (each in its own process) pushing ``nbytes`` each
    round, 3 rounds; the last (steady state) is reported. push = the client's upload until
    acknowledged (wall; with several clients: first start to last acknowledgement); apply =
    the engine's policy time for the round (for a spooled upload: read back, re-verify, fold;
    folded on receive: the bookkeeping); CPU = each process's CPU seconds within the push."""
    import _flower_transport as flw

    tcp = flw.raw_tcp_loopback(GIB, repeats=2)["gib_per_s"]  # the machine's state now
    with OtherCpu() as oc:
        r = fedagg_run(nbytes // 4, clients, PLANE_ROUNDS[0], client_procs=clients, **opts)
    last = [c["pushes"][-1] for c in r["clients"]]
    t0, t1 = min(p[0] for p in last), max(p[1] for p in last)
    pol = [t["policy"] for t in r["round_timings"]]
    apply_s = pol[-1] - pol[-2]
    at = r["folds_at_round"]
    engine_folds = r["folds"][at[-2] : at[-1]]  # none: every update was folded on receive
    fold_s = sum(engine_folds)
    push = t1 - t0
    server_cpu = cpu_between(r["cpu_samples"], t0, t1)
    client_cpu = sum(p[2] for p in last)
    row = {
        "key": key,
        "setting": label,
        "options": opts,
        "clients": clients,
        "bytes": nbytes * clients,
        "push_s": push,
        "apply_s": apply_s,
        "fold_s": fold_s,
        "engine_folds": len(engine_folds),
        "upload_fold_s": push + fold_s,
        "push_gib_per_s": nbytes * clients / GIB / push,
        "gib_per_s": nbytes * clients / GIB / (push + fold_s),
        "server_cpu_s": server_cpu,
        "client_cpu_s": client_cpu,
        "cores_busy": (server_cpu + client_cpu) / push,
        "all_push_s": [c["push_s"] for c in r["clients"]],
        "round_s": r["round_s"],
        "other_cpu": oc.share,
        "raw_tcp_gib_per_s": tcp,  # measured just before this row (one flow, best of 2)
    }
    print(f"  {label}: push {push:.2f} s + fold {fold_s:.2f} s = {row['gib_per_s']:.2f} GiB/s;"
          f" CPU server {server_cpu:.2f} s, client {client_cpu:.2f} s [other {oc.share:.0%}]",
          flush=True)  # fmt: skip
    return row


def grpc_drain(nbytes: int, cases: list[tuple[int, str]], reps: int = 3) -> list[dict[str, Any]]:
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
                 digest, str(reps), str(server.pid)],
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


TWO = [
    ("two", "two clients at once, no TLS/digest/fsync, S=1, spool", _FAST),
    ("two-secure", "two clients at once, TLS, BLAKE3, retained, S=4, fold", PLANE[11][2]),
    ("two-proxy", "two clients at once, TLS, BLAKE3, ack at the log commit, S=4, fold",
     PLANE[12][2]),
    ("two-stream", "two clients at once, data port, no TLS/digest/fsync, S=1, spool",
     {**_FAST, "transport": "stream"}),
    ("two-stream-default", "two clients at once, data port, TLS, BLAKE3, retained, S=2, spool",
     {**_SECURE, "algorithm": "blake3", "durability": "retained", "streams": 2,
      "transport": "stream"}),
]  # fmt: skip


def bench_plane(
    nbytes: int,
    only: list[str] | None = None,
    save: Callable[[list[dict[str, Any]]], None] = lambda rows: None,
) -> list[dict[str, Any]]:
    """The 1 GiB rows, in the order of ``only`` (keys of PLANE and TWO; None: all), each
    saved (``save``) as soon as it is measured."""
    table = {k: (label, opts, 1) for k, label, opts in PLANE}
    table.update({k: (label, opts, 2) for k, label, opts in TWO})
    rows: list[dict[str, Any]] = []
    for key in only if only is not None else list(table):
        label, opts, clients = table[key]
        try:
            rows.append(plane_row(key, label, opts, nbytes, clients=clients))
        except Exception as e:  # recorded, not hidden (e.g. a feature not on this branch)
            print(f"  {label}: FAILED {type(e).__name__}: {e}", flush=True)
            rows.append({"key": key, "setting": label, "options": opts, "error": str(e)})
        save(rows)
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


def cpu_bound(r: dict[str, Any], cores: int = 2) -> float:
    """The GiB/s a row's CPU seconds allow on an idle machine of ``cores``: the push cannot be
    shorter than the busier process's CPU, nor than both processes' CPU spread over the cores
    (then the engine's fold after the ack, as measured). Load-independent, unlike wall time."""
    s, c = r["server_cpu_s"], r["client_cpu_s"]
    return r["bytes"] / GIB / (max(s, c, (s + c) / cores) + r["fold_s"])


def plane_summary(res: dict[str, Any]) -> dict[str, Any]:
    """The headline fractions of raw TCP: the secure path (TLS + signed digest + durable ack)
    and the fast one (none of them), each its best row; two uploads at once vs one flow."""
    tcp = res["raw_tcp"]["gib_per_s"]
    rows = [r for r in res.get("plane", []) if "error" not in r]

    def best(pred: Any) -> dict[str, Any] | None:
        cands = [r for r in rows if r["clients"] == 1 and pred(r["options"])]
        return max(cands, key=lambda r: r["gib_per_s"]) if cands else None

    secure = best(lambda o: o.get("tls") and o.get("digest") and o.get("fsync"))
    proxy = best(lambda o: o.get("tls") and o.get("digest") and not o.get("fsync"))
    fast = best(lambda o: not (o.get("tls") or o.get("digest") or o.get("fsync")))
    out: dict[str, Any] = {"raw_tcp_gib_per_s": tcp}
    idle = res.get("raw_tcp_idle", {}).get("gib_per_s", tcp)
    for name, r, target in (("secure", secure, TARGET_SECURE), ("fast", fast, TARGET_FAST),
                            ("proxy", proxy, TARGET_SECURE)):  # fmt: skip
        if r is not None:
            out[name] = {"key": r["key"], "setting": r["setting"], "target": target,
                         "fraction": r["gib_per_s"] / r.get("raw_tcp_gib_per_s", tcp),
                         "cpu_bound_fraction": cpu_bound(r) / idle}  # fmt: skip
    two = [r for r in rows if r["clients"] == 2]
    if two:
        r = max(two, key=lambda r: r["push_gib_per_s"])
        frac = r["push_gib_per_s"] / r.get("raw_tcp_gib_per_s", tcp)
        out["two"] = {"key": r["key"], "setting": r["setting"], "target": 1.0, "fraction": frac}
    return out


def _ingest(r: dict[str, Any], nbytes: int) -> dict[str, Any]:
    """The server's ingest in a run's last round: update bytes over the window from the first
    push's start to the last push's acknowledgement (other clients may still be downloading
    the model in it: a conservative rate), and the server's CPU seconds in that window."""
    last = [c["pushes"][-1] for c in r["clients"] if c.get("pushes")]
    if not last:
        return {}
    t0, t1 = min(p[0] for p in last), max(p[1] for p in last)
    cpu = cpu_between(r["cpu_samples"], t0, t1)
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
    idle = res.get("raw_tcp_idle", {}).get("gib_per_s", tcp)
    idle_from = f", {res['raw_tcp_idle']['from']}" if "raw_tcp_idle" in res else ""
    if res.get("plane"):
        sm = plane_summary(res)
        lines += [
            f"## {res['plane'][0].get('bytes', GIB) / GIB:g} GiB update: upload until "
            "acknowledged, then in the aggregate (issue 20)",
            "",
            f"One client, {res.get('plane_rounds', 3)} rounds, the last (steady state) reported. "
            "push = the client's upload "
            "until the server acknowledges it; fold = the engine's fold of the update after it "
            "(0 when it was folded on receive, before the acknowledgement: `ingest = fold`); "
            "GiB/s = update bytes / (push + fold), the measure of before issue 20; apply = the "
            "engine's whole step for the round (a spooled update's read-back and re-verification, "
            "the fold, and the round's close: finalize, server step, for every setting). "
            "Raw TCP is measured just before each row (one flow, 1 GiB, best of 2): the "
            "machine is shared with other work, and the fraction compares like with like. "
            "CPU = each process's CPU seconds (all threads) "
            "within the push; cores busy = (server + client CPU) / push (2 cores here); "
            "other = the share of the machine other processes used meanwhile. S = parallel "
            "streams; fold/spool = `ingest`; fsync/retained = `durability`.",
            "",
            f"CPU-bound = what the row's CPU seconds allow on an idle machine (the busier "
            f"process's CPU, or both spread over the 2 cores, plus the fold), and its fraction of "
            f"the idle machine's raw TCP ({idle:.2f} GiB/s{idle_from}): the load-independent "
            f"figure.",
            "",
            "| setting | push | fold | GiB/s | raw TCP just before | of raw TCP | push alone GiB/s "
            "| apply | server CPU | client CPU | cores busy | other | CPU-bound GiB/s | of idle "
            "raw TCP |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in res["plane"]:
            if "error" in r:
                lines.append(f"| {r['setting']} | failed: {r['error'][:120]} |" + " |" * 12)
                continue
            who = f" ({r['clients']} clients)" if r["clients"] > 1 else ""
            lines.append(
                f"| {r['setting']}{who} | {r['push_s']:.2f} s | {r['fold_s']:.2f} s | "
                f"{r['gib_per_s']:.2f} | {r.get('raw_tcp_gib_per_s', tcp):.2f} | "
                f"{r['gib_per_s'] / r.get('raw_tcp_gib_per_s', tcp):.0%} | "
                f"{r['push_gib_per_s']:.2f} | {r['apply_s']:.2f} s "
                f"| {r['server_cpu_s']:.2f} s | {r['client_cpu_s']:.2f} s | "
                f"{r['cores_busy']:.2f} | {r['other_cpu']:.0%} | {cpu_bound(r):.2f} | "
                f"{cpu_bound(r) / idle:.0%} |"
            )
        if res.get("drain"):
            lines += [
                "",
                "The ceiling Python gRPC sets here: fedagg's client upload code against a gRPC "
                "server that only drains the streams (`_grpc_drain.py`: no checks, no spool, no "
                "fold, no TLS), best of 3 (or of 1, in a short run):",
                "",
                "| streams | client digest | GiB/s | of raw TCP | server CPU | client CPU |",
                "|---|---|---|---|---|---|",
            ]
            lines += [
                f"| {d['streams']} | {d['digest']} | {d['gib_per_s']:.2f} | "
                f"{d['gib_per_s'] / d.get('raw_tcp_gib_per_s', tcp):.0%} | "
                f"{d['server_cpu_s']:.2f} s | "
                f"{d['client_cpu_s']:.2f} s |"
                for d in res["drain"]
            ]
        lines += ["", "Against the targets (fractions of one raw TCP flow, this run):", ""]
        for name, what in [
            ("secure", "secure path (TLS + signed digest + durable ack)"),
            (
                "proxy",
                "secure path acknowledged at the log commit (what `retained` acks after; "
                "measured without i20-durable's committer)",
            ),
            ("fast", "without TLS, digest and durability"),
            ("two", "two uploads at once (push alone) vs one raw TCP flow"),
        ]:
            x = sm.get(name)
            if x:
                cb = x.get("cpu_bound_fraction")
                lines.append(f"- {what}: **{x['fraction']:.0%}** of the raw TCP measured just "
                             f"before it ({x['setting']}), target {x['target']:.0%}: "
                             f"{_ok(x['fraction'], x['target'])}"
                             + (f"; CPU-bound on an idle machine: **{cb:.0%}** of idle raw TCP, "
                                f"{_ok(cb, x['target'])}" if cb is not None else ""))  # fmt: skip
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
    if res.get("many_from"):
        lines += ["", res["many_from"]]
    if res.get("flower_from"):
        lines += ["", f"Flower's rows: {res['flower_from']}"]
    lines += ["", f"Command: `{res['command']}`"]
    lines += [f"then `{u}`" for u in res.get("updates", []) if u != res["command"]]
    lines.append("")
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
                   label="upload + fold (in the aggregate)")  # fmt: skip
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


def save(res: dict[str, Any], a: argparse.Namespace, out: Path) -> None:
    """Write ``res`` (merged into the file's rows with ``--update``) as transport.json/.md/.png;
    called after each 1 GiB row, so an interrupted run keeps what it measured."""
    res = dict(res)
    for r in res["plane"] + res["drain"]:  # the raw TCP next to it (just before a plane row)
        r.setdefault("raw_tcp_gib_per_s", res["raw_tcp"]["gib_per_s"])
        r["command"] = res["command"]
    if a.update:  # this run's rows replace the same settings' rows of the file
        prev = json.loads((out / "transport.json").read_text())
        keys = {r["key"] for r in res["plane"]}
        prev["plane"] = [r for r in prev.get("plane", []) if r["key"] not in keys] + res["plane"]
        order = [k for k, *_ in PLANE] + [k for k, *_ in TWO]
        prev["plane"].sort(key=lambda r: order.index(r["key"]) if r["key"] in order else 99)
        if res["command"] not in prev.setdefault("updates", []):
            prev["updates"].append(res["command"])
        for k in ("latency", "latency_secure"):
            if k in res:
                prev[k] = res[k]
        if res["many"]:
            prev["many"] = res["many"]
        if res["drain"]:
            prev["drain"] = res["drain"]
        res = prev
    if not res.get("many") and a.flower_from:  # not re-measured: an earlier run's, said so
        old = json.loads(Path(a.flower_from).read_text())
        res["many"] = old.get("many", [])
        res["many_from"] = (
            f"The N-clients rows are from an earlier run of this benchmark (`{a.flower_from}`, "
            f"raw TCP {old['raw_tcp']['gib_per_s']:.2f} GiB/s then), not re-measured here."
        )
    (out / "transport.json").write_text(json.dumps(res, indent=1, default=str))
    render(res, out)


DRAIN_CASES = [(1, ""), (2, ""), (4, ""), (1, "blake3"), (1, "sha256")]


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
    ap.add_argument(
        "--update",
        action="store_true",
        help="merge the rows measured into the "
        "existing transport.json (each row keeps the raw TCP of its own run)",
    )
    ap.add_argument("--many", metavar="NS", help="N of the many-clients rows (10,50,100)")
    ap.add_argument("--skip-plane", action="store_true", help="no 1 GiB table (with --update)")
    ap.add_argument("--plane-rounds", type=int, default=3, help="rounds per 1 GiB row (>= 2)")
    ap.add_argument("--drain-reps", type=int, default=3, help="gRPC drain: best of this many")
    ap.add_argument("--rerender", action="store_true", help="re-write transport.md/.png")
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
        res["summary"] = summaries(res["runs"])
        render_hardening(res, Path(a.out))
        return
    if a.baseline:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # clean up on kill too
        run_hardening(a)
        return
    os.environ.update(FLOWER_ENV)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.rerender:  # transport.json's tables again (with --flower-from: its idle raw TCP)
        res = json.loads((out / "transport.json").read_text())
        if a.flower_from:
            old = json.loads(Path(a.flower_from).read_text())
            res["raw_tcp_idle"] = {**old["raw_tcp"], "from": "an earlier run on an idle "
                                   f"machine, `{old.get('command', '')}`"}  # fmt: skip
        if a.notes:
            res["plane_notes"] = [Path(a.notes).read_text().strip()]
        res.setdefault("updates", []).append("python " + " ".join(sys.argv))
        (out / "transport.json").write_text(json.dumps(res, indent=1, default=str))
        render(res, out)
        return
    nbytes = 64 * MIB if a.quick else GIB
    rounds = 10 if a.quick else 50
    ns = [4, 8] if a.quick else [10, 50, 100]
    if a.many:
        ns = [] if a.many == "none" else [int(x) for x in a.many.split(",")]
    params = 1_000_000 if a.quick else 10_000_000
    import _flower_transport as flw

    res: dict[str, Any] = {"machine": machine_info(), "command": "python " + " ".join(sys.argv)}
    if a.wait_idle:
        wait_for_idle(a.wait_idle)
    res["raw_tcp"] = flw.raw_tcp_loopback(nbytes)
    print(f"raw TCP {res['raw_tcp']['gib_per_s']:.2f} GiB/s", flush=True)
    print("1 GiB upload, the data plane's settings:", flush=True)
    only = [k for k in a.only.split(",") if k != "drain"] if a.only else None
    PLANE_ROUNDS[0] = max(2, a.plane_rounds)
    res["drain"], res["plane"], res["many"] = [], [], []
    res["plane_rounds"] = max(2, a.plane_rounds)
    if a.notes:
        res["plane_notes"] = [Path(a.notes).read_text().strip()]
    if a.no_flower and a.flower_from:  # Flower's figures of an earlier run, said so
        old = json.loads(Path(a.flower_from).read_text())
        if "flower" in old:
            res["flower"] = old["flower"]
            res["flower_from"] = (
                f"from an earlier run of this benchmark (`{a.flower_from}`, raw TCP "
                f"{old['raw_tcp']['gib_per_s']:.2f} GiB/s then), not re-measured."
            )
        res["raw_tcp_idle"] = {**old["raw_tcp"], "from": "an earlier run on an idle "
                               f"machine, `{old.get('command', '')}`"}  # fmt: skip
    if not a.skip_plane:
        drain_last = not a.only or "drain" in a.only.split(",")
        if drain_last and not a.only:  # the whole run: the ceiling first
            res["drain"] = grpc_drain(nbytes, DRAIN_CASES)

        def partial(rows: list[dict[str, Any]]) -> None:  # the rows so far, saved
            res["plane"] = rows
            save(res, a, out)

        res["plane"] = bench_plane(nbytes, only, partial)
        if drain_last and a.only:
            res["drain"] = grpc_drain(nbytes, DRAIN_CASES, reps=a.drain_reps)
        res["raw_tcp_end"] = flw.raw_tcp_loopback(nbytes)
        print(f"raw TCP (again) {res['raw_tcp_end']['gib_per_s']:.2f} GiB/s", flush=True)
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
    save(res, a, out)
    print((out / "transport.md").read_text())


if __name__ == "__main__":
    main(sys.argv[1:])
