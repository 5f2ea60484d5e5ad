"""The config reference and the schema file are generated from the key definitions: the
committed files are the generated ones, and the schema has the expected structure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import fedagg
from fedagg.config import DEFAULTS, json_schema
from fedagg.config._docs import reference, schema_text, write_docs
from fedagg.config._spec import SPEC, Key, Section

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
SRC = str(Path(fedagg.__file__).resolve().parents[1])


def test_the_committed_reference_and_schema_are_the_generated_ones() -> None:
    assert (DOCS / "config.md").read_text(encoding="utf-8") == reference(), (
        "docs/config.md is out of date: run python -m fedagg.config docs"
    )
    assert (DOCS / "config.schema.json").read_text(encoding="utf-8") == schema_text(), (
        "docs/config.schema.json is out of date: run python -m fedagg.config docs"
    )


def test_the_generator_writes_and_checks(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": SRC}
    run = [sys.executable, "-m", "fedagg.config", "docs", str(tmp_path)]
    r = subprocess.run([*run, "--check"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1 and "out of date" in r.stdout  # nothing there yet
    assert not (tmp_path / "config.md").exists()
    r = subprocess.run(run, capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "config.md").read_text(encoding="utf-8") == reference()
    r = subprocess.run([*run, "--check"], capture_output=True, text=True, env=env, timeout=60)
    assert (r.returncode, r.stdout) == (0, "")
    assert write_docs(tmp_path, check=True) == []


def paths(section: Section = SPEC, prefix: str = "") -> list[tuple[str, Key]]:
    out: list[tuple[str, Key]] = []
    for k, v in section.keys.items():
        out += paths(v, f"{prefix}{k}.") if isinstance(v, Section) else [(f"{prefix}{k}", v)]
    return out


def test_the_reference_documents_every_key() -> None:
    text = reference()
    for path, key in paths():
        table, _, name = path.rpartition(".")
        assert f"| `{name}` |" in text, path
        assert key.doc.split(".")[0][:30].replace("|", "\\|") in text, path
        if table:
            assert f"## [{table}]" in text, path


def test_the_schema_describes_every_key_with_type_default_and_description() -> None:
    schema = json_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    json.dumps(schema, allow_nan=False)  # plain JSON: inf is spelled "inf"
    free = {"model.args", "client.config", "strategy.aggregator_args", "deploy.edge_clients"}

    def walk(node: dict[str, Any], defaults: dict[str, Any], prefix: str) -> None:
        assert node["type"] == "object" and node["additionalProperties"] is False, prefix
        assert node["description"]
        assert list(node["properties"]) == list(defaults), prefix
        for k, sub in node["properties"].items():
            path = f"{prefix}{k}"
            if isinstance(defaults[k], dict) and path not in free:
                walk(sub, defaults[k], f"{path}.")
                continue
            assert sub["description"], path
            assert "type" in sub or "anyOf" in sub, path
            want = "inf" if defaults[k] == float("inf") else defaults[k]
            assert sub["default"] == want, path
            if path in free:
                assert sub["type"] == "object" and sub.get("additionalProperties") is not False

    walk(schema, DEFAULTS, "")
    props = schema["properties"]
    assert props["rounds"] == {
        "description": props["rounds"]["description"], "type": "integer", "minimum": 1,
        "default": 20,
    }  # fmt: skip
    assert props["max_time"]["anyOf"] == [
        {"type": "number", "exclusiveMinimum": 0.0}, {"const": "inf"},
    ]  # fmt: skip
    assert props["policy"]["properties"]["kind"]["enum"][:2] == ["sync", "fedbuff"]
    assert props["data"]["properties"]["test_fraction"]["maximum"] == 1.0
    assert props["model"]["properties"]["hidden"]["items"] == {"type": "integer", "minimum": 1}
    assert props["client"]["properties"]["config"]["additionalProperties"] == {
        "type": ["boolean", "number", "string"]
    }
    agg = props["strategy"]["properties"]["aggregator"]["anyOf"]
    assert "krum" in agg[0]["enum"] and agg[1]["type"] == "string" and agg[1]["pattern"]


def test_the_schema_validates_the_defaults_and_refuses_the_issues_examples() -> None:
    js = pytest.importorskip("jsonschema")
    js.Draft202012Validator.check_schema(json.loads(schema_text()))
    validator = js.Draft202012Validator(json_schema())
    validator.validate(json.loads(json.dumps({**DEFAULTS, "max_time": "inf", "policy": {
        **DEFAULTS["policy"], "deadline": "inf"}})))  # fmt: skip
    for bad in ({"rounds": 2.5}, {"client": {"epochs": True}}, {"client": {"epochs": 1.5}},
                {"data": {"num_clients": "100"}}, {"rounds": "ten"}, {"policy": {"kind": "x"}},
                {"roundz": 1}, {"system": {"compute": {"kind": "pareto"}}}):  # fmt: skip
        assert not validator.is_valid(bad), bad
    assert validator.is_valid({"rounds": 2.0, "strategy": {"aggregator": "mine:Agg"}})
