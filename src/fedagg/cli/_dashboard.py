"""``fedagg dashboard``: serve the read-only web dashboard (see :mod:`fedagg.dashboard`).

fedagg dashboard                                   # runs/fedagg.db on http://127.0.0.1:8050/
fedagg dashboard --db runs/fedagg.db --state fed/state --listen 127.0.0.1:8050
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

import fedagg
from fedagg.cli._common import EXIT_ERROR, EXIT_OK, EXIT_USAGE, Command


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", default="runs/fedagg.db", help="run database (default: %(default)s)")
    p.add_argument(
        "--state",
        metavar="STATE_DIR",
        help="a server's state directory (deploy.state) for the live page",
    )
    p.add_argument(
        "--listen",
        default="127.0.0.1:8050",
        metavar="HOST:PORT",
        help="address to serve on (default: %(default)s; port 0: a free one). The dashboard "
        "has no authentication: keep it on loopback or behind your own proxy",
    )


def _address(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def _run(args: argparse.Namespace) -> int:
    from fedagg.dashboard import Dashboard, make_server

    addr = _address(args.listen)
    if addr is None:
        print(
            f"fedagg dashboard: error: --listen wants HOST:PORT, not {args.listen!r}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    app = Dashboard(args.db, args.state)
    try:
        app.reader.check()
    except fedagg.FedaggError as e:
        print(f"fedagg dashboard: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    try:
        server = make_server(app, *addr)
    except OSError as e:
        print(f"fedagg dashboard: error: cannot listen on {args.listen}: {e}", file=sys.stderr)
        return EXIT_ERROR
    bound, port = server.server_address[:2]
    host = bound.decode() if isinstance(bound, bytes) else str(bound)
    notes = []
    if not os.path.exists(args.db):
        notes.append(f"no run database at {args.db} yet")
    if args.state and not os.path.isdir(args.state):
        notes.append(f"no state directory {args.state} yet")
    print(
        f"fedagg dashboard: http://{host}:{port}/ (read-only: {args.db}"
        + (f", live: {args.state}" if args.state else "")
        + ")"
        + (f"; {'; '.join(notes)}" if notes else ""),
        flush=True,
    )
    try:
        if not ipaddress.ip_address(host).is_loopback:
            print(
                "fedagg dashboard: warning: not on loopback, and there is no authentication",
                file=sys.stderr,
                flush=True,
            )
    except ValueError:
        pass
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return EXIT_OK


#: This module's subcommands (see :data:`fedagg.cli.COMMANDS`).
COMMANDS: dict[str, Command] = {
    "dashboard": Command(
        help="a read-only web dashboard of the run database and a running deployment",
        description=(
            "Serve a web dashboard: the runs (filters), a run's charts (accuracy, loss, "
            "participation, staleness, bytes, refusals) and config, a comparison of runs with "
            "their config diff, and a live view of a server's state directory (--state), "
            "updated every second. Reads only; nothing is loaded from the internet."
        ),
        configure=_configure,
        run=_run,
    ),
}
