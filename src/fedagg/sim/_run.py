"""Build a simulation from a resolved config, run it, store it, report it."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fedagg.core import strategy as strategies
from fedagg.core.aggregate import mean
from fedagg.core.pretransforms import clip_norm
from fedagg.core.strategy import Strategy
from fedagg.errors import ConfigError
from fedagg.sim._config import DEFAULTS, resolve_config
from fedagg.sim._engine import Executor, LocalExecutor, RoundRecord, SimResult, Simulation
from fedagg.sim._policy import SyncPolicy
from fedagg.sim._rundb import RunDB
from fedagg.sim._system import Availability, Distribution, SystemModel
from fedagg.strategies import fedadagrad

__all__ = ["Built", "build", "format_table", "plot_run", "run_config"]

_DEFAULT_BETA1 = float(DEFAULTS["strategy"]["beta1"])

_DATA_KEYS = {
    "dirichlet": ("alpha",),
    "label_dirichlet": ("alpha",),
    "shards": ("shards_per_client",),
    "quantity": ("sigma",),
    "natural": ("alpha", "beta"),
    "iid": (),
}


@dataclass
class Built:
    """The objects of one run, before it runs."""

    config: dict[str, Any]
    simulation: Simulation
    data: Any


def build_data(cfg: Mapping[str, Any], seed: int) -> Any:
    from fedagg import data as fdata

    d = cfg["data"]
    part = d["partition"]
    if part not in _DATA_KEYS:
        raise ConfigError(f"unknown partition {part!r}; valid: {sorted(_DATA_KEYS)}")
    kwargs: dict[str, Any] = {k: d[k] for k in _DATA_KEYS[part]}
    if d["name"] != "synthetic":
        kwargs["test_fraction"] = d["test_fraction"]
    else:  # the generator's own heterogeneity; the partition then applies to its users
        kwargs.update(alpha=d["alpha"], beta=d["beta"], iid=bool(d["iid"]))
    return fdata.load(
        d["name"], num_clients=int(d["num_clients"]), partition=part, seed=seed, **kwargs
    )


def build_model(cfg: Mapping[str, Any], data: Any) -> Any:
    from fedagg import models

    m = cfg["model"]
    if m["name"] == "logreg":
        return models.LogReg(data.num_features, data.num_classes)
    if m["name"] == "mlp":
        return models.MLP(data.num_features, tuple(int(h) for h in m["hidden"]), data.num_classes)
    raise ConfigError(f"unknown model {m['name']!r}; valid: logreg, mlp")


def build_algorithm(cfg: Mapping[str, Any]) -> Any:
    from fedagg import clients

    c = cfg["client"]
    steps = int(c["steps"]) or None
    common: dict[str, Any] = {
        "epochs": int(c["epochs"]),
        "batch_size": int(c["batch_size"]),
        "lr": float(c["lr"]),
        "steps": steps,
    }
    if c["algorithm"] == "momentum":
        return clients.WorkerMomentum(
            lr=common["lr"], batch_size=common["batch_size"], beta=float(c["beta"])
        )
    if c["algorithm"] == "fedamd":
        return clients.FedAMD(
            steps=steps or 10,
            batch_size=common["batch_size"],
            lr=common["lr"],
            anchor_batch=int(c["anchor_batch"]) or None,
        )
    if c["algorithm"] == "fedavg":
        return clients.LocalSGD(**common)
    if c["algorithm"] == "fedprox":
        return clients.FedProx(mu=float(c["mu"]), **common)
    if c["algorithm"] == "scaffold":
        return clients.Scaffold(**common)
    raise ConfigError(
        f"unknown client algorithm {c['algorithm']!r}; valid: fedavg, fedprox, scaffold, fedamd, "
        "momentum"
    )


_AGGREGATORS = (
    "mean", "median", "trimmed_mean", "krum", "multi_krum", "bulyan", "geometric_median",
    "centered_clipping", "flag",
)  # fmt: skip


def build_aggregator(s: Mapping[str, Any]) -> Any:
    """The ``[strategy] aggregator``: the mean or a robust rule (spooled to ``spool``)."""
    from fedagg import aggregators as A
    from fedagg import spool as spools

    name = s["aggregator"]
    if name == "mean":
        return mean(s["accumulator"])
    kw: dict[str, Any] = {"spool": spools.disk(s["spool"]) if s["spool"] else None}
    f = int(s["f"])
    rules: dict[str, Callable[[], Any]] = {
        "median": lambda: A.median(**kw),
        "trimmed_mean": lambda: A.trimmed_mean(int(s["trim"]) or f, **kw),
        "krum": lambda: A.krum(f, **kw),
        "multi_krum": lambda: A.multi_krum(f, int(s["keep"]) or 1, **kw),
        "bulyan": lambda: A.bulyan(f, **kw),
        "geometric_median": lambda: A.geometric_median(**kw),
        "centered_clipping": lambda: A.centered_clipping(float(s["tau_cc"]), int(s["iters"]), **kw),
        "flag": lambda: A.flag_aggregator(
            int(s["subspace"]) or None, float(s["lam"]), norm="median", **kw
        ),
    }
    if name not in rules:
        raise ConfigError(f"unknown aggregator {name!r}; valid: {', '.join(_AGGREGATORS)}")
    return rules[name]()


def build_strategy(cfg: Mapping[str, Any]) -> Strategy:
    s = cfg["strategy"]
    agg = build_aggregator(s)
    pre = [clip_norm(float(s["clip_norm"]))] if s["clip_norm"] else []
    name = s["name"]
    if name == "fedavg":
        return strategies.fedavg(float(s["lr"]), aggregator=agg, pre=pre)
    if name == "fedavgm":
        return strategies.fedavgm(float(s["lr"]), float(s["momentum"]), aggregator=agg, pre=pre)
    opt = {"lr": float(s["lr"]), "tau": float(s["tau"]), "flavor": s["flavor"]}
    if name == "fedadam":
        return strategies.fedadam(
            beta1=s["beta1"], beta2=s["beta2"], **opt, aggregator=agg, pre=pre
        )
    if name == "fedyogi":
        return strategies.fedyogi(
            beta1=s["beta1"], beta2=s["beta2"], **opt, aggregator=agg, pre=pre
        )
    if name == "fedadagrad":
        return fedadagrad(beta1=_adagrad_beta1(s), **opt, aggregator=agg, pre=pre)
    raise ConfigError(
        f"unknown strategy {name!r}; valid: fedavg, fedavgm, fedadam, fedyogi, fedadagrad"
    )


def _adagrad_beta1(s: Mapping[str, Any]) -> float | None:
    """FedAdagrad's beta1 from ``[strategy]``: the ``beta1`` key (default 0.9, the paper's)
    in the paper's flavor. Flower's FedAdagrad fixes beta1 at 0, so the flower flavor takes
    that and refuses any other explicit value (only the default 0.9, or 0, pass)."""
    beta1 = float(s["beta1"])
    if s["flavor"] != "flower":
        return beta1
    if beta1 not in (_DEFAULT_BETA1, 0.0):
        raise ConfigError(
            f"strategy.beta1 = {beta1} with fedadagrad's flavor 'flower': Flower's FedAdagrad "
            "fixes beta1 at 0; use flavor = 'paper' for another beta1"
        )
    return None


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
    fd = build_data(cfg, seed) if data is None else data
    algorithm = build_algorithm(cfg)
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


_POLICIES = ("sync", "fedbuff", "fedasync", "fedfix", "async", "fedamd")


def build_policy(cfg: Mapping[str, Any], strategy: Strategy) -> Any:
    """The round or async policy of the ``[policy]`` table."""
    from fedagg.core import participation, staleness
    from fedagg.sim import _async

    p = cfg["policy"]
    kind = p["kind"]
    rounds = int(cfg["rounds"])
    algorithm = cfg["client"]["algorithm"]
    if (kind == "fedamd") != (algorithm == "fedamd"):
        raise ConfigError("policy kind 'fedamd' and client algorithm 'fedamd' go together")
    if algorithm == "scaffold" and kind != "sync":
        raise ConfigError("SCAFFOLD runs with the sync policy only")
    concurrency = int(p["concurrency"]) or None
    max_stale = int(p["max_staleness"])
    stale = staleness.Staleness(
        p["staleness"], a=float(p["staleness_a"]), b=float(p["staleness_b"])
    )
    if kind == "sync":
        weightings = {
            "examples": participation.examples,
            "participating": participation.participating,
            "all": participation.all_clients,
        }
        if p["weighting"] == "fedau":
            weighting = participation.fedau(int(p["cutoff"]))
        elif p["weighting"] in weightings:
            weighting = weightings[p["weighting"]]()
        else:
            raise ConfigError(
                f"unknown weighting {p['weighting']!r}; valid: examples, participating, all, fedau"
            )
        return SyncPolicy(
            strategy=strategy,
            rounds=rounds,
            clients_per_round=int(p["clients_per_round"]),
            over_select=float(p["over_select"]),
            deadline=float(p["deadline"]),
            min_updates=int(p["min_updates"]),
            stragglers=float(p["stragglers"]),
            straggler_mode=p["straggler_mode"],
            scaffold=algorithm == "scaffold",
            weighting=None if p["weighting"] == "examples" else weighting,
        )
    if kind == "fedbuff":
        return _async.fedbuff(
            strategy,
            rounds,
            int(p["buffer"]),
            concurrency,
            staleness=stale,
            restart=p["restart"],
            weights=p["weights"],
            max_staleness=max_stale if max_stale >= 0 else None,
        )
    if kind == "fedasync":
        return _async.fedasync(
            strategy,
            rounds,
            float(p["alpha"]),
            staleness=stale,
            concurrency=concurrency,
            max_staleness=max_stale if max_stale >= 0 else None,
        )
    if kind == "fedfix":
        return _async.fedfix(
            strategy, rounds, float(p["window"]), weights=p["weights"], concurrency=concurrency
        )
    if kind == "async":
        return _async.async_fedavg(
            strategy, rounds, weights=p["weights"], concurrency=concurrency, staleness=stale
        )
    if kind == "fedamd":
        from fedagg.sim._amd import FedAMDPolicy

        return FedAMDPolicy(
            strategy,
            rounds,
            int(p["clients_per_round"]),
            float(p["anchor_prob"]),
            weights=p["weights"],
        )
    raise ConfigError(f"unknown policy {kind!r}; valid: {', '.join(_POLICIES)}")


def run_config(
    config: Mapping[str, Any] | None = None,
    *,
    on_round: Callable[[RoundRecord], None] | None = None,
    db: RunDB | None = None,
) -> tuple[SimResult, int | None]:
    """Build and run; store config and rounds in ``db`` (if given). Returns (result, run id)."""
    built = build(config)
    cfg = built.config
    run_id = db.start_run(str(cfg["name"]), int(cfg["seed"]), _jsonable(cfg)) if db else None

    def each(rec: RoundRecord) -> None:
        if db is not None and run_id is not None:
            db.add_round(run_id, rec.row())
        if on_round is not None:
            on_round(rec)

    built.simulation.on_round = each
    try:
        result = built.simulation.run()
    except BaseException:
        if db is not None and run_id is not None:
            db.finish_run(run_id, "failed", {})
        raise
    if db is not None and run_id is not None:
        db.finish_run(run_id, "finished", summary(result))
    return result, run_id


def summary(result: SimResult) -> dict[str, Any]:
    f = result.final.row()
    return {
        "rounds": len(result.records),
        "final_accuracy": f["test_accuracy"],
        "final_loss": f["test_loss"],
        "virtual_time": f["virtual_time"],
        "wall_time": result.wall_time,
        "client_updates": result.client_updates,
        "updates_per_second": result.client_updates / result.wall_time if result.wall_time else 0,
    }


def _jsonable(cfg: Mapping[str, Any]) -> dict[str, Any]:
    def fix(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, Mapping):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v

    return {k: fix(v) for k, v in cfg.items()}


def format_table(rows: Sequence[Mapping[str, Any]], every: int = 1) -> str:
    """A fixed-width results table of round rows (every ``every``-th, plus the last)."""
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
        if i % every and i != len(rows) - 1:
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


def plot_run(rows: Sequence[Mapping[str, Any]], path: str, title: str) -> list[str]:
    """Two PNGs: accuracy against round and against virtual time. Returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(path, exist_ok=True)
    pts = [r for r in rows if r.get("test_accuracy") is not None
           and not math.isnan(float(r["test_accuracy"]))]  # fmt: skip
    out = []
    for x_key, label, suffix in (("round", "round", "round"),
                                 ("virtual_time", "virtual time (s)", "time")):  # fmt: skip
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot([r[x_key] for r in pts], [r["test_accuracy"] for r in pts], marker=".")
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
