"""Real processes on loopback: a federation directory, a server process, client processes.

Each test makes its own directory (certs, keys, config, state) under pytest's tmp_path and
runs ``python -m fedagg.cli server|client`` as subprocesses, so crashes (SIGKILL) and restarts
are real. Every wait has a timeout; every process started is killed at the end.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fedagg
from fedagg.deploy import make_certs, make_keys

PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, Mapping):  # an inline table
        return (
            "{" + ", ".join(f"{_toml_value(str(k))} = {_toml_value(x)}" for k, x in v.items()) + "}"
        )
    return repr(v)


def write_toml(path: Path, cfg: Mapping[str, Any]) -> None:
    lines = [f"{k} = {_toml_value(v)}" for k, v in cfg.items() if not isinstance(v, Mapping)]
    for k, v in cfg.items():
        if isinstance(v, Mapping):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    path.write_text("\n".join(lines) + "\n")


@dataclass
class Fed:
    """A federation on disk: ``config`` (TOML), ``keys/NAME.key``, ``certs/``, ``state/``."""

    dir: Path
    config: Path
    port: int
    names: list[str]
    cfg: dict[str, Any]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def state(self) -> Path:
        return self.dir / "state"

    def key(self, i: int) -> Path:
        return self.dir / "keys" / f"{self.names[i]}.key"

    def final(self) -> Any:
        return fedagg.load(self.state / "final.npz")


def make_fed(
    root: Path,
    *,
    clients: int = 4,
    rounds: int = 3,
    per_round: int | None = None,
    tls: bool = True,
    data: Mapping[str, Any] | None = None,
    policy: Mapping[str, Any] | None = None,
    deploy: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Fed:
    """Certs, keys and a config for ``clients`` clients (digits, logreg, FedAvg by default)."""
    root.mkdir(parents=True, exist_ok=True)
    if tls:
        make_certs(root / "certs")
    names = [f"client-{i:03d}" for i in range(clients)]
    make_keys(root / "keys", names)
    port = free_port()
    cfg: dict[str, Any] = {
        "name": "deploy-test",
        "seed": 0,
        "rounds": rounds,
        "data": {"name": "digits", "num_clients": clients, "partition": "iid", **(data or {})},
        "client": {"epochs": 1, "batch_size": 10, "lr": 0.05},
        "policy": {"clients_per_round": per_round or clients, **(policy or {})},
        "deploy": {
            "listen": f"127.0.0.1:{port}",
            "server": f"127.0.0.1:{port}",
            "state": str(root / "state"),
            "certs": str(root / "certs"),
            "keys": str(root / "keys"),
            "insecure": not tls,
            "client_timeout": 30.0,
            **(deploy or {}),
        },
        # the run database the server records the deployment in: here, not in the cwd
        "output": {"db": str(root / "runs.db"), "plots": str(root / "plots")},
        **(extra or {}),
    }
    path = root / "fed.toml"
    write_toml(path, cfg)
    return Fed(root, path, port, names, cfg)


def _env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FEDAGG_CRASH_AT", None)
    # the processes under test cache their bytecode as Python does by default (a shell that
    # turned that off would make each of the suite's ~100 process starts recompile fedagg)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    env.update(extra or {})
    return env


def start_server(
    fed: Fed, *, env: Mapping[str, str] | None = None, args: tuple[str, ...] = (),
    log: str = "server.log",
) -> subprocess.Popen[bytes]:  # fmt: skip
    with open(fed.dir / log, "ab") as out:  # the child keeps its own descriptor
        p = subprocess.Popen(
            [PY, "-m", "fedagg.cli", "server", str(fed.config), *args],
            stdout=out, stderr=subprocess.STDOUT, env=_env(env), start_new_session=True,
        )  # fmt: skip
    fed.procs.append(p)
    return p


# ``fedagg client`` that appends "client task duplicate retain watermark" to $FEDAGG_TEST_ACKS
# for every upload the server acknowledged, once the acknowledgement is in (nothing else
# changes)
_RECORD_ACKS = """
import os, sys
from fedagg.deploy import _client

_push = _client.Client._push

async def _push_and_record(self, t, *args):
    reply = await _push(self, t, *args)
    with open(os.environ["FEDAGG_TEST_ACKS"], "a") as f:
        f.write(f"{self.index} {t.task} {int(reply.duplicate)} {int(reply.retain)} "
                f"{reply.watermark}\\n")
    return reply

