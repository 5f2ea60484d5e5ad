"""The ``fedagg`` command line. The only package of fedagg that reads argv (or the environment).

Subcommands are registered in :data:`COMMANDS` (name -> :class:`Command`), one module per
group of commands; each adds its options to its own sub-parser and runs from the parsed
namespace, returning an exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import fedagg
from fedagg.cli import (
    _config,
    _dashboard,
    _demo,
    _deploy,
    _new,
    _privacy,
    _runs,
    _simulate,
    _status,
)
from fedagg.cli._common import EXIT_USAGE, Command

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

#: Every subcommand, in the order ``fedagg --help`` lists them.
COMMANDS: dict[str, Command] = {
    **_simulate.COMMANDS,
    **_runs.COMMANDS,
    **_config.COMMANDS,
    **_demo.COMMANDS,
    **_deploy.COMMANDS,
    **_status.COMMANDS,
    **_dashboard.COMMANDS,
    **_new.COMMANDS,
    **_privacy.COMMANDS,
}


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one sub-parser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="fedagg",
        description="fedagg: federated learning with fast, lean, trustworthy model-update "
        "aggregation.",
        epilog="Run 'fedagg <command> --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"fedagg {fedagg.__version__}")
    sub = parser.add_subparsers(dest="command", title="commands", metavar="<command>")
    for name, cmd in COMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.description)
        cmd.configure(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fedagg`` command line with ``argv`` (default: ``sys.argv[1:]``); return the
    exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return COMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
