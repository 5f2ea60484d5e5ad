"""Progress a deployment shows, with real processes on loopback: the server's lines (clients
connecting, waiting for k of n, rounds started and closed, a resume after SIGKILL), the
client's (connection, tasks, uploads, retries), ``--log-json`` and ``--quiet``, and a
TLS/insecure mismatch named in a few seconds instead of "Socket closed" after retries."""

from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.deploy.harness import (
    Fed,
    federation,
    read_log,
    start_client,
    start_server,
    wait,
    wait_after_server,
    wait_listening,
    write_toml,
)

STAMP = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (INFO|WARNING) fedagg\.(server|client): "


def _wait_for_line(fed: Fed, log: str, pattern: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = read_log(fed, log)
        if re.search(pattern, text, re.M):
            return text
        time.sleep(0.1)
    raise AssertionError(f"no {pattern!r} in {log} after {timeout}s:\n{read_log(fed, log)}")


def test_server_and_client_lines_and_the_resume_after_a_kill(tmp_path: Path) -> None:
    with federation(tmp_path, clients=2, rounds=2, tls=True) as fed:
        # the server dies (SIGKILL) on the 3rd fold: the 1st update of round 2
        server = start_server(fed, args=("--crash-at", "fold:3"))
        wait_listening(fed, server)
        _wait_for_line(fed, "server.log", r"waiting for 2 of 2 clients before the first round "
                       r"\(deploy.wait_for = 0: all registered keys\): 0 connected")  # fmt: skip
        # (a client that misses "finished" at the restarted server's quick end gives up soon)
        retry = ("--retry-for", "20")
        c0 = start_client(fed, 0, args=retry)
        _wait_for_line(fed, "server.log", r"client client-000 connected \(1 of 2 clients")
        # still waiting, and said so again (every few seconds), now with one connected
        _wait_for_line(fed, "server.log", r"waiting for 2 of 2 clients .*: 1 connected", 15)
        c1 = start_client(fed, 1, args=retry)
        wait(server, 60)  # killed at the fold
        log = read_log(fed)
        assert re.search(r"starting the first round: 2 of 2 clients connected", log), log
        assert re.search(r"round 1 started: model version 0, 2 clients dispatched", log), log
        assert re.search(r"round 1 closed in [\d.]+s: 2 folded, 0 dropped, 0 refused, 0 late; "
                         r"model version 1", log), log  # fmt: skip
        assert re.search(r"round 2 started: model version 1, 2 clients dispatched", log), log
        assert re.search(STAMP + "new federation in ", log, re.M), log
        again = start_server(fed, log="again.log")
        assert wait(again, 90) == 0, read_log(fed, "again.log")
        # (one that missed "finished" is stopped at its first retry of the server that is gone)
        wait_after_server(fed, 0, c0, 60)
        wait_after_server(fed, 1, c1, 60)
        log2 = read_log(fed, "again.log")
        # killed at the 1st fold of round 2: the 2nd update of round 2 may have been logged
        # before the kill too (one batch), and then the replay alone finishes the federation
        m = re.search(r"resumed at (round 2|the end \(finished\)) from checkpoint (\d+) \(model "
                      r"version 1\), replayed (\d+) events", log2)  # fmt: skip
        assert m and int(m[3]) >= 1, log2
        assert "waiting for" not in log2  # a resumed federation has started already
        if m[1] == "round 2":
            assert re.search(r"round 2 closed in [\d.]+s: 2 folded", log2), log2
            assert re.search(r"finished: model version 2 after 2 rounds", log2), log2
        else:
            assert re.search(r"replayed \d+ events; model version 2, 0 tasks open", log2), log2
        for i in range(2):
            # the whole log: read_log's tail misses the first lines of a client that retried
            # for long after missing the restarted server's quick end
            cl = (fed.dir / f"client-{i}.log").read_text(errors="replace")
            assert re.search(STAMP + r"connected to 127\.0\.0\.1:\d+ \(TLS\) as client-00"
                             rf"{i}: client {i}", cl, re.M), cl[-4000:]  # fmt: skip
            assert re.search(r"task \d+: train from model version 0, 1 epoch\b", cl), cl[-4000:]
            assert re.search(r"task \d+: trained in [\d.]+s, uploaded 2600 bytes in [\d.]+s", cl)
        # the restart: each client retried (the call, the error, the backoff delay)
        both = read_log(fed, "client-0.log") + read_log(fed, "client-1.log")
        assert "the federation finished: 2 tasks" in both, both
        assert re.search(r"WARNING fedagg\.client: \w+: UNAVAILABLE: .+; retry \d+ in [\d.]+s",
                         both), both  # fmt: skip


def test_log_json_and_quiet(tmp_path: Path) -> None:
    with federation(tmp_path, clients=2, rounds=2, tls=False) as fed:
        server = start_server(fed, args=("--log-json",))
        wait_listening(fed, server)
        c0 = start_client(fed, 0, args=("--log-json",))
        c1 = start_client(fed, 1, args=("--quiet",))
        assert wait(server, 60) == 0, read_log(fed)
        assert wait(c0, 30) == 0 and wait(c1, 30) == 0
        records = []
        for line in (fed.dir / "server.log").read_text().splitlines():
            if line.startswith("fedagg server: "):  # the result lines on stdout
                continue
            records.append(json.loads(line))  # every log line is one JSON object
        for r in records:
            assert {"time", "level", "logger", "message"} <= r.keys(), r
            assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", r["time"]), r
        by = {}
        for r in records:
            by.setdefault(r.get("event"), []).append(r)
        closed = by["round_closed"]
        assert [(r["round"], r["version"], r["folded"], r["refused"]) for r in closed] == [
            (1, 1, 2, 0),
            (2, 2, 2, 0),
        ], closed
        assert closed[0]["refusals"] == {} and closed[0]["logger"] == "fedagg.server"
        assert {r["client"] for r in by["connected"]} == {"client-000", "client-001"}
        assert by["waiting"][0]["need"] == 2 and by["waiting"][0]["wait_for"] == 0
        assert by["finished"][0]["version"] == 2
        client = [json.loads(x) for x in read_log(fed, "client-0.log").splitlines()[:-1]]
        assert {"connected", "task", "uploaded", "finished"} <= {r.get("event") for r in client}
        up = next(r for r in client if r.get("event") == "uploaded")
        assert up["bytes"] == 2600 and up["upload_s"] >= 0 and up["train_s"] >= 0, up
        assert read_log(fed, "client-1.log") == ""  # --quiet: no INFO lines, no result line


def test_a_tls_mismatch_is_named_both_ways(tmp_path: Path) -> None:
    with (
        federation(tmp_path / "tls", clients=1, rounds=1, tls=True) as tls,
        federation(tmp_path / "plain", clients=1, rounds=1, tls=False) as plain,
    ):
        s1, s2 = start_server(tls), start_server(plain)
        wait_listening(tls, s1)
        wait_listening(plain, s2)
        # an insecure client (no certificates) against the TLS server
        cfg = {**tls.cfg, "deploy": {**tls.cfg["deploy"], "certs": "", "insecure": True}}
        write_toml(tls.dir / "insecure.toml", cfg)
        # a TLS client (a CA of its own) against the insecure server
        from fedagg.deploy import make_certs

        make_certs(plain.dir / "client-certs")
        cfg = {**plain.cfg, "deploy": {**plain.cfg["deploy"], "insecure": False,
                                       "certs": str(plain.dir / "client-certs")}}  # fmt: skip
        write_toml(plain.dir / "tls.toml", cfg)
        cases = [(tls, "insecure.toml", "speaks TLS but this client is --insecure: drop "
                  "--insecure"), (plain, "tls.toml", "does not speak TLS (it runs --insecure) "
                  "but this client uses TLS")]  # fmt: skip
        for fed, config, says in cases:
            t0 = time.monotonic()
            fed.config = fed.dir / config
            c = start_client(fed, 0, args=("--retry-for", "60"))
            rc = wait(c, 30)
            took = time.monotonic() - t0
            out = read_log(fed, "client-0.log")
            assert rc == 1, out
            assert f"fedagg client: error: UNAVAILABLE: the server at {fed.address} " in out, out
            assert says.replace(" (deploy.insecure)", "") in out.replace(" (deploy.insecure)", "")
            assert "Socket closed" not in out and took < 15, (took, out)


def test_a_round_close_names_its_refusal_reasons(caplog: pytest.LogCaptureFixture) -> None:
    """The policy's refusal reasons (``RoundStats.refusals``) in the line, in its JSON fields
    and in status.json's totals (counted once, also when the round is replayed)."""
    from fedagg.deploy import JsonFormatter
    from fedagg.deploy._progress import Progress

    svc = SimpleNamespace(serves=None, engine=SimpleNamespace(store=None, finished=False))
    p = Progress(svc)  # type: ignore[arg-type]
    stats = SimpleNamespace(round=0, version=0, applied=True, folded=3, dropped=1, refused=2,
                            late=0, started=10.0, ended=11.5,
                            refusals=(("dtype float64, expected float32", 2),))  # fmt: skip
    caplog.set_level(logging.INFO, logger="fedagg.server")
    p._closed(stats)  # type: ignore[arg-type]
    p.closed_at_open = 1
    p._closed(stats)  # type: ignore[arg-type]  # replayed after a restart: not again
    (rec,) = [r for r in caplog.records if r.levelno == logging.INFO]
    assert rec.getMessage() == (
        "round 1 closed in 1.50s: 3 folded, 1 dropped, 2 refused (dtype float64, expected "
        "float32: 2), 0 late; model version 1"
    )
    line = json.loads(JsonFormatter().format(rec))
    assert line["refusals"] == {"dtype float64, expected float32": 2}
    assert (line["round"], line["version"], line["refused"]) == (1, 1, 2)
    assert p.policy_refused == {"dtype float64, expected float32": 2}
