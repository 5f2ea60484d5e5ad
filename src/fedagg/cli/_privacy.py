"""``fedagg privacy plan``: the noise multiplier that fits a privacy budget."""

from __future__ import annotations

import argparse
import json
import sys

import fedagg
from fedagg.cli._common import EXIT_OK, EXIT_USAGE, Command, positive_int


def _configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="privacy_command", metavar="<subcommand>", required=True)
    plan = sub.add_parser(
        "plan", help="print the noise multiplier that meets a target (epsilon, delta)",
        description="Print the smallest noise multiplier (within 0.1%%) for which DP-FedAvg "
        "with Poisson client sampling (rate = clients-per-round / clients), ROUNDS rounds and "
        "the clipped sum noised with noise_multiplier * clip stays within (EPSILON, DELTA), "
        "by each accountant (RDP and the tighter PLD), and the epsilon it spends.",
    )  # fmt: skip
    plan.add_argument("--epsilon", type=float, required=True, help="the target epsilon (> 0)")
    plan.add_argument(
        "--delta", type=float, default=None,
        help="the target delta (default: the largest power of 10 below 1 / clients)",
    )  # fmt: skip
    plan.add_argument("--rounds", type=positive_int, required=True, help="training rounds")
    plan.add_argument(
        "--clients-per-round", type=positive_int, required=True, metavar="N",
        help="expected clients sampled per round",
    )  # fmt: skip
    plan.add_argument(
        "--clients", type=positive_int, required=True, metavar="N", help="clients in total"
    )
    plan.add_argument(
        "--accountant", choices=("rdp", "pld", "both"), default="both",
        help="which accountant(s) to run (default: both; pld takes a few seconds)",
    )  # fmt: skip
    plan.add_argument("--json", action="store_true", help="print the result as one JSON object")


def _default_delta(clients: int) -> float:
    """The largest power of ten strictly below 1 / clients."""
    k = 1
    while 10.0**-k >= 1.0 / clients:
        k += 1
    return 10.0**-k


def _run(args: argparse.Namespace) -> int:
    from fedagg import privacy

    if args.clients_per_round > args.clients:
        print("fedagg privacy plan: error: --clients-per-round exceeds --clients", file=sys.stderr)
        return EXIT_USAGE
    q = args.clients_per_round / args.clients
    delta = _default_delta(args.clients) if args.delta is None else args.delta
    kinds: tuple[privacy.Accountant, ...] = (
        ("rdp", "pld") if args.accountant == "both" else (args.accountant,)
    )
    rows = []
    try:
        for kind in kinds:
            sigma = privacy.noise_multiplier_for(
                epsilon=args.epsilon, delta=delta, sample_rate=q, steps=args.rounds,
                accountant=kind,
            )  # fmt: skip
            spent = privacy.epsilon(
                noise_multiplier=sigma, sample_rate=q, steps=args.rounds, delta=delta,
                accountant=kind,
            )  # fmt: skip
            rows.append({"accountant": kind, "noise_multiplier": sigma, "epsilon": spent})
    except fedagg.ConfigError as e:
        print(f"fedagg privacy plan: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        result = {
            "target_epsilon": args.epsilon, "delta": delta, "rounds": args.rounds,
            "clients_per_round": args.clients_per_round, "clients": args.clients,
            "sample_rate": q, "plans": rows,
        }  # fmt: skip
        print(json.dumps(result, indent=2))
        return EXIT_OK
    print(
        f"target (epsilon={args.epsilon:g}, delta={delta:g}); {args.rounds} rounds, Poisson "
        f"sampling at q={q:g} ({args.clients_per_round} of {args.clients} clients per round)"
    )
    print(f"{'accountant':<12}{'noise_multiplier':>18}{'epsilon spent':>16}")
    for row in rows:
        print(f"{row['accountant']:<12}{row['noise_multiplier']:>18.4f}{row['epsilon']:>16.4f}")
    print(
        "noise std on the clipped sum = noise_multiplier * clip; with adaptive clipping, split "
        "it with fedagg.privacy.update_noise_multiplier"
    )
    return EXIT_OK


#: This module's subcommands (see :data:`fedagg.cli.COMMANDS`).
COMMANDS: dict[str, Command] = {
    "privacy": Command(
        help="differential-privacy planning (the noise multiplier for a budget)",
        description=(
            "Differential privacy tools. 'plan' prints the noise multiplier that keeps a "
            "DP-FedAvg run within a target (epsilon, delta) under Poisson client sampling."
        ),
        configure=_configure,
        run=_run,
    ),
}
