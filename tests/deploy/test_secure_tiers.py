"""Secure aggregation (SecAgg+) through three tiers of real processes on loopback:
root <- mid <- leaf <- clients, with clients at every tier.

Clients 0 and 1 are behind the leaf edge, whose parent is the intermediate edge ``mid``;
clients 2 and 3 connect to ``mid`` directly, 4 and 5 to the root. ``mid`` merges the leaf's
masked partial and its own clients' masked uploads with wrap-around uint32 adds and forwards
one masked partial to the root, which alone unmasks; stage requests go down through both
edges and replies up through both (each tier checking the client's own signature). The model
is compared with the plaintext weighted mean of the accepted jobs (the helpers of
``tests/deploy/test_secure.py``), and no state directory holds a plaintext update.
"""

from __future__ import annotations

import re
from pathlib import Path

from tests.deploy.harness import read_log, start_client, wait, write_toml
from tests.deploy.test_secure import _check_model, _crash, _no_plaintext, _rounds, _secure_kw
from tests.hierarchy.tree_harness import finish, start_node, tree_context, wait_node

N = 6
PARENTS = {"mid": "root", "leaf": "mid"}
SERVES = {"mid": [0, 1, 2, 3], "leaf": [0, 1]}


def test_an_intermediate_edge_merges_masked_partials_and_resumes_after_a_sigkill(
    tmp_path: Path,
) -> None:
    """Three rounds of the 6 clients.

    * Round 1: ``mid`` is SIGKILLed right after it added its 2nd masked input (a direct
      client's upload, or the leaf's masked partial) into its masked partial, before it
      forwarded anything, and restarted. The designed behaviour is a resume, not dropouts:
      what ``mid`` logged (and maybe acknowledged) is replayed from its log and forwarded,
      each logged input alone (so that the root could tell one it had already taken as a
      duplicate); the clients and the leaf retry what was not acknowledged (a retry of a
      logged upload is a duplicate); the leaf says hello again to the restarted ``mid`` (which
      forgot its routes); the root re-pushes its open stage requests when ``mid`` is back. All
      6 masked inputs count once: one counted twice, or lost, would leave masks in the sum and
      miss the plaintext mean by far more than the quantisation bound.
    * Round 2: ``mid`` forwards ONE masked partial, the leaf's (2 jobs) merged with its two
      direct clients' uploads (4 jobs).
    * Round 3: client 1, two tiers down, dies after advertising its keys: the round applies
      the 5 survivors' exact weighted mean; ``mid`` forwards one masked partial of 3 jobs.
    """
    kw = _secure_kw(tmp_path, N, 3, 10.0, {"wait_for": N})  # client_timeout: mid's restart
    kw["extra"]["secure_aggregation"]["stage_timeout"] = 3.0  # client 1's stage-1 reply
    # edges link up once their own subtree is connected; a masked partial goes up when every
    # task of its round below the edge is resolved (not early on a timer)
    edge = {"wait_for": 0, "flush_after": 60.0}
    with tree_context(tmp_path, parents=PARENTS, serves=SERVES, edge_deploy=edge, **kw) as tree:
        fed = tree.fed
        tree.deploy["leaf"]["client_timeout"] = 3.0  # the leaf drops dead client 1 sooner
        cfg = {**fed.cfg, "deploy": tree.deploy["leaf"]}
        write_toml(tree.nodes["leaf"], cfg)
        server = {**{c: tree.address("mid") for c in (2, 3)}, **tree.client_server}
        root = start_node(tree, "root")
        wait_node(tree, "root", root)
        # the edges and the clients at once (the clients retry until their server listens)
        mid = start_node(tree, "mid", env=_crash("edge-masked:2"))
        leaf = start_node(tree, "leaf")
        procs = [
            start_client(fed, i, env=_crash("client-secure-1:3") if i == 1 else None,
                         args=("--server", server.get(i, fed.address)))
            for i in range(N)
        ]  # fmt: skip
        assert wait(mid, 60) == -9, read_log(fed, "mid.log")
        mid = start_node(tree, "mid")
        finish(tree, root, [mid, leaf] + [p for i, p in enumerate(procs) if i != 1], 60)
        assert wait(procs[1], 30) == -9, read_log(fed, "client-1.log")
        assert _check_model(fed, N) == [6, 6, 5]
        rounds, jobs = _rounds(fed)
        assert [r["dropped"] for r in rounds] == [0, 0, 1], rounds
        assert sorted(len(js) for js in jobs.values()) == [5, 6, 6]  # each job once
        mid_log = (tmp_path / "mid.log").read_text()
        sent = re.findall(r"forwarded (\d+) jobs of version (\d+)", mid_log)
        assert sent[-2:] == [("4", "1"), ("3", "2")], mid_log
        assert sum(int(k) for k, v in sent if v == "0") == 4, mid_log  # round 1: all once
        assert re.search(r"replayed [1-9]\d* events", mid_log), mid_log
        leaf_log = (tmp_path / "leaf.log").read_text()
        assert "(a relayed update)" not in mid_log + leaf_log
        for name in PARENTS:
            _no_plaintext(fed, tmp_path / f"state-{name}")


def test_an_intermediate_edge_killed_holding_every_masked_input_replays_them(
    tmp_path: Path,
) -> None:
    """One round; ``mid`` is SIGKILLed as it adds its 3rd and last masked input (so the
    leaf's masked partial is among those replayed), before it forwarded anything, and
    restarted: it forwards each logged input alone (the leaf's 2 jobs in one; a re-send of
    one it had acknowledged is a duplicate), and the round applies all 6 masked inputs once."""
    kw = _secure_kw(tmp_path, N, 1, 10.0, {"wait_for": N})
    edge = {"wait_for": 0, "flush_after": 60.0}
    with tree_context(tmp_path, parents=PARENTS, serves=SERVES, edge_deploy=edge, **kw) as tree:
        fed = tree.fed
        server = {**{c: tree.address("mid") for c in (2, 3)}, **tree.client_server}
        root = start_node(tree, "root")
        wait_node(tree, "root", root)
        mid = start_node(tree, "mid", env=_crash("edge-masked:3"))
        leaf = start_node(tree, "leaf")
        procs = [start_client(fed, i, args=("--server", server.get(i, fed.address)))
                 for i in range(N)]  # fmt: skip
        assert wait(mid, 60) == -9, read_log(fed, "mid.log")
        mid = start_node(tree, "mid")
        finish(tree, root, [mid, leaf, *procs], 60)
        assert _check_model(fed, N) == [6]
        mid_log = (tmp_path / "mid.log").read_text()
        assert "replayed 3 events" in mid_log, mid_log
        sent = sorted(re.findall(r"forwarded (\d+) jobs of version 0", mid_log))
        assert sent == ["1", "1", "2"], mid_log
        for name in PARENTS:
            _no_plaintext(fed, tmp_path / f"state-{name}")
