"""``fedagg config`` and strict configs through the command line, in real processes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import fedagg
from fedagg.config import DEFAULTS, json_schema, resolve_config

SRC = str(Path(fedagg.__file__).resolve().parents[1])


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([SRC, *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-m", "fedagg.cli", *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("rounds = 2.5", "rounds: expected an integer, got 2.5 (float)"),
        ("[client]\nepochs = true", "client.epochs: expected an integer, got true (bool)"),
        ('[data]\nnum_clients = "100"', 'data.num_clients: expected an integer, got "100" (str)'),
        ('rounds = "ten"', 'rounds: expected an integer, got "ten" (str)'),
    ],
)
def test_simulate_refuses_a_wrongly_typed_value_naming_the_key(
    tmp_path: Path, toml: str, message: str
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(toml + "\n")
    r = cli("simulate", str(bad), "--db", str(tmp_path / "runs.db"), "--no-plots", "--quiet")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip() == f"fedagg simulate: error: {message}"
    assert not (tmp_path / "runs.db").exists()  # refused before anything ran


def test_config_check_prints_every_error_with_its_key(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text('rounds = 3\n[data]\nname = "digits"\n[policy]\nkind = "fedbuff"\n')
    bad = tmp_path / "bad.toml"
    bad.write_text('rounds = 2.5\n[client]\nepochs = true\n[policy]\nkind = "fedsgd"\nbuffr = 3\n')
    r = cli("config", "check", str(good))
    assert (r.returncode, r.stdout, r.stderr) == (0, f"{good}: ok\n", "")
    r = cli("config", "check", str(good), str(bad), str(tmp_path / "missing.toml"))
    assert r.returncode == 2
    assert r.stdout == f"{good}: ok\n"
    lines = r.stderr.splitlines()
    assert lines[:3] == [
        f"{bad}: rounds: expected an integer, got 2.5 (float)",
        f"{bad}: client.epochs: expected an integer, got true (bool)",
        f'{bad}: policy.kind: unknown policy "fedsgd"; valid: sync, fedbuff, fedasync, fedfix, '
        "async, fedamd",
    ]
    assert lines[3].startswith(
        f"{bad}: unknown key policy.buffr (did you mean policy.buffer?); valid keys in [policy]: "
    )
    assert lines[4].startswith(f"{tmp_path / 'missing.toml'}: cannot read it")
    assert lines[5:] == ["1 of 3 configs ok"]
    (tmp_path / "broken.toml").write_text("rounds = [\n")
    r = cli("config", "check", str(tmp_path / "broken.toml"))
    assert r.returncode == 2 and "not valid TOML" in r.stderr


def test_config_schema_prints_the_json_schema() -> None:
    r = cli("config", "schema")
    assert r.returncode == 0, r.stderr
    schema = json.loads(r.stdout)
    assert schema == json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["rounds"]["minimum"] == 1


def test_config_show_prints_the_resolved_config(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text(
        "rounds = 3\nmax_time = 60\n[model]\nhidden = [8, 4]\n[client.config]\nlr = 0.1\n"
    )
    r = cli("config", "show", str(path))
    assert r.returncode == 0, r.stderr
    shown = tomllib.loads(r.stdout)
    want = resolve_config({
        "rounds": 3, "max_time": 60.0, "model": {"hidden": [8, 4]},
        "client": {"config": {"lr": 0.1}}, "code_path": str(tmp_path.resolve()),
    })  # fmt: skip
    assert shown == want
    assert shown["max_time"] == 60.0 and isinstance(shown["max_time"], float)
    r = cli("config", "show", "--json", str(path))
    assert r.returncode == 0, r.stderr
    as_json = json.loads(r.stdout)
    assert as_json["policy"]["deadline"] == "inf"  # JSON has no infinity
    assert resolve_config(as_json) == want
    path.write_text("rounds = 0\n")
    r = cli("config", "show", str(path))
    assert r.returncode == 2
    assert r.stderr.strip() == "fedagg config show: error: rounds: expected an integer >= 1, got 0"


def test_config_defaults_prints_every_default() -> None:
    r = cli("config", "defaults")
    assert r.returncode == 0, r.stderr
    assert tomllib.loads(r.stdout) == DEFAULTS
    assert "max_time = inf\n" in r.stdout and "[system.compute]\n" in r.stdout
    r = cli("config", "defaults", "--json")
    defaults = json.loads(r.stdout)
    assert defaults["max_time"] == "inf"
    assert resolve_config(defaults)["max_time"] == math.inf


def test_fedagg_help_lists_the_config_command() -> None:
    r = cli("--help")
    assert r.returncode == 0 and "config" in r.stdout
    r = cli("config")
    assert r.returncode == 2 and "subcommand" in r.stderr