_client.Client._push = _push_and_record
from fedagg.cli import main
sys.exit(main(sys.argv[1:]))
"""


def acks_path(fed: Fed, i: int) -> Path:
    return fed.dir / f"client-{i}.acks"


def start_client(
    fed: Fed, i: int, *, env: Mapping[str, str] | None = None, args: tuple[str, ...] = (),
    record_acks: bool = False,
) -> subprocess.Popen[bytes]:  # fmt: skip
    """``fedagg client`` as client ``i``; ``record_acks``: it appends every acknowledgement it
    receives to :func:`acks_path` (see :func:`read_acks`)."""
    run = ["-c", _RECORD_ACKS] if record_acks else ["-m", "fedagg.cli"]
    if record_acks:
        env = {**(env or {}), "FEDAGG_TEST_ACKS": str(acks_path(fed, i))}
    with open(fed.dir / f"client-{i}.log", "ab") as out:
        p = subprocess.Popen(
            [PY, *run, "client", str(fed.config), "--key", str(fed.key(i)), *args],
            stdout=out, stderr=subprocess.STDOUT, env=_env(env), start_new_session=True,
        )  # fmt: skip
    fed.procs.append(p)
    return p


def wait_listening(fed: Fed, proc: subprocess.Popen[bytes], timeout: float = 60.0,
                   log: str = "server.log") -> None:  # fmt: skip
    """Wait until the server's port accepts connections (or it exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited {proc.returncode}:\n{read_log(fed, log)}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", fed.port), 0.2):
            return
        time.sleep(0.05)
    raise AssertionError(f"server not listening after {timeout}s:\n{read_log(fed, log)}")


def wait(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill(proc)
        raise AssertionError(f"process {proc.args} did not finish in {timeout}s") from None


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def read_acks(fed: Fed) -> list[tuple[int, int, bool]]:
    """Every acknowledgement the clients started with ``record_acks`` received so far:
    ``(client, task, duplicate)``, in each client's order (a line still being written is
    left for the next call)."""
    out = []
    for i in range(len(fed.names)):
        p = acks_path(fed, i)
        text = p.read_text() if p.exists() else ""
        for line in text.splitlines(keepends=True):
            if line.endswith("\n"):
                c, t, d = line.split()[:3]
                out.append((int(c), int(t), d == "1"))
    return out


def read_retained(fed: Fed) -> dict[int, list[tuple[int, int]]]:
    """By client, in order: ``(task, watermark)`` of each acknowledgement that said "retain"."""
    out: dict[int, list[tuple[int, int]]] = {}
    for i in range(len(fed.names)):
        p = acks_path(fed, i)
        for line in (p.read_text() if p.exists() else "").splitlines(keepends=True):
            f = line.split()
            if line.endswith("\n") and len(f) == 5 and f[3] == "1":
                out.setdefault(int(f[0]), []).append((int(f[1]), int(f[4])))
    return out


def read_log(fed: Fed, name: str = "server.log") -> str:
    p = fed.dir / name
    return p.read_text(errors="replace")[-4000:] if p.exists() else ""


@contextlib.contextmanager
def federation(root: Path, **kw: Any) -> Iterator[Fed]:
    """:func:`make_fed`, killing every process it started on exit."""
    fed = make_fed(root, **kw)
    try:
        yield fed
    finally:
        for p in fed.procs:
            kill(p)


def run_all(fed: Fed, timeout: float = 120.0) -> None:
    """Start the server and every client, and wait for all to finish cleanly."""
    server = start_server(fed)
    wait_listening(fed, server)
    clients = [start_client(fed, i) for i in range(len(fed.names))]
    assert wait(server, timeout) == 0, read_log(fed)
    for i, c in enumerate(clients):
        assert wait(c, 30) == 0, read_log(fed, f"client-{i}.log")


def wait_after_server(fed: Fed, i: int, proc: subprocess.Popen[bytes], timeout: float) -> int:
    """Client ``i``'s exit code, once the server has exited. A client that heard the end exits
    by itself; one that missed it (the server finished while the client was in a retry pause)
    can only retry a server that is gone until its ``--retry-for`` runs out: its next attempt
    logs UNAVAILABLE, and it is killed then (-9) rather than waited out (after a second for a
    client that was exiting anyway to do so, with its own code)."""
    path = fed.dir / f"client-{i}.log"
    seen = path.stat().st_size if path.exists() else 0
    deadline = time.monotonic() + timeout
    while (rc := proc.poll()) is None:
        with open(path, "rb") as f:
            f.seek(seen)
            if b"UNAVAILABLE" in f.read():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    return proc.wait(1.0)
                kill(proc)
                return -9
        if time.monotonic() > deadline:
            kill(proc)
            raise AssertionError(f"process {proc.args} did not finish in {timeout}s")
        time.sleep(0.05)
    return rc
