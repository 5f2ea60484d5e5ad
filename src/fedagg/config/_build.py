"""The objects a resolved config describes: data, model, client algorithm, aggregator,
strategy and policy. The simulator (:mod:`fedagg.sim`) and the deployment
(:mod:`fedagg.deploy`) build from the same config with these, so both run the same thing.
Heavy packages (data, models, clients) are imported only when their builder runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from fedagg import policy as policies
from fedagg.config._models import is_user_aggregator, named, user_aggregator, user_model
from fedagg.config._privacy import (
    check_privacy,
    privacy_client,
    privacy_policy,
    privacy_strategy,
    sampling,
)
from fedagg.config._schema import DEFAULTS
from fedagg.core import strategy as strategies
from fedagg.core.aggregate import mean
from fedagg.core.pretransforms import clip_norm
from fedagg.core.strategy import Strategy
from fedagg.errors import ConfigError
from fedagg.strategies import fedadagrad

__all__ = [
    "build_aggregator",
    "build_algorithm",
    "build_data",
    "build_model",
    "build_policy",
    "build_strategy",
]

_DEFAULT_BETA1 = float(DEFAULTS["strategy"]["beta1"])

_DATA_KEYS = {
    "dirichlet": ("alpha",),
    "label_dirichlet": ("alpha",),
    "shards": ("shards_per_client",),
    "quantity": ("sigma",),
    "natural": ("alpha", "beta"),
    "iid": (),
}


def build_data(cfg: Mapping[str, Any], seed: int) -> Any:
    from fedagg import data as fdata

    d = cfg["data"]
    if d["name"] == "none":  # your code loads its own data (deployment only)
        return None
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
    """The ``[model]``: a built-in one (``name``, sized by ``data``), or yours (``factory``,
    ``init``; see :mod:`fedagg.config._models`), evaluated by ``[client] evaluate`` if set.
    ``data`` may be None (``data.name = "none"``) for a model of your own."""
    from fedagg import models

    m = cfg["model"]

    def builtin(data: Any) -> Any:
        if m["name"] == "logreg":
            return models.LogReg(data.num_features, data.num_classes)
        if m["name"] == "mlp":
            hidden = tuple(int(h) for h in m["hidden"])
            return models.MLP(data.num_features, hidden, data.num_classes)
        raise ConfigError(f"unknown model {m['name']!r}; valid: logreg, mlp")

    return user_model(cfg, data, builtin)


def build_algorithm(cfg: Mapping[str, Any]) -> Any:
    """The ``[client]`` algorithm (wrapped as ``[privacy]`` needs: local DP)."""
    return privacy_client(cfg, _build_algorithm(cfg))


def _build_algorithm(cfg: Mapping[str, Any]) -> Any:
    from fedagg import clients

    c = cfg["client"]
    train = named(cfg, "client.train")
    if train is not None:  # your train function
        return clients.UserTrain(train, epochs=int(c["epochs"]), name_=f"user:{c['train']}")
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


def build_aggregator(s: Mapping[str, Any], *, code_path: str = "") -> Any:
    """The ``[strategy] aggregator``: the mean, a robust rule (spooled to ``spool``), or yours,
    ``"module:Class"`` made with ``aggregator_args`` (imported from ``code_path`` first)."""
    from fedagg import aggregators as A
    from fedagg import spool as spools

    name = s["aggregator"]
    if is_user_aggregator(name):
        return user_aggregator(s, code_path)
    if s.get("aggregator_args"):
        raise ConfigError(
            f'strategy.aggregator_args is for an aggregator of yours ("module:Class"), not '
            f"the built-in {name!r}"
        )
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
    """The ``[strategy]`` (its aggregator wrapped as ``[privacy]`` needs: central DP)."""
    check_privacy(cfg)
    return privacy_strategy(cfg, _build_strategy(cfg))


def _build_strategy(cfg: Mapping[str, Any]) -> Strategy:
    s = cfg["strategy"]
    agg = build_aggregator(s, code_path=cfg.get("code_path", ""))
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


_POLICIES = ("sync", "fedbuff", "fedasync", "fedfix", "async", "fedamd")


def build_policy(cfg: Mapping[str, Any], strategy: Strategy) -> Any:
    """The round or async policy of the ``[policy]`` table; with ``[secure_aggregation] kind
    = "secagg+"``, a :class:`~fedagg.policy.SecurePolicy` around the sync policy (refused
    with a :class:`ConfigError` for what needs plaintext updates); with ``[privacy]``, the
    policy of :func:`fedagg.config._privacy.privacy_policy` around that (central DP: a
    :class:`~fedagg.policy.PrivatePolicy`)."""
    check_privacy(cfg)
    return privacy_policy(cfg, _secure_or_plain(cfg, strategy))


def _secure_or_plain(cfg: Mapping[str, Any], strategy: Strategy) -> Any:
    sa = cfg.get("secure_aggregation", {"kind": "none"})
    if sa["kind"] == "none":
        return _build_policy(cfg, strategy)
    if sa["kind"] != "secagg+":
        raise ConfigError(f"unknown secure aggregation {sa['kind']!r}; valid: none, secagg+")
    _check_secure(cfg)
    return policies.SecurePolicy(
        _build_policy(cfg, strategy),
        neighbors=int(sa["neighbors"]),
        threshold=int(sa["threshold"]),
        clip=float(sa["clip"]),
        bits=int(sa["bits"]),
        rotation=bool(sa["rotation"]),
        max_weight=float(sa["max_weight"]),
        stage_timeout=float(sa["stage_timeout"]),
    )


def _check_secure(cfg: Mapping[str, Any]) -> None:
    """Refuse, by config key, what secure aggregation cannot do (the server sees only a sum)."""
    s, p, b = cfg["strategy"], cfg["policy"], cfg["byzantine"]
    why = "with [secure_aggregation] kind = 'secagg+'"
    if s["aggregator"] != "mean":
        raise ConfigError(
            f"strategy.aggregator = {s['aggregator']!r} {why}: robust and custom rules need "
            "plaintext updates; use 'mean' and clip before masking with [secure_aggregation] clip"
        )
    if s["clip_norm"]:
        raise ConfigError(
            f"strategy.clip_norm {why}: the server cannot clip masked updates; clip before "
            "masking with [secure_aggregation] clip"
        )
    if p["kind"] != "sync":
        raise ConfigError(
            f"policy.kind = {p['kind']!r} {why}: secure aggregation runs with sync rounds; FedBuff "
            "per-buffer cohorts (and async, FedAMD) are not implemented"
        )
    if p["weighting"] != "examples":
        raise ConfigError(
            f"policy.weighting = {p['weighting']!r} {why}: FedAU and participation weightings "
            "need each client's plaintext weight; use 'examples'"
        )
    if cfg["client"]["algorithm"] in ("scaffold", "fedamd"):
        raise ConfigError(
            f"client.algorithm = {cfg['client']['algorithm']!r} {why}: its server-side state "
            "(control variates, anchors) needs plaintext updates"
        )
    if int(b["clients"]) > 0 and b["attack"] not in ("none", "label_flip"):
        raise ConfigError(
            f"byzantine.attack = {b['attack']!r} {why}: model-poisoning attacks read the honest "
            "plaintext updates; only 'label_flip' (data poisoning) runs under secure aggregation"
        )
    if int(cfg["deploy"]["checkpoint_updates"]) > 0:
        raise ConfigError(
            f"deploy.checkpoint_updates > 0 {why}: a mid-round checkpoint would need the "
            "protocol's secrets; rounds resume from the event log instead"
        )


def _build_policy(cfg: Mapping[str, Any], strategy: Strategy) -> Any:
    from fedagg.core import participation, staleness

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
        return policies.SyncPolicy(
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
            sampling="poisson" if sampling(cfg) == "poisson" else "fixed",
        )
    if kind == "fedbuff":
        return policies.fedbuff(
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
        return policies.fedasync(
            strategy,
            rounds,
            float(p["alpha"]),
            staleness=stale,
            concurrency=concurrency,
            max_staleness=max_stale if max_stale >= 0 else None,
        )
    if kind == "fedfix":
        return policies.fedfix(
            strategy, rounds, float(p["window"]), weights=p["weights"], concurrency=concurrency
        )
    if kind == "async":
        return policies.async_fedavg(
            strategy, rounds, weights=p["weights"], concurrency=concurrency, staleness=stale
        )
    if kind == "fedamd":
        return policies.FedAMDPolicy(
            strategy,
            rounds,
            int(p["clients_per_round"]),
            float(p["anchor_prob"]),
            weights=p["weights"],
        )
    raise ConfigError(f"unknown policy {kind!r}; valid: {', '.join(_POLICIES)}")
