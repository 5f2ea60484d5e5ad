"""Fault injection is configured explicitly (issue 15): the library never reads
``FEDAGG_CRASH_AT``; only the command line (a process entry point) does, or takes
``--crash-at``. A bad spec is refused with a message naming the valid points."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import fedagg
from fedagg.cli import main
from fedagg.deploy import _faults
from fedagg.deploy._faults import POINTS, Faults, configure, crash_point
from tests.deploy.harness import federation, kill, read_log, start_client, start_server, wait


@pytest.fixture(autouse=True)
def _off() -> Iterator[None]:
    configure(None)
    yield
    configure(None)


def test_the_library_ignores_the_environment() -> None:
    """Imported with FEDAGG_CRASH_AT set, the points do nothing until configured; then the
    configured pass kills the process."""
    code = """if True:
        import fedagg.deploy
        from fedagg.deploy._faults import configure, crash_point, current
        assert current() is None
        for _ in range(5):
            crash_point("fold")
        print("survived", flush=True)
        configure("fold:2")
        crash_point("fold")
        print("first pass", flush=True)
        crash_point("fold")
        print("not reached", flush=True)
    """
    env = {**os.environ, "FEDAGG_CRASH_AT": "fold:1"}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert p.returncode == -9, p.stderr.decode()
    assert p.stdout.decode().splitlines() == ["survived", "first pass"]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("fold", Faults("fold", 1, 0.0)),
        ("fold:3", Faults("fold", 3)),
        ("upload-queued:2:0.3", Faults("upload-queued", 2, 0.3)),
        (" edge-logged:1 ", Faults("edge-logged")),
        ("checkpoint::1.5", Faults("checkpoint", 1, 1.5)),
    ],
)
def test_specs_parse(spec: str, expected: Faults) -> None:
    assert Faults.parse(spec) == expected
    assert Faults.parse(str(expected)) == expected


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("folds:1", "unknown crash point 'folds'"),
        ("fold:0", "n must be an integer >= 1"),
        ("fold:x", "malformed crash spec 'fold:x'"),
        ("fold:1.5", "malformed crash spec"),
        ("fold:1:-2", "seconds must be finite and >= 0"),
        ("fold:1:nan", "seconds must be finite and >= 0"),
        ("fold:1:2:3", "malformed crash spec"),
        (":1", "malformed crash spec"),
    ],
)
def test_a_bad_spec_is_refused_naming_the_points(spec: str, fragment: str) -> None:
    configure("applied:4")
    with pytest.raises(fedagg.ConfigError) as info:
        configure(spec)
    message = str(info.value)
    assert fragment in message
    if "n must" not in message and "seconds must" not in message:
        assert all(p in message for p in POINTS), message
    assert _faults.current() == Faults("applied", 4)  # unchanged


def test_configure_returns_the_previous_setting_and_restarts_counts() -> None:
    assert configure("spooled:3") is None
    crash_point("spooled")
    crash_point("spooled")
    assert configure(Faults("spooled", 3)) == Faults("spooled", 3)
    crash_point("spooled")  # the counts restarted: 1st pass of the new setting
    crash_point("spooled")
    crash_point("upload")  # another point: not counted
    assert configure("") == Faults("spooled", 3)
    assert _faults.current() is None
    with pytest.raises(fedagg.ConfigError):
        configure(3)  # type: ignore[arg-type]


def test_the_cli_refuses_a_bad_spec_from_the_environment_or_the_flag(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    config = str(tmp_path / "missing.toml")
    monkeypatch.setenv("FEDAGG_CRASH_AT", "nowhere:1")
    assert main(["client", config, "--key", "k.key"]) == 2
    err = capsys.readouterr().err
    assert "FEDAGG_CRASH_AT: unknown crash point 'nowhere'" in err and "client-upload" in err
    assert main(["server", config, "--crash-at", "fold:zero"]) == 2
    err = capsys.readouterr().err
    assert "--crash-at: malformed crash spec 'fold:zero'" in err and "checkpoint" in err
    assert _faults.current() is None
    # a good spec is configured before anything else (here, before the missing config fails)
    monkeypatch.setenv("FEDAGG_CRASH_AT", "fold:2")
    assert main(["client", config, "--key", "k.key", "--crash-at", "client-upload:7"]) == 2
    assert _faults.current() == Faults("client-upload", 7)  # the flag wins over the env
    monkeypatch.delenv("FEDAGG_CRASH_AT")
    assert main(["server", config]) == 2
    assert _faults.current() is None  # neither: off


def test_the_crash_at_flag_kills_a_server(tmp_path: Path) -> None:
    """``fedagg server --crash-at fold:2`` dies (SIGKILL) about to fold the 2nd arrival."""
    with federation(tmp_path, clients=2, rounds=1, tls=False) as fed:
        server = start_server(fed, args=("--crash-at", "fold:2"))
        clients = [start_client(fed, i) for i in range(2)]
        assert wait(server, 60) == -9, read_log(fed)
        for c in clients:
            kill(c)
        assert not (fed.state / "final.npz").exists()
