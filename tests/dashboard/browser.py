"""Shared by the browser tests and ``make screenshots``: headless Chromium (Debian's
``chromium`` and ``chromium-driver``) driven by selenium, ``fedagg simulate`` and ``fedagg
dashboard`` as real processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[2] / "src"
PY = sys.executable

#: a tiny, quick simulation (digits, a few rounds)
SIM = """name = "{name}"
seed = {seed}
rounds = {rounds}
[data]
name = "digits"
num_clients = 8
partition = "{partition}"
[policy]
clients_per_round = {per_round}
"""


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(SRC), e.get("PYTHONPATH", "")])
    e.update({"PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    return e


def browser_paths() -> tuple[str, str] | str:
    """(chromium, chromedriver), or why they cannot be used."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dashboard-test]')"
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if chromium is None or driver is None:
        return (
            "no chromium / chromedriver (apt-get install chromium chromium-driver; make test does)"
        )
    return chromium, driver


def make_driver(width: int = 1280, height: int = 900) -> Any:
    """Headless Chromium with the browser console log kept (``driver.get_log("browser")``)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = browser_paths()
    assert not isinstance(paths, str), paths
    opts = webdriver.ChromeOptions()
    opts.binary_location = paths[0]
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},{height}",
        "--disable-extensions",
        "--no-first-run",
        "--disable-background-networking",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(executable_path=paths[1]))


def simulate(
    cwd: Path,
    db: Path,
    name: str,
    *,
    seed: int = 0,
    rounds: int = 4,
    per_round: int = 4,
    partition: str = "iid",
) -> subprocess.Popen[str]:
    cfg = cwd / f"{name}.toml"
    cfg.write_text(
        SIM.format(name=name, seed=seed, rounds=rounds, per_round=per_round, partition=partition)
    )
    return subprocess.Popen(
        [PY, "-m", "fedagg.cli", "simulate", str(cfg), "--db", str(db), "--no-plots", "--quiet"],
        cwd=cwd,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@contextlib.contextmanager
def dashboard(db: Path, state: Path | None = None) -> Iterator[str]:
    """``fedagg dashboard`` on a free port as a real process; yields its URL."""
    args = ["--db", str(db), "--listen", "127.0.0.1:0"]
    if state is not None:
        args += ["--state", str(state)]
    p = subprocess.Popen(
        [PY, "-m", "fedagg.cli", "dashboard", *args],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        assert p.stdout is not None
        line = p.stdout.readline()  # "fedagg dashboard: http://127.0.0.1:PORT/ (read-only: ...)"
        assert "http://" in line, f"dashboard did not start: {line}{p.stdout.read()}"
        host = line.split("http://", 1)[1].split("/", 1)[0]
        yield f"http://{host}"
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
        if p.stdout is not None:
            p.stdout.close()


def wait_for(what: Callable[[], Any], timeout: float, message: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):
            got = what()
            if got:
                return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {message}")
        time.sleep(0.1)


def rendered(driver: Any, timeout: float = 10.0) -> str:
    """Wait until the page's script finished drawing; its render time in ms (or "error")."""
    return str(
        wait_for(
            lambda: driver.find_element("tag name", "body").get_attribute("data-rendered"),
            timeout,
            "the page did not render",
        )
    )


def console_errors(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
