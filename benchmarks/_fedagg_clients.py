"""Benchmark clients for benchmarks/transport.py: K fedagg clients on one asyncio loop, each
its own gRPC channel, answering every task with the same constant delta (no training: the
benchmark measures the transport). Prints a JSON line naming the ``fedagg`` it imported
(``{"fedagg_file": ...}``), then, when done, one JSON line with each client's timings.

    python benchmarks/_fedagg_clients.py DIR PORT PARAMS FIRST COUNT [--tls]
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np

import fedagg
from fedagg.deploy import Client, ClientKey, Result


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("port", type=int)
    ap.add_argument("params", type=int)
    ap.add_argument("first", type=int)
    ap.add_argument("count", type=int)
    ap.add_argument("--tls", action="store_true")
    a = ap.parse_args()
    print(json.dumps({"fedagg_file": fedagg.__file__}), flush=True)
    d = Path(a.dir)
    delta = np.full(a.params, 0.5, np.float32)

    def train(model: Any, task: Any) -> Result:
        return Result(delta, 1.0)

    ca = (d / "certs" / "ca.pem").read_bytes() if a.tls else None
    clients = [
        Client(
            f"127.0.0.1:{a.port}",
            ClientKey.load(d / "keys" / f"c{i:04d}.key"),
            train,
            ca=ca,
            insecure=not a.tls,
            retry_for=600.0,
        )
        for i in range(a.first, a.first + a.count)
    ]

    async def run() -> list[Any]:
        return list(await asyncio.gather(*(c.run_async() for c in clients)))

    reports = asyncio.run(run())
    print(json.dumps([{"pull_s": r.pull_s, "push_s": r.push_s} for r in reports]), flush=True)


if __name__ == "__main__":
    main()
