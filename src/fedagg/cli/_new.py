"""``fedagg new DIR [--template numpy|torch]``: a project to start from.

A template is a directory of package data, ``fedagg/templates/<name>/`` (read with
:mod:`importlib.resources`, so an installed wheel has them too), copied file by file with
three substitutions: ``{{name}}`` (the project's name: its directory's), ``{{name_toml}}``
(the same as a TOML string) and ``{{clients}}``. A file named ``X.py-tpl`` is written as
``X.py`` (stored so, the templates are not modules of fedagg: not linted, type-checked or
layered with it) and ``gitignore`` as ``.gitignore``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path

from fedagg.cli._common import EXIT_ERROR, EXIT_OK, EXIT_USAGE, Command, positive_int

#: What a template's files are renamed to when written (the rest keep their names).
_RENAME = {"gitignore": ".gitignore"}


def _root() -> Traversable:
    return files("fedagg").joinpath("templates")


def templates() -> list[str]:
    """The names of the bundled templates."""
    return sorted(t.name for t in _root().iterdir() if t.is_dir() and not t.name.startswith("_"))


def render(template: str, name: str, clients: int) -> dict[str, str]:
    """The files of a project made from ``template``: output file name -> text."""
    if template not in templates():
        raise ValueError(f"unknown template {template!r}; valid: {', '.join(templates())}")
    values = {"name": name, "name_toml": json.dumps(name), "clients": str(clients)}
    out: dict[str, str] = {}
    for f in sorted(_root().joinpath(template).iterdir(), key=lambda t: t.name):
        if not f.is_file():
            continue
        text = f.read_text(encoding="utf-8")
        for key, value in values.items():
            text = text.replace("{{" + key + "}}", value)
        target = _RENAME.get(f.name, f.name.removesuffix("-tpl"))
        out[target] = text
    return out


def _configure_new(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", help="the project's directory (created; must be empty)")
    p.add_argument(
        "--template",
        default="numpy",
        choices=templates(),
        help="numpy: an MLP in plain NumPy (default); torch: a PyTorch module",
    )
    p.add_argument(
        "--clients",
        type=positive_int,
        default=3,
        help="the number of clients (data.num_clients, and the keys to make; default: 3)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="write into a non-empty directory (overwrites the template's files only)",
    )


def _run_new(args: argparse.Namespace) -> int:
    target = Path(args.directory)
    if target.exists() and not target.is_dir():
        print(f"fedagg new: error: {target} exists and is not a directory", file=sys.stderr)
        return EXIT_USAGE
    if target.is_dir() and any(target.iterdir()) and not args.force:
        print(
            f"fedagg new: error: {target} is not empty; choose a new directory, or pass "
            "--force to write the project's files into it (overwriting those of the same name)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    name = target.resolve().name
    project = render(args.template, name, args.clients)
    try:
        target.mkdir(parents=True, exist_ok=True)
        for fname, text in project.items():
            (target / fname).write_text(text, encoding="utf-8")
    except OSError as e:
        print(f"fedagg new: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    print(f"fedagg new: a {args.template} project in {target}: {', '.join(sorted(project))}")
    if args.template == "torch" and importlib.util.find_spec("torch") is None:
        print(
            "fedagg new: note: this project needs PyTorch: pip install 'fedagg[torch]'",
            file=sys.stderr,
        )
    where = shlex.quote(str(target))
    print(f"next: cd {where} && fedagg simulate fedagg.toml  (its README.md: how to deploy it)")
    return EXIT_OK


#: This module's subcommands (see :data:`fedagg.cli.COMMANDS`).
COMMANDS: dict[str, Command] = {
    "new": Command(
        help="make a project to start from: config, model, train/evaluate code, README",
        description=(
            "Write a small, self-contained project into DIRECTORY: fedagg.toml, model.py "
            "(the model), client.py (train and evaluate functions) and a README. It runs "
            "with 'fedagg simulate fedagg.toml' and deploys with 'fedagg certs', 'keys', "
            "'server' and 'client' as it is (see its README)."
        ),
        configure=_configure_new,
        run=_run_new,
    ),
}
