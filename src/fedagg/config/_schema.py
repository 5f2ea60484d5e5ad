"""Run configs (simulation and deployment): a TOML file (or dict) -> a resolved config.

Every key is defined once in :data:`fedagg.config._spec.SPEC` (type, default, doc, choices,
bounds); the defaults (:data:`DEFAULTS`), the checks of :func:`resolve_config` and the JSON
Schema (:func:`json_schema`) are all made from those definitions. Unknown sections or keys
are errors that name the valid ones, so a typo never silently falls back to a default; a
value of the wrong type, out of its bounds or not one of its choices is an error naming the
key's full path, what it expects and what it got (``rounds: expected an integer, got 2.5
(float)``). The resolved config (defaults filled in) is what the run database stores.

Type rules: an integer key refuses booleans and non-integral numbers, and takes an integral
float (``2.0``) as the integer ``2`` (JSON Schema's integers are the same); a float key takes
integers (as floats) and refuses ``nan``, and ``inf`` unless its default is ``inf`` (there
``"inf"``, the JSON spelling, is also read as ``inf``); boolean keys take only booleans, string
keys only strings, lists their element type, and tables only tables.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
import numbers
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedagg.config._spec import REF_PATTERN, SPEC, Key, Section
from fedagg.errors import ConfigError

__all__ = ["DEFAULTS", "config_errors", "json_schema", "load_config", "resolve_config"]


def _defaults(section: Section) -> dict[str, Any]:
    return {
        k: _defaults(v) if isinstance(v, Section) else copy.deepcopy(v.default)
        for k, v in section.keys.items()
    }


#: The default config: every key of :data:`SPEC` with its default.
DEFAULTS: dict[str, Any] = _defaults(SPEC)

_REF = re.compile(REF_PATTERN)
_BAD = object()  # a value refused (its error recorded)
_MAX_SHOWN = 60


def _show(v: Any) -> str:
    """A value as TOML writes it (``true``, ``"100"``, ``2.5``, ``inf``), cut if long."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else "inf" if v > 0 else "-inf"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        s = json.dumps(v, ensure_ascii=False)
    elif isinstance(v, Mapping):
        s = "{" + ", ".join(f"{k} = {_show(x)}" for k, x in v.items()) + "}"
    elif isinstance(v, list | tuple):
        s = "[" + ", ".join(_show(x) for x in v) + "]"
    else:
        s = repr(v)
    return s if len(s) <= _MAX_SHOWN else s[: _MAX_SHOWN - 3] + "..."


def _type(v: Any) -> str:
    if isinstance(v, Mapping):
        return "table"
    if isinstance(v, list | tuple):
        return "list"
    return "none" if v is None else type(v).__name__


def _got(v: Any) -> str:
    return f"got {_show(v)} ({_type(v)})"


def _expected(key: Key) -> str:
    if key.kind == "int":
        return "an integer"
    if key.kind == "float":
        return "a number or inf" if key.allow_inf else "a number"
    if key.kind == "bool":
        return "a boolean (true or false)"
    if key.kind == "str":
        return "a string"
    if key.kind == "list":
        assert key.items is not None
        return f"a list of {_plural(key.items)}"
    if key.kind == "z":
        return f"{_choices_text(key)} or a number"
    return "a table"


def _plural(key: Key) -> str:
    return {"int": "integers", "float": "numbers", "bool": "booleans"}.get(key.kind, "strings")


def _choices_text(key: Key) -> str:
    names = [json.dumps(c) for c in key.choices]
    return ", ".join(names[:-1]) + f" or {names[-1]}" if len(names) > 1 else names[0]


def _in_bounds(key: Key, x: float) -> bool:
    return not (
        (key.minimum is not None and x < key.minimum)
        or (key.maximum is not None and x > key.maximum)
        or (key.exclusive_minimum is not None and x <= key.exclusive_minimum)
        or (key.exclusive_maximum is not None and x >= key.exclusive_maximum)
    )


