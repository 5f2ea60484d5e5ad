"""``[privacy]``: what the config builds for each mechanism. :func:`build_strategy`,
:func:`build_policy` and :func:`build_algorithm` (``config/_build.py``) call the three hooks
here; each tells the mechanisms apart by ``[privacy] mechanism`` (one branch per mechanism).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedagg import policy as policies
from fedagg.core.strategy import Strategy
from fedagg.errors import ConfigError

__all__ = ["check_privacy", "privacy_client", "privacy_policy", "privacy_strategy", "sampling"]

_MECHANISMS = ("none", "central", "local", "distributed")


def mechanism(cfg: Mapping[str, Any]) -> str:
    """``[privacy] mechanism`` (``"none"`` when the table is absent)."""
    mech = str(cfg.get("privacy", {}).get("mechanism", "none"))
    if mech not in _MECHANISMS:
        raise ConfigError(f"unknown privacy mechanism {mech!r}; valid: {', '.join(_MECHANISMS)}")
    return mech


def sampling(cfg: Mapping[str, Any]) -> str:
    """How the sync policy samples clients: ``[privacy] sampling`` under DP, else fixed."""
    if mechanism(cfg) == "none":
        return "fixed"
    return str(cfg["privacy"]["sampling"])


def check_privacy(cfg: Mapping[str, Any]) -> None:
    """Refuse, with a :class:`ConfigError` naming the key, what the mechanism does not cover
    (called before anything is built)."""
    if mechanism(cfg) == "central":
        _check_central(cfg)


def privacy_strategy(cfg: Mapping[str, Any], strategy: Strategy) -> Strategy:
    """The strategy under ``[privacy]``: central DP wraps the aggregator in
    :class:`~fedagg.policy.DPSum` (clip, count, noise the sum)."""
    if mechanism(cfg) == "central":
        return policies.dp_strategy(strategy, float(cfg["privacy"]["clip"]))
    return strategy


def privacy_policy(cfg: Mapping[str, Any], inner: Any) -> Any:
    """The policy under ``[privacy]``, around ``inner`` (the sync policy, or the
    SecurePolicy around it): central DP is a :class:`~fedagg.policy.PrivatePolicy`."""
    mech = mechanism(cfg)
    if mech == "none":
        return inner
    if mech == "central":
        pr = cfg["privacy"]
        return policies.PrivatePolicy(
            inner,
            noise_multiplier=float(pr["noise_multiplier"]),
            clip=float(pr["clip"]),
            target_quantile=float(pr["target_quantile"]),
            clip_learning_rate=float(pr["clip_learning_rate"]),
            count_stddev=float(pr["count_stddev"]),
            delta=float(pr["delta"]),
            max_epsilon=float(pr["max_epsilon"]),
            accountant=str(pr["accountant"]),
        )
    raise ConfigError(f"[privacy] mechanism = {mech!r} is not wired yet")


def privacy_client(cfg: Mapping[str, Any], algorithm: Any) -> Any:
    """The client algorithm under ``[privacy]`` (central DP: unchanged; the server clips)."""
    mech = mechanism(cfg)
    if mech in ("none", "central"):
        return algorithm
    raise ConfigError(f"[privacy] mechanism = {mech!r} is not wired yet")


def _check_central(cfg: Mapping[str, Any]) -> None:
    """Refuse, by config key, what central DP does not cover."""
    why = "with [privacy] mechanism = 'central'"
    s, p = cfg["strategy"], cfg["policy"]
    if cfg.get("secure_aggregation", {}).get("kind", "none") != "none":
        raise ConfigError(
            f"[secure_aggregation] {why}: the server cannot clip what it cannot see; use "
            "mechanism = 'distributed' (clients add noise before masking)"
        )
    if p["kind"] != "sync":
        raise ConfigError(
            f"policy.kind = {p['kind']!r} {why}: DP runs with sync rounds; async, FedBuff and "
            "FedAMD would need DP-FTRL (tree aggregation), which is not implemented"
        )
    if s["aggregator"] != "mean":
        raise ConfigError(
            f"strategy.aggregator = {s['aggregator']!r} {why}: a robust rule's output is not "
            "covered by the Gaussian mechanism's analysis; use 'mean'"
        )
    if p["weighting"] != "examples":
        raise ConfigError(
            f"policy.weighting = {p['weighting']!r} {why}: DP weighs every client 1 (a bounded "
            "sensitivity); FedAU and participation weightings are not DP here"
        )
    if cfg["client"]["algorithm"] in ("scaffold", "fedamd"):
        raise ConfigError(
            f"client.algorithm = {cfg['client']['algorithm']!r} {why}: its server-side "
            "per-client state (control variates, anchors) is not privatised"
        )
    if float(p.get("over_select", 0.0)):
        raise ConfigError(f"policy.over_select {why}: Poisson sampling takes no over-selection")
    if cfg["privacy"]["sampling"] != "poisson":
        raise ConfigError(
            f"privacy.sampling = 'fixed' {why}: no accountant for fixed-size sampling here "
            "(sampling without replacement is analysed under substitution adjacency only, "
            "Wang et al. 2019, not implemented); use 'poisson'"
        )
    dep = cfg.get("deploy", {})
    if dep.get("edges") and dep.get("edge_mode", "auto") != "relay":
        raise ConfigError(
            f"deploy.edges with edge_mode = {dep.get('edge_mode', 'auto')!r} {why}: edges that "
            "aggregate would fold updates the root never clips (and not with the adaptive "
            "clip); use edge_mode = 'relay' (the root clips every update and adds the noise "
            "once)"
        )
    if not math.isfinite(float(cfg["privacy"]["clip"])):
        raise ConfigError("privacy.clip must be finite")
