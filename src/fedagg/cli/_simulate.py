"""``fedagg simulate``."""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
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


def _configure_simulate(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="TOML config (default: the embedded MNIST-5k run)")
    p.add_argument("--rounds", type=positive_int, help="override the config's rounds")
    p.add_argument("--seed", type=non_negative_int, help="override the config's seed")
    p.add_argument("--db", help="run database (default: the config's output.db)")
    p.add_argument("--plots", help="directory for PNG plots (default: the config's output.plots)")
    p.add_argument("--no-plots", action="store_true", help="do not write plots")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a Ctrl-C'd command


def _num(v: Any) -> str:
    """A config number as a person writes it: 10, 0.5, 1e-3, inf."""
    if isinstance(v, float):
        return "inf" if math.isinf(v) else f"{v:g}"
    return str(v)


def _args(**kw: Any) -> str:
    return ", ".join(f"{k}={_num(v)}" for k, v in kw.items())


def describe_data(cfg: Mapping[str, Any]) -> str:
    """``"mnist5k, 100 clients, dirichlet(alpha=0.5)"``."""
    d = cfg["data"]
    part = d["partition"]
    if part == "dirichlet":
        part = f"dirichlet(alpha={_num(d['alpha'])})"
    elif part == "shards":
        part = f"shards({d['shards_per_client']} per client)"
    if d["name"] in ("", "none"):
        return f"no dataset (the client code loads its own), {d['num_clients']} clients"
    return f"{d['name']}, {d['num_clients']} clients, {part}"


def describe_policy(cfg: Mapping[str, Any]) -> str:
    """The policy kind with its own parameters (what decides when the server steps)."""
    p = cfg["policy"]
    kind = p["kind"]
    conc = f"concurrency {p['concurrency'] or 'all'}"
    stale = f"staleness {p['staleness']}"
    if kind == "sync":
        out = f"sync: {p['clients_per_round']} clients per round"
        if p["over_select"]:
            out += f", over-select {_num(p['over_select'])}"
        if p["stragglers"]:
            out += f", stragglers {_num(p['stragglers'])} ({p['straggler_mode']})"
        if not math.isinf(float(p["deadline"])):
            out += f", deadline {_num(p['deadline'])} s"
        if p["weighting"] != "examples":
            out += f", weighting {p['weighting']}"
        return out
    if kind == "fedbuff":
        return f"fedbuff: buffer {p['buffer']}, {conc}, {stale}"
    if kind == "fedasync":
        return f"fedasync: alpha {_num(p['alpha'])}, {conc}, {stale}"
    if kind == "fedfix":
        return f"fedfix: window {_num(p['window'])} s, {conc}"
    if kind == "async":
        return f"async fedavg: {conc}, {stale}, weights {p['weights']}"
    if kind == "fedamd":
        return (
            f"fedamd: {p['clients_per_round']} clients per round, "
            f"anchor_prob {_num(p['anchor_prob'])}"
        )
    return str(kind)


def describe_strategy(cfg: Mapping[str, Any]) -> str:
    """``"aggregator + server optimizer"``, e.g. ``"krum(f=2) + fedavg(lr=1)"``."""
    s = cfg["strategy"]
    name = s["aggregator"]
    f = s["f"]
    aggs: dict[str, str] = {
        "mean": "mean" if s["accumulator"] == "float32" else f"mean({s['accumulator']})",
        "median": "median",
        "trimmed_mean": f"trimmed_mean({_args(trim=s['trim'] or f)})",
        "krum": f"krum({_args(f=f)})",
        "multi_krum": f"multi_krum({_args(f=f, keep=s['keep'] or 1)})",
        "bulyan": f"bulyan({_args(f=f)})",
        "geometric_median": "geometric_median",
        "centered_clipping": f"centered_clipping({_args(tau=s['tau_cc'], iters=s['iters'])})",
        "flag": f"flag({_args(subspace=s['subspace'], lam=s['lam'])})",
    }
    agg = aggs.get(name)
    if agg is None:  # a custom aggregator, "module:Class", with its keyword arguments
        extra = s.get("aggregator_args") or {}
        agg = f"{name}({_args(**extra)})" if extra else str(name)
    if s["clip_norm"]:
        agg = f"clip_norm({_num(s['clip_norm'])}) + {agg}"
    opt = s["name"]
    params: dict[str, Any] = {"lr": s["lr"]}
    if opt == "fedavgm":
        params["momentum"] = s["momentum"]
    elif opt in ("fedadam", "fedyogi"):
        params.update(beta1=s["beta1"], beta2=s["beta2"], tau=s["tau"])
    elif opt == "fedadagrad":
        params["tau"] = s["tau"]
    return f"{agg} + {opt}({_args(**params)})"


