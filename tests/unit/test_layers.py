"""The package's layering, checked on the imports of every module (also those inside
functions).

The core stays pure: no I/O, no threads, no clock, no asyncio. Above it every package imports
only its own modules and lower layers (:data:`LAYERS`): the simulator and the deployment are
siblings on the same policies and configs. No module imports another package's private
modules, nor another module's private names.
"""

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


# -- the package layers --------------------------------------------------------------------------
#: fedagg's layers, lowest first. A module may import its own top-level package (``fedagg.X``,
#: or the top-level module ``fedagg/X.py``) and anything in a lower layer, never a sibling in its
#: own layer nor anything above it:
#:
#: errors < core < {_checkpoint, spool, jobs, data, models, runs, secagg, plane, and the public
#: namespaces over core: attacks, optimizers, staleness, strategies, transforms, weighting}
#: < {aggregators, clients} < fedagg (the package's own ``__init__``: the curated API)
#: < policy < config < {sim, deploy, hierarchy} < demo < dashboard < cli
#:
#: so the simulator and the deployment are siblings built on the same policies and configs, and
#: neither imports the other (nor the hierarchy, nor it them). ``jobs`` (the client training jobs
#: executors run, and Ray's start-up) is what sim and hierarchy share; ``plane`` (the one-host
#: shared-memory data plane) is what deploy and hierarchy share.
LAYERS: list[set[str]] = [
    {"errors"},
    {"core"},
    {"_checkpoint", "spool", "jobs", "data", "models", "runs", "secagg", "plane"}
    | {"optimizers", "staleness", "strategies", "transforms", "weighting"},
    {"privacy"},  # DP accountants and mechanisms: noise from secagg's seekable PRG
    {"aggregators", "clients"},
    {"attacks"},  # re-exports clients.LabelFlip (data poisoning is a client)
    {"fedagg"},
    {"policy"},
    {"config"},
    {"sim", "deploy", "hierarchy"},
    {"demo"},  # a recipe over the simulator
    {"dashboard"},  # the web view: reads runs (the run database) and deploy (read_status)
    {"cli"},
]
RANK = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}
SRC = Path(fedagg.__file__).parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    """Whether ``fedagg.a.b`` names a module or package of the source tree."""
    rel = Path(*name.split("."))
    return (SRC.parent / rel).with_suffix(".py").is_file() or (SRC.parent / rel).is_dir()


def unit(module: str) -> str:
    """The top-level package (or module) of ``fedagg`` a module belongs to."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def fedagg_imports(path: Path, text: str | None = None) -> list[tuple[int, str, str | None]]:
    """Every import of a fedagg module in ``path``, at module level or inside functions,
    relative ones resolved: ``(line, module, name)``, where ``name`` is what a ``from`` import
    takes from ``module`` when it is not itself a module (else the module is the name's)."""
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text() if text is None else text)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod != "fedagg" and not mod.startswith("fedagg."):
                continue
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append(
                    (node.lineno, sub, None) if is_module(sub) else (node.lineno, mod, a.name)
                )
    return [i for i in out if i[1] == "fedagg" or i[1].startswith("fedagg.")]


def sources() -> list[Path]:
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 50
    return files


def test_every_package_has_a_layer() -> None:
    units = {unit(module_name(f)) for f in sources()}
    assert units <= set(RANK), f"place these in LAYERS: {sorted(units - set(RANK))}"


def test_imports_go_only_down_the_layers() -> None:
    bad = []
    for f in sources():
        me = unit(module_name(f))
        for line, mod, _ in fedagg_imports(f):
            them = unit(mod)
            if them != me and RANK.get(them, len(LAYERS)) >= RANK[me]:
                bad.append(f"{f.relative_to(SRC)}:{line} imports {mod} ({them} is not below {me})")
    assert not bad, "\n".join(bad)


def test_sim_deploy_and_hierarchy_are_siblings() -> None:
    """Neither the simulator nor the deployment nor the hierarchy imports another of them
    (also inside functions): what they share lives below them."""
    siblings = {"sim", "deploy", "hierarchy"}
    bad = []
    for f in sources():
        me = unit(module_name(f))
        if me in siblings:
            for line, mod, _ in fedagg_imports(f):
                if unit(mod) in siblings - {me}:
                    bad.append(f"{f.relative_to(SRC)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def private_imports() -> list[str]:
    """Imports of another module's private (``_``) names: a ``from X import _name`` whose
    ``_name`` is not a module of the importer's own package, and any import of a private
    module outside the package that holds it (``fedagg.core._x`` from outside ``fedagg.core``;
    ``fedagg._checkpoint`` is the whole package's)."""
    return [bad for f in sources() for bad in private_in(f)]


def private_in(path: Path, text: str | None = None) -> list[str]:
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: list[str] = []
    for line, mod, name in fedagg_imports(path, text):
        where = f"{path.relative_to(SRC)}:{line}"
        parts = mod.split(".")
        for i, part in enumerate(parts):
            holder = ".".join(parts[:i])
            if part.startswith("_") and not (package + ".").startswith(holder + "."):
                out.append(f"{where} imports the private module {mod}")
                break
        if name is not None and name.startswith("_") and not name.endswith("__"):
            out.append(f"{where} imports the private name {name} from {mod}")
    return list(dict.fromkeys(out))  # once per import statement and name


def test_no_module_imports_another_modules_private_names() -> None:
    bad = private_imports()
    assert bad == [], "\n".join(bad)


def test_the_import_parser_sees_relative_and_nested_imports() -> None:
    text = (
        "import numpy\nfrom . import _fed\nfrom ..sim import _engine\n"
        "from .._checkpoint import register\nimport fedagg.core.kernels\n"
        "def f():\n    from fedagg.sim._run import build\n    from fedagg import config\n"
    )
    got = fedagg_imports(SRC / "deploy" / "_x.py", text)
    assert got == [
        (2, "fedagg.deploy._fed", None),
        (3, "fedagg.sim._engine", None),
        (4, "fedagg._checkpoint", "register"),
        (5, "fedagg.core.kernels", None),
        (7, "fedagg.sim._run", "build"),
        (8, "fedagg.config", None),
    ]
    assert private_in(SRC / "deploy" / "_x.py", text) == [
        "deploy/_x.py:3 imports the private module fedagg.sim._engine",
        "deploy/_x.py:7 imports the private module fedagg.sim._run",
    ]
    own = "from fedagg.deploy._fed import _Ctx, Canonical"
    assert private_in(SRC / "deploy" / "_x.py", own) == [
        "deploy/_x.py:1 imports the private name _Ctx from fedagg.deploy._fed"
    ]
    assert private_in(SRC / "clients" / "_x.py", "from fedagg.clients import _engine") == []
