"""The ceiling of Python gRPC here, for benchmarks/transport.py: fedagg's client upload code
(``deploy/_push.py``: chunks of 4 MiB, S parallel streams, optional digest) against a gRPC
server that only drains the stream (no checks, no spool, no fold). Two processes:

    python benchmarks/_grpc_drain.py serve            # prints its port
    python benchmarks/_grpc_drain.py push PORT BYTES STREAMS DIGEST [REPS]

``push`` prints one JSON line: the best of REPS uploads (seconds) and each process's CPU
seconds in it (the server's is read from /proc).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

import grpc

METHOD = "/fedagg.v1.Federation/Push"
OPTS = [("grpc.max_receive_message_length", 80 << 20), ("grpc.max_send_message_length", 80 << 20)]


async def _serve() -> None:
    async def push(it: Any, ctx: Any) -> bytes:
        async for _ in it:
            pass
        return b""

    server = grpc.aio.server(options=OPTS)
    handler = grpc.method_handlers_generic_handler(
        "fedagg.v1.Federation", {"Push": grpc.stream_unary_rpc_method_handler(push)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(port, flush=True)
    await server.wait_for_termination()


def _cpu_of(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _push(port: int, nbytes: int, streams: int, digest: str, reps: int, pid: int) -> None:
    import numpy as np
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from fedagg.deploy import ClientKey
    from fedagg.deploy import fedagg_pb2 as pb
    from fedagg.deploy._push import PushPlan, push_update

    key = ClientKey("c", Ed25519PrivateKey.generate())
    data = np.full(nbytes // 4, 0.5, np.float32)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=OPTS)
    call = channel.stream_unary(METHOD)
    plan = PushPlan(1, 0, 1.0, {}, 4 << 20, bool(digest), digest or "sha256", streams)
    best: dict[str, float] = {"s": float("inf")}
    for _ in range(reps):
        t, c, sc = time.perf_counter(), time.process_time(), _cpu_of(pid)
        await push_update(call, key, lambda m, b: pb.Auth(**key.sign(m, b)),
                          data.data.cast("B"), 4, plan)  # fmt: skip
        took = time.perf_counter() - t
        if took < best["s"]:
            best = {"s": took, "client_cpu_s": time.process_time() - c,
                    "server_cpu_s": _cpu_of(pid) - sc}  # fmt: skip
    await channel.close()
    print(json.dumps(best), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        asyncio.run(_serve())
    else:
        port, nbytes, streams, digest = sys.argv[2:6]
        reps = int(sys.argv[6]) if len(sys.argv) > 6 else 3
        pid = int(sys.argv[7]) if len(sys.argv) > 7 else os.getpid()
        asyncio.run(_push(int(port), int(nbytes), int(streams), digest, reps, pid))