def _number(key: Key, v: Any, path: str, errors: list[str]) -> Any:
    """An int or float key's value, normalized (``2.0`` -> ``2`` for ints, ints -> floats)."""
    given = v
    if key.allow_inf and v == "inf":
        v = math.inf
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        errors.append(f"{path}: expected {_expected(key)}, {_got(v)}")
        return _BAD
    v = int(v) if isinstance(v, numbers.Integral) else float(v)  # (numpy scalars too)
    if key.kind == "int":
        if isinstance(v, float):
            if not v.is_integer():
                errors.append(f"{path}: expected an integer, {_got(v)}")
                return _BAD
            v = int(v)
    else:
        v = float(v)
        if math.isnan(v) or (math.isinf(v) and not (key.allow_inf and v > 0)):
            errors.append(f"{path}: expected a finite number, {_got(v)}")
            return _BAD
    if not _in_bounds(key, v):
        what = "an integer" if key.kind == "int" else "a number"
        errors.append(f"{path}: expected {what} {key.bounds_text()}, got {_show(given)}")
        return _BAD
    return v


def _string(key: Key, v: str, path: str, errors: list[str]) -> Any:
    if key.choices and v not in key.choices and not (key.ref and _REF.match(v)):
        valid = ", ".join(c if c else '""' for c in key.choices)
        if key.ref:
            valid += ', or "module:Class"'
        errors.append(f"{path}: unknown {key.noun or path} {_show(v)}; valid: {valid}")
        return _BAD
    if key.ref and not key.choices and v and not _REF.match(v):
        errors.append(f'{path}: expected "" or "module:function" (e.g. "mycode:train"), '
                      f"{_got(v)}")  # fmt: skip
        return _BAD
    return v


def check_value(key: Key, v: Any, path: str, errors: list[str]) -> Any:
    """``v`` checked against ``key`` (normalized), or :data:`_BAD` with its errors recorded."""
    if key.kind in ("int", "float"):
        return _number(key, v, path, errors)
    if key.kind == "bool":
        if not isinstance(v, bool):
            errors.append(f"{path}: expected {_expected(key)}, {_got(v)}")
            return _BAD
        return v
    if key.kind == "str":
        if not isinstance(v, str):
            errors.append(f"{path}: expected {_expected(key)}, {_got(v)}")
            return _BAD
        return _string(key, v, path, errors)
    if key.kind == "z":
        if isinstance(v, str):
            return _string(key, v, path, errors)
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            errors.append(f"{path}: expected {_expected(key)}, {_got(v)}")
            return _BAD
        return float(v)
    if key.kind == "list":
        if not isinstance(v, list | tuple):
            errors.append(f"{path}: expected {_expected(key)}, {_got(v)}")
            return _BAD
        assert key.items is not None
        n = len(errors)
        out = [check_value(key.items, x, f"{path}[{i}]", errors) for i, x in enumerate(v)]
        return _BAD if len(errors) > n else out
    # a free-form table, checked by its user (client.config: booleans, numbers, strings)
    if not isinstance(v, Mapping):
        errors.append(f"{path}: expected {_expected(key)}, {_got(v)}")
        return _BAD
    n = len(errors)
    for k, x in v.items():
        if not isinstance(k, str):
            errors.append(f"{path}: keys must be strings, got {k!r}")
        elif key.values == "scalar" and not isinstance(x, bool | int | float | str):
            errors.append(f"{path}.{k}: expected a boolean, number or string, {_got(x)}")
    return _BAD if len(errors) > n else copy.deepcopy(dict(v))


def _merge(
    section: Section, base: dict[str, Any], over: Mapping[str, Any], where: str,
    errors: list[str],
) -> dict[str, Any]:  # fmt: skip
    out = copy.deepcopy(base)
    for k, v in over.items():
        spec = section.keys.get(k) if isinstance(k, str) else None
        path = f"{where}{k}"
        if spec is None:
            near = difflib.get_close_matches(str(k), list(section.keys), n=1)
            hint = f" (did you mean {where}{near[0]}?)" if near else ""
            table = f" in [{where[:-1]}]" if where else ""
            errors.append(f"unknown key {path}{hint}; valid keys{table}: {', '.join(section.keys)}")
        elif isinstance(spec, Section):
            if not isinstance(v, Mapping):
                errors.append(f"{path}: expected a table, {_got(v)}")
            else:
                out[k] = _merge(spec, base[k], v, f"{path}.", errors)
        else:
            value = check_value(spec, v, path, errors)
            if value is not _BAD:
                out[k] = value
    return out


