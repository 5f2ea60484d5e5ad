"""mkdocs hooks for fedagg's docs site (``mkdocs.yml``: ``hooks: [tools/mkdocs_hooks.py]``).

At build time, with nothing written to the checkout:

* ``cli.md``, the CLI reference, is generated from ``fedagg.cli.build_parser()`` (so it can
  never go stale: a new subcommand or option appears in the next build);
* the committed benchmark tables and plots (``benchmarks/results/``, ``benchmarks/README.md``)
  and the paper reproductions (``experiments/*/README.md`` and ``results/``) are added as pages
  at the same relative paths, so their own relative links and images work unchanged;
* Sphinx-style roles left in docstrings (``:class:`X```) become code, linked to ``X``'s API
  entry where the API reference has one, and a reST ``Example::`` reads ``Example:``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Document this checkout's code, whatever fedagg the environment has installed.
sys.path.insert(0, str(ROOT / "src"))

#: Repo files mirrored into the site, at the same relative path (glob patterns).
MIRRORED = (
    "benchmarks/results/*.md",
    "benchmarks/results/*.png",
    "experiments/*/README.md",
    "experiments/*/results/*.md",
    "experiments/*/results/*.png",
    "experiments/*/results/*.json",
)
#: benchmarks/README.md would be the benchmarks/ index; it is mirrored under this name.
BENCH_README = "benchmarks/running.md"

_ROLE = re.compile(r":(?:mod|class|func|meth|data|attr|exc|obj|const):<code>([^<]*)</code>")


def _text(text: str) -> str:
    """argparse's terminal prose as one markdown paragraph: no raw HTML, no emphasis."""
    text = " ".join(text.split())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace("*", "\\*")


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell (also no pipes)."""
    return _text(text).replace("|", "\\|")


def _flags(action: argparse.Action) -> str:
    if not action.option_strings:
        return f"`{action.metavar or action.dest}`"
    nargs = action.nargs
    metavar = action.metavar or action.dest.upper()
    if nargs == 0:
        return ", ".join(f"`{s}`" for s in action.option_strings)
    if isinstance(metavar, tuple):
        metavar = " ".join(metavar)
    return ", ".join(f"`{s} {metavar}`" for s in action.option_strings)


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(parser.prog, width=88)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    formatter = argparse.HelpFormatter(parser.prog)
    return formatter._expand_help(action)


def _default(action: argparse.Action) -> str:
    d = action.default
    if action.nargs == 0 or d is None or d == argparse.SUPPRESS or not action.option_strings:
        return ""
    return f"`{d}`"


def _command(parser: argparse.ArgumentParser, name: str, help_: str, level: int) -> list[str]:
    out = [f"{'#' * level} `{name}`", ""]
    if help_:
        line = _text(help_).rstrip(".")
        out += [line[:1].upper() + line[1:] + ".", ""]
    if parser.description and parser.description != help_:
        out += [_text(parser.description), ""]
    out += ["```text", _usage(parser), "```", ""]
    subcommands: list[tuple[str, argparse.ArgumentParser, str]] = []
    for group in parser._action_groups:
        rows = []
        for action in group._group_actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help or "" for a in action._choices_actions}
                subcommands += [(n, p, helps.get(n, "")) for n, p in action.choices.items()]
                continue
            if isinstance(action, argparse._HelpAction | argparse._VersionAction):
                continue
            row = [_flags(action), _cell(_help(parser, action)), _default(action)]
            rows.append("| " + " | ".join(row) + " |")
        if rows:
            title = group.title or "options"
            out += [f"*{title}*", "", "| argument | meaning | default |", "|---|---|---|"]
            out += [*rows, ""]
    for sub_name, sub, sub_help in subcommands:
        out += _command(sub, f"{name} {sub_name}", sub_help, min(level + 1, 4))
    return out


def cli_reference(parser: argparse.ArgumentParser) -> str:
    """The CLI reference page: every (sub)command's usage and options, from ``parser``."""
    out = [
        "# CLI reference",
        "",
        "<!-- Generated at build time from fedagg.cli.build_parser() by tools/mkdocs_hooks.py. -->",
        "",
        "Every command and option of `fedagg`, as `fedagg COMMAND --help` prints them."
        " Exit codes: 0 success, 1 error, 2 usage error, 3 the state directory cannot be used"
        " as it is.",
        "",
    ]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                out += _command(sub, f"fedagg {name}", helps.get(name, ""), 2)
    return "\n".join(out).rstrip() + "\n"


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    from fedagg.cli import build_parser

    files.append(File.generated(config, "cli.md", content=cli_reference(build_parser())))
    files.append(
        File.generated(config, BENCH_README, abs_src_path=str(ROOT / "benchmarks/README.md"))
    )
    for pattern in MIRRORED:
        for path in sorted(ROOT.glob(pattern)):
            uri = path.relative_to(ROOT).as_posix()
            files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_content(html: str, **kwargs: Any) -> str:
    # a reST "Example::" before a code block reads "Example:" (the block is code already)
    html = html.replace(" ::</p>", "</p>").replace("::</p>", ":</p>")
    # ":class:`X`" in a docstring: an optional cross-reference (no warning where X has no entry)
    return _ROLE.sub(
        lambda m: (
            f'<autoref identifier="{m[1].lstrip("~.")}" optional><code>{m[1]}</code></autoref>'
        ),
        html,
    )
