"""Run configs (simulation and deployment): a TOML file (or dict) -> a resolved config.

Every section has defaults; unknown sections or keys are errors that name the valid ones, so a
typo never silently falls back to a default. The resolved config (defaults filled in) is what
the run database stores.
"""

from __future__ import annotations

import copy
import math
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedagg.errors import ConfigError

__all__ = ["DEFAULTS", "load_config", "resolve_config"]


def _dist(kind: str, mean: float, sigma: float) -> dict[str, Any]:
    return {"kind": kind, "mean": mean, "sigma": sigma, "low": 0.0, "high": 0.0}


DEFAULTS: dict[str, Any] = {
    "name": "mnist5k-fedavg",
    "seed": 0,
    "rounds": 20,
    "eval_every": 1,
    "eval_train": False,
    "eval_clients": 100,
    "max_time": math.inf,
    # held-out data the server evaluates the global model on every eval_every rounds: a .npz
    # file with arrays x and y, or "module:function" returning (x, y); "": the dataset's test
    # split (in deployment, "" and no [data] dataset: no server-side evaluation)
    "eval_data": "",
    # how clients' evaluation metrics are aggregated: "" (a mean weighted by each client's
    # num_examples) or "module:function" taking [(num_examples, {metric: value}), ...]
    "eval_metrics": "",
    # the directory "module:function" references are imported from first ("": the config
    # file's directory, or the working directory for a config given as a dict)
    "code_path": "",
    "data": {
        "name": "mnist5k",
        "num_clients": 100,
        "partition": "dirichlet",
        "alpha": 0.5,
        "beta": 0.5,
        "iid": False,
        "shards_per_client": 2,
        "sigma": 1.0,
        "test_fraction": 0.2,
    },
    "model": {
        "name": "logreg",
        "hidden": [64],
        # your model: initial parameters from a file (.npz, .safetensors, or a torch
        # state_dict, read with weights_only=True), and/or a factory "module:function" called
        # with args that returns a torch.nn.Module or a dict of arrays
        "init": "",
        "factory": "",
        "args": {},
    },
    "client": {
        "algorithm": "fedavg",
        "epochs": 1,
        "batch_size": 10,
        "lr": 0.05,
        "mu": 0.0,
        "beta": 0.9,
        "steps": 0,
        "anchor_batch": 0,
        # your code: train(params, data, task) -> fedagg.clients.Result and
        # evaluate(params, data, task) -> {metric: value}, as "module:function"
        "train": "",
        "evaluate": "",
        # per-task client config sent with every task (task.config), and a function
        # schedule(version, config) -> config that makes it per round (e.g. an lr schedule)
        "config": {},
        "schedule": "",
    },
    "strategy": {
        "name": "fedavg",
        "lr": 1.0,
        "momentum": 0.9,
        "beta1": 0.9,  # fedadagrad with flavor "flower": Flower's fixed 0 (see _run.py)
        "beta2": 0.99,
        "tau": 1e-3,
        "flavor": "paper",
        "accumulator": "float32",
        "clip_norm": 0.0,
        "aggregator": "mean",
        "f": 0,
        "trim": 0,
        "keep": 0,
        "tau_cc": 100.0,
        "iters": 1,
        "subspace": 0,
        "lam": 0.0,
        "spool": "",
        # keyword arguments of a custom aggregator (aggregator = "module:Class")
        "aggregator_args": {},
    },
    "byzantine": {
        "clients": 0,
        "attack": "none",
        "scale": 1.0,
        "eps": 0.1,
        "z": "paper",
        "direction": "unit_vec",
    },
    "policy": {
        "kind": "sync",
        "clients_per_round": 10,
        "over_select": 0.0,
        "deadline": math.inf,
        "min_updates": 1,
        "stragglers": 0.0,
        "straggler_mode": "drop",
        "weighting": "examples",
        "cutoff": 100_000,
        "buffer": 10,
        "concurrency": 0,
        "restart": "arrival",
        "weights": "identical",  # fedbuff and fedamd also take "examples" (by sample count)
        "staleness": "polynomial",
        "staleness_a": 0.5,
        "staleness_b": 4.0,
        "max_staleness": -1,
        "alpha": 0.6,
        "window": 1.0,
        "anchor_prob": 0.2,
    },
    "system": {
        "compute": _dist("lognormal", 2000.0, 0.5),
        "downlink": _dist("lognormal", 2.5e6, 0.5),
        "uplink": _dist("lognormal", 1.0e6, 0.5),
        "latency": _dist("constant", 0.05, 0.0),
        "dropout": 0.0,
        "jitter": 0.0,
        "availability": {"kind": "always", "p": 1.0, "max_on": 0.05, "period": 100},
    },
    "executor": {"kind": "local", "workers": 2},
    "output": {"db": "runs/fedagg.db", "plots": "runs/plots"},
    # `fedagg server` / `fedagg client` (see fedagg.deploy); ignored by the simulator
    "deploy": {
        "listen": "127.0.0.1:7531",
        "server": "127.0.0.1:7531",
        "state": "fedagg-state",
        "certs": "certs",
        "insecure": False,
        "keys": "keys",
        "chunk_mib": 4.0,
        "queue": 64,
        "order": "arrival",
        "checkpoint_every": 1,
        "checkpoint_updates": 0,
        "client_timeout": 30.0,
        "heartbeat": 10.0,
        "wait_for": 0,
        "rate": 50.0,
        "burst": 200.0,
        "skew": 60.0,
        "fsync": True,
        "max_clients": 100_000,
        "digest": True,
        "max_uploads": 8,
        "adaptive_window": False,
        # limits on what a peer can hold (see ServerOptions): seconds for an RPC's first
        # message, seconds an upload or download may stall, its progress floor (KiB/s),
        # uploads/downloads one client may have in progress, unauthenticated RPCs at once
        # (in all, and per peer IP address)
        "first_timeout": 10.0,
        "idle_timeout": 30.0,
        "min_rate_kib": 64.0,
        "client_uploads": 2,
        "preauth": 64,
        "preauth_per_peer": 32,
        # aggregation tiers (see fedagg.deploy._edge): a server with a parent is an edge
        "parent": "",  # host:port of the parent; empty: this server is the root
        "edge_key": "",  # this edge's private key (its name is the key's)
        "edges": "",  # authorized keys of the edge aggregators below this server
        # which clients each of those edges may serve: { "edge-0" = ["client-0", ...] }, or
        # "*" for any client (not connected directly, not held by another edge); an edge not
        # listed may serve none
        "edge_clients": {},
        "serves": [],  # client names of this edge's subtree (empty: all)
        "edge_mode": "auto",  # aggregate (partials), relay (updates), auto: by policy
        "flush_after": 1.0,  # seconds after its first update a partial is sent anyway
        "leaf_rule": "",  # a robust rule run over this edge's own clients (then a mean above)
        # bounds on what a client claims (see fedagg.deploy._bounds), before its update is
        # folded: a weight is capped at weight_cap x the median claimed weight, an update's L2
        # norm bounded by norm_cap x the median norm (clipped, or refused with "reject") and by
        # max_norm; medians over the latest accepted claims of the last bound_window clients
        # of earlier rounds, or, until bound_warmup clients (or half the federation) have one,
        # over the round's own (its updates kept until its close). 0 disables a cap (all
        # three 0: no bounds)
        "weight_cap": 10.0,
        "norm_cap": 10.0,
        "norm_mode": "clip",  # clip (scale the update down to the bound) or reject
        "max_norm": 0.0,  # an absolute bound on every update's norm (0: none)
        "bound_window": 64,
        "bound_warmup": 5,
        # federated evaluation: every fed_eval_every model versions the server asks up to
        # fed_eval_clients connected clients (0: all of them) to evaluate the model on their
        # own data, waiting at most eval_timeout seconds for their metrics (0: off)
        "fed_eval_every": 0,
        "fed_eval_clients": 0,
        "eval_timeout": 60.0,
    },
}


def _merge(base: dict[str, Any], over: Mapping[str, Any], where: str) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if k not in base:
            valid = ", ".join(sorted(base))
            raise ConfigError(f"unknown key {where}{k!r}; valid keys: {valid}")
        if isinstance(base[k], dict) and not base[k]:  # a free-form table (checked by its user)
            if not isinstance(v, Mapping):
                raise ConfigError(f"{where}{k} must be a table")
            out[k] = copy.deepcopy(dict(v))
        elif isinstance(base[k], dict):
            if not isinstance(v, Mapping):
                raise ConfigError(f"{where}{k} must be a table")
            out[k] = _merge(base[k], v, f"{where}{k}.")
        else:
            out[k] = v
    return out


def resolve_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The defaults with ``overrides`` applied (nested tables merge key by key)."""
    return _merge(DEFAULTS, overrides or {}, "")


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a TOML config and resolve it against the defaults."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"no config file {path}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e
    return resolve_config(raw)
