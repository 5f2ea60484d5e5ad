"""The docs site's generated pages (tools/mkdocs_hooks.py): the CLI reference covers every
command, subcommand and option of ``fedagg.cli.build_parser()``, and is safe markdown.
(``make docs`` builds the whole site with ``--strict``.)"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path
from types import ModuleType

from fedagg.cli import COMMANDS, build_parser

ROOT = Path(__file__).resolve().parents[2]


def _hooks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mkdocs_hooks", ROOT / "tools/mkdocs_hooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commands(parser: argparse.ArgumentParser, name: str) -> list[tuple[str, list[str]]]:
    """(command line, its option strings and positionals) for a parser and every sub-parser."""
    found: list[tuple[str, list[str]]] = []
    own: list[str] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                found += _commands(sub, f"{name} {sub_name}")
        elif not isinstance(action, argparse._HelpAction):
            own += action.option_strings or [str(action.metavar or action.dest)]
    return [(name, own), *found]


def _sections(page: str) -> dict[str, str]:
    parts = re.split(r"^#{2,4} `(fedagg[^`]*)`$", page, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_the_cli_reference_documents_every_command_and_option() -> None:
    page = _hooks().cli_reference(build_parser())
    sections = _sections(page)
    commands = _commands(build_parser(), "fedagg")[1:]
    assert {c.split()[1] for c, _ in commands} == set(COMMANDS)
    assert "fedagg config check" in sections  # nested sub-commands too
    for command, options in commands:
        assert command in sections, f"no section for {command}"
        text = sections[command]
        assert f"usage: {command}" in text
        for option in options:
            assert f"`{option}" in text, f"{command}: {option} is not documented"


def test_the_cli_reference_is_safe_markdown() -> None:
    page = _hooks().cli_reference(build_parser())
    in_code = False
    for line in page.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and not line.startswith("<!--"):
            # argparse's "<command>" or "a|b" would otherwise be raw HTML or a table column
            assert "<" not in line, line
            if line.startswith("| `"):
                assert line.count(" | ") == 2, line
    assert not in_code


def test_cells_escape_what_markdown_would_interpret() -> None:
    hooks = _hooks()
    assert hooks._cell("a | b <c> *d*\n  e") == "a \\| b &lt;c> \\*d\\* e"
