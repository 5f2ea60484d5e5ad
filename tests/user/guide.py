"""Helpers shared by the tests of your own code: the guides' example code, configs on disk
and ``python -m fedagg.cli`` in a real process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"


def guide_code(doc: str, first_line: str) -> str:
    """The ```python block of ``docs/<doc>`` whose first line starts with ``first_line``."""
    text = (ROOT / "docs" / doc).read_text()
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        if block.startswith(first_line):
            return str(block)
    raise AssertionError(f"no python block starting with {first_line!r} in docs/{doc}")


def cli(
    args: Sequence[str], cwd: Path, *, timeout: float = 120.0, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m fedagg.cli ARGS`` in ``cwd``, this worktree's sources first."""
    e = dict(os.environ)
    e.update({"PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "fedagg.cli", *args], cwd=cwd, env=e, capture_output=True,
        text=True, timeout=timeout, check=False,
    )  # fmt: skip


def toml(cfg: Mapping[str, Any]) -> str:
    """A config as TOML (tables one level deep, inline tables below)."""
    from tests.deploy.harness import _toml_value

    top = [f"{k} = {_toml_value(v)}" for k, v in cfg.items() if not isinstance(v, Mapping)]
    for k, v in cfg.items():
        if isinstance(v, Mapping):
            top.append(f"\n[{k}]")
            top += [f"{kk} = {_toml_value(vv)}" for kk, vv in v.items()]
    return "\n".join(top) + "\n"
