"""Properties over generated configs: every valid config resolves, survives a round trip
through TOML and JSON, and satisfies the JSON Schema; a wrongly-typed value for any key is
refused naming that key (and the schema refuses it too)."""

from __future__ import annotations

import json
import math
import tomllib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedagg.config import config_errors, json_schema, resolve_config, to_toml
from fedagg.config._spec import SPEC, Key, Section

IDENT = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
REFS = st.builds(
    lambda mod, name: f"{'.'.join(mod)}:{name}", st.lists(IDENT, min_size=1, max_size=3), IDENT
)
SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(10**9), 10**9),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
TABLES = st.dictionaries(
    st.text(min_size=1, max_size=8),
    st.one_of(
        SCALARS,
        st.lists(st.integers(0, 9), max_size=3),
        st.dictionaries(IDENT, SCALARS, max_size=2),
    ),
    max_size=3,
)


def leaves(section: Section = SPEC, prefix: str = "") -> list[tuple[str, Key]]:
    out: list[tuple[str, Key]] = []
    for k, v in section.keys.items():
        if isinstance(v, Section):
            out += leaves(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


LEAVES = leaves()


def valid(key: Key, path: str) -> st.SearchStrategy[Any]:
    if key.kind == "int":
        lo = key.minimum if key.minimum is not None else -(10**9)
        hi = key.maximum if key.maximum is not None else 10**9
        ints = st.integers(int(lo), int(hi))
        return st.one_of(ints, ints.map(float))  # an integral float is an integer
    if key.kind == "float":
        floats = st.floats(
            min_value=key.minimum if key.minimum is not None else key.exclusive_minimum,
            max_value=key.maximum if key.maximum is not None else key.exclusive_maximum,
            exclude_min=key.exclusive_minimum is not None,
            exclude_max=key.exclusive_maximum is not None,
            allow_nan=False,
            allow_infinity=key.allow_inf,
        )
        lo = math.ceil(key.minimum if key.minimum is not None else -(10**6))
        ints = st.integers(lo, lo + 10).filter(lambda i: _ok(path, i))
        return st.one_of(floats, ints)  # an integer is taken as a float
    if key.kind == "bool":
        return st.booleans()
    if key.kind == "str":
        if key.choices:
            return (
                st.one_of(st.sampled_from(key.choices), REFS)
                if key.ref
                else st.sampled_from(key.choices)
            )
        return st.one_of(st.just(""), REFS) if key.ref else st.text(max_size=20)
    if key.kind == "z":
        return st.one_of(
            st.sampled_from(key.choices), st.floats(allow_nan=False, allow_infinity=False)
        )
    if key.kind == "list":
        assert key.items is not None
        return st.lists(valid(key.items, path), max_size=4)
    if key.values == "scalar":
        return st.dictionaries(st.text(min_size=1, max_size=8), SCALARS, max_size=4)
    return TABLES


def _ok(path: str, x: float) -> bool:
    return not config_errors(nest(path, x))


def section_strategy(section: Section, prefix: str = "") -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={
            k: section_strategy(v, f"{prefix}{k}.") if isinstance(v, Section)
            else valid(v, f"{prefix}{k}")
            for k, v in section.keys.items()
        },
    )  # fmt: skip


CONFIGS = section_strategy(SPEC)


def jsonable(v: Any) -> Any:
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [jsonable(x) for x in v]
    return v


def nest(path: str, value: Any) -> dict[str, Any]:
    parts = path.split(".")
    out: dict[str, Any] = {parts[-1]: value}
    for p in reversed(parts[:-1]):
        out = {p: out}
    return out


def get(cfg: dict[str, Any], path: str) -> Any:
    for p in path.split("."):
        cfg = cfg[p]
    return cfg


