"""The docs site: the CLI reference the build hook generates (tools/mkdocs_hooks.py) covers every
command, subcommand and option of ``fedagg.cli.build_parser()`` and is safe markdown; the Flower
migration guide's fedagg project runs as written. (``make docs`` builds the whole site with
``--strict``.)"""

from __future__ import annotations

import argparse
import importlib.util
import re
import textwrap
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


LOCAL_SGD = """

def local_sgd(params, x, y, lr, batch_size=16):
    trained = {name: array.copy() for name, array in params.items()}
    for start in range(0, len(y), batch_size):
        batch = slice(start, start + batch_size)
        _, grads = loss_and_grads(trained, x[batch], y[batch])
        for name, grad in grads.items():
            trained[name] -= lr * grad
    return trained
"""


def test_the_flower_guides_fedagg_project_runs_as_written(tmp_path: Path) -> None:
    # the "fedagg" tab of docs/migrate-from-flower.md: its fedagg.toml and client.py, with the
    # numpy template's model.py plus the local_sgd helper the guide says both sides share
    import tomllib

    from fedagg.sim import build

    text = (ROOT / "docs/migrate-from-flower.md").read_text(encoding="utf-8")
    tab = text[text.index('=== "fedagg"') :]
    blocks = dict(re.findall(r"\n    ```(toml|python)\n(.*?)\n    ```", tab, flags=re.S))
    config = tomllib.loads(textwrap.dedent(blocks["toml"]))
    client = textwrap.dedent(blocks["python"]).replace("from model ", "from doc_fl_model ")
    model = (ROOT / "src/fedagg/templates/numpy/model.py-tpl").read_text(encoding="utf-8")
    (tmp_path / "doc_fl_model.py").write_text(model + LOCAL_SGD, encoding="utf-8")
    (tmp_path / "doc_fl_client.py").write_text(client, encoding="utf-8")
    assert config["client"] == {
        "train": "client:train", "evaluate": "client:evaluate", "config": {"lr": 0.1},
    }  # fmt: skip
    config["client"].update(train="doc_fl_client:train", evaluate="doc_fl_client:evaluate")
    config["model"]["factory"] = "doc_fl_model:build"
    config.update(rounds=4, code_path=str(tmp_path))
    records = build(config).simulation.run().records
    accuracy = [r.test_accuracy for r in records]
    assert len(records) == 4 and all(r.stats.folded == 5 for r in records)
    assert accuracy[-1] > accuracy[0] + 0.1 and accuracy[-1] > 0.5, accuracy
