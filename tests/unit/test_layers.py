"""The core stays pure: no I/O, no threads, no clock, no asyncio (checked on its imports)."""

from __future__ import annotations

import ast
from pathlib import Path

import fedagg

CORE = Path(fedagg.__file__).parent / "core"
FORBIDDEN = {
    "asyncio", "io", "os", "pathlib", "socket", "subprocess", "threading", "time", "logging",
    "multiprocessing", "sqlite3", "shutil", "tempfile", "random", "datetime", "grpc",
}  # fmt: skip


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module.split(".")[0] if node.level == 0 else node.module)
    return out


def test_core_imports_nothing_that_does_io_or_keeps_time() -> None:
    files = sorted(CORE.glob("*.py"))
    assert len(files) >= 6
    for f in files:
        bad = imported_modules(f) & FORBIDDEN
        assert not bad, f"{f.name} imports {sorted(bad)}"


def test_core_imports_only_inward() -> None:
    for f in sorted(CORE.glob("*.py")):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("fedagg")
            ):
                assert node.module.startswith(("fedagg.core", "fedagg.errors")), (
                    f"{f.name} imports {node.module}: core may import only core and errors"
                )