@settings(max_examples=150)
@given(CONFIGS)
def test_a_valid_config_resolves_and_round_trips_through_toml_and_json(
    over: dict[str, Any],
) -> None:
    cfg = resolve_config(over)
    assert resolve_config(cfg) == cfg
    assert resolve_config(tomllib.loads(to_toml(cfg))) == cfg
    assert resolve_config(json.loads(json.dumps(jsonable(cfg)))) == cfg
    for path, key in LEAVES:  # the given values are kept (normalized), the rest are defaults
        given_v: Any = over
        for p in path.split("."):
            given_v = given_v.get(p, {}) if isinstance(given_v, dict) else {}
        value = get(cfg, path)
        if key.kind in ("int", "float") and not isinstance(given_v, dict):
            assert value == given_v and type(value) is (int if key.kind == "int" else float)


def wrong(key: Key, path: str) -> st.SearchStrategy[Any]:
    """Values of the wrong type for ``key`` (or, for a list, with a wrong element)."""
    lists = st.lists(st.integers(), min_size=1, max_size=2)
    if key.kind == "int":
        return st.one_of(st.booleans(), st.text(max_size=5), lists, st.just(None),
                         st.floats().filter(lambda x: not float(x).is_integer()))  # fmt: skip
    if key.kind == "float":
        text = st.text(max_size=5).filter(lambda s: s != "inf")
        nonfinite = st.sampled_from(
            [math.nan, -math.inf] if key.allow_inf else [math.nan, math.inf]
        )
        return st.one_of(st.booleans(), text, lists, st.just(None), nonfinite)
    if key.kind == "bool":
        return st.one_of(st.integers(), st.floats(), st.text(max_size=5), lists)
    if key.kind == "str":
        bad = st.one_of(st.integers(), st.floats(), st.booleans(), lists)
        if not (key.choices or key.ref):
            return bad
        return st.one_of(bad, st.text(max_size=8).filter(lambda s: not _ok(path, s)))
    if key.kind == "z":
        return st.one_of(st.booleans(), lists, st.just(None),
                         st.text(max_size=5).filter(lambda s: s not in key.choices))  # fmt: skip
    if key.kind == "list":
        assert key.items is not None
        return st.one_of(st.integers(), st.text(max_size=5), st.dictionaries(IDENT, st.integers()),
                         wrong(key.items, f"{path}[0]").map(lambda x: [x]))  # fmt: skip
    bad = st.one_of(st.integers(), st.text(max_size=5), lists, st.booleans())
    if key.values == "scalar":
        # one wrong entry (two would be two errors)
        return st.one_of(bad, st.dictionaries(IDENT, st.one_of(lists, st.just(None)), min_size=1,
                                              max_size=1))  # fmt: skip
    return bad


@st.composite
def bad_configs(draw: st.DrawFn) -> tuple[str, Any]:
    path, key = draw(st.sampled_from(LEAVES))
    return path, draw(wrong(key, path))


@settings(max_examples=300)
@given(bad_configs())
def test_a_wrong_value_for_any_key_is_refused_naming_that_key(case: tuple[str, Any]) -> None:
    path, value = case
    errors = config_errors(nest(path, value))
    assert len(errors) == 1, errors
    assert errors[0].startswith((f"{path}: ", f"{path}[", f"{path}.")), errors
    assert "expected" in errors[0] or "unknown" in errors[0]


@pytest.fixture(scope="module")
def validator() -> Any:
    js = pytest.importorskip("jsonschema")
    schema = json_schema()
    js.Draft202012Validator.check_schema(schema)
    return js.Draft202012Validator(schema)


@settings(max_examples=100)
@given(over=CONFIGS)
def test_the_schema_accepts_every_valid_config(validator: Any, over: dict[str, Any]) -> None:
    validator.validate(jsonable(over))
    validator.validate(jsonable(resolve_config(over)))


@settings(max_examples=200)
@given(case=bad_configs())
def test_the_schema_refuses_what_the_checks_refuse(validator: Any, case: tuple[str, Any]) -> None:
    path, value = case
    if isinstance(value, float) and not math.isfinite(value):
        return  # JSON has no nan or inf (the schema spells inf "inf")
    assert not validator.is_valid(nest(path, value)), (path, value)