def _resolve(overrides: object) -> tuple[dict[str, Any], list[str]]:
    errors: list[str] = []
    if overrides is None:
        overrides = {}
    if not isinstance(overrides, Mapping):
        return copy.deepcopy(DEFAULTS), [f"a config is a table, {_got(overrides)}"]
    return _merge(SPEC, DEFAULTS, overrides, "", errors), errors


def config_errors(overrides: Mapping[str, Any] | None) -> list[str]:
    """Every problem of a config (a partial one: defaults fill the rest), one message per
    key, each naming the key's path; an empty list if it resolves."""
    return _resolve(overrides)[1]


def resolve_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The defaults with ``overrides`` applied (nested tables merge key by key), every value
    checked against its definition (see the module docstring for the type rules). Raises
    :class:`ConfigError` naming each bad key; ``code_path = ""`` stays "" (the working
    directory)."""
    cfg, errors = _resolve(overrides)
    if len(errors) == 1:
        raise ConfigError(errors[0])
    if errors:
        raise ConfigError(f"{len(errors)} config errors:\n  " + "\n  ".join(errors))
    return cfg


def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file's table (ConfigError if it is missing or not TOML)."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"no config file {path}") from e
    except IsADirectoryError as e:
        raise ConfigError(f"{path} is a directory, not a config file") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML: {e}") from e


def with_code_path(raw: Mapping[str, Any], path: str | Path) -> dict[str, Any]:
    """``raw`` with a ``code_path`` of "" (or none) set to the config file's absolute
    directory."""
    out = dict(raw)
    if out.get("code_path", "") == "":
        out["code_path"] = str(Path(path).resolve().parent)
    return out


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a TOML config and resolve it against the defaults. A ``code_path`` of "" (the
    default) becomes the config file's absolute directory, so that ``"module:function"``
    references import the code next to the config; any other ``code_path`` is kept as given
    (a relative one is taken from the working directory)."""
    return resolve_config(with_code_path(read_toml(path), path))


# -- the JSON Schema -----------------------------------------------------------------------------


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return v


def _key_schema(key: Key) -> dict[str, Any]:
    out: dict[str, Any] = {"description": key.doc} if key.doc else {}
    if key.kind in ("int", "float"):
        num: dict[str, Any] = {"type": "integer" if key.kind == "int" else "number"}
        for name in ("minimum", "maximum", "exclusive_minimum", "exclusive_maximum"):
            bound = getattr(key, name)
            if bound is not None:
                camel = name.replace("_m", "M")
                num[camel] = int(bound) if key.kind == "int" else float(bound)
        if key.allow_inf:
            out["anyOf"] = [num, {"const": "inf"}]
        else:
            out.update(num)
    elif key.kind == "bool":
        out["type"] = "boolean"
    elif key.kind == "str":
        if key.choices and key.ref:
            out["anyOf"] = [{"enum": list(key.choices)}, {"type": "string", "pattern": REF_PATTERN}]
        elif key.choices:
            out.update(type="string", enum=list(key.choices))
        elif key.ref:
            out.update(type="string", pattern=f"^$|{REF_PATTERN}")
        else:
            out["type"] = "string"
    elif key.kind == "z":
        out["anyOf"] = [{"enum": list(key.choices)}, {"type": "number"}]
    elif key.kind == "list":
        assert key.items is not None
        items = _key_schema(key.items)
        items.pop("description", None)
        items.pop("default", None)
        out.update(type="array", items=items)
    else:
        out["type"] = "object"
        if key.values == "scalar":
            out["additionalProperties"] = {"type": ["boolean", "number", "string"]}
    out["default"] = _jsonable(copy.deepcopy(key.default))
    return out


def _section_schema(section: Section) -> dict[str, Any]:
    return {
        "type": "object",
        "description": section.doc,
        "properties": {
            k: _section_schema(v) if isinstance(v, Section) else _key_schema(v)
            for k, v in section.keys.items()
        },
        "additionalProperties": False,
    }


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a config, made from the key definitions: types,
    defaults, descriptions, enums and bounds; unknown keys are refused except in the
    free-form tables (``model.args``, ``client.config``, ``strategy.aggregator_args``,
    ``deploy.edge_clients``). ``inf`` is spelled ``"inf"`` (JSON has no infinity)."""
    body = _section_schema(SPEC)
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "fedagg run config",
        **body,
    }