def _pairs(table: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_num(v) if isinstance(v, float) else v}" for k, v in table.items())


def describe_model(cfg: Mapping[str, Any]) -> str:
    """``[model]``: your factory with its arguments, your initial parameters, or a built-in."""
    m = cfg["model"]
    if m["factory"]:
        what = f"{m['factory']}({_pairs(m['args'])})"
    elif m["init"] and cfg["client"]["train"]:
        what = "your arrays"
    else:
        what = m["name"] + (f" {list(m['hidden'])}" if m["name"] == "mlp" else "")
    return what + (f", initial parameters from {m['init']}" if m["init"] else "")


def describe_clients(cfg: Mapping[str, Any]) -> str:
    """``[client]``: your train function (the built-in's batch and lr do not apply to it) or
    the built-in algorithm, and the per-task config each task carries."""
    c = cfg["client"]
    if c["train"]:
        out = f"{c['train']}, {c['epochs']} epoch(s)"
    else:
        out = (
            f"{c['algorithm']}, {c['epochs']} epoch(s), batch {c['batch_size']}, lr {_num(c['lr'])}"
        )
    if c["config"]:
        out += f"; task config {_pairs(c['config'])}"
    if c["schedule"]:
        out += f" through {c['schedule']}"
    return out


def header(cfg: Mapping[str, Any]) -> str:
    """What ``fedagg simulate`` is about to run, as the resolved config says."""
    byz = cfg["byzantine"]
    lines = [
        f"fedagg {fedagg.__version__} simulate: {cfg['name']}, {cfg['rounds']} rounds, "
        f"seed {cfg['seed']}",
        f"  data      {describe_data(cfg)}",
        f"  policy    {describe_policy(cfg)}",
        f"  model     {describe_model(cfg)}",
        f"  strategy  {describe_strategy(cfg)}",
        f"  clients   {describe_clients(cfg)}",
    ]
    if int(byz["clients"]) and byz["attack"] != "none":
        lines.append(f"  attack    {byz['attack']} by {byz['clients']} clients")
    sa = cfg.get("secure_aggregation", {})
    if sa.get("kind", "none") != "none":
        k = f"k {sa['neighbors']}" if sa["neighbors"] else "k auto"
        t = f"t {sa['threshold']}" if sa["threshold"] else "t auto"
        extra = ", rotation" if sa["rotation"] else ""
        drop = f", simulated dropout {_num(sa['dropout'])}" if sa["dropout"] else ""
        lines.append(
            f"  secure    {sa['kind']} ({k}, {t}, clip {_num(sa['clip'])}, {sa['bits']} bits"
            f"{extra}{drop})"
        )
    pr = cfg.get("privacy", {})
    if pr.get("mechanism", "none") != "none":
        clip = f"clip {_num(pr['clip'])}"
        if pr["target_quantile"]:
            clip = (
                f"adaptive clip from {_num(pr['clip'])} to quantile {_num(pr['target_quantile'])}"
            )
        cap = f", max epsilon {_num(pr['max_epsilon'])}" if math.isfinite(pr["max_epsilon"]) else ""
        lines.append(
            f"  privacy   {pr['mechanism']} DP (noise multiplier {_num(pr['noise_multiplier'])}, "
            f"{clip}, {pr['accountant']} accountant{cap})"
        )
    return "\n".join(lines)


