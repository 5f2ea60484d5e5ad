"""The docstrings' ``>>>`` examples run as doctests: every module of ``src/fedagg`` whose
source has one is imported and its examples run (``# doctest: +SKIP`` marks the few that need
a live system, e.g. shared memory)."""

from __future__ import annotations

import doctest
import importlib
import io
from pathlib import Path

import pytest

import fedagg

PACKAGE = Path(fedagg.__file__).resolve().parent


def _modules_with_examples() -> list[str]:
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if ">>>" in path.read_text(encoding="utf-8"):
            parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
            names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


MODULES = _modules_with_examples()


def test_the_examples_are_found() -> None:
    # fedagg, aggregators, optimizers, strategies, transforms, staleness, weighting, attacks...
    assert len(MODULES) >= 8, MODULES
    assert "fedagg.aggregators" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name: str) -> None:
    module = importlib.import_module(name)
    tests = doctest.DocTestFinder(exclude_empty=True).find(module, name)
    assert sum(len(t.examples) for t in tests), f"{name}: '>>>' in the source but no doctest"
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out = io.StringIO()
    for test in tests:
        runner.run(test, out=out.write)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, out.getvalue()


def test_a_wrong_example_fails() -> None:
    # the runner really compares: a docstring whose output is wrong is a failure
    def f() -> None:
        """>>> 1 + 1
        3
        """

    tests = doctest.DocTestFinder().find(f, "f", globs={})
    runner = doctest.DocTestRunner()
    for test in tests:
        runner.run(test, out=io.StringIO().write)
    assert runner.summarize(verbose=False).failed == 1
