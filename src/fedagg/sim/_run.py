"""Build a simulation from a resolved config, run it, store it, report it."""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedagg.config import (
    build_algorithm,
    build_data,
    build_eval_data,
    build_model,
    build_policy,
    build_strategy,
    client_config,
    resolve_config,
)
from fedagg.errors import ConfigError
from fedagg.runs import RunDB, jsonable
from fedagg.sim._engine import Executor, LocalExecutor, RoundRecord, SimResult, Simulation
from fedagg.sim._system import Availability, Distribution, SystemModel

__all__ = ["Built", "build", "format_table", "plot_run", "run_config"]


@dataclass
class Built:
    """The objects of one run, before it runs."""

    config: dict[str, Any]
    simulation: Simulation
    data: Any


def build_system(cfg: Mapping[str, Any], num_clients: int, seed: int) -> SystemModel:
    s = cfg["system"]

    def dist(d: Mapping[str, Any]) -> Distribution:
        return Distribution(
            d["kind"], float(d["mean"]), float(d["sigma"]), float(d["low"]), float(d["high"])
        )

    a = s["availability"]
    return SystemModel(
        num_clients=num_clients,
        seed=seed,
        compute=dist(s["compute"]),
        downlink=dist(s["downlink"]),
        uplink=dist(s["uplink"]),
        latency=dist(s["latency"]),
        dropout=float(s["dropout"]),
        jitter=float(s["jitter"]),
        availability=Availability(a["kind"], float(a["p"]), float(a["max_on"]), int(a["period"])),
    )


def build_executor(cfg: Mapping[str, Any]) -> Executor:
    e = cfg["executor"]
    if e["kind"] == "local":
        return LocalExecutor()
    if e["kind"] == "processes":
        from fedagg.sim._procs import ProcessExecutor

        return ProcessExecutor(workers=int(e["workers"]))
    if e["kind"] == "ray":
        from fedagg.sim._ray import RayExecutor

        return RayExecutor(workers=int(e["workers"]))
    raise ConfigError(f"unknown executor {e['kind']!r}; valid: local, processes, ray")


def build(
    config: Mapping[str, Any] | None = None,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    data: Any = None,
) -> Built:
    """The simulation described by ``config`` (a partial config: defaults fill the rest)."""
    cfg = resolve_config(config)
    seed = int(cfg["seed"])
    if data is None and cfg["data"]["name"] == "none":
        raise ConfigError(
            "data.name = 'none' (your code loads its own data) is for deployment only: the "
            "simulator needs a dataset to give each client its share (e.g. data.name = "
            "'synthetic' or 'mnist5k')"
        )
    fd = build_data(cfg, seed) if data is None else data
    algorithm = build_algorithm(cfg, seeded_noise=True)  # replays bit for bit
    strategy = build_strategy(cfg)
    policy = build_policy(cfg, strategy)
    byz, attack, byz_alg = build_byzantine(cfg, algorithm, fd)
    sim = Simulation(
        data=fd,
        model=build_model(cfg, fd),
        algorithm=algorithm,
        strategy=strategy,
        policy=policy,
        system=build_system(cfg, len(fd.clients), seed),
        seed=seed,
        executor=build_executor(cfg),
        eval_every=int(cfg["eval_every"]),
        eval_train=bool(cfg["eval_train"]),
        eval_clients=int(cfg["eval_clients"]),
        on_round=on_round,
        max_time=float(cfg["max_time"]),
        byzantine=byz,
        attack=attack,
        byzantine_algorithm=byz_alg,
        task_config=functools.partial(client_config, cfg),
        eval_data=build_eval_data(cfg),
        secure_dropout=float(cfg["secure_aggregation"]["dropout"]),
    )
    return Built(cfg, sim, fd)


def build_byzantine(cfg: Mapping[str, Any], algorithm: Any, data: Any) -> tuple[Any, Any, Any]:
    """``[byzantine]``: the first ``clients`` clients lie with ``attack`` (or train on
    flipped labels, ``attack = "label_flip"``)."""
    from fedagg import attacks

    b = cfg["byzantine"]
    count = int(b["clients"])
    if not 0 <= count <= len(data.clients):
        raise ConfigError(f"byzantine.clients must be in [0, {len(data.clients)}], got {count}")
    kind = b["attack"]
    if count == 0 or kind == "none":
        return frozenset(), None, None
    byz = frozenset(range(count))
    if kind == "label_flip":
        return byz, None, attacks.LabelFlip(algorithm, int(data.num_classes))
    params: dict[str, Any] = {
        "sign_flip": {"scale": float(b["scale"])},
        "ipm": {"eps": float(b["eps"])},
        "alie": {"z": b["z"]},
        "min_max": {"direction": b["direction"]},
        "min_sum": {"direction": b["direction"]},
    }.get(kind, {})
    return byz, attacks.attack(kind, **params), None


