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
            out = server.communicate(timeout=timeout)[0].decode()
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
