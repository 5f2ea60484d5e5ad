"""Shared benchmark plumbing: read bandwidth, memory probes, child processes, machine info."""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numba
import numpy as np
from numba import prange

#: Flower must neither phone home nor check for updates (the benchmark runs offline).
FLOWER_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}
RESULT_TAG = "@@RESULT@@ "
GIB = 1 << 30
MIB = 1 << 20


def set_flower_env() -> None:
    """Set Flower's opt-out variables; call before anything imports ``flwr``."""
    for k, v in FLOWER_ENV.items():
        os.environ[k] = v


# -- read bandwidth ----------------------------------------------------------------------------


@numba.njit(parallel=True, fastmath=True, cache=True)  # type: ignore[untyped-decorator]
def read_lanes(x: np.ndarray) -> float:
    """Sum ``x`` with 64 independent lane-parallel partial sums: a pure read stream."""
    n = x.size
    w = 2048
    nblk = n // w
    nt = 64
    per = (nblk + nt - 1) // nt
    out = np.zeros(nt, np.float32)
    for t in prange(nt):
        loc = np.zeros(w, np.float32)
        for b in range(t * per, min(nblk, (t + 1) * per)):
            xb = x[b * w : (b + 1) * w]
            for j in range(w):
                loc[j] += xb[j]
        out[t] = loc.sum()
    return out.sum() + x[nblk * w :].sum()


def measure_bandwidth(gib: float = 1.0, repeats: int = 7) -> dict[str, float]:
    """Best-of-``repeats`` read bandwidth (bytes/s) over a ``gib``-GiB float32 buffer.

    ``numba``: the multi-threaded :func:`read_lanes` kernel (the machine's read-once rate);
    ``numpy``: single-threaded ``x.sum()``, a second reference line.
    """
    x = np.ones(int(gib * GIB) // 4, np.float32)
    read_lanes(x[:4096])  # compile (or load from cache)

    def best(fn: Callable[[], object]) -> float:
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return x.nbytes / min(ts)

    with ForeignCpu() as foreign:
        numba_bps, numpy_bps = best(lambda: read_lanes(x)), best(x.sum)
    return {
        "numba": numba_bps,
        "numpy": numpy_bps,
        "buffer_bytes": float(x.nbytes),
        "repeats": float(repeats),
        "threads": float(numba.get_num_threads()),
        "foreign_cpu": foreign.share,
    }


# -- memory probes (Linux) ---------------------------------------------------------------------


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
    assert m is not None, key
    return int(m.group(1))


def rss() -> int:
    """Current resident set size in bytes."""
    return _status_kib("VmRSS") * 1024


def peak_rss() -> int:
    """Peak resident set size (bytes) since the process started or the last reset_peak()."""
    return _status_kib("VmHWM") * 1024


def reset_peak() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def trim_heap() -> None:
    """Return freed heap memory to the OS, so that RSS counts only live objects."""
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class ForeignCpu:
    """Share of the machine's CPU time used by *other* processes while a block ran.

    A benchmark here uses every core, so any other busy process makes its numbers noisy.
    """

    def __enter__(self) -> ForeignCpu:
        self._t, self._busy, self._own = time.perf_counter(), _busy_s(), _own_s()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t
        other = (_busy_s() - self._busy) - (_own_s() - self._own)
        self.share = max(0.0, other / (wall * (os.cpu_count() or 1)))


def wait_for_idle(max_wait_s: float, share: float = 0.05, probe_s: float = 3.0) -> float:
    """Sleep until other processes use < ``share`` of the CPU (or ``max_wait_s`` passed).

    Returns the seconds waited.
    """
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < max_wait_s:
        with ForeignCpu() as f:
            time.sleep(probe_s)
        if f.share < share:
            break
    return time.perf_counter() - t0


def _busy_s() -> float:
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = map(
            int, f.readline().split()[1:9]
        )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_s() -> float:
    t = os.times()
    return t.user + t.system


# -- timing ------------------------------------------------------------------------------------


def time_repeats(
    fn: Callable[[], object], *, min_reps: int, max_reps: int, budget_s: float
) -> list[float]:
    """Wall times of ``fn()``: at least ``min_reps`` runs, more while within ``budget_s``."""
    times: list[float] = []
    while len(times) < min_reps or (len(times) < max_reps and sum(times) < budget_s):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
        del out
    return times


# -- child processes ---------------------------------------------------------------------------


def emit(result: dict[str, Any]) -> None:
    """Print a child's result where :func:`run_child` finds it."""
    sys.stdout.write(RESULT_TAG + json.dumps(result) + "\n")
    sys.stdout.flush()


def run_child(script: Path, args: Sequence[str], timeout_s: float = 900) -> dict[str, Any]:
    """Run ``python script *args`` in a fresh process and return the dict it emitted."""
    env = {**os.environ, **FLOWER_ENV}
    proc = subprocess.run(
        [sys.executable, str(script), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
        check=False,
    )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            out: dict[str, Any] = json.loads(line[len(RESULT_TAG) :])
            return out
    tail = (proc.stderr or proc.stdout)[-2000:]
    raise RuntimeError(f"child {args} failed (exit {proc.returncode}):\n{tail}")


# -- machine description -----------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for key in ("Model name", "L3 cache", "Hypervisor vendor"):
            m = re.search(rf"^{key}:\s+(.+)$", lscpu, re.MULTILINE)
            info[key.lower().replace(" ", "_")] = m.group(1).strip() if m else "?"
    except (OSError, subprocess.CalledProcessError):
        info["model_name"] = platform.processor() or "?"
    info["cores"] = os.cpu_count()
    info["ram_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)
    info["python"] = platform.python_version()
    info["numpy"] = np.__version__
    info["numba"] = numba.__version__
    info["numba_threads"] = numba.config.NUMBA_NUM_THREADS
    info["kernel"] = platform.release()
    info["date"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    try:
        info["git"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "src"], capture_output=True, text=True, check=True
        ).stdout.strip()
        info["git"] += " (src/ has uncommitted changes)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        info["git"] = "?"
    return info
