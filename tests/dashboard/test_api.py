"""The dashboard's routes and JSON endpoints, in memory and over a real socket: statuses
(bad run id: 404, bad query: 400), the data they return, and strict read-only access (the
database file byte-for-byte unchanged, no -wal / -shm / journal appears)."""

from __future__ import annotations

import hashlib
import json
import math
import sqlite3
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fedagg.cli import main
from fedagg.dashboard import MAX_COMPARE, Dashboard, make_server
from fedagg.runs import RunDB

STATIC = Path(__file__).resolve().parents[2] / "src" / "fedagg" / "dashboard" / "static"


def build_db(path: Path) -> None:
    with RunDB(path) as db:
        a = db.start_run("sync-a", seed=0, config={"rounds": 3, "policy": {"kind": "sync"}})
        for r in range(1, 4):
            db.add_round(
                a,
                {
                    "round": r,
                    "virtual_time": 2.0 * r,
                    "test_accuracy": 0.5 + r / 10,
                    "test_loss": 1.0 / r,
                    "folded": 4,
                    "dropped": r - 1,
                    "refused": 1 if r == 2 else 0,
                    "bytes_up": 1000,
                    "bytes_down": 2000,
                    "staleness_mean": math.nan,
                    "refusals": "non-finite values: 1" if r == 2 else None,
                },
            )
        db.finish_run(a, "finished", {"rounds": 3, "final_accuracy": 0.8})
        b = db.start_run(
            "fedbuff-b",
            seed=1,
            kind="deploy",
            config={"rounds": 2, "policy": {"kind": "fedbuff", "buffer": 5}},
        )
        db.add_round(
            b,
            {
                "round": 1,
                "virtual_time": 1.5,
                "test_accuracy": 0.6,
                "refusals": "dtype float64, expected float32: 2; norm 9.1 > 5: 1",
            },
        )


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "runs.db"
    build_db(path)
    assert siblings(path) == []  # closed: no -wal, no -shm
    return path


def get(app: Dashboard, url: str) -> tuple[int, Any]:
    path, _, query = url.partition("?")
    r = app.handle(path, query)
    return r.status, json.loads(r.body) if r.content_type == "application/json" else r.body


def test_runs_filters_and_final_accuracy(db: Path) -> None:
    app = Dashboard(db)
    status, data = get(app, "/api/runs")
    assert status == 200 and data["total"] == 2 and data["exists"]
    a, b = data["runs"]
    assert (a["id"], a["name"], a["kind"], a["status"], a["rounds"]) == (
        1,
        "sync-a",
        "simulate",
        "finished",
        3,
    )
    assert a["final_accuracy"] == 0.8  # the summary's
    assert (b["kind"], b["status"], b["rounds"], b["final_accuracy"]) == (
        "deploy",
        "running",
        1,
        0.6,
    )
    assert [r["id"] for r in get(app, "/api/runs?kind=deploy")[1]["runs"]] == [2]
    assert [r["id"] for r in get(app, "/api/runs?status=finished")[1]["runs"]] == [1]
    assert [r["id"] for r in get(app, "/api/runs?name=FEDBUFF")[1]["runs"]] == [2]
    assert get(app, "/api/runs?name=nothing-like-it")[1]["runs"] == []


def test_a_run_its_rounds_refusals_and_config(db: Path) -> None:
    app = Dashboard(db)
    status, run = get(app, "/api/runs/1")
    assert status == 200
    assert run["config"] == {"rounds": 3, "policy": {"kind": "sync"}}
    assert run["refusals"] == {"non-finite values": 1} and run["rounds"] == 3
    status, cols = get(app, "/api/runs/1/rounds")
    assert status == 200
    assert cols["round"] == [1, 2, 3] and cols["dropped"] == [0, 1, 2]
    assert cols["test_accuracy"] == pytest.approx([0.6, 0.7, 0.8])
    assert cols["staleness_mean"] == [None, None, None]  # NaN is stored as NULL: JSON null
    assert get(app, "/api/runs/2")[1]["refusals"] == {
        "dtype float64, expected float32": 2,
        "norm 9.1 > 5": 1,
    }


def test_compare_overlays_and_diffs_configs(db: Path) -> None:
    status, data = get(Dashboard(db), "/api/compare?ids=1,2")
    assert status == 200
    assert [r["id"] for r in data["runs"]] == [1, 2]
    assert data["runs"][0]["series"]["test_accuracy"] == pytest.approx([0.6, 0.7, 0.8])
    assert data["runs"][1]["best_accuracy"] == 0.6
    diff = {d["key"]: d["values"] for d in data["diff"]}
    assert diff == {
        "kind": ["simulate", "deploy"],
        "policy.buffer": [None, 5],
        "policy.kind": ["sync", "fedbuff"],
        "rounds": [3, 2],
    }


@pytest.mark.parametrize(
    "url",
    [
        "/api/runs/3",
        "/api/runs/99/rounds",
        "/api/compare?ids=1,7",
        "/api/nothing",
        "/runs/42",
        "/static/../../x.py",
        "/static/nope.js",
        "/elsewhere",
    ],
)
def test_unknown_runs_and_paths_are_404(db: Path, url: str) -> None:
    path, _, query = url.partition("?")
    r = Dashboard(db).handle(path, query)
    assert r.status == 404
    if path.startswith("/api/"):
        assert "error" in json.loads(r.body)


