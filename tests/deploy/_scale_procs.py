"""Process entry points for ``test_scale.py``: a server with a synthetic model, many clients.

``python _scale_procs.py server CONFIG --params N [--pattern]`` serves a FedAvg (lr 1, sync,
arrival order, every client every round) federation whose model is one flat float32 array of
N parameters: zeros, or :func:`pattern` with ``--pattern``. The ``[deploy]`` table and the
keys come from CONFIG (a harness config); ``rounds`` from its top level. It prints a
``ROUND <round> <folded> <monotonic time>`` line as each round closes and saves the final
state to ``<state>/final.npz``, as ``fedagg server`` does.

``python _scale_procs.py clients CONFIG --first I --count K --kind soak|large`` runs the
clients ``client-I`` .. ``client-(I+K-1)`` as :class:`fedagg.deploy.Client` objects on one
asyncio loop (one gRPC channel each) and prints their summed reports.

Run as a script, so it needs only ``fedagg`` on the path (``test_scale.py`` imports its
pure functions: the update and the initial model, to check the final one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from fedagg._checkpoint import save
from fedagg.deploy import (
    Client,
    ClientKey,
    Federation,
    Keyring,
    Result,
    TaskContext,
    options_from_config,
    serve_async,
)
from fedagg.sim import SyncPolicy
from fedagg.strategies import fedavg

SOAK_SCALE = 0.01
PATTERN_PERIOD = 1000
CHUNK = 1 << 24  # elements per pass over a large array (64 MiB of float32)


def pattern(lo: int, hi: int) -> np.ndarray[Any, Any]:
    """Elements ``lo:hi`` of the large test's initial model: ``(i % 1000) / 8``, exact in
    float32 (multiples of 1/8 below 125), and so is each plus 1.0."""
    return ((np.arange(lo, hi, dtype=np.int64) % PATTERN_PERIOD) / 8).astype(np.float32)


def soak_delta(task: TaskContext, n: int) -> np.ndarray[Any, Any]:
    """The soak clients' update: a function of the job's random stream only."""
    return (task.rng().standard_normal(n) * SOAK_SCALE).astype(np.float32)


def soak_weight(client_index: int) -> float:
    return float(1 + client_index % 5)


def _maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _usage() -> str:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return (
        f"maxrss {ru.ru_maxrss / 1024:.0f} MiB cpu {ru.ru_utime:.1f}s user {ru.ru_stime:.1f}s sys"
    )


# -- server ------------------------------------------------------------------------------------
def run_server(args: argparse.Namespace) -> int:
    cfg = tomllib.loads(Path(args.config).read_text())
    d = cfg["deploy"]
    opts = options_from_config(cfg)
    keyring = Keyring.load(Path(d["keys"]) / "authorized_keys")
    clients = len(keyring.names)
    t0 = time.monotonic()
    params = np.zeros(args.params, np.float32)
    if args.pattern:
        for lo in range(0, params.size, CHUNK):
            hi = min(params.size, lo + CHUNK)
            params[lo:hi] = pattern(lo, hi)
    strategy = fedavg(lr=1.0)
    server = strategy.init([params])
    del params
    policy = SyncPolicy(strategy=strategy, rounds=int(cfg["rounds"]), clients_per_round=clients)
    fed = Federation(
        policy,
        server,
        num_clients=clients,
        seed=int(cfg["seed"]),
        directory=d["state"],
        identity={"test": "scale", "params": str(args.params)},
    )
    del server
    print(f"BUILT {time.monotonic() - t0:.3f}s maxrss {_maxrss_mib():.0f} MiB", flush=True)

    def on_start(srv: Any) -> None:
        print(f"LISTENING {srv.port} {time.monotonic():.6f}", flush=True)

    def on_round(r: Any) -> None:
        print(f"ROUND {r.round} {r.folded} {time.monotonic():.6f}", flush=True)

    result = asyncio.run(serve_async(fed, keyring, opts, on_round=on_round, on_start=on_start))
    t1 = time.monotonic()
    save(Path(d["state"]) / "final.npz", result.server)
    print(
        f"SAVED {time.monotonic() - t1:.3f}s version {result.server.version} "
        f"uploads {result.uploads} duplicates {result.duplicates} refused {result.refused}",
        flush=True,
    )
    print(f"USAGE {_usage()}", flush=True)
    return 0


# -- clients -----------------------------------------------------------------------------------
def _soak_train(model: Any, task: TaskContext) -> Result:
    n = sum(int(a.size) for a in model)
    return Result(soak_delta(task, n), soak_weight(task.client_index), {"train_loss": 1.0})


def _large_train(model: Any, task: TaskContext) -> Result:
    t0 = time.monotonic()
    (flat,) = model
    n = int(flat.size)
    # the model arrived intact: its first, last and byte-offset-2**31 elements
    for lo in (0, n - 4096, (1 << 29) - 2048):
        if not np.array_equal(flat[lo : lo + 4096], pattern(lo, lo + 4096)):
            raise AssertionError(f"the pulled model differs from the pattern at {lo}")
    delta = np.full(n, 1.0, np.float32)
    print(f"TRAIN {task.job} {n} {t0:.6f} {time.monotonic():.6f}", flush=True)
    return Result(delta, 1.0, {})


async def _run_clients(args: argparse.Namespace) -> list[Any]:
    cfg = tomllib.loads(Path(args.config).read_text())
    d = cfg["deploy"]
    insecure = bool(d["insecure"])
    ca = None if insecure else (Path(d["certs"]) / "ca.pem").read_bytes()
    train = _soak_train if args.kind == "soak" else _large_train
    names = [f"client-{i:03d}" for i in range(args.first, args.first + args.count)]
    clients = [
        Client(
            d["server"],
            ClientKey.load(Path(d["keys"]) / f"{name}.key"),
            train,
            ca=ca,
            insecure=insecure,
            retry_for=120.0,
        )
        for name in names
    ]
    return list(await asyncio.gather(*(c.run_async() for c in clients)))


def run_clients(args: argparse.Namespace) -> int:
    t0 = time.monotonic()
    reports = asyncio.run(_run_clients(args))
    total = {
        k: sum(getattr(r, k) for r in reports)
        for k in ("tasks", "uploads", "duplicates", "skipped", "retries")
    }
    print(f"REPORT {json.dumps(total)}", flush=True)
    print(f"CLIENTS {time.monotonic() - t0:.3f}s {_usage()}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("config")
    s.add_argument("--params", type=int, required=True)
    s.add_argument("--pattern", action="store_true")
    c = sub.add_parser("clients")
    c.add_argument("config")
    c.add_argument("--first", type=int, required=True)
    c.add_argument("--count", type=int, required=True)
    c.add_argument("--kind", choices=("soak", "large"), required=True)
    args = p.parse_args(argv)
    return run_server(args) if args.cmd == "server" else run_clients(args)


if __name__ == "__main__":
    sys.exit(main())
