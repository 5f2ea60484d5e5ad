"""``fedagg config``: check, show and document run configs (``schema``, ``check``, ``show``,
``defaults``)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import tomllib
from typing import Any

import fedagg
from fedagg import config
from fedagg.cli._common import EXIT_OK, EXIT_USAGE, Command


def _configure(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="config_command", metavar="<subcommand>", required=True)
    sub.add_parser(
        "schema", help="print the JSON Schema of a config (draft 2020-12)",
        description="Print the JSON Schema of a run config: every key's type, default, "
        "description, choices and bounds (inf is spelled \"inf\").",
    )  # fmt: skip
    check = sub.add_parser(
        "check", help="validate config files, printing every error with its key",
        description="Check TOML configs against the schema (unknown keys, types, choices, "
        "bounds). Prints 'FILE: ok' or one line per error, each naming the key; exits 2 if "
        "any file has an error. Combinations (e.g. a fedamd policy with a fedavg client) are "
        "checked when the run is built.",
    )  # fmt: skip
    check.add_argument("files", nargs="+", metavar="FILE", help="TOML config files")
    show = sub.add_parser(
        "show", help="print a config resolved (defaults filled in), as TOML or JSON",
        description="Print the resolved config: the file's values with every default filled "
        "in and code_path made absolute, as the run will use it.",
    )  # fmt: skip
    show.add_argument("file", metavar="FILE", help="TOML config file")
    show.add_argument("--json", action="store_true", help="JSON instead of TOML")
    defaults = sub.add_parser("defaults", help="print every key with its default")
    defaults.add_argument("--json", action="store_true", help="JSON instead of TOML")


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def _print(cfg: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(_jsonable(cfg), indent=2))
    else:
        print(config.to_toml(cfg), end="")


def _file_errors(path: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        return [f"cannot read it: {e.strerror or e}"]
    except tomllib.TOMLDecodeError as e:
        return [f"not valid TOML: {e}"]
    return config.config_errors(raw)


def _check(files: list[str]) -> int:
    bad = 0
    for path in files:
        errors = _file_errors(path)
        if not errors:
            print(f"{path}: ok")
        for e in errors:
            print(f"{path}: {e}", file=sys.stderr)
        bad += bool(errors)
    if len(files) > 1:
        print(f"{len(files) - bad} of {len(files)} configs ok", file=sys.stderr)
    return EXIT_USAGE if bad else EXIT_OK


def _run(args: argparse.Namespace) -> int:
    cmd = args.config_command
    if cmd == "schema":
        print(json.dumps(config.json_schema(), indent=2))
        return EXIT_OK
    if cmd == "defaults":
        _print(config.resolve_config(), args.json)
        return EXIT_OK
    if cmd == "check":
        return _check(args.files)
    try:
        cfg = config.load_config(args.file)
    except fedagg.ConfigError as e:
        print(f"fedagg config show: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    _print(cfg, args.json)
    return EXIT_OK


#: This module's subcommands (see :data:`fedagg.cli.COMMANDS`).
COMMANDS: dict[str, Command] = {
    "config": Command(
        help="check, show and document run configs (schema, check, show, defaults)",
        description=(
            "Run configs: 'check' validates TOML files (every error names its key), 'show' "
            "prints one resolved with its defaults, 'defaults' every key's default, 'schema' "
            "the JSON Schema. The reference of every key: docs/config.md."
        ),
        configure=_configure,
        run=_run,
    ),
}