@pytest.mark.parametrize(
    "url",
    [
        "/api/runs?kind=train",
        "/api/runs?status=done",
        "/api/runs?color=red",
        "/api/runs?kind=a&kind=b",
        "/api/compare",
        "/api/compare?ids=",
        "/api/compare?ids=1,x",
        "/api/compare?ids=-1",
        f"/api/compare?ids={','.join(map(str, range(1, MAX_COMPARE + 2)))}",
        "/api/runs/1?x=1",
        "/api/live?verbose=1",
        "/?bogus=1",
        "/api/runs?%zz",
        "/api/runs?a=1&&b",
    ],
)
def test_bad_queries_are_400(db: Path, url: str) -> None:
    status, data = get(Dashboard(db), url)
    assert status == 400, data
    assert data["error"]


def test_live_without_or_before_a_state_dir(tmp_path: Path, db: Path) -> None:
    status, data = get(Dashboard(db), "/api/live")
    assert status == 200 and data["ok"] is False and "--state" in data["error"]
    status, data = get(Dashboard(db, tmp_path / "not-yet"), "/api/live")
    assert status == 200 and data["ok"] is False and "not a directory" in data["error"]
    assert not (tmp_path / "not-yet").exists()


def test_no_database_yet_and_not_a_run_database(tmp_path: Path) -> None:
    status, data = get(Dashboard(tmp_path / "none.db"), "/api/runs")
    assert status == 200 and data["runs"] == [] and data["exists"] is False
    assert not (tmp_path / "none.db").exists()
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE meta (k TEXT)")
    con.commit()
    con.close()
    before = digest(other)
    assert main(["dashboard", "--db", str(other), "--listen", "127.0.0.1:0"]) == 1
    assert main(["dashboard", "--db", str(other), "--listen", "nowhere"]) == 2
    assert digest(other) == before and siblings(other) == []


def test_pages_are_one_local_shell(db: Path) -> None:
    app = Dashboard(db)
    for path, page in [
        ("/", "runs"),
        ("/runs/1", "run"),
        ("/compare", "compare"),
        ("/live", "live"),
    ]:
        r = app.handle(path)
        assert r.status == 200 and r.content_type.startswith("text/html")
        assert f'data-page="{page}"'.encode() in r.body
    # nothing is loaded from elsewhere: every URL in the page, script and style is local
    for f in STATIC.iterdir():
        text = f.read_text()
        for bad in (
            'src="http',
            "src='http",
            'href="http',
            "url(http",
            "@import",
            "//cdn",
            'fetch("http',
            "integrity=",
        ):
            assert bad not in text, f"{f.name}: {bad}"


@pytest.fixture
def served(db: Path) -> Iterator[str]:
    server = make_server(Dashboard(db), "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        t.join(5)


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        with e:
            return e.code, dict(e.headers), e.read()


def test_over_http_and_the_database_is_untouched(db: Path, served: str) -> None:
    before = digest(db)
    for url, want in [
        ("/", 200),
        ("/runs/1", 200),
        ("/runs/9", 404),
        ("/compare?ids=1,2", 200),
        ("/live", 200),
        ("/static/dash.js", 200),
        ("/static/style.css", 200),
        ("/favicon.ico", 200),
        ("/api/runs", 200),
        ("/api/runs/1/rounds", 200),
        ("/api/runs/9", 404),
        ("/api/runs?kind=x", 400),
        ("/api/compare?ids=1,2", 200),
        ("/api/live", 200),
    ]:
        status, headers, body = fetch(served + url)
        assert status == want, (url, body[:200])
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        if url.startswith("/api/"):
            json.loads(body)
    req = urllib.request.Request(served + "/api/runs", method="POST", data=b"{}")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    e.value.close()
    assert e.value.code == 501  # nothing but GET and HEAD
    assert digest(db) == before
    assert siblings(db) == []  # no -wal, -shm or journal appeared


def test_a_foreign_host_header_is_refused(served: str) -> None:
    """DNS rebinding: a page on evil.example resolving to 127.0.0.1 cannot read the data."""
    for host, want in [("evil.example", 403), ("evil.example:8050", 403), ("localhost:1", 200),
                       (served.removeprefix("http://"), 200)]:  # fmt: skip
        req = urllib.request.Request(served + "/api/runs", headers={"Host": host})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                status = r.status
        except urllib.error.HTTPError as e:
            with e:
                status = e.code
        assert status == want, host


def test_a_database_being_written_is_read_as_it_grows(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    with RunDB(path) as w:
        rid = w.start_run("live", seed=0, config={})
        w.add_round(rid, {"round": 1, "test_accuracy": 0.5})
        assert (tmp_path / "runs.db-wal").exists()  # the writer's
        app = Dashboard(path)
        assert get(app, "/api/runs")[1]["runs"][0]["rounds"] == 1
        w.add_round(rid, {"round": 2, "test_accuracy": 0.6})
        assert get(app, f"/api/runs/{rid}/rounds")[1]["test_accuracy"] == [0.5, 0.6]
    assert siblings(path) == []
