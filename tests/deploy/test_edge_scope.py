"""Edges are scoped and cannot forge (issue 14, finding 7), against a real root process.

The root serves 4 clients (digits, logistic regression, one round, float64 accumulator) and
authorizes two edge keys: ``edge-a`` may serve clients 0 and 1, ``edge-b`` any client (``"*"``)
(``deploy.edge_clients``). Client 3 is connected directly. The test plays both edges over raw
gRPC (as :class:`~fedagg.deploy._edge.ParentLink` speaks) and checks that

1. a claim outside the edge's scope is refused, in words that do not say which names exist,
   and the edge gets no task of that client;
2. a claim of a client connected directly (or held by another live edge) is refused, and a
   client held by a live edge cannot connect directly;
3. a relayed update without its client's own signatures (signed by the edge key only), or with
   the client's weight or bytes altered, is refused, and nothing is logged;
4. a partial with a job the client never signed (or its weight or train_loss changed) is
   refused;
5. the honest forwards (a partial, a relay, with the clients' signatures) and the direct client
   are counted, once, and the round closes. (The real edge processes, in both modes and across
   an edge restart, are in tests/hierarchy/test_deploy_tree.py.)
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fedagg.core.spec import ParamSpec
from fedagg.deploy import ClientKey, make_keys
from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._auth import body, signing_bytes, upload_body
from tests.deploy.harness import Fed, federation, read_log, start_server, wait, wait_listening
from tests.hierarchy.test_edge_bad_input import (
    DENIED,
    UNAUTH,
    Job,
    Peer,
    TaskStream,
    delta,
    outcome,
    partial_header,
    partial_of,
    relay_header,
    uploads,
)

CLIENTS = 4
NAMES = [f"client-{i:03d}" for i in range(CLIENTS)]
SCOPES = {"edge-a": NAMES[:2], "edge-b": "*"}
FORGED = "an edge forwards only what its clients signed"


def origin(
    key: ClientKey, task: int, version: int, weight: float, nbytes: int,
    metrics: dict[str, float], digest: bytes, *, name: str | None = None,
) -> pb.Origin:  # fmt: skip
    """A client's signatures over one upload, as the client makes them; with ``name``, a
    forgery: ``key`` (an edge's) signing under the client's name."""
    who = name or key.name
    content = upload_body(task, version, weight, nbytes, metrics)
    ts, nonce = int(time.time() * 1000), bytes(range(16))
    sig = key.private.sign(signing_bytes("Push", who, ts, nonce, content))
    trailer = key.private.sign(signing_bytes("PushTrailer", who, ts, nonce, sig + digest))
    auth = pb.Auth(client=who, timestamp_ms=ts, nonce=nonce, signature=sig)
    return pb.Origin(auth=auth, sha256=digest, trailer_signature=trailer, metrics=metrics)


@dataclass
class Scenario:
    out: dict[str, tuple[str, str]] = field(default_factory=dict)
    tasks_a: list[pb.Task] = field(default_factory=list)
    tasks_b: list[pb.Task] = field(default_factory=list)
    after_forgeries: list[tuple[int, int]] = field(default_factory=list)
    spool_after_forgeries: list[str] = field(default_factory=list)
    final_uploads: list[tuple[int, int]] = field(default_factory=list)
    server_rc: int | None = None
    log: str = ""


def _scenario(fed: Fed, root: Path, sc: Scenario) -> None:
    out = sc.out
    server = start_server(fed)
    keys = {c: ClientKey.load(fed.key(c)) for c in range(CLIENTS)}
    ka = ClientKey.load(root / "edgekeys" / "edge-a.key")
    kb = ClientKey.load(root / "edgekeys" / "edge-b.key")
    wait_listening(fed, server)
    a, b = Peer(fed.address, ka), Peer(fed.address, kb)
    direct = Peer(fed.address, keys[3])
    t3 = TaskStream(direct)  # client 3, connected directly
    time.sleep(0.5)

    # 1. scope: a client outside it, and an index no client has, get the same words
    out["a_claims_out_of_scope"] = outcome(lambda: a.hello([0, 1, 2]))
    out["a_claims_out_of_range"] = outcome(lambda: a.hello([0, 1, 7]))
    ta = TaskStream(a)
    # 2. a client connected directly cannot be claimed, even by an edge that may serve any
    out["b_claims_direct_client"] = outcome(lambda: b.hello([2, 3]))
    spec = ParamSpec.from_dict(json.loads(a.hello([0, 1]).spec_json))
    ta.close()
    ta = TaskStream(a)  # the stream after the Hello carries the claimed clients
    time.sleep(0.5)
    out["b_claims_client_of_live_edge"] = outcome(lambda: b.hello([1, 2]))
    req = pb.HelloRequest(auth=Peer(fed.address, keys[0]).auth("Hello", body(protocol=1)),
                          protocol=1)  # fmt: skip
    out["routed_client_connects_directly"] = outcome(
        lambda: Peer(fed.address, keys[0]).unary("Hello", req.SerializeToString())
    )
    b.hello([2])
    tb = TaskStream(b)
    sc.tasks_a = ta.take(2, 60)
    sc.tasks_b = tb.take(1, 60)
    task3 = t3.take(1, 60)[0]
    job = {int(t.client): Job(int(t.client), int(t.task), 10.0 + c, 0.5)
           for c, t in enumerate(sorted([*sc.tasks_a, *sc.tasks_b, task3],
                                        key=lambda t: t.client))}  # fmt: skip
    sc.tasks_a += ta.poll(1.0)  # nothing more: not client 2's task
    out["a_pulls_task_of_client_2"] = outcome(lambda: a.pull(job[2].task, spec))

    # 3. relays of client 0 by edge-a that client 0 did not sign as they are
    d0 = delta(0, 0, spec).tobytes()
    sha0 = hashlib.sha256(d0).digest()
    m = {"train_loss": 0.5}
    j0 = job[0]

    def relay(origin_: pb.Origin | None, *, weight: float = j0.weight, data: bytes = d0,
              client: int = 0) -> tuple[str, str]:  # fmt: skip
        h = relay_header(Job(client, job[client].task, weight), 0, len(data))
        if origin_ is not None:
            h.origin.CopyFrom(origin_)
        else:
            h.origin.CopyFrom(pb.Origin(metrics=m))  # present, empty: no signature
        a.sign_header(h)
        return outcome(lambda: a.push(a.messages(h, data)))

    genuine0 = origin(keys[0], j0.task, 0, j0.weight, len(d0), m, sha0)
    out["relay_without_client_signature"] = relay(None)
    out["relay_signed_by_edge_key"] = relay(
        origin(ka, j0.task, 0, j0.weight, len(d0), m, sha0, name=NAMES[0])
    )
    out["relay_weight_changed"] = relay(genuine0, weight=j0.weight * 10)
    altered = bytearray(d0)
    altered[8] ^= 1
    out["relay_bytes_changed"] = relay(genuine0, data=bytes(altered))
    out["relay_signed_by_another_client"] = relay(
        origin(keys[1], j0.task, 0, j0.weight, len(d0), m, sha0)
    )

    # 4. partials of edge-a with jobs clients 0 and 1 did not sign as they are
    st, payload = partial_of([job[0], job[1]], 0, spec, 0)

    def partial(origins: dict[int, pb.Origin | None], *, weights: dict[int, float] | None = None,
                loss: float = 0.5) -> tuple[str, str]:  # fmt: skip
        jobs = [Job(c, job[c].task, (weights or {}).get(c, job[c].weight), loss) for c in (0, 1)]
        h = partial_header(0, jobs, st, len(payload))
        for pj in h.partial.jobs:
            o = origins.get(int(pj.client))
            pj.origin.CopyFrom(o if o is not None else pb.Origin(metrics=m))
        a.sign_header(h)
        return outcome(lambda: a.push(a.messages(h, payload)))

    def genuine(c: int, weight: float | None = None) -> pb.Origin:
        w = job[c].weight if weight is None else weight
        return origin(
            keys[c], job[c].task, 0, w, spec.nbytes, m, hashlib.sha256(b"%d" % c).digest()
        )

    forged1 = origin(ka, job[1].task, 0, job[1].weight, spec.nbytes, m,
                     hashlib.sha256(b"x").digest(), name=NAMES[1])  # fmt: skip
    out["partial_job_never_uploaded"] = partial({0: genuine(0), 1: forged1})
    out["partial_job_without_signature"] = partial({0: genuine(0), 1: None})
    out["partial_weight_changed"] = partial(
        {0: genuine(0), 1: genuine(1)}, weights={1: job[1].weight * 2}
    )
    out["partial_train_loss_changed"] = partial({0: genuine(0), 1: genuine(1)}, loss=0.25)
    sc.after_forgeries = uploads(fed)
    sc.spool_after_forgeries = sorted(p.name for p in (fed.state / "spool").iterdir())

    # 5. the honest forwards and the direct client: counted once, the round closes
    out["honest_partial"] = partial({0: genuine(0), 1: genuine(1)})
    d2 = delta(2, 0, spec).tobytes()
    h = relay_header(job[2], 0, len(d2))
    h.origin.CopyFrom(origin(keys[2], job[2].task, 0, job[2].weight, len(d2),
                             dict(h.metrics), hashlib.sha256(d2).digest()))  # fmt: skip
    b.sign_header(h)
    out["honest_relay"] = outcome(lambda: b.push(b.messages(h, d2)))
    d3 = delta(3, 0, spec).tobytes()
    h = pb.UploadHeader(task=job[3].task, version=0, weight=job[3].weight, nbytes=len(d3))
    direct.sign_header(h, edge=False)
    out["direct_upload"] = outcome(lambda: direct.push(direct.messages(h, d3)))
    sc.server_rc = wait(server, 60)
    sc.final_uploads = uploads(fed)
    sc.log = read_log(fed)
    for s in (ta, tb, t3):
        s.close()
    for p in (a, b, direct):
        p.channel.close()


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Scenario:
    root = tmp_path_factory.mktemp("edge-scope")
    edges = make_keys(root / "edgekeys", sorted(SCOPES))
    sc = Scenario()
    with federation(root, clients=CLIENTS, rounds=1, tls=False,
                    extra={"strategy": {"accumulator": "float64"}},
                    deploy={"edges": str(edges), "client_timeout": 60.0,
                            "edge_clients": SCOPES}) as fed:  # fmt: skip
        _scenario(fed, root, sc)
    return sc


def _code(sc: Scenario, case: str) -> str:
    return sc.out[case][0]


def test_a_claim_outside_the_edges_scope_is_refused_without_naming_names(
    scenario: Scenario,
) -> None:
    scope, rng = scenario.out["a_claims_out_of_scope"], scenario.out["a_claims_out_of_range"]
    assert scope[0] == DENIED, scope
    assert "edge 'edge-a' may not serve clients [2] here" in scope[1], scope
    # an index of a registered client outside the scope, and one of no client: the same words
    assert scope[1].replace("[2]", "[7]") == rng[1], (scope, rng)
    assert rng[0] == DENIED, rng


def test_an_edge_gets_no_task_of_a_client_it_may_not_serve(scenario: Scenario) -> None:
    assert sorted(int(t.client) for t in scenario.tasks_a) == [0, 1], scenario.tasks_a
    assert [int(t.client) for t in scenario.tasks_b] == [2], scenario.tasks_b
    assert _code(scenario, "a_pulls_task_of_client_2") == DENIED


def test_a_client_connected_directly_or_held_by_a_live_edge_cannot_be_claimed(
    scenario: Scenario,
) -> None:
    got = scenario.out["b_claims_direct_client"]
    assert got[0] == DENIED and "[3]" in got[1] and "connected directly" in got[1], got
    got = scenario.out["b_claims_client_of_live_edge"]
    assert got[0] == DENIED and "[1]" in got[1], got


def test_a_client_held_by_a_live_edge_cannot_connect_directly(scenario: Scenario) -> None:
    got = scenario.out["routed_client_connects_directly"]
    assert got[0] == DENIED and "served through an edge aggregator" in got[1], got


@pytest.mark.parametrize(
    "case",
    [
        "relay_without_client_signature",
        "relay_signed_by_edge_key",
        "relay_weight_changed",
        "relay_bytes_changed",
        "relay_signed_by_another_client",
    ],
)
def test_a_relay_its_client_did_not_sign_is_refused(scenario: Scenario, case: str) -> None:
    got = scenario.out[case]
    assert got[0] == UNAUTH, got
    if case == "relay_bytes_changed":
        assert "the bytes are not those its client signed" in got[1], got
    else:
        assert FORGED in got[1], got


@pytest.mark.parametrize(
    "case",
    [
        "partial_job_never_uploaded",
        "partial_job_without_signature",
        "partial_weight_changed",
        "partial_train_loss_changed",
    ],
)
def test_a_partial_with_a_job_its_client_did_not_sign_is_refused(
    scenario: Scenario, case: str
) -> None:
    got = scenario.out[case]
    assert got[0] == UNAUTH, got
    # job 0's signatures are genuine (but its train_loss in the last case); job 1 is the forgery
    who = "client 0" if case == "partial_train_loss_changed" else "client 1"
    assert f"of {who}:" in got[1], got


def test_forgeries_leave_nothing_behind(scenario: Scenario) -> None:
    assert scenario.after_forgeries == []
    assert scenario.spool_after_forgeries == []


def test_the_honest_forwards_and_the_direct_client_are_counted_once(scenario: Scenario) -> None:
    for case in ("honest_partial", "honest_relay", "direct_upload"):
        assert scenario.out[case][0] == "OK", (case, scenario.out[case])
        assert "duplicate: true" not in scenario.out[case][1]
    assert scenario.server_rc == 0, scenario.log
    assert sorted(c for c, _ in scenario.final_uploads) == [0, 1, 2, 3]
    assert "Traceback" not in scenario.log


# -- the configuration ---------------------------------------------------------------------------
def test_edge_clients_config_and_flag(tmp_path: Path) -> None:
    """``deploy.edge_clients`` (or ``--edge-clients``) names each edge's clients, or "*"; an
    unknown edge or client is a config error, and an edge not listed may serve none."""
    import argparse

    from fedagg.cli._deploy import _configure_server, _tier_overrides
    from fedagg.config import resolve_config
    from fedagg.deploy import Keyring
    from fedagg.deploy._app import edge_scopes
    from fedagg.errors import ConfigError

    clients = Keyring.load(make_keys(tmp_path / "keys", NAMES))
    edges = Keyring.load(make_keys(tmp_path / "edgekeys", ["edge-a", "edge-b", "edge-c"]))

    def scopes(table: dict[str, object]) -> dict[str, set[int]]:
        d = resolve_config({"deploy": {"edge_clients": table}})["deploy"]
        return edge_scopes(d, clients, edges)

    assert scopes({"edge-a": NAMES[:2], "edge-b": "*"}) == {
        "edge-a": {0, 1},
        "edge-b": {0, 1, 2, 3},
    }
    assert scopes({}) == {}  # no edge may serve any client
    for bad in ({"edge-z": NAMES[:1]}, {"edge-a": ["client-999"]}, {"edge-a": "client-000"}):
        with pytest.raises(ConfigError):
            scopes(bad)
    with pytest.raises(ConfigError):
        edge_scopes(resolve_config({"deploy": {"edge_clients": {"edge-a": []}}})["deploy"],
                    clients, None)  # fmt: skip

    p = argparse.ArgumentParser()
    _configure_server(p)
    args = p.parse_args(["fed.toml", "--edge-clients", "edge-a=client-000, client-001",
                         "--edge-clients", "edge-b=*"])  # fmt: skip
    assert _tier_overrides(args)["edge_clients"] == {"edge-a": NAMES[:2], "edge-b": "*"}


# -- real edge processes -------------------------------------------------------------------------
def test_relaying_edges_forward_their_clients_signatures_across_a_restart(tmp_path: Path) -> None:
    """Real edges in relay mode under a scoped root (``deploy.edge_clients`` from the tree's
    shape): edge-a is SIGKILLed right after logging its first client upload and restarted; the
    relays it re-sends after the restart carry the client signatures it kept in its state
    database, the root accepts every update once, and the federation finishes. (Aggregate
    mode, three levels and the same crash: tests/hierarchy/test_deploy_tree.py.)"""
    import sqlite3
    import subprocess

    from tests.hierarchy.tree_harness import (
        finish,
        node_log,
        start_node,
        start_tree_client,
        tree_context,
        wait_node,
    )

    with tree_context(tmp_path / "tree", parents={"edge-a": "root", "edge-b": "root"},
                      serves={"edge-a": [0, 1], "edge-b": [2, 3]}, clients=CLIENTS, rounds=2,
                      deploy={"client_timeout": 60.0},
                      edge_deploy={"edge_mode": "relay"}) as tree:  # fmt: skip
        assert tree.fed.cfg["deploy"]["edge_clients"] == {"edge-a": NAMES[:2], "edge-b": NAMES[2:]}
        r = start_node(tree, "root")
        wait_node(tree, "root", r)
        a = start_node(tree, "edge-a", env={"FEDAGG_CRASH_AT": "edge-logged:1"})
        b = start_node(tree, "edge-b")
        clients = [start_tree_client(tree, i) for i in range(CLIENTS)]
        assert subprocess.Popen.wait(a, 120) == -9, node_log(tree, "edge-a")
        again = start_node(tree, "edge-a")
        finish(tree, r, [again, b, *clients])
        with sqlite3.connect(tree.fed.state / "state.db") as con:
            uploads_ = con.execute("SELECT count(*) FROM uploads").fetchone()[0]
            kinds = {k for (k,) in con.execute("SELECT DISTINCT kind FROM events")}
        logs = {n: node_log(tree, n) for n in ("root", "edge-a", "edge-b")}
    assert uploads_ == 2 * CLIENTS  # every update accepted once
    assert "partial" not in kinds  # relayed
    assert re.search(r"[1-9]\d* events replayed", logs["edge-a"]), logs["edge-a"]
    assert "parent refused" not in logs["edge-a"] + logs["edge-b"]
    assert FORGED not in logs["root"] and "refused:" not in logs["root"], logs["root"]
