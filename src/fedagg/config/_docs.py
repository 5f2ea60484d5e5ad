"""The config reference (``docs/config.md``) and schema file (``docs/config.schema.json``),
generated from the key definitions so that they cannot drift from the code:
``python -m fedagg.config docs`` writes both, ``--check`` tells whether they are current."""

from __future__ import annotations

import json
from pathlib import Path

from fedagg.config._schema import json_schema
from fedagg.config._spec import SPEC, Key, Section
from fedagg.config._toml import toml_value

__all__ = ["MARKDOWN", "SCHEMA_JSON", "reference", "schema_text", "write_docs"]

#: The generated files' names, in the docs directory.
MARKDOWN = "config.md"
SCHEMA_JSON = "config.schema.json"

_INTRO = """\
# Config reference

<!-- Generated from src/fedagg/config/_spec.py by `python -m fedagg.config docs`: do not edit.
     tests/config/test_docs.py fails if this file is out of date. -->

A run config is a TOML file (or, from Python, a dict) read by `fedagg simulate`,
`fedagg server` and `fedagg client`. Every key has a default: a config names only what it
changes. Every key is defined once, in `src/fedagg/config/_spec.py`, and the defaults, the
checks, the JSON Schema ([config.schema.json](config.schema.json)) and this page are made
from those definitions.

```toml
name = "my-run"
rounds = 50

[data]
name = "digits"
num_clients = 20

[policy]
clients_per_round = 5
```

```console
$ fedagg config check run.toml          # every error, each naming its key
$ fedagg config show run.toml           # the resolved config (defaults filled in; --json)
$ fedagg config defaults                # every key with its default, as TOML
$ fedagg config schema > config.schema.json
```

**Checks.** An unknown table or key is an error listing the valid ones. Every value is
checked against its key's type, choices and bounds, and the error names the key's path, what
it expects and what it got:

```text
rounds: expected an integer, got 2.5 (float)
client.epochs: expected an integer, got true (bool)
data.num_clients: expected an integer, got "100" (str)
policy.kind: unknown policy "fedsgd"; valid: sync, fedbuff, fedasync, fedfix, async, fedamd
```

**Types.** `int`: an integer; an integral float such as `2.0` is taken as `2` (as JSON
Schema counts integers), `2.5` and booleans are refused. `float`: a number; an integer is
taken as a float; `nan` is refused, and `inf` too except where the default is `inf`
(`max_time`, `policy.deadline`; JSON spells it `"inf"`). `bool`: `true` or `false` only.
`str`: a string only (`num_clients = "100"` is refused). Lists check their elements; a
`table` is free-form (its keys are checked by what uses it) except `client.config`, whose
values must be booleans, numbers or strings. `"module:function"` keys take `""` (none) or
a reference to your code, imported with `code_path` searched first.

**`code_path`.** `""` in a config file means the file's own directory: `load_config`
writes that absolute path into the resolved config, so `fedagg config show` prints it. Any
other `code_path` is kept as given (a relative one is taken from the working directory). A
config given as a dict keeps `""`: the working directory.

An editor with TOML schema support (e.g. Taplo / Even Better TOML) can check a file as you
type it: put `#:schema ./config.schema.json` (a path or URL to the schema) on its first line.
"""


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _type(key: Key) -> str:
    bounds = key.bounds_text()
    text = f"{key.type_name()} {bounds}" if bounds else key.type_name()
    return f"{text} or inf" if key.allow_inf else text


def _doc(key: Key) -> str:
    doc = key.doc
    if key.choices:
        names = ", ".join(f"`{c}`" if c else '`""`' for c in key.choices)
        doc += f". One of {names}" + (', or `"module:Class"`' if key.ref else "")
    return doc


def _table(section: Section, name: str, out: list[str]) -> None:
    keys = {k: v for k, v in section.keys.items() if isinstance(v, Key)}
    out.append(f"## {'Top-level keys' if not name else f'[{name}]'}\n")
    out.append(f"{section.doc[0].upper()}{section.doc[1:]}.\n")
    if keys:
        out.append("| key | type | default | description |")
        out.append("|---|---|---|---|")
        for k, key in keys.items():
            default = _cell(toml_value(key.default))
            out.append(f"| `{k}` | {_cell(_type(key))} | `{default}` | {_cell(_doc(key))} |")
        out.append("")
    for k, v in section.keys.items():
        if isinstance(v, Section):
            _table(v, f"{name}.{k}" if name else k, out)


def reference() -> str:
    """The text of ``docs/config.md``."""
    out = [_INTRO]
    _table(SPEC, "", out)
    return "\n".join(out).rstrip("\n") + "\n"


def schema_text() -> str:
    """The text of ``docs/config.schema.json``."""
    return json.dumps(json_schema(), indent=2) + "\n"


def write_docs(directory: str | Path, *, check: bool = False) -> list[Path]:
    """Write both files into ``directory`` (or, with ``check``, write nothing). Returns the
    files that were (or, with ``check``, would be) changed."""
    d = Path(directory)
    changed = []
    for name, text in ((MARKDOWN, reference()), (SCHEMA_JSON, schema_text())):
        path = d / name
        old = path.read_text(encoding="utf-8") if path.exists() else None
        if old != text:
            changed.append(path)
            if not check:
                d.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
    return changed
