"""Benchmark clients for benchmarks/transport.py: K fedagg clients on one asyncio loop, each
its own gRPC channel, answering every task with the same constant delta (no training: the
benchmark measures the transport). Prints a JSON line naming the ``fedagg`` it imported
(``{"fedagg_file": ...}``), then, when done, one JSON line with each client's timings.

    python benchmarks/_fedagg_clients.py DIR PORT PARAMS FIRST COUNT [--tls] [--streams S]
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import time
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
    ap.add_argument("--streams", type=int, default=0, help="parallel streams (0: auto)")
    ap.add_argument("--transport", default="grpc", help="deploy.transport (stream: the data port)")
    a = ap.parse_args()
    print(json.dumps({"fedagg_file": fedagg.__file__}), flush=True)
    d = Path(a.dir)
    delta = np.full(a.params, 0.5, np.float32)

    def train(model: Any, task: Any) -> Result:
        return Result(delta, 1.0)

    ca = (d / "certs" / "ca.pem").read_bytes() if a.tls else None
    pushes: dict[int, list[tuple[float, float, float]]] = {}

    class Timed(Client):  # each push's (start, end) wall clock and this process's CPU in it
        async def _push(self, *args: Any, **kw: Any) -> Any:
            t0, c0 = time.time(), time.process_time()
            out = await super()._push(*args, **kw)
            pushes.setdefault(id(self), []).append((t0, time.time(), time.process_time() - c0))
            return out

    # (a tree of before parallel streams has no such parameter: one stream)
    params = inspect.signature(Client).parameters
    extra: dict[str, Any] = {"streams": a.streams} if "streams" in params else {}
    if "transport" in params:  # (a tree of before the data port: gRPC)
        extra["transport"] = a.transport
    clients = [
        Timed(
            f"127.0.0.1:{a.port}",
            ClientKey.load(d / "keys" / f"c{i:04d}.key"),
            train,
            ca=ca,
            insecure=not a.tls,
            retry_for=600.0,
            **extra,
        )
        for i in range(a.first, a.first + a.count)
    ]

    async def run() -> list[Any]:
        return list(await asyncio.gather(*(c.run_async() for c in clients)))

    reports = asyncio.run(run())
    print(
        json.dumps(
            [
                {"pull_s": r.pull_s, "push_s": r.push_s, "pushes": pushes.get(id(c), [])}
                for c, r in zip(clients, reports, strict=True)
            ]
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
