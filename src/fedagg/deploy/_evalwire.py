"""What evaluation and the per-task client config look like on the wire, for the server and
the client alike.

* A task's ``config`` is a JSON object of booleans, numbers and strings (at most
  :data:`MAX_CONFIG_BYTES` bytes, :data:`MAX_CONFIG_KEYS` keys); ``""`` is no config.
* A federated evaluation task has ``kind = "evaluate"`` and the id :data:`EVAL_BASE` +
  version: one per model version, the same for every client asked (a client and the id name
  it), never an id a training job can have (jobs count up from 0).
* A ``Report`` carries the metrics of an evaluation task; its signature covers
  :func:`report_body`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from fedagg.deploy._auth import body
from fedagg.errors import ConfigError

__all__ = [
    "EVAL_BASE",
    "KINDS",
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_KEYS",
    "encode_task_config",
    "eval_task_id",
    "is_eval_task",
    "parse_task_config",
    "report_body",
]

#: evaluation task ids: EVAL_BASE + the model version evaluated
EVAL_BASE = 1 << 62
#: what a task may ask ("" on the wire is "train")
KINDS = ("train", "evaluate")
MAX_CONFIG_BYTES = 64 * 1024
MAX_CONFIG_KEYS = 256
_SCALARS = (bool, int, float, str)


def eval_task_id(version: int) -> int:
    return EVAL_BASE + int(version)


def is_eval_task(task: int) -> bool:
    return int(task) >= EVAL_BASE


def encode_task_config(config: Mapping[str, Any]) -> str:
    """A per-task config as it travels with a task (``""`` if empty); ConfigError if it is
    not a flat table of booleans, finite numbers and strings, or is too large."""
    if not config:
        return ""
    if len(config) > MAX_CONFIG_KEYS:
        raise ConfigError(f"client config: {len(config)} keys, at most {MAX_CONFIG_KEYS}")
    for k, v in config.items():
        if not isinstance(k, str) or not isinstance(v, _SCALARS):
            raise ConfigError(f"client config {k!r} = {v!r}: values must be bool, int, float "
                              "or str")  # fmt: skip
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"client config {k!r} = {v!r}: numbers must be finite")
    text = json.dumps(dict(config), sort_keys=True, separators=(",", ":"), allow_nan=False)
    if len(text.encode()) > MAX_CONFIG_BYTES:
        raise ConfigError(f"client config: {len(text.encode())} bytes of JSON, at most "
                          f"{MAX_CONFIG_BYTES}")  # fmt: skip
    return text


def parse_task_config(text: str) -> dict[str, Any]:
    """A task's config as the client reads it, defensively: bounded before it is parsed, a
    flat JSON object of booleans, finite numbers and strings. ConfigError (saying what is
    wrong) otherwise."""
    if not text:
        return {}
    if len(text) > MAX_CONFIG_BYTES or len(text.encode()) > MAX_CONFIG_BYTES:
        raise ConfigError(f"the task's config is over {MAX_CONFIG_BYTES} bytes")

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a number")

    try:
        out = json.loads(text, parse_constant=no_constant)
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"the task's config is not valid JSON ({e})") from None
    if not isinstance(out, dict):
        raise ConfigError(f"the task's config is not a JSON object: {text[:80]!r}")
    if len(out) > MAX_CONFIG_KEYS:
        raise ConfigError(f"the task's config has {len(out)} keys, at most {MAX_CONFIG_KEYS}")
    for k, v in out.items():
        if not isinstance(v, _SCALARS):
            raise ConfigError(f"the task's config {k[:64]!r}: values must be booleans, numbers "
                              f"or strings, not {type(v).__name__}")  # fmt: skip
    return out


def report_body(
    task: int, version: int, num_examples: float, metrics: Mapping[str, float]
) -> bytes:
    """What a ``Report``'s signature covers (client and server build it here, alike)."""

    def num(x: float) -> float | str:  # JSON has no NaN/Inf; the server refuses them later
        return x if math.isfinite(x) else repr(x)

    return body(
        task=int(task), version=int(version), num_examples=num(float(num_examples)),
        metrics={k: num(float(v)) for k, v in metrics.items()},
    )  # fmt: skip
