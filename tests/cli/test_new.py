"""``fedagg new``: a generated project simulates and deploys as its README says.

Everything runs as a user would: ``python -m fedagg.cli`` in real processes, with the
project's directory as the working directory, and only the flags its README shows (plus a
free port and fewer rounds).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from fnmatch import fnmatch
from pathlib import Path

import pytest

import fedagg
from fedagg.runs import RunDB
from tests.deploy.harness import free_port

PY = sys.executable
ROOT = Path(__file__).resolve().parents[2]
TEMPLATES_DIR = Path(fedagg.__file__).parent / "templates"
HAS_TORCH = importlib.util.find_spec("torch") is not None
TEMPLATES = [
    "numpy",
    pytest.param("torch", marks=pytest.mark.skipif(not HAS_TORCH, reason="needs torch")),
]
FILES = [".gitignore", "README.md", "client.py", "fedagg.toml", "model.py"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("FEDAGG_CRASH_AT", None)
    env.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    return env


def fedagg_cli(*args: str, cwd: Path, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "fedagg.cli", *args],
        cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def start(*args: str, cwd: Path, log: str) -> subprocess.Popen[bytes]:
    with open(cwd / log, "wb") as out:
        return subprocess.Popen(
            [PY, "-m", "fedagg.cli", *args],
            cwd=cwd, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def readme_commands(readme: str) -> list[str]:
    """The ``fedagg`` command lines of the README's shell blocks, in order."""
    blocks = re.findall(r"```sh\n(.*?)```", readme, re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("fedagg ")]


def new_project(root: Path, template: str, *extra: str) -> Path:
    proj = root / "proj"
    r = fedagg_cli("new", str(proj), "--template", template, *extra, cwd=root)
    assert r.returncode == 0, r.stderr
    return proj


