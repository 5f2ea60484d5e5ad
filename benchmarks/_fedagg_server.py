"""A fedagg server process for benchmarks/transport.py: a zero model of N float32 params,
FedAvg, synchronous rounds of every client. Prints one JSON line of timings when done.

    python benchmarks/_fedagg_server.py DIR PORT PARAMS CLIENTS ROUNDS [--tls] [--no-fsync]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

import numpy as np

from fedagg import strategies
from fedagg.deploy import Federation, Keyring, ServerOptions, serve_async
from fedagg.sim import SyncPolicy


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("port", type=int)
    ap.add_argument("params", type=int)
    ap.add_argument("clients", type=int)
    ap.add_argument("rounds", type=int)
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--no-fsync", action="store_true")
    ap.add_argument("--chunk-mib", type=float, default=4.0)
    a = ap.parse_args()
    d = Path(a.dir)
    strategy = strategies.fedavg()
    policy = SyncPolicy(strategy=strategy, rounds=a.rounds, clients_per_round=a.clients)
    server = strategy.init([np.zeros(a.params, np.float32)])
    fed = Federation(policy, server, num_clients=a.clients, seed=0, directory=d / "state")
    tls = None
    if a.tls:
        tls = ((d / "certs" / "server.pem").read_bytes(), (d / "certs" / "server.key").read_bytes())
    opts = ServerOptions(
        listen=f"127.0.0.1:{a.port}", tls=tls, insecure=not a.tls, fsync=not a.no_fsync,
        chunk_bytes=int(a.chunk_mib * (1 << 20)), rate=0.0, client_timeout=600.0,
        heartbeat=30.0,
    )  # fmt: skip
    ends: list[float] = []
    t0 = time.perf_counter()
    result = asyncio.run(
        serve_async(
            fed, Keyring.load(d / "keys" / "authorized_keys"), opts,
            on_round=lambda r: ends.append(time.perf_counter() - t0),
        )  # fmt: skip
    )
    rounds = [r.ended - r.started for r in result.rounds]
    print(
        json.dumps(
            {
                "round_s": rounds,
                "round_end_s": ends,
                "uploads": result.uploads,
                "timings": {**fed.timings, "receive": result.receive_s},
                "version": result.server.version,
                "checksum": float(np.float64(result.server.params[:: max(1, a.params // 1000)].sum())),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
