"""Running fedagg federations for benchmarks/transport.py: a server process and client
processes on 127.0.0.1 (``_fedagg_server.py``, ``_fedagg_clients.py``), and the probes of
where their CPU went."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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
    server_args: tuple[str, ...] = (),
    transport: str = "grpc",
) -> dict[str, Any]:
    """One fedagg federation: server process + ``client_procs`` client processes.

    ``transport``: how uploads travel: ``"grpc"`` (the server has no data port), or
    ``"stream"`` (the data port, ``deploy/_stream.py``; the clients' ``transport = "stream"``,
    also under TLS).

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
        args += server_args
        if transport == "stream":
            args += ["--data-listen", "auto"]
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
                    *(["--transport", "stream"] if transport == "stream" else []),
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


class OtherCpu:
    """Share of the machine's CPU used by processes other than this one and its (reaped)
    children while the block ran: how disturbed a measurement was."""

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self) -> OtherCpu:
        from _common import _busy_s

        self._busy_s = _busy_s
        self._t, self._b, self._o = time.perf_counter(), _busy_s(), self._own()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.perf_counter() - self._t
        other = (self._busy_s() - self._b) - (self._own() - self._o)
        self.share = max(0.0, other / (wall * (os.cpu_count() or 1)))


def cpu_between(samples: list[list[float]], t0: float, t1: float) -> float:
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
