"""What every ``fedagg`` subcommand shares: exit codes, the command record, argument types."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "EXIT_ERROR", "EXIT_OK", "EXIT_STATE", "EXIT_USAGE", "Command", "non_negative_int",
    "positive_int",
]  # fmt: skip

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_STATE = 3  # the state directory cannot be used as it is (e.g. an unreadable state.db)


@dataclass(frozen=True, slots=True)
class Command:
    """A subcommand: one-line help, a function adding its options, and its handler."""

    help: str
    description: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value
