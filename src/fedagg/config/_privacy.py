"""The client-side privacy mechanisms of ``[privacy]``: local and distributed DP.

Called by the config's builders (``build_algorithm`` / ``build_policy`` in ``_build``):

* :func:`check_client_side` refuses, with a :class:`ConfigError` naming the keys, what local
  and distributed DP cannot do: distributed DP without ``[secure_aggregation] kind =
  "secagg+"`` (the noise is sized for a sum that the server must see only after masking),
  ``noise_multiplier = 0`` (no noise: no guarantee), adaptive clipping (``target_quantile >
  0``: the clip follows a count the server would need in plaintext, and under local DP the
  clip is each client's own public constant), and client algorithms that send more than the
  update (SCAFFOLD's control variates, FedAMD's anchors would leave un-noised).
* :func:`wrap_algorithm` wraps the client algorithm in :class:`fedagg.clients.LocalDP` for
  ``mechanism = "local"`` (clip = ``[privacy] clip``, noise ``noise_multiplier * clip``).
* :func:`secure_noise` gives the :class:`fedagg.policy.SecurePolicy` keyword arguments of
  ``mechanism = "distributed"``: the discrete Gaussian (``noise = "gaussian"``; the Python API
  also offers ``"skellam"``), ``noise_multiplier``, and ``clip`` = ``[privacy] clip`` (which
  replaces ``[secure_aggregation] clip``: the DP clip is the encoding's).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedagg.errors import ConfigError

__all__ = ["check_client_side", "secure_noise", "wrap_algorithm"]


def _privacy(cfg: Mapping[str, Any]) -> Mapping[str, Any]:
    p: Mapping[str, Any] = cfg.get("privacy", {"mechanism": "none"})
    return p


def check_client_side(cfg: Mapping[str, Any]) -> None:
    """Refuse a ``[privacy]`` local/distributed config that cannot hold (module docs)."""
    p = _privacy(cfg)
    mech = p["mechanism"]
    if mech not in ("local", "distributed"):
        return
    sa = cfg.get("secure_aggregation", {"kind": "none"})["kind"]
    if mech == "distributed" and sa != "secagg+":
        raise ConfigError(
            "privacy.mechanism = 'distributed' needs [secure_aggregation] kind = 'secagg+' "
            f"(got {sa!r}): each client's noise is only a share of the sum's, and the server "
            "must see nothing but the masked sum; use mechanism = 'local' or 'central' otherwise"
        )
    if not float(p["noise_multiplier"]) > 0:
        raise ConfigError(
            f"privacy.noise_multiplier = 0 with mechanism = {mech!r}: no noise, no guarantee"
        )
    if float(p["target_quantile"]) > 0:
        raise ConfigError(
            f"privacy.target_quantile > 0 (adaptive clipping) with mechanism = {mech!r}: only "
            "central DP adapts the clip (the server needs the plaintext count); set 0"
        )
    algo = cfg["client"]["algorithm"]
    if algo in ("scaffold", "fedamd"):
        raise ConfigError(
            f"client.algorithm = {algo!r} with privacy.mechanism = {mech!r}: it sends more than "
            "the update (control variates, anchors), which would leave the client un-noised"
        )


def wrap_algorithm(cfg: Mapping[str, Any], algorithm: Any) -> Any:
    """``algorithm`` wrapped in :class:`fedagg.clients.LocalDP` under ``mechanism =
    "local"`` (checked by :func:`check_client_side`), else unchanged."""
    p = _privacy(cfg)
    if p["mechanism"] != "local":
        return algorithm
    check_client_side(cfg)
    from fedagg.clients import LocalDP

    return LocalDP(algorithm, float(p["clip"]), float(p["noise_multiplier"]))


def secure_noise(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The :class:`~fedagg.policy.SecurePolicy` keyword arguments of ``mechanism =
    "distributed"`` (``noise``, ``noise_multiplier``, ``clip``); ``{}`` otherwise."""
    p = _privacy(cfg)
    if p["mechanism"] != "distributed":
        return {}
    check_client_side(cfg)
    return {
        "noise": "gaussian",
        "noise_multiplier": float(p["noise_multiplier"]),
        "clip": float(p["clip"]),
    }