def _progress(total: int, enabled: bool) -> Callable[[Any], None]:
    from fedagg.policy import format_refusals

    refused: dict[str, int] = {}  # the run's refusals so far, by reason

    def show(rec: Any) -> None:
        for reason, n in rec.stats.refusals:
            refused[reason] = refused.get(reason, 0) + n
        if not enabled:
            return
        done = rec.stats.round + 1
        width = 30
        bar = "#" * (width * done // total) + "-" * (width - width * done // total)
        acc = rec.test_accuracy
        acc_s = "   -  " if acc != acc else f"{acc:6.2%}"
        line = f"[{bar}] round {done}/{total}  acc {acc_s}  virtual {rec.stats.ended:9.1f} s"
        if not math.isnan(rec.stats.epsilon):  # differential privacy: the budget spent
            line += f"  epsilon {rec.stats.epsilon:.3g}"
        if refused:
            line += f"  refused ({sum(refused.values())}): {format_refusals(refused)}"
        if sys.stderr.isatty():  # redraw in place
            print("\r" + line, end="\n" if done == total else "", file=sys.stderr, flush=True)
        elif done == total or done % max(1, total // 10) == 0:  # a log: a line per tenth
            print(line, file=sys.stderr, flush=True)

    return show


def _privacy_line(cfg: Mapping[str, Any], eps: float, rounds: int) -> str:
    """``privacy: epsilon 2.31 at delta 1e-05 after 40 rounds (central, rdp; max 3)``."""
    pr = cfg["privacy"]
    n = int(cfg["data"]["num_clients"])
    delta = float(pr["delta"]) or 1.0 / n**1.1
    line = f"privacy: epsilon {eps:.4g} at delta {delta:.3g} after {rounds} rounds "
    line += f"({pr['mechanism']}, {pr['accountant']}"
    cap = float(pr["max_epsilon"])
    line += f"; max_epsilon {cap:g})" if math.isfinite(cap) else ")"
    return line


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt (as Ctrl-C does), so the run is stored as
    interrupted, not lost; the previous handler is restored afterwards."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_simulate(args: argparse.Namespace) -> int:
    from fedagg import sim
    from fedagg.policy import format_refusals

    db_path = ""
    try:
        cfg = sim.load_config(args.config) if args.config else sim.resolve_config()
        if args.rounds is not None:
            cfg["rounds"] = args.rounds
        if args.seed is not None:
            cfg["seed"] = args.seed
        db_path = args.db or cfg["output"]["db"]
        plots = None if args.no_plots else (args.plots or cfg["output"]["plots"])
        print(header(cfg), flush=True)
        with sim.RunDB(db_path) as db, _sigterm_interrupts():
            try:
                result, run_id = sim.run_config(
                    cfg, on_round=_progress(int(cfg["rounds"]), not args.quiet), db=db
                )
            except KeyboardInterrupt:
                last = db.runs()[-1] if db.runs() else None
                if last is not None and last.status == "interrupted":
                    print(
                        f"\nfedagg simulate: interrupted; run {last.id} in {db_path} keeps "
                        f"its {last.summary.get('rounds', 0)} stored rounds",
                        file=sys.stderr,
                    )
                else:
                    print("\nfedagg simulate: interrupted", file=sys.stderr)
                return EXIT_INTERRUPTED
            num_classes = db.run(run_id).summary.get("num_classes") if run_id else None
    except fedagg.FedaggError as e:
        print(f"fedagg simulate: error: {e}", file=sys.stderr)
        return EXIT_USAGE if isinstance(e, fedagg.ConfigError) else EXIT_ERROR
    except (ValueError, TypeError) as e:  # a config value of the wrong type, e.g. rounds = "x"
        print(f"fedagg simulate: error: invalid config value: {e}", file=sys.stderr)
        return EXIT_USAGE
    rows = [r.row() for r in result.records]
    print()
    print(sim.format_table(rows))
    print()
    refused: dict[str, int] = {}
    for rec in result.records:
        for reason, n in rec.stats.refusals:
            refused[reason] = refused.get(reason, 0) + n
    if refused:
        print(f"refused updates ({sum(refused.values())}): {format_refusals(refused)}")
    eps = result.records[-1].stats.epsilon if result.records else math.nan
    if not math.isnan(eps):
        print(_privacy_line(cfg, eps, len(result.records)))
    ups = result.client_updates / result.wall_time if result.wall_time else 0.0
    print(
        f"run {run_id} in {db_path}: final test accuracy {rows[-1]['test_accuracy']:.2%}, "
        f"{result.client_updates} client updates in {result.wall_time:.2f} s wall "
        f"({ups:,.0f} updates/s), {rows[-1]['virtual_time']:.1f} s virtual"
    )
    if plots:
        for f in sim.plot_run(rows, plots, f"run{run_id}-{cfg['name']}", num_classes):
            print(f"plot: {f}")
    return EXIT_OK


#: This module's subcommands (see :data:`fedagg.cli.COMMANDS`).
COMMANDS: dict[str, Command] = {
    "simulate": Command(
        help="run a virtual-clock federation from a TOML config (default: MNIST-5k, 100 clients)",
        description=(
            "Simulate a federation on this machine in virtual time: clients with modelled "
            "compute, links and availability train on their data; the server folds their "
            "updates as they arrive. Metrics per round go to the run database and to PNG plots."
        ),
        configure=_configure_simulate,
        run=_run_simulate,
    ),
}
