"""``fedagg demo``."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import fedagg
from fedagg.cli._common import (
    EXIT_ERROR,
    EXIT_OK,
    EXIT_USAGE,
    Command,
    non_negative_int,
    positive_int,
)


def _configure_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--rounds", type=positive_int, default=10, help="rounds per strategy (default: 10)"
    )
    p.add_argument(
        "--clients",
        type=positive_int,
        default=20,
        help="number of simulated clients, at most 200 (default: 20)",
    )
    p.add_argument(
        "--per-round",
        type=positive_int,
        default=10,
        help="clients sampled each round (default: 10)",
    )
    p.add_argument(
        "--no-bad-client",
        dest="bad_client",
        action="store_false",
        help="skip the client that sends a NaN update (in FedAvg round 2)",
    )


_DEMO_ROW = "{:<9} {:>5} {:>10} {:>9} {:>8} {:>8}"


def _demo_lines(r: Any) -> list[str]:
    """A demo round's table row, then a line per refused update."""
    row = _DEMO_ROW.format(r.strategy, r.round, f"{r.test_loss:.4f}",
                           f"{100 * r.test_accuracy:.1f}%", r.clients, f"{r.agg_ms:.2f}",
                           )  # fmt: skip
    return [row, *(f"  refused update from client {x.client_id}: {x.reason}" for x in r.refused)]


def _demo_summary(records: Sequence[Any]) -> str:
    """Each strategy's final test accuracy and loss, and how many updates were refused."""
    last = {r.strategy: r for r in records}
    parts = [f"{r.strategy} {100 * r.test_accuracy:.1f}% (loss {r.test_loss:.3f}) after "
             f"{r.round} rounds" for r in last.values()]  # fmt: skip
    refused = sum(len(r.refused) for r in records)
    return f"final test accuracy: {', '.join(parts)}; {refused} update(s) refused"


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
    header = ("strategy", "round", "test loss", "test acc", "clients", "agg ms")
    print(_DEMO_ROW.format(*header), flush=True)

    def show(record: demo.RoundRecord) -> None:
        print("\n".join(_demo_lines(record)), flush=True)

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
    print(_demo_summary(records))
    print(f"done in {time.perf_counter() - start:.1f} s")
    return EXIT_OK


#: This module's subcommands (see :data:`fedagg.cli.COMMANDS`).
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
