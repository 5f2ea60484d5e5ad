"""``fedagg dashboard`` in a real browser: headless Chromium (Debian's ``chromium`` and
``chromium-driver``, installed by ``make test``) driven by selenium, against real processes:
``fedagg simulate`` into a temporary database, ``fedagg dashboard`` on a free port, and for the
live page a real deployment (``fedagg server`` and ``fedagg client``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fedagg.deploy import read_status
from tests.dashboard.browser import (
    browser_paths,
    console_errors,
    dashboard,
    make_driver,
    rendered,
    simulate,
    wait_for,
)
from tests.deploy import harness

_PATHS = browser_paths()
pytestmark = pytest.mark.skipif(isinstance(_PATHS, str), reason=str(_PATHS))


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    d = make_driver()
    try:
        yield d
    finally:
        d.quit()


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dash")
    db = root / "runs.db"
    procs = [
        simulate(root, db, "tiny-iid", seed=0),
        simulate(root, db, "tiny-dirichlet", seed=1, per_round=6, partition="dirichlet"),
    ]
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    return db


@pytest.fixture(scope="module")
def url(db: Path) -> Iterator[str]:
    with dashboard(db) as u:
        yield u


def names_listed(driver: Any) -> list[str]:
    rows = driver.find_elements("css selector", "table#runs tbody tr")
    return [r.find_elements("tag name", "td")[3].text for r in rows]


def test_runs_page_lists_the_simulated_runs(driver: Any, url: str) -> None:
    driver.get(url + "/")
    assert rendered(driver) != "error"
    assert sorted(names_listed(driver)) == ["tiny-dirichlet", "tiny-iid"]
    row = driver.find_elements("css selector", "table#runs tbody tr")[0]
    cells = [td.text for td in row.find_elements("tag name", "td")]
    assert cells[2] == "simulate" and cells[4] == "finished" and cells[5] == "4"
    assert cells[6].endswith("%")  # its final accuracy
    # the name filter narrows the table without a reload
    driver.execute_script("window.__same = 1")
    driver.find_element("css selector", "input[name=name]").send_keys("dirich")
    wait_for(lambda: names_listed(driver) == ["tiny-dirichlet"], 5, "the filter did not apply")
    assert driver.execute_script("return window.__same") == 1
    assert "name=dirich" in driver.current_url
    assert console_errors(driver) == []


def test_run_page_draws_its_charts(driver: Any, url: str) -> None:
    driver.get_log("browser")  # start from an empty console log
    driver.get(url + "/runs/1")
    assert rendered(driver) != "error"
    title = driver.find_element("tag name", "h1").text  # the two ran at once: either is 1
    assert title.startswith("run 1: tiny-") and title.endswith("finished"), title
    points: dict[str, int] = {}
    for box in driver.find_elements("css selector", "div.chart[data-chart]"):
        paths = box.find_elements("css selector", "svg path.series")
        points[box.get_attribute("data-chart")] = max(
            (int(p.get_attribute("data-points")) for p in paths), default=0
        )
        for p in paths:
            d = p.get_attribute("d")  # "M x,y L x,y ...": a command a point
            assert d.count("M") + d.count("L") == int(p.get_attribute("data-points"))
    # 4 rounds: a point a round in accuracy and loss against round and virtual time,
    # participation and bytes
    for chart in (
        "accuracy-round",
        "loss-round",
        "accuracy-time",
        "loss-time",
        "participation",
        "bytes",
    ):
        assert points.get(chart, 0) == 4, points
    assert '"rounds": 4' in driver.find_element("id", "config").text
    assert console_errors(driver) == []


def test_compare_page_shows_both_runs(driver: Any, url: str) -> None:
    driver.get(url + "/compare?ids=1,2")
    assert rendered(driver) != "error"
    text = driver.find_element("id", "compared").text
    assert "tiny-iid" in text and "tiny-dirichlet" in text
    lines = driver.find_elements(
        "css selector", "div[data-chart=compare-accuracy-round] svg path.series"
    )
    assert len(lines) == 2
    diff = driver.find_element("id", "diff").text
    for key in ("name", "seed", "policy.clients_per_round", "data.partition"):
        assert key in diff
    assert console_errors(driver) == []


def test_live_page_follows_a_real_deployment(driver: Any, db: Path, tmp_path: Path) -> None:
    with (
        harness.federation(
            tmp_path / "fed", clients=2, rounds=3, tls=False, deploy={"wait_for": 2}
        ) as fed,
        dashboard(db, fed.state) as url,
    ):
        driver.get(url + "/live")
        assert rendered(driver) != "error"
        driver.execute_script("window.__same = 1")
        text = lambda i: driver.find_element("id", "live-" + i).text  # noqa: E731
        note = driver.find_element("id", "live-note")
        wait_for(lambda: "not a directory" in note.text, 5, "no note before the server started")
        server = harness.start_server(fed)
        harness.wait_listening(fed, server)
        wait_for(
            lambda: text("server") == "running" and text("connected") == "0 of 2",
            10,
            "the page did not see the server start with no client",
        )
        lags = []

        def within_2s(state: Callable[[dict[str, Any]], bool], page: str, what: str) -> None:
            """Once the state directory says so, the page shows it within 2 s."""
            wait_for(lambda: state(read_status(fed.state)), 60, what + harness.read_log(fed))
            t0 = time.monotonic()
            wait_for(lambda: page == text(what), 2.0, f"the page lagged over 2 s on {what}")
            lags.append(time.monotonic() - t0)

        # one client: connected, waiting for the second (deploy.wait_for = 2)
        clients = [harness.start_client(fed, 0)]
        within_2s(lambda s: s["clients"]["connected"] == 1, "1 of 2", "connected")
        assert text("rounds-closed") == "0"
        clients.append(harness.start_client(fed, 1))
        within_2s(lambda s: s["rounds_closed"] == 3, "3", "rounds-closed")
        for p in [server, *clients]:
            harness.wait(p, 60)
        assert driver.execute_script("return window.__same") == 1  # no reload
        assert int(driver.find_element("tag name", "body").get_attribute("data-polls")) >= 3
        paths = driver.find_elements("css selector", "div[data-chart=live-folded] path.series")
        assert paths and int(paths[0].get_attribute("data-points")) >= 2
        assert console_errors(driver) == []
        print(f"live page lag after the state changed: {', '.join(f'{x:.2f}s' for x in lags)}")
