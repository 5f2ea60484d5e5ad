"""Shared fixtures: small models and updates, seeded."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, settings

import fedagg

settings.register_profile(
    "fedagg",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
    print_blob=True,
)
settings.load_profile("fedagg")

# Test modules that run federations of real processes on loopback (servers, clients and edges
# through the harnesses, a Ray cluster, a browser): under pytest-xdist (`make test` runs
# `-n 2 --dist loadgroup`) they go to one worker, one test after another as in a serial run,
# so no two of them run at once: they time clients out after 1-3 s, synchronise on short
# pauses, measure RSS or how soon a refusal comes, or load both cores (the soak, Ray). Found
# by what the module's source uses, so a new module that starts a federation joins the group
# without being listed here. The in-process tests are shared out over both workers, and so are
# the process modules in _ALONGSIDE: their clients' timeouts and retry windows are 30 s or
# more and they assert on outcomes, never on timing, so they may run next to the group. The
# modules that count the machine's shared-memory segments (/dev/shm: none left behind) are in
# the group too: a segment of a test running next to them would look like a leak.
# (The grouping is done by the scheduler below, from the node ids: xdist's own xdist_group
# marks are lost with pytest 9, whose nodes no longer take xdist's renamed ids.)
_PROCS = re.compile(
    r"tests\.deploy\.harness|tests\.deploy import harness|tree_harness|\bnetns\b|\bimport ray\b"
    r"|\bray\.init\b|\"ray\"|\bbrowser\b|start_new_session|wait_listening"
    r"|/dev/shm"
)
_ALONGSIDE = {
    "cli/test_new.py",
    "deploy/test_bounds.py",
    "deploy/test_eventlog.py",
    "deploy/test_examples.py",
    "deploy/test_fault_config.py",
    "deploy/test_hardening.py",
    "deploy/test_integrity.py",
    "deploy/test_overflow.py",
    "deploy/test_status.py",
    "hierarchy/test_edge_bounds.py",
    "user/test_cli.py",
    "user/test_custom_aggregator.py",
}
# process tests the patterns miss that fail when a federation runs next to them (seen under
# -n 2: a simulation interrupted after its k-th stored round timed out at 60 s)
_SERIAL_TOO = {"runs/test_cli_runs.py"}
_HERE = Path(__file__).parent
_serial: dict[Path, bool] = {}


def serial_module(path: Path) -> bool:
    """Whether the test module at ``path`` runs in the one-at-a-time group."""
    if path not in _serial:
        rel = path.relative_to(_HERE).as_posix() if path.is_relative_to(_HERE) else ""
        ok = path.suffix == ".py" and path.is_file()
        text = path.read_text(errors="replace") if ok else ""
        _serial[path] = rel in _SERIAL_TOO or (rel not in _ALONGSIDE and bool(_PROCS.search(text)))
    return _serial[path]


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup``: the serial modules' tests are one work unit (one worker, in
    order), every other test a unit of its own."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadScopeScheduling

    root = config.rootpath

    class Serial(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return "procs" if serial_module(root / nodeid.split("::", 1)[0]) else nodeid

    return Serial(config, log)


def make_model(kind: str = "dict", dtype: Any = np.float32, seed: int = 0) -> Any:
    """A model with a matrix, a vector and a scalar-shaped array: tiny, or with a "big" matrix
    (70,000 elements: large enough for the compiled kernels)."""
    rng = np.random.default_rng(seed)
    arrays = [
        rng.standard_normal((280, 250) if kind == "big" else (3, 4)).astype(dtype),
        rng.standard_normal(4).astype(dtype),
        np.asarray(rng.standard_normal(()), dtype=dtype),
    ]
    if kind in ("dict", "big"):
        return dict(zip(["w", "b", "s"], arrays, strict=True))
    return arrays


def random_delta(spec: fedagg.ParamSpec, rng: np.random.Generator, scale: float = 1.0) -> Any:
    flat = (rng.standard_normal(spec.size) * scale).astype(spec.dtype)
    return (
        {k: v.copy() for k, v in spec.unflatten(flat).items()}
        if spec.keyed
        else [v.copy() for v in spec.unflatten(flat)]
    )


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