@pytest.mark.parametrize("template", TEMPLATES)
def test_a_new_project_simulates_and_deploys_as_its_readme_says(
    tmp_path: Path, template: str
) -> None:
    proj = new_project(tmp_path, template, "--clients", "2")
    assert sorted(p.name for p in proj.iterdir()) == FILES
    cfg = tomllib.loads((proj / "fedagg.toml").read_text())
    assert cfg["name"] == "proj"
    assert cfg["data"]["num_clients"] == 2
    assert cfg["model"]["factory"] == "model:build"
    assert cfg["client"]["train"] == "client:train"
    assert cfg["client"]["evaluate"] == "client:evaluate"
    assert readme_commands((proj / "README.md").read_text()) == [
        "fedagg simulate fedagg.toml",
        "fedagg runs",
        "fedagg certs certs",
        "fedagg keys keys --clients 2",
        "fedagg server fedagg.toml",
        "fedagg client fedagg.toml --key keys/client-000.key",
    ]

    # simulate: the README's command, with 3 rounds
    r = fedagg_cli("simulate", "fedagg.toml", "--rounds", "3", "--no-plots", "--quiet", cwd=proj)
    assert r.returncode == 0, r.stdout + r.stderr
    with RunDB(proj / "runs" / "fedagg.db") as db:
        (run,) = db.runs()
        rows = db.rounds(run.id)
    assert run.status == "finished"
    assert len(rows) == 3
    assert rows[-1]["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert 0 < rows[-1]["client_loss"] < rows[0]["client_loss"]  # train() reports train_loss

    # deploy: the README's commands, with TLS and client keys; a free port and 3 rounds
    for cmd in (["certs", "certs"], ["keys", "keys", "--clients", "2"]):
        r = fedagg_cli(*cmd, cwd=proj)
        assert r.returncode == 0, r.stdout + r.stderr
    assert (proj / "certs" / "ca.pem").is_file()
    assert not (proj / "certs" / "ca.key").exists()
    assert "insecure" not in cfg.get("deploy", {})  # TLS: the default
    address = f"127.0.0.1:{free_port()}"
    procs = [
        start("server", "fedagg.toml", "--listen", address, "--rounds", "3", cwd=proj,
              log="server.log"),
        *(
            start("client", "fedagg.toml", "--key", f"keys/client-00{i}.key",
                  "--server", address, cwd=proj, log=f"client-{i}.log")
            for i in range(2)
        ),
    ]  # fmt: skip
    logs = ["server.log", "client-0.log", "client-1.log"]
    try:
        deadline = time.monotonic() + 120
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            for p, log in zip(procs, logs, strict=True):  # a failure fails now, not at timeout
                assert p.poll() in (None, 0), f"{log}:\n{(proj / log).read_text()[-3000:]}"
            time.sleep(0.2)
        for p, log in zip(procs, logs, strict=True):
            assert p.poll() == 0, f"{log}: exit {p.poll()}\n{(proj / log).read_text()[-3000:]}"
    finally:
        for p in procs:
            stop(p)

    # the final model, scored by the project's own evaluate() on all of digits
    score = (
        "import fedagg, client\n"
        "from fedagg.data import digits\n"
        "state = fedagg.load('fedagg-state/final.npz')\n"
        "print(state.version, client.evaluate(state.model, digits(), None)['accuracy'])\n"
    )
    r = subprocess.run([PY, "-c", score], cwd=proj, env=_env(), capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr
    version, accuracy = r.stdout.split()
    assert int(version) == 3
    assert float(accuracy) > 0.5


def test_new_refuses_a_non_empty_directory_unless_forced(tmp_path: Path) -> None:
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "notes.txt").write_text("mine")
    (proj / "model.py").write_text("# mine")
    r = fedagg_cli("new", str(proj), cwd=tmp_path)
    assert r.returncode == 2
    assert f"{proj} is not empty" in r.stderr
    assert "--force" in r.stderr
    assert sorted(p.name for p in proj.iterdir()) == ["model.py", "notes.txt"]
    assert (proj / "model.py").read_text() == "# mine"

    r = fedagg_cli("new", str(proj), "--force", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in proj.iterdir()) == sorted([*FILES, "notes.txt"])
    assert (proj / "notes.txt").read_text() == "mine"
    assert "def build(" in (proj / "model.py").read_text()


def test_new_refuses_bad_arguments_with_a_usage_error(tmp_path: Path) -> None:
    r = fedagg_cli("new", "proj", "--template", "jax", cwd=tmp_path)
    assert r.returncode == 2
    assert "invalid choice: 'jax'" in r.stderr
    assert "'numpy', 'torch'" in r.stderr
    r = fedagg_cli("new", "proj", "--clients", "0", cwd=tmp_path)
    assert r.returncode == 2
    assert "--clients: must be >= 1" in r.stderr
    (tmp_path / "afile").write_text("x")
    r = fedagg_cli("new", "afile", cwd=tmp_path)
    assert r.returncode == 2
    assert "afile exists and is not a directory" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # nothing written


def test_a_project_name_is_quoted_in_its_config(tmp_path: Path) -> None:
    name = 'my "fl" project'
    r = fedagg_cli("new", name, "--template", "torch", cwd=tmp_path)  # no torch needed
    assert r.returncode == 0, r.stderr
    cfg = tomllib.loads((tmp_path / name / "fedagg.toml").read_text())
    assert cfg["name"] == name
    assert cfg["data"]["num_clients"] == 3  # the default
    assert (tmp_path / name / "README.md").read_text().startswith(f"# {name}\n")


@pytest.mark.skipif(importlib.util.find_spec("ruff") is None, reason="needs ruff")
@pytest.mark.parametrize("template", ["numpy", "torch"])
def test_generated_code_is_lint_clean(tmp_path: Path, template: str) -> None:
    # the first code a new user reads: ruff's defaults (88 columns) and common rule sets
    proj = new_project(tmp_path, template)
    rules = "E,F,W,I,B,UP,SIM,RUF,NPY"
    for cmd in (["check", "--select", rules, "."], ["format", "--check", "."]):
        r = subprocess.run([PY, "-m", "ruff", *cmd, "--isolated"], cwd=proj,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr


def test_templates_ship_as_package_data() -> None:
    # a non-editable install has only what [tool.setuptools.package-data] names
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["fedagg"]
    package = TEMPLATES_DIR.parent
    files = [p for p in TEMPLATES_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) >= 10
    for f in files:
        rel = f.relative_to(package).as_posix()
        assert rel.count("/") == 2, f"{rel}: templates are flat directories"
        assert any(fnmatch(rel, pat) for pat in patterns), f"{rel} is not package data"
