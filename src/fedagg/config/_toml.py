"""A config written back as TOML (``fedagg config show``, the reference's defaults): the
values a config holds (tables, strings, booleans, numbers with ``inf`` and ``nan``, lists),
read back by :mod:`tomllib` to the same config."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["to_toml", "toml_value"]

_BARE = re.compile(r"[A-Za-z0-9_-]+")


_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f",
            "\r": "\\r"}  # fmt: skip


def _string(s: str) -> str:
    """A TOML basic string: quotes, backslashes and control characters escaped."""
    out = []
    for c in s:
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _key(k: str) -> str:
    return k if _BARE.fullmatch(k) else _string(k)


def toml_value(v: Any) -> str:
    """One value as TOML (tables inline)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, Mapping):
        if not v:
            return "{}"
        return "{ " + ", ".join(f"{_key(k)} = {toml_value(x)}" for k, x in v.items()) + " }"
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} {v!r} as TOML")


def to_toml(cfg: Mapping[str, Any]) -> str:
    """``cfg`` as a TOML document: its plain keys first, then one ``[table]`` per nested
    table (recursively: ``[system.compute]``); an empty table is written inline (``{}``)."""
    blocks: list[str] = []
    _emit(cfg, (), blocks)
    return "\n\n".join(blocks) + "\n"


def _emit(table: Mapping[str, Any], name: tuple[str, ...], blocks: list[str]) -> None:
    def nested(v: Any) -> bool:
        return isinstance(v, Mapping) and bool(v)

    lines = [f"[{'.'.join(_key(n) for n in name)}]"] if name else []
    lines += [f"{_key(k)} = {toml_value(v)}" for k, v in table.items() if not nested(v)]
    if lines:
        blocks.append("\n".join(lines))
    for k, v in table.items():
        if nested(v):
            _emit(v, (*name, k), blocks)
