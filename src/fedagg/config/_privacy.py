"""``[privacy]``: what the config builds for each mechanism. :func:`build_strategy`,
:func:`build_policy` and :func:`build_algorithm` (``config/_build.py``) call the three hooks
here; each tells the mechanisms apart by ``[privacy] mechanism`` (one branch per mechanism).

The client-side mechanisms (:func:`check_client_side`, :func:`wrap_algorithm`,
:func:`secure_noise`, :func:`client_side_policy`):

* ``local``: the client algorithm is wrapped in :class:`fedagg.clients.LocalDP` (clip =
  ``[privacy] clip``, noise ``noise_multiplier * clip``), and the policy in a
  :class:`~fedagg.policy.ClientDPPolicy` that reports each round the largest per-client local
  epsilon so far and stops before ``max_epsilon``.
* ``distributed``: needs ``[secure_aggregation] kind = "secagg+"``; the SecurePolicy gets the
  discrete Gaussian (``noise = "gaussian"``; the Python API also offers ``"skellam"``),
  ``noise_multiplier``, and ``clip`` = ``[privacy] clip`` (replacing ``[secure_aggregation]
  clip``: the DP clip is the encoding's), and the :class:`~fedagg.policy.ClientDPPolicy`
  around it accounts the rounds (RDP against the server: replace-one, no amplification).
* refused: distributed DP without secagg+, ``noise_multiplier = 0``, adaptive clipping
  (``target_quantile > 0``: the clip follows a count the server would need in plaintext),
  async/FedAMD policies, SCAFFOLD/FedAMD clients (their extra payload would leave
  un-noised), robust aggregators under local DP (the guarantee would hold, but the refusal
  keeps "DP with robust rules" one rule: see docs/privacy.md).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from fedagg import policy as policies
from fedagg.core.strategy import Strategy
from fedagg.errors import ConfigError

__all__ = [
    "check_client_side",
    "check_privacy",
    "client_side_policy",
    "privacy_client",
    "privacy_policy",
    "privacy_strategy",
    "sampling",
    "secure_noise",
    "wrap_algorithm",
]

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
    check_client_side(cfg)


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
    return client_side_policy(cfg, inner)


def privacy_client(cfg: Mapping[str, Any], algorithm: Any, *, seeded: bool = False) -> Any:
    """The client algorithm under ``[privacy]`` (central DP: unchanged; the server clips).
    ``seeded``: local DP noise from the job's seeded generator (the simulator, to replay),
    not from a fresh secret key (a deployment: the server knows the seed)."""
    mech = mechanism(cfg)
    if mech in ("none", "central"):
        return algorithm
    return wrap_algorithm(cfg, algorithm, seeded=seeded)


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


# -- local and distributed DP (client side) -------------------------------------------------
def check_client_side(cfg: Mapping[str, Any]) -> None:
    """Refuse a ``[privacy]`` local/distributed config that cannot hold (module docs)."""
    mech = mechanism(cfg)
    if mech not in ("local", "distributed"):
        return
    p = cfg["privacy"]
    why = f"with [privacy] mechanism = {mech!r}"
    sa = cfg.get("secure_aggregation", {"kind": "none"})["kind"]
    if mech == "distributed" and sa != "secagg+":
        raise ConfigError(
            "privacy.mechanism = 'distributed' needs [secure_aggregation] kind = 'secagg+' "
            f"(got {sa!r}): each client's noise is only a share of the sum's, and the server "
            "must see nothing but the masked sum; use mechanism = 'local' or 'central' otherwise"
        )
    if not float(p["noise_multiplier"]) > 0:
        raise ConfigError(f"privacy.noise_multiplier = 0 {why}: no noise, no guarantee")
    if float(p["target_quantile"]) > 0:
        raise ConfigError(
            f"privacy.target_quantile > 0 (adaptive clipping) {why}: only central DP adapts "
            "the clip (the server needs the plaintext count); set 0"
        )
    algo = cfg["client"]["algorithm"]
    if algo in ("scaffold", "fedamd"):
        raise ConfigError(
            f"client.algorithm = {algo!r} {why}: it sends more than the update (control "
            "variates, anchors), which would leave the client un-noised"
        )
    kind = cfg["policy"]["kind"]
    if kind != "sync":
        raise ConfigError(
            f"policy.kind = {kind!r} {why}: DP runs with sync rounds (the accounting counts "
            "rounds); async, FedBuff and FedAMD are not covered"
        )
    if mech == "local" and cfg["strategy"]["aggregator"] != "mean":
        raise ConfigError(
            f"strategy.aggregator = {cfg['strategy']['aggregator']!r} {why}: DP runs with the "
            "mean here; use 'mean'"
        )


def wrap_algorithm(cfg: Mapping[str, Any], algorithm: Any, *, seeded: bool = False) -> Any:
    """``algorithm`` wrapped in :class:`fedagg.clients.LocalDP` under ``mechanism =
    "local"`` (checked by :func:`check_client_side`), else unchanged."""
    if mechanism(cfg) != "local":
        return algorithm
    check_client_side(cfg)
    from fedagg.clients import LocalDP

    p = cfg["privacy"]
    return LocalDP(algorithm, float(p["clip"]), float(p["noise_multiplier"]), seeded=seeded)


def secure_noise(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`~fedagg.policy.SecurePolicy` keyword arguments of ``mechanism =
    "distributed"`` (``noise``, ``noise_multiplier``, ``clip``); ``{}`` otherwise."""
    if mechanism(cfg) != "distributed":
        return {}
    check_client_side(cfg)
    p = cfg["privacy"]
    return {
        "noise": "gaussian",
        "noise_multiplier": float(p["noise_multiplier"]),
        "clip": float(p["clip"]),
    }


def client_side_policy(cfg: Mapping[str, Any], inner: Any) -> Any:
    """The :class:`~fedagg.policy.ClientDPPolicy` of a local or distributed ``[privacy]``
    around ``inner`` (for distributed DP, ``inner`` is the SecurePolicy, given its noise
    here)."""
    mech = mechanism(cfg)
    check_client_side(cfg)
    if mech == "distributed":
        if not isinstance(inner, policies.SecurePolicy):
            raise ConfigError("distributed DP needs the SecurePolicy ([secure_aggregation])")
        inner = dataclasses.replace(inner, **secure_noise(cfg))
    p = cfg["privacy"]
    return policies.ClientDPPolicy(
        inner,
        mechanism=mech,
        noise_multiplier=float(p["noise_multiplier"]),
        delta=float(p["delta"]),
        max_epsilon=float(p["max_epsilon"]),
    )
