"""The ``fedagg`` command line. The only module of fedagg that reads argv (or the environment).

Subcommands are registered in :data:`COMMANDS` (name -> :class:`Command`); each one adds its
options to its own sub-parser and runs from the parsed namespace, returning an exit code.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import fedagg

__all__ = ["COMMANDS", "Command", "build_parser", "main"]

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


@dataclass(frozen=True, slots=True)
class Command:
    """A subcommand: one-line help, a function adding its options, and its handler."""

    help: str
    description: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


# --------------------------------------------------------------------------------------------
# fedagg demo
# --------------------------------------------------------------------------------------------


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=_non_negative_int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--rounds", type=_positive_int, default=10, help="rounds per strategy (default: 10)"
    )
    p.add_argument(
        "--clients",
        type=_positive_int,
        default=20,
        help="number of simulated clients, at most 200 (default: 20)",
    )
    p.add_argument(
        "--per-round",
        type=_positive_int,
        default=10,
        help="clients sampled each round (default: 10)",
    )
    p.add_argument(
        "--no-bad-client",
        dest="bad_client",
        action="store_false",
        help="skip the client that sends a NaN update (in FedAvg round 2)",
    )


def _run_demo(args: argparse.Namespace) -> int:
    from fedagg import demo  # imported here so that `fedagg --help` stays fast

    try:
        demo.check_settings(args.seed, args.rounds, args.clients, args.per_round)
    except fedagg.ConfigError as e:
        print(f"fedagg demo: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(
        f"fedagg {fedagg.__version__} demo: softmax regression on scikit-learn digits "
        f"(8x8 images, {round(100 * demo.TEST_FRACTION)}% held out for testing)"
    )
    print(
        f"{args.clients} clients with Dirichlet(alpha={demo.ALPHA}) label skew, "
        f"{args.per_round} sampled per round, {demo.LOCAL_EPOCHS} local epochs of SGD "
        f"(batch {demo.BATCH_SIZE}, lr {demo.CLIENT_LR}); seed {args.seed}"
    )
    print(
        f"FedAvg, then FedAdam (server lr {demo.FEDADAM_LR}, tau {demo.FEDADAM_TAU}, "
        "paper flavor), each from the same all-zero model"
    )
    print()
    print(demo.format_header(), flush=True)

    def show(record: demo.RoundRecord) -> None:
        print("\n".join(demo.format_record(record)), flush=True)

    start = time.perf_counter()
    try:
        records = demo.run_demo(
            seed=args.seed,
            rounds=args.rounds,
            clients=args.clients,
            per_round=args.per_round,
            inject_bad=args.bad_client,
            on_record=show,
        )
    except fedagg.ConfigError as e:
        print(f"fedagg demo: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as e:
        print(f"fedagg demo: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print()
    print(demo.format_summary(records))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


#: Every subcommand, in the order ``fedagg --help`` lists them.
COMMANDS: dict[str, Command] = {
    "demo": Command(
        help="federated training demo: FedAvg and FedAdam on the digits dataset",
        description=(
            "Simulated clients train a softmax regression on a non-IID share of scikit-learn's "
            "bundled digits dataset and send model deltas; the server folds them as they "
            "arrive, for a few rounds of FedAvg and then FedAdam, and prints test loss and "
            "accuracy per round. One client sends a NaN update, which is refused."
        ),
        configure=_configure_demo,
        run=_run_demo,
    ),
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


if __name__ == "__main__":
    raise SystemExit(main())
