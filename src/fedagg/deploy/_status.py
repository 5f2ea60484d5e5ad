"""``fedagg status STATE_DIR``: what a server's state directory says, read without writing.

Two sources, both in the state directory (``deploy.state``):

* ``state.db``, the event log (:mod:`fedagg.deploy._store`): rounds closed, model versions,
  accepted uploads per client, checkpoints, events;
* ``status.json``, written by the running server (:mod:`fedagg.deploy._progress`) at most
  once a second while something changes, at least every 5 s (its liveness), on every round
  close and on a clean stop: what lives only in the server's memory (the clients connected
  now, when each was last seen, duplicate uploads acknowledged, refusals by reason, the
  process id). Mode 0600, replaced atomically (a reader never sees half of one). Counts
  carry over from the previous file when a server restarts, so they cover the federation,
  not one process.

Reading never writes to the state directory. With a server running, ``state.db`` is opened
``mode=ro`` (SQLite's read-only mode; the server's -wal and -shm files exist and stay
its). With no server running it is opened ``immutable=1`` (no locks, no -wal, -shm or journal
file created); a server that was killed leaves committed transactions in ``state.db-wal``:
then ``state.db`` and its -wal are copied to a temporary directory elsewhere and the copy is
read, so nothing in the state directory is touched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sqlite3
import tempfile
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from fedagg.errors import StateError

__all__ = [
    "STATUS_FILE",
    "format_status",
    "load_status_file",
    "read_status",
    "write_status_file",
]

STATUS_FILE = "status.json"
#: a running server rewrites status.json at least this often (seconds)
ALIVE_EVERY = 5.0


def write_status_file(directory: str | os.PathLike[str], data: Mapping[str, Any]) -> None:
    """Replace ``directory/status.json`` with ``data`` atomically, mode 0600."""
    path = Path(directory) / STATUS_FILE
    tmp = path.with_name(STATUS_FILE + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, separators=(",", ":"), default=str)
    os.replace(tmp, path)


def load_status_file(directory: str | os.PathLike[str]) -> dict[str, Any] | None:
    """``status.json`` of a state directory, or None (missing, unreadable, not a status)."""
    try:
        data = json.loads((Path(directory) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == 1 else None


# -- is a server running? ----------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    cmd = Path(f"/proc/{pid}/cmdline")
    if cmd.parent.exists():  # Linux: a reused pid is not a fedagg server
        try:
            return b"fedagg" in cmd.read_bytes()
        except OSError:
            return True
    return True


def _holds(pid: int, target: str) -> bool:
    """Whether process ``pid`` has the file ``target`` open (Linux /proc)."""
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == target:
                    return True
    return False


def _holders(db: Path) -> list[int]:
    """Processes that have ``db`` open (Linux /proc; [] elsewhere)."""
    target = str(db.resolve())
    return [int(p.name) for p in Path("/proc").glob("[0-9]*") if _holds(int(p.name), target)]


def _server(d: Path, st: Mapping[str, Any] | None) -> dict[str, Any]:
    """Whether a server is running on this state directory, and what status.json says."""
    out: dict[str, Any] = {"running": False}
    if st is None:
        pids = [p for p in _holders(d / "state.db") if p != os.getpid()]
        out["running"] = bool(pids)
        out["pid"] = pids[0] if pids else None
        out["note"] = "no status.json (a server not yet started, or an older fedagg)"
        return out
    for k in ("pid", "host", "role", "listen", "tls", "started", "updated", "stopped"):
        out[k] = st.get(k)
    pid = int(st.get("pid") or 0)
    here = st.get("host") == socket.gethostname()
    if st.get("running") is False:
        out["note"] = "stopped cleanly"
    elif here and pid:
        out["running"] = _alive(pid)
        fds = Path(f"/proc/{pid}/fd")
        if out["running"] and fds.is_dir() and os.access(fds, os.R_OK):  # a reused pid?
            out["running"] = _holds(pid, str((d / "state.db").resolve()))
        if not out["running"]:
            out["note"] = f"process {pid} is gone without a clean stop (killed or crashed)"
    else:  # another host (a shared file system): judge by the file's age
        age = time.time() - float(st.get("updated") or 0)
        out["running"] = age < 3 * ALIVE_EVERY
        out["note"] = f"a server on {st.get('host')}, judged by status.json's age ({age:.0f}s)"
    return out


@contextlib.contextmanager
def _database(d: Path, running: bool) -> Iterator[sqlite3.Connection]:
    """``state.db`` opened so that nothing in ``d`` is written (see the module docstring)."""
    db = d / "state.db"
    wal = d / "state.db-wal"
    tmp: tempfile.TemporaryDirectory[str] | None = None
    try:
        if running:
            uri = f"file:{urllib.parse.quote(str(db))}?mode=ro"
        elif wal.exists() and wal.stat().st_size > 0:  # a killed server's committed tail
            tmp = tempfile.TemporaryDirectory(prefix="fedagg-status-")
            shutil.copyfile(db, Path(tmp.name) / "state.db")
            shutil.copyfile(wal, Path(tmp.name) / "state.db-wal")
            uri = f"file:{urllib.parse.quote(str(Path(tmp.name) / 'state.db'))}?mode=ro"
        else:
            uri = f"file:{urllib.parse.quote(str(db))}?immutable=1"
        try:
            con = sqlite3.connect(uri, uri=True)
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except sqlite3.Error as e:
            raise StateError(f"cannot read the state database {db}: {e}") from e
        try:
            yield con
        finally:
            con.close()
    finally:
        if tmp is not None:
            tmp.cleanup()


def _query(con: sqlite3.Connection, sql: str, *args: Any) -> list[Any]:
    """Rows of ``sql``, or [] if its table does not exist (an older or an edge's database)."""
    try:
        return con.execute(sql, args).fetchall()
    except sqlite3.OperationalError:
        return []


# -- reading -------------------------------------------------------------------------------------
def read_status(state_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The status of the federation whose state is in ``state_dir`` (a JSON-able dict; see
    :func:`format_status`). Writes nothing there. A StateError if it is not a state
    directory or its database cannot be read."""
    d = Path(state_dir)
    if not d.is_dir():
        raise StateError(f"{d} is not a directory (a server's deploy.state)")
    if not (d / "state.db").is_file():
        raise StateError(f"{d} holds no state.db: not a server's state directory (deploy.state)")
    st = load_status_file(d)
    server = _server(d, st)
    with _database(d, server["running"]) as con:
        meta = dict(_query(con, "SELECT key, value FROM meta"))
        events = (_query(con, "SELECT max(seq) FROM events") or [(0,)])[0][0] or 0
        per_client = dict(_query(con, "SELECT client, count(*) FROM uploads GROUP BY client"))
        last = _query(
            con, "SELECT round, version, applied, stats FROM rounds ORDER BY round DESC LIMIT 1"
        )
        ck = _query(con, "SELECT seq, path, version FROM checkpoints ORDER BY seq DESC LIMIT 1")
    st = st or {}
    rounds_closed = int(last[0][0]) + 1 if last else 0
    finished = (d / "final.npz").exists() or bool(st.get("finished"))
    # a round's row holds the version it trained from; the model is one on if it applied
    version = max(int(last[0][1]) + int(last[0][2]) if last else 0, int(ck[0][2]) if ck else 0)
    checkpoint = None
    if ck:
        seq, path, v = ck[0]
        when = None
        with contextlib.suppress(OSError):
            when = Path(path).stat().st_mtime
        checkpoint = {"event": int(seq), "version": int(v), "time": when, "file": Path(path).name}
    names: list[str] = list(st.get("clients") or [])
    connected = set(st.get("connected") or []) if server["running"] else set()
    seen: dict[str, float] = dict(st.get("last_seen") or {})
    clients = []
    for i in range(max(len(names), max(per_client, default=-1) + 1)):
        name = names[i] if i < len(names) else f"#{i}"
        clients.append(
            {
                "index": i,
                "name": name,
                "connected": name in connected,
                "last_seen": seen.get(name),
                "accepted": int(per_client.get(i, 0)),
            }
        )
    requests = {k: dict(v) for k, v in dict(st.get("refused") or {}).items()}
    updates = {k: int(v) for k, v in dict(st.get("policy_refused") or {}).items()}
    refused = sum(int(v.get("count", 0)) for v in requests.values()) + sum(updates.values())
    return {
        "state": str(d),
        "server": server,
        "round": rounds_closed if finished else rounds_closed + 1,
        "rounds_closed": rounds_closed,
        "finished": finished,
        "version": version,
        "seed": meta.get("seed"),
        "config": meta.get("config"),
        "events": int(events),
        "clients": {
            "registered": len(names) if names else None,
            "connected": len(connected) if names else None,
            "edges_connected": list(st.get("edges_connected") or []) if server["running"] else [],
            "seen": sum(1 for c in clients if c["last_seen"] is not None),
            "list": clients,
        },
        "uploads": {
            "accepted": sum(int(v) for v in per_client.values()),
            "duplicate": int(st.get("duplicates") or 0),
            "refused": refused,
            "refused_requests": requests,
            "refused_updates": updates,
        },
        "checkpoint": checkpoint,
    }


# -- the text view -------------------------------------------------------------------------------
def _when(t: Any, now: float) -> str:
    if not isinstance(t, (int, float)):
        return "-"
    ago = max(0.0, now - float(t))
    span = (
        f"{ago:.0f}s" if ago < 120 else f"{ago / 60:.0f}m" if ago < 7200 else f"{ago / 3600:.0f}h"
    )
    return f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(float(t)))} ({span} ago)"


def format_status(s: Mapping[str, Any], *, max_clients: int = 20) -> str:
    """:func:`read_status`'s result as text (at most ``max_clients`` client rows: the most
    recently seen first; ``--json`` has them all)."""
    now = time.time()
    srv = s["server"]
    if srv["running"]:
        where = (
            f" on {srv['listen']} ({'TLS' if srv.get('tls') else 'insecure'})"
            if srv.get("listen")
            else ""
        )
        server = f"running (pid {srv.get('pid')}{where}, since {_when(srv.get('started'), now)})"
    elif srv.get("stopped"):
        server = f"not running (stopped cleanly {_when(srv['stopped'], now)})"
    else:
        server = (
            f"not running ({srv.get('note', '')}; last update {_when(srv.get('updated'), now)})"
        )
    c, u = s["clients"], s["uploads"]
    reg = "?" if c["registered"] is None else c["registered"]
    conn = "?" if c["connected"] is None else c["connected"]
    rnd = f"{s['round']} ({s['rounds_closed']} closed{', finished' if s['finished'] else ''})"
    ck = s["checkpoint"]
    ckpt = (
        "none"
        if ck is None
        else (f"model version {ck['version']} at event {ck['event']}, {_when(ck['time'], now)}")
    )
    lines = [
        f"state       {s['state']}",
        f"server      {server}",
        f"round       {rnd}",
        f"model       version {s['version']}",
        f"clients     {reg} registered, {conn} connected, {c['seen']} seen"
        + (f"; edges connected: {', '.join(c['edges_connected'])}" if c["edges_connected"] else ""),
        f"uploads     {u['accepted']} accepted, {u['duplicate']} duplicate, {u['refused']} refused",
    ]
    for reason, r in sorted(u["refused_requests"].items()):
        lines.append(f"  refused   {r.get('count', 0)} x {reason} (last: {r.get('example', '')})")
    for reason, n in sorted(u["refused_updates"].items()):
        lines.append(f"  refused   {n} x update refused by the policy: {reason}")
    lines += [f"checkpoint  {ckpt}", f"events      {s['events']} logged"]
    rows = sorted(c["list"], key=lambda r: -(r["last_seen"] or 0))
    if rows:
        lines.append("")
        lines.append(f"  {'client':20s} {'connected':9s} {'accepted':>8s}  last seen")
        for r in rows[:max_clients]:
            conn_s = "yes" if r["connected"] else "no"
            lines.append(
                f"  {r['name']:20s} {conn_s:9s} {r['accepted']:8d}  {_when(r['last_seen'], now)}"
            )
        if len(rows) > max_clients:
            lines.append(f"  ... and {len(rows) - max_clients} more (--json lists them all)")
    return "\n".join(lines)
