"""A fedagg server process for benchmarks/transport.py: a zero model of N float32 params,
FedAvg, synchronous rounds of every client. Prints one JSON line of timings when done.

    python benchmarks/_fedagg_server.py DIR PORT PARAMS CLIENTS ROUNDS [--tls] [--no-fsync]
        [--no-digest] [--digest-algorithm A] [--ingest fold|spool] [--durability D]
        [--max-streams S] [--receivers P]

Also reports the server's ``Federation.timings`` after each round (``round_timings``: the
engine's cumulative log / policy / checkpoint seconds; a round's policy time is the spooled
update's read-back (and, from issue 14 on, its re-verification) plus the fold) and which
``fedagg`` it imported (``fedagg_file``: ``transport.py --baseline`` checks it).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import threading
import time
from pathlib import Path

import numpy as np

import fedagg
from _common import peak_rss
from fedagg import strategies
from fedagg.deploy import Federation, Keyring, ServerOptions, serve_async

try:
    from fedagg.policy import SyncPolicy
except ImportError:  # a revision from before fedagg.policy (transport.py --baseline runs both)
    from fedagg.sim import SyncPolicy  # type: ignore[no-redef]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("port", type=int)
    ap.add_argument("params", type=int)
    ap.add_argument("clients", type=int)
    ap.add_argument("rounds", type=int)
    ap.add_argument("--tls", action="store_true")
    ap.add_argument("--no-fsync", action="store_true")
    ap.add_argument("--no-digest", action="store_true")
    ap.add_argument("--adaptive-window", action="store_true")
    ap.add_argument("--chunk-mib", type=float, default=4.0)
    ap.add_argument("--receivers", type=int, default=0)  # deploy.receivers
    ap.add_argument("--digest-algorithm", default="sha256")
    ap.add_argument("--ingest", default="spool")
    ap.add_argument("--durability", default="fsync")
    ap.add_argument("--max-streams", type=int, default=8)
    ap.add_argument("--data-listen", default="")  # deploy.data_listen ("": uploads over gRPC)
    a = ap.parse_args()
    d = Path(a.dir)
    strategy = strategies.fedavg()
    if a.receivers:  # the fold in receiver processes, through shared memory
        from fedagg.core.spec import ParamSpec
        from fedagg.deploy._receivers import plane_strategy

        spec = ParamSpec.from_arrays([np.zeros(a.params, np.float32)])
        strategy = plane_strategy(strategy, a.receivers, spec)
    fold_s = [0.0]
    folds: list[float] = []  # each fold's time
    agg = strategy.aggregator

    cls = type(agg)
    plain_fold = cls.fold

    def timed_fold(self: object, state: object, update: object) -> object:
        """The fold alone, as the engine calls it (patched on the class: the aggregator stays
        the plain Mean that folding on receive needs; an update folded on receive is not
        folded here, only counted)."""
        t = time.perf_counter()
        out = plain_fold(self, state, update)
        fold_s[0] += time.perf_counter() - t
        folds.append(time.perf_counter() - t)
        return out

    cls.fold = timed_fold  # type: ignore[method-assign]
    folds_at_round: list[int] = []  # engine folds so far, at each round's end
    samples: list[tuple[float, float]] = []  # (wall clock, this process's CPU seconds)

    def sample() -> None:
        while True:
            samples.append((time.time(), time.process_time()))
            time.sleep(0.02)

    threading.Thread(target=sample, daemon=True).start()
    policy = SyncPolicy(strategy=strategy, rounds=a.rounds, clients_per_round=a.clients)
    server = strategy.init([np.zeros(a.params, np.float32)])
    fed = Federation(policy, server, num_clients=a.clients, seed=0, directory=d / "state")
    tls = None
    if a.tls:
        tls = ((d / "certs" / "server.pem").read_bytes(), (d / "certs" / "server.key").read_bytes())
    opts = ServerOptions(
        listen=f"127.0.0.1:{a.port}", tls=tls, insecure=not a.tls, fsync=not a.no_fsync,
        chunk_bytes=int(a.chunk_mib * (1 << 20)), rate=0.0, client_timeout=600.0,
        heartbeat=30.0, digest=not a.no_digest, adaptive_window=a.adaptive_window,
        **_new_options(a),
    )  # fmt: skip
    ends: list[float] = []
    round_timings: list[dict[str, float]] = []

    cpu: list[float] = []  # the process's CPU seconds (all threads) at each round's end

    def on_round(_: object) -> None:
        ends.append(time.perf_counter() - t0)
        round_timings.append(dict(fed.timings))
        cpu.append(time.process_time())
        folds_at_round.append(len(folds))

    t0 = time.perf_counter()
    result = asyncio.run(
        serve_async(
            fed,
            Keyring.load(d / "keys" / "authorized_keys"),
            opts,
            on_round=on_round,
            on_start=lambda _: (fold_s.__setitem__(0, 0.0), folds.clear()),  # not warm-up's
        )
    )
    rounds = [r.ended - r.started for r in result.rounds]
    print(
        json.dumps(
            {
                "round_s": rounds,
                "round_end_s": ends,
                "round_timings": round_timings,
                "uploads": result.uploads,
                "timings": {**fed.timings, "receive": result.receive_s, "fold": fold_s[0]},
                "folds": folds,
                "version": result.server.version,
                "peak_rss": peak_rss(),
                "round_cpu_s": [b - a for a, b in zip([0.0, *cpu], cpu, strict=False)],
                "cpu_samples": samples,
                "folds_at_round": folds_at_round,
                "fedagg_file": fedagg.__file__,
                "checksum": float(
                    np.float64(result.server.params[:: max(1, a.params // 1000)].sum())
                ),
            }
        ),
        flush=True,
    )


def _new_options(a: argparse.Namespace) -> dict[str, object]:
    """The issue-20 options, for a ``src`` that has them (``--baseline`` runs older trees)."""
    fields = {f.name for f in dataclasses.fields(ServerOptions)}
    want = {"digest_algorithm": a.digest_algorithm, "ingest": a.ingest,
            "durability": a.durability, "max_streams": a.max_streams,
            "data_listen": a.data_listen}  # fmt: skip
    return {k: v for k, v in want.items() if k in fields}


if __name__ == "__main__":
    main()
