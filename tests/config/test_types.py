"""Strict configs: every key's type, choices and bounds are checked, and each error names the
key's full path, what it expects and what it got."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedagg
from fedagg import attacks, data, sim
from fedagg.config import (
    DEFAULTS,
    build_aggregator,
    build_algorithm,
    build_policy,
    build_strategy,
    config_errors,
    load_config,
    resolve_config,
)
from fedagg.config._spec import SPEC, Key, Section
from fedagg.errors import ConfigError


def refused(over: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        resolve_config(over)
    return str(info.value)


# -- the issue's five examples, exactly ---------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("rounds = 2.5", "rounds: expected an integer, got 2.5 (float)"),
        ("[client]\nepochs = true", "client.epochs: expected an integer, got true (bool)"),
        ("[client]\nepochs = 1.5", "client.epochs: expected an integer, got 1.5 (float)"),
        ('[data]\nnum_clients = "100"', 'data.num_clients: expected an integer, got "100" (str)'),
        ('rounds = "ten"', 'rounds: expected an integer, got "ten" (str)'),
    ],
)
def test_the_issues_examples_are_refused_naming_the_key(
    tmp_path: Path, toml: str, message: str
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == message


# -- type rules ----------------------------------------------------------------------------------


def test_an_integer_key_takes_integers_and_integral_floats_only() -> None:
    assert resolve_config({"rounds": 7})["rounds"] == 7
    two = resolve_config({"rounds": 2.0})["rounds"]  # JSON Schema's integers: 2.0 is 2
    assert two == 2 and type(two) is int
    assert resolve_config({"rounds": np.int64(3)})["rounds"] == 3
    assert refused({"seed": False}) == "seed: expected an integer, got false (bool)"
    assert refused({"rounds": math.inf}) == "rounds: expected an integer, got inf (float)"
    assert refused({"rounds": [1]}) == "rounds: expected an integer, got [1] (list)"
    assert refused({"rounds": None}) == "rounds: expected an integer, got None (none)"


def test_a_float_key_takes_numbers_and_inf_only_where_the_default_is_inf() -> None:
    lr = resolve_config({"client": {"lr": 1}})["client"]["lr"]
    assert lr == 1.0 and type(lr) is float
    assert resolve_config({"max_time": math.inf})["max_time"] == math.inf
    assert resolve_config({"policy": {"deadline": "inf"}})["policy"]["deadline"] == math.inf
    assert resolve_config({"max_time": 5})["max_time"] == 5.0
    assert refused({"client": {"lr": True}}) == "client.lr: expected a number, got true (bool)"
    assert refused({"client": {"lr": "0.1"}}) == 'client.lr: expected a number, got "0.1" (str)'
    assert refused({"client": {"lr": math.inf}}) == (
        "client.lr: expected a finite number, got inf (float)"
    )
    assert refused({"max_time": math.nan}) == "max_time: expected a finite number, got nan (float)"
    assert refused({"max_time": "forever"}) == (
        'max_time: expected a number or inf, got "forever" (str)'
    )
    assert refused({"client": {"lr": "inf"}}) == 'client.lr: expected a number, got "inf" (str)'


def test_boolean_and_string_keys_take_only_their_type() -> None:
    assert resolve_config({"eval_train": True})["eval_train"] is True
    assert refused({"eval_train": 1}) == (
        "eval_train: expected a boolean (true or false), got 1 (int)"
    )
    assert refused({"deploy": {"insecure": "yes"}}) == (
        'deploy.insecure: expected a boolean (true or false), got "yes" (str)'
    )
    assert refused({"name": 3}) == "name: expected a string, got 3 (int)"
    assert refused({"deploy": {"state": Path("x")}}).startswith(
        "deploy.state: expected a string, got PosixPath('x')"
    )


def test_lists_check_their_elements() -> None:
    assert resolve_config({"model": {"hidden": [32, 16.0]}})["model"]["hidden"] == [32, 16]
    assert resolve_config({"deploy": {"serves": ["a", "b"]}})["deploy"]["serves"] == ["a", "b"]
    assert refused({"model": {"hidden": 64}}) == (
        "model.hidden: expected a list of integers, got 64 (int)"
    )
    assert refused({"model": {"hidden": [64, "8"]}}) == (
        'model.hidden[1]: expected an integer, got "8" (str)'
    )
    assert refused({"model": {"hidden": [0]}}) == "model.hidden[0]: expected an integer >= 1, got 0"
    assert (
        refused({"deploy": {"serves": [1]}}) == "deploy.serves[0]: expected a string, got 1 (int)"
    )


def test_tables_are_tables_and_free_form_tables_are_kept_as_given() -> None:
    cfg = resolve_config({
        "model": {"args": {"width": 8, "layers": [1, 2], "act": {"kind": "relu"}}},
        "strategy": {"aggregator_args": {"f": 1}},
        "deploy": {"edge_clients": {"edge-a": ["client-000"], "edge-b": "*"}},
        "client": {"config": {"lr": 0.1, "warm": True, "opt": "sgd", "steps": 3}},
    })  # fmt: skip
    assert cfg["model"]["args"] == {"width": 8, "layers": [1, 2], "act": {"kind": "relu"}}
    assert cfg["deploy"]["edge_clients"]["edge-b"] == "*"
    assert cfg["client"]["config"] == {"lr": 0.1, "warm": True, "opt": "sgd", "steps": 3}
    assert refused({"data": 3}) == "data: expected a table, got 3 (int)"
    assert refused({"system": {"compute": "fast"}}) == (
        'system.compute: expected a table, got "fast" (str)'
    )
    assert refused({"model": {"args": [1]}}) == "model.args: expected a table, got [1] (list)"
    assert refused({"client": {"config": {"lr": [0.1]}}}) == (
        "client.config.lr: expected a boolean, number or string, got [0.1] (list)"
    )


def test_nested_system_tables_are_typed_and_merge_with_their_defaults() -> None:
    cfg = resolve_config({"system": {"compute": {"kind": "uniform", "low": 1, "high": 2}}})
    assert cfg["system"]["compute"] == {
        "kind": "uniform", "mean": 2000.0, "sigma": 0.5, "low": 1.0, "high": 2.0,
    }  # fmt: skip
    assert refused({"system": {"latency": {"mean": "fast"}}}) == (
        'system.latency.mean: expected a number, got "fast" (str)'
    )
    assert refused({"system": {"availability": {"period": 2.5}}}) == (
        "system.availability.period: expected an integer, got 2.5 (float)"
    )
    assert refused({"system": {"compute": {"kind": "pareto"}}}) == (
        'system.compute.kind: unknown distribution "pareto"; valid: constant, lognormal, uniform'
    )


# -- choices and bounds --------------------------------------------------------------------------


def test_closed_choices_name_the_valid_ones() -> None:
    assert refused({"policy": {"kind": "fedsgd"}}) == (
        'policy.kind: unknown policy "fedsgd"; valid: sync, fedbuff, fedasync, fedfix, async, '
        "fedamd"
    )
    assert refused({"data": {"partition": "dirichlet2"}}).startswith(
        'data.partition: unknown partition "dirichlet2"; valid: dirichlet, label_dirichlet'
    )
    assert "unknown client algorithm" in refused({"client": {"algorithm": "sgd"}})
    assert "unknown executor" in refused({"executor": {"kind": "dask"}})
    assert refused({"byzantine": {"z": "exact"}}) == (
        'byzantine.z: unknown z formula "exact"; valid: paper, code'
    )
    assert resolve_config({"byzantine": {"z": 1}})["byzantine"]["z"] == 1.0
    assert refused({"byzantine": {"z": True}}) == (
        'byzantine.z: expected "paper" or "code" or a number, got true (bool)'
    )


def test_the_aggregator_is_a_built_in_rule_or_a_module_class_reference() -> None:
    for name in ("krum", "mypkg.rules:Median", "rules:Outer.Inner"):
        assert resolve_config({"strategy": {"aggregator": name}})["strategy"]["aggregator"] == name
    message = refused({"strategy": {"aggregator": "mode"}})
    assert message.startswith('strategy.aggregator: unknown aggregator "mode"; valid: mean, ')
    assert message.endswith(', or "module:Class"')
    assert "unknown aggregator" in refused({"strategy": {"aggregator": "rules:"}})
    assert resolve_config({"deploy": {"leaf_rule": ""}})["deploy"]["leaf_rule"] == ""


def test_code_references_are_empty_or_module_colon_name() -> None:
    cfg = resolve_config({"client": {"train": "mycode:train", "schedule": "a.b:c.d"}})
    assert cfg["client"]["train"] == "mycode:train"
    for bad in ("mycode.train", "my code:train", "mycode:", ":train", "a:b:c"):
        assert refused({"client": {"train": bad}}) == (
            f'client.train: expected "" or "module:function" (e.g. "mycode:train"), '
            f'got "{bad}" (str)'
        )


def test_bounds_are_checked() -> None:
    assert refused({"rounds": 0}) == "rounds: expected an integer >= 1, got 0"
    assert refused({"data": {"num_clients": 0}}) == (
        "data.num_clients: expected an integer >= 1, got 0"
    )
    assert refused({"eval_every": -1}) == "eval_every: expected an integer >= 1, got -1"
    assert refused({"data": {"test_fraction": 1.5}}) == (
        "data.test_fraction: expected a number in [0, 1], got 1.5"
    )
    assert refused({"client": {"lr": 0}}) == "client.lr: expected a number > 0, got 0"
    assert refused({"strategy": {"beta2": 1.0}}) == (
        "strategy.beta2: expected a number in [0, 1), got 1.0"
    )
    assert refused({"policy": {"max_staleness": -2}}) == (
        "policy.max_staleness: expected an integer >= -1, got -2"
    )
    assert refused({"policy": {"deadline": 0}}) == "policy.deadline: expected a number > 0, got 0"
    # the edges are inside
    cfg = resolve_config({"data": {"test_fraction": 1}, "policy": {"max_staleness": -1}})
    assert cfg["data"]["test_fraction"] == 1.0


def test_unknown_keys_are_refused_naming_the_valid_ones() -> None:
    message = refused({"policy": {"clients_per_rond": 5}})
    assert message.startswith(
        "unknown key policy.clients_per_rond (did you mean policy.clients_per_round?); valid "
        "keys in [policy]: kind, clients_per_round, over_select,"
    )
    assert refused({"roundz": 1}).startswith(
        "unknown key roundz (did you mean rounds?); valid keys: name, seed, rounds"
    )
    assert refused({"system": {"compute": {"xyzzy": 1}}}).startswith(
        "unknown key system.compute.xyzzy; valid keys in [system.compute]: kind, mean"
    )


def test_every_error_is_reported_at_once() -> None:
    bad = {"rounds": 2.5, "client": {"epochs": True}, "data": {"num_clients": "100", "x": 1}}
    errors = config_errors(bad)
    assert errors == [
        "rounds: expected an integer, got 2.5 (float)",
        "client.epochs: expected an integer, got true (bool)",
        'data.num_clients: expected an integer, got "100" (str)',
        errors[3],
    ]
    assert errors[3].startswith("unknown key data.x;")
    message = refused(bad)
    assert message.startswith("4 config errors:\n  rounds: expected an integer")
    assert all(e in message for e in errors)
    assert config_errors({"rounds": 3}) == [] and config_errors(None) == []
    assert config_errors([1]) == ["a config is a table, got [1] (list)"]  # type: ignore[arg-type]


# -- defaults, resolution, load_config -----------------------------------------------------------


def test_defaults_come_from_the_definitions_and_resolve_to_themselves() -> None:
    def walk(section: Section, defaults: dict[str, Any]) -> None:
        assert list(section.keys) == list(defaults)
        for k, v in section.keys.items():
            if isinstance(v, Section):
                walk(v, defaults[k])
            else:
                assert v.doc, k
                assert defaults[k] == v.default, k
                if isinstance(v.default, list | dict):  # a copy: changing it changes no default
                    assert defaults[k] is not v.default, k

    walk(SPEC, DEFAULTS)
    assert resolve_config() == DEFAULTS
    assert resolve_config(DEFAULTS) == DEFAULTS
    cfg = resolve_config()
    cfg["model"]["hidden"].append(1)
    cfg["client"]["config"]["x"] = 1
    assert DEFAULTS["model"]["hidden"] == [64] and DEFAULTS["client"]["config"] == {}


def test_resolving_is_idempotent_and_keeps_valid_values() -> None:
    over = {"rounds": 3, "policy": {"kind": "fedbuff", "buffer": 4}, "model": {"hidden": [8]}}
    cfg = resolve_config(over)
    assert cfg["policy"]["buffer"] == 4 and cfg["policy"]["clients_per_round"] == 10
    assert resolve_config(cfg) == cfg


def test_load_config_sets_code_path_to_the_files_directory(tmp_path: Path) -> None:
    (tmp_path / "proj").mkdir()
    path = tmp_path / "proj" / "run.toml"
    path.write_text('name = "x"\n')
    assert load_config(path)["code_path"] == str((tmp_path / "proj").resolve())
    path.write_text('code_path = "src"\n')  # kept: relative to the working directory
    assert load_config(path)["code_path"] == "src"
    path.write_text(f'code_path = "{tmp_path}"\n')
    assert load_config(path)["code_path"] == str(tmp_path.resolve())
    path.write_text("code_path = 3\n")
    with pytest.raises(ConfigError, match=r"^code_path: expected a string, got 3 \(int\)$"):
        load_config(path)
    assert resolve_config({})["code_path"] == ""  # a dict config: the working directory


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config file"):
        load_config(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("rounds = [")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(tmp_path / "bad.toml")
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_every_shipped_example_config_is_valid() -> None:
    root = Path(__file__).resolve().parents[2]
    files = sorted((root / "examples" / "configs").glob("*.toml"))
    assert files
    for f in files:
        load_config(f)


# -- the closed choices are the ones the builders take -------------------------------------------


def choices(path: str) -> tuple[str, ...]:
    node: Any = SPEC
    for part in path.split("."):
        node = node.keys[part]
    assert isinstance(node, Key)
    return node.choices


def test_the_choices_match_the_library() -> None:
    assert set(choices("data.name")) == {*data.DATASETS, "none"}  # none: your own data
    assert set(choices("data.partition")) == set(data.PARTITIONS)
    assert set(choices("byzantine.attack")) == {*attacks.ATTACK_KINDS, "label_flip"}
    for kind in choices("system.compute.kind"):
        sim.Distribution(kind, 1.0, 0.5, 1.0, 2.0)  # type: ignore[arg-type]
    for kind in choices("system.availability.kind"):
        sim.Availability(kind, 0.5)  # type: ignore[arg-type]
    s = DEFAULTS["strategy"]
    for name in choices("strategy.aggregator"):
        build_aggregator({**s, "aggregator": name, "f": 1})
    for acc in choices("strategy.accumulator"):
        build_aggregator({**s, "accumulator": acc})
    for name in choices("strategy.name"):
        for flavor in choices("strategy.flavor"):
            build_strategy(resolve_config({"strategy": {"name": name, "flavor": flavor}}))
    for alg in choices("client.algorithm"):
        build_algorithm(resolve_config({"client": {"algorithm": alg}}))
    for kind in choices("policy.kind"):
        alg = "fedamd" if kind == "fedamd" else "fedavg"
        cfg = resolve_config({"policy": {"kind": kind}, "client": {"algorithm": alg}})
        build_policy(cfg, build_strategy(cfg))
    for w in choices("policy.weighting"):
        cfg = resolve_config({"policy": {"weighting": w}})
        build_policy(cfg, build_strategy(cfg))
    for mode in choices("policy.straggler_mode"):
        cfg = resolve_config({"policy": {"straggler_mode": mode}})
        build_policy(cfg, build_strategy(cfg))
    for w in choices("policy.weights"):
        cfg = resolve_config({"policy": {"kind": "fedbuff", "weights": w}})
        build_policy(cfg, build_strategy(cfg))
    for r in choices("policy.restart"):
        cfg = resolve_config({"policy": {"kind": "fedbuff", "restart": r}})
        build_policy(cfg, build_strategy(cfg))
    for st in choices("policy.staleness"):
        cfg = resolve_config({"policy": {"kind": "fedasync", "staleness": st}})
        build_policy(cfg, build_strategy(cfg))
    for z in choices("byzantine.z"):
        attacks.attack("alie", z=z)
    for d in choices("byzantine.direction"):
        attacks.attack("min_max", direction=d)


def test_a_config_error_is_a_fedagg_error() -> None:
    with pytest.raises(fedagg.FedaggError):
        resolve_config({"rounds": "ten"})