def run_config(
    config: Mapping[str, Any] | None = None,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    db: RunDB | None = None,
) -> tuple[SimResult, int | None]:
    """Build and run; store config and rounds in ``db`` (if given). Returns (result, run id).

    The run ends ``"finished"``; or ``"interrupted"`` on a :class:`KeyboardInterrupt` (Ctrl-C;
    ``fedagg simulate`` turns SIGTERM into one), or ``"failed"`` on any other exception,
    both re-raised after the run's summary (the rounds stored, the last accuracy) is saved.
    """
    built = build(config)
    cfg = built.config
    run_id = db.start_run(str(cfg["name"]), int(cfg["seed"]), jsonable(cfg)) if db else None
    classes = getattr(built.data, "num_classes", None)
    extra = {"num_classes": int(classes)} if isinstance(classes, int) and classes > 1 else {}

    def each(rec: RoundRecord) -> None:
        if db is not None and run_id is not None:
            db.add_round(run_id, rec.row())
        if on_round is not None:
            on_round(rec)

    built.simulation.on_round = each
    wall0 = time.perf_counter()
    try:
        result = built.simulation.run()
    except BaseException as e:
        if db is not None and run_id is not None:
            status = "interrupted" if isinstance(e, KeyboardInterrupt) else "failed"
            # what the database holds is the truth (an interrupt may fall between the store
            # of a round and anything after it)
            part = _summary(db.rounds(run_id), time.perf_counter() - wall0, None)
            note = {} if status == "interrupted" else {"error": f"{type(e).__name__}: {e}"[:500]}
            db.finish_run(run_id, status, {**part, **extra, **note})
        raise
    if db is not None and run_id is not None:
        db.finish_run(run_id, "finished", {**summary(result), **extra})
    return result, run_id


def summary(result: SimResult) -> dict[str, Any]:
    """A finished run's summary: rounds, final accuracy and loss, times, update rate."""
    rows = [r.row() for r in result.records]
    return _summary(rows, result.wall_time, result.client_updates)


def _summary(rows: Sequence[Mapping[str, Any]], wall: float, updates: int | None) -> dict[str, Any]:
    """The summary of the rounds run so far (``final_*``: the last evaluated round's)."""
    if updates is None:
        updates = sum(int(r.get("folded") or 0) for r in rows)
    evaluated = [r for r in rows if _evaluated(r)]
    last = evaluated[-1] if evaluated else {}
    return {
        "rounds": len(rows),
        "final_accuracy": last.get("test_accuracy"),
        "final_loss": last.get("test_loss"),
        "virtual_time": rows[-1].get("virtual_time") if rows else 0.0,
        "wall_time": wall,
        "client_updates": updates,
        "updates_per_second": updates / wall if wall else 0,
    }


def _evaluated(r: Mapping[str, Any]) -> bool:
    v = r.get("test_accuracy")
    return v is not None and not (isinstance(v, float) and math.isnan(v))


def format_table(rows: Sequence[Mapping[str, Any]], every: int = 0) -> str:
    """A fixed-width results table of round rows: every evaluated round and the last, and
    (``every`` > 0) every ``every``-th of the rounds not evaluated."""
    cols = [
        ("round", "{:>5}"), ("test_accuracy", "{:>8.2%}"), ("test_loss", "{:>9.4f}"),
        ("client_loss", "{:>11.4f}"), ("folded", "{:>6}"), ("staleness_mean", "{:>6.2f}"),
        ("virtual_time", "{:>12.1f}"),
        ("wall_time", "{:>9.2f}"), ("bytes_up", "{:>12,}"),
    ]  # fmt: skip
    heads = ["round", "test acc", "test loss", "client loss", "folded", "stale", "virtual s",
             "wall s", "bytes up"]  # fmt: skip
    widths = [len(f.format(0 if "%" not in f else 0.0)) for _, f in cols]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True))]
    for i, r in enumerate(rows):
        if not (_evaluated(r) or i == len(rows) - 1 or (every > 0 and i % every == 0)):
            continue
        cells = []
        for (k, f), w in zip(cols, widths, strict=True):
            v = r.get(k)
            cells.append(
                "-".rjust(w)
                if v is None or (isinstance(v, float) and math.isnan(v))
                else f.format(int(v) if k in ("round", "folded", "bytes_up") else v)
            )
        lines.append("  ".join(cells))
    return "\n".join(lines)


def plot_run(
    rows: Sequence[Mapping[str, Any]], path: str, title: str, num_classes: int | None = None
) -> list[str]:
    """Two PNGs: accuracy against round and against virtual time, on a fixed [0, 1] axis
    (so a collapse shows as one), with a dashed chance line at ``1 / num_classes`` if given.
    Returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(path, exist_ok=True)
    pts = [r for r in rows if _evaluated(r)]
    out = []
    for x_key, label, suffix in (("round", "round", "round"),
                                 ("virtual_time", "virtual time (s)", "time")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r[x_key] for r in pts], [r["test_accuracy"] for r in pts], marker=".")
        ax.set_ylim(0.0, 1.0)
        if num_classes is not None and num_classes > 1:
            ax.axhline(1.0 / num_classes, color="grey", linestyle="--", linewidth=1,
                       label=f"chance (1/{num_classes})")  # fmt: skip
            ax.legend(loc="lower right")
        ax.set_xlabel(label)
        ax.set_ylabel("test accuracy")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        file = os.path.join(path, f"{title}-accuracy-vs-{suffix}.png")
        fig.savefig(file, dpi=100)
        plt.close(fig)
        out.append(file)
    return out
