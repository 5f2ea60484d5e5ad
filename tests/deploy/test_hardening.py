"""Deployment hardening (issue 14, findings 10, 11, 12, 14): file modes, the --insecure rule,
the CA key's place, an unreadable state.db, and refusals that do not tell registered names
from unregistered ones. CLI subprocesses and real servers on loopback."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
from pathlib import Path

import pytest

from fedagg.deploy import ClientKey, Keyring, make_certs, make_keys
from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._auth import AuthError
from tests.deploy.harness import (
    PY,
    federation,
    read_log,
    run_all,
    start_server,
    wait,
)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _cli(
    *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "fedagg.cli", *args], capture_output=True, text=True, timeout=timeout,
        cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


# -- finding 14: file modes ----------------------------------------------------------------------
def test_keys_rewritten_over_a_world_readable_file_are_0600(tmp_path: Path) -> None:
    d = tmp_path / "keys"
    assert _cli("keys", str(d), "--name", "alice").returncode == 0
    key = d / "alice.key"
    os.chmod(key, 0o644)  # e.g. copied around, or made by an older version
    r = _cli("keys", str(d), "--name", "alice")
    assert r.returncode == 0, r.stderr
    assert _mode(key) == 0o600


def test_certs_rewritten_over_world_readable_keys_are_0600(tmp_path: Path) -> None:
    paths = make_certs(tmp_path / "certs")
    os.chmod(paths["key"], 0o644)
    os.chmod(paths["ca_key"], 0o644)
    paths = make_certs(tmp_path / "certs")
    assert _mode(paths["key"]) == 0o600
    assert _mode(paths["ca_key"]) == 0o600


def test_certs_keep_the_ca_key_out_of_the_servers_directory(tmp_path: Path) -> None:
    r = _cli("certs", str(tmp_path / "certs"))
    assert r.returncode == 0, r.stderr
    served = tmp_path / "certs"
    assert sorted(p.name for p in served.iterdir()) == ["ca.pem", "server.key", "server.pem"]
    assert (tmp_path / "certs-ca" / "ca.key").exists()  # the documented default: DIR-ca/
    assert _mode(tmp_path / "certs-ca") == 0o700
    assert _mode(tmp_path / "certs-ca" / "ca.key") == 0o600
    assert "certs-ca/ca.key" in r.stdout
    # --ca-dir puts it elsewhere, never inside the served directory
    r = _cli("certs", str(tmp_path / "c2"), "--ca-dir", str(tmp_path / "offline"))
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "offline" / "ca.key").exists() and not (tmp_path / "c2" / "ca.key").exists()
    r = _cli("certs", str(tmp_path / "c3"), "--ca-dir", str(tmp_path / "c3" / "ca"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "outside" in r.stderr


def test_state_directory_and_files_are_private(tmp_path: Path) -> None:
    with federation(tmp_path, clients=2, rounds=1, tls=False) as fed:
        fed.state.mkdir(mode=0o755)
        os.chmod(fed.state, 0o755)
        old = fed.state / "checkpoint-stale.tmp"  # an existing file from an older version
        old.write_bytes(b"x")
        os.chmod(old, 0o644)
        run_all(fed, timeout=120)
        assert _mode(fed.state) == 0o700
        files = [p for p in fed.state.rglob("*") if p.is_file()]
        names = {p.name for p in files}
        assert {"state.db", "final.npz"} <= names, names
        assert any(n.startswith("checkpoint-") and n.endswith(".npz") for n in names), names
        assert {p.name: _mode(p) for p in files} == {p.name: 0o600 for p in files}
        assert _mode(fed.state / "spool") == 0o700


# -- finding 12: --insecure with certificates configured ---------------------------------------
def test_insecure_server_with_certificates_is_refused(tmp_path: Path) -> None:
    with federation(tmp_path, clients=2, rounds=1) as fed:  # TLS: certs/ exists
        server = start_server(fed, args=("--insecure",))
        rc = wait(server, 60)
        log = read_log(fed)
        assert rc == 2, log
        assert "Traceback" not in log and "listening" not in log
        assert "--insecure" in log and "server.pem" in log, log


def test_insecure_client_with_certificates_is_refused(tmp_path: Path) -> None:
    with federation(tmp_path, clients=2, rounds=1) as fed:
        r = _cli("client", str(fed.config), "--key", str(fed.key(0)), "--insecure",
                 "--retry-for", "1")  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr
        assert "--insecure" in r.stderr and "ca.pem" in r.stderr, r.stderr


def test_insecure_edge_with_certificates_is_refused(tmp_path: Path) -> None:
    with federation(tmp_path, clients=2, rounds=1) as fed:
        make_keys(tmp_path / "edgekeys", ["edge-a"])
        r = _cli("server", str(fed.config), "--insecure", "--parent", "127.0.0.1:1",
                 "--edge-key", str(tmp_path / "edgekeys" / "edge-a.key"),
                 "--state", str(tmp_path / "edge-state"))  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr and "--insecure" in r.stderr, r.stderr


# -- finding 10: an unreadable state.db ----------------------------------------------------------
@pytest.mark.parametrize("damage", ["garbage", "truncated-with-checkpoints", "a-directory"])
def test_an_unreadable_state_db_is_a_clear_error(tmp_path: Path, damage: str) -> None:
    with federation(tmp_path, clients=2, rounds=1, tls=False) as fed:
        run_all(fed, timeout=120)
        db = fed.state / "state.db"
        for side in ("state.db-wal", "state.db-shm"):
            (fed.state / side).unlink(missing_ok=True)
        if damage == "garbage":
            db.write_bytes(b"this is not a database, just some bytes " * 200)
        elif damage == "truncated-with-checkpoints":
            db.write_bytes(b"")  # the event log is gone; the checkpoints are still there
        else:  # not a file at all (works as root too, who reads any file whatever its mode)
            db.unlink()
            db.mkdir()
        before = sorted(p.name for p in fed.state.iterdir())
        server = start_server(fed, log="again.log")
        rc = wait(server, 60)
        log = read_log(fed, "again.log")
        assert rc == 3, log
        assert "Traceback" not in log and "listening" not in log, log
        assert str(db) in log, log
        assert "backup" in log  # the recovery hint
        assert sorted(p.name for p in fed.state.iterdir()) == before  # nothing started afresh
        if damage != "a-directory":
            assert db.read_bytes()[:16] != b"SQLite format 3\0"


# -- finding 11: unknown names and bad signatures look alike to the peer --------------------------
def test_unknown_name_and_bad_signature_are_indistinguishable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_keys(tmp_path / "k", ["alice", "bob"])
    ring = Keyring.load(tmp_path / "k" / "authorized_keys")
    alice = ClientKey.load(tmp_path / "k" / "alice.key")
    content = b"{}"
    forged = pb.Auth(**ClientKey("alice", ClientKey.load(tmp_path / "k" / "bob.key").private)
                     .sign("Hello", content))  # fmt: skip
    unknown = pb.Auth(**ClientKey("mallory", alice.private).sign("Hello", content))
    caplog.set_level(logging.INFO, logger="fedagg.auth")
    with pytest.raises(AuthError) as a:
        ring.verify("Hello", forged, content)
    with pytest.raises(AuthError) as b:
        ring.verify("Hello", unknown, content)
    assert a.value.reason == b.value.reason
    assert "alice" not in a.value.reason and "mallory" not in b.value.reason
    assert not a.value.denied and not b.value.denied
    # the server's own log tells them apart
    text = caplog.text
    assert "unknown name 'mallory'" in text and "bad signature for 'alice'" in text, text
