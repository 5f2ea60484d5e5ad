"""``fedagg status STATE_DIR``: a server's progress, read from its state directory.

Strictly read-only: nothing in STATE_DIR is written, created or locked (see
:func:`fedagg.deploy.read_status`). Works on a running and on a stopped server.
"""

from __future__ import annotations

import argparse
import json
import sys

import fedagg
from fedagg.cli._common import EXIT_OK, EXIT_STATE, Command


def _configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("state_dir", metavar="STATE_DIR", help="the server's state (deploy.state)")
    p.add_argument("--json", action="store_true", help="the whole status as one JSON object")
    p.add_argument(
        "--clients", type=int, default=20, metavar="N",
        help="client rows in the text view, most recently seen first (default: 20)",
    )  # fmt: skip


def _run(args: argparse.Namespace) -> int:
    from fedagg.deploy import format_status, read_status

    try:
        status = read_status(args.state_dir)
    except fedagg.FedaggError as e:
        print(f"fedagg status: error: {e}", file=sys.stderr)
        return EXIT_STATE
    if args.json:
        print(json.dumps(status, indent=2, default=str))
    else:
        print(format_status(status, max_clients=max(0, args.clients)))
    return EXIT_OK


#: This module's subcommands (see :data:`fedagg.cli.COMMANDS`).
COMMANDS: dict[str, Command] = {
    "status": Command(
        help="a server's progress from its state directory (read-only)",
        description=(
            "Show round, model version, clients registered / connected / last seen, uploads "
            "accepted / duplicate / refused by reason, the last checkpoint and whether a "
            "server is running, from STATE_DIR (deploy.state). Never writes to it: safe on a "
            "running server."
        ),
        configure=_configure,
        run=_run,
    ),
}
