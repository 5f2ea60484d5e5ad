"""Config diffs of runs: which dotted keys differ (``fedagg runs --diff``, the dashboard's
compare page)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["config_diff", "flatten"]


def flatten(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys: ``{"policy.kind": "sync", ...}`` (lists as JSON).

    >>> flatten({"policy": {"kind": "sync", "k": [1, 2]}, "rounds": 3})
    {'policy.kind': 'sync', 'policy.k': '[1, 2]', 'rounds': 3}
    """
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple, Mapping)):
            out[key] = json.dumps(v, default=str)
        else:
            out[key] = v
    return out


_MISSING = object()


def config_diff(configs: Sequence[Mapping[str, Any]]) -> list[tuple[str, list[Any]]]:
    """The dotted keys whose values differ between ``configs`` (a value per config; a key a
    config lacks is ``None``), sorted by key.

    >>> config_diff([{"seed": 0, "policy": {"kind": "sync"}}, {"seed": 1, "policy": {"kind": "sync"}}])
    [('seed', [0, 1])]
    """  # noqa: E501
    flat = [flatten(c) for c in configs]
    keys = sorted(set().union(*flat)) if flat else []
    out = []
    for k in keys:
        values = [f.get(k, _MISSING) for f in flat]
        if any(v != values[0] for v in values[1:]):
            out.append((k, [None if v is _MISSING else v for v in values]))
    return out
