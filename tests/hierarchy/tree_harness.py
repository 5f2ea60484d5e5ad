"""Aggregation trees of real processes: a root, edge/intermediate aggregators, clients.

Every node is ``python -m fedagg.cli server CONFIG`` (an edge is a server whose config has a
``deploy.parent``); clients are ``fedagg client --server <their edge>``. The shape is a dict
``{node: parent}`` plus which clients each leaf serves.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedagg.deploy import make_keys
from tests.deploy.harness import (
    PY,
    Fed,
    _env,
    free_port,
    kill,
    make_fed,
    read_log,
    wait,
    write_toml,
)


@dataclass
class Tree:
    fed: Fed  # the root's federation (keys, certs, its config)
    nodes: dict[str, Path]  # edge name -> its config
    ports: dict[str, int]
    client_server: dict[int, str]  # client index -> the address it connects to
    host: dict[str, str] = field(default_factory=dict)  # node -> host it listens on
    deploy: dict[str, dict[str, Any]] = field(default_factory=dict)  # edge -> its [deploy]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def address(self, node: str) -> str:
        return f"{self.host.get(node, '127.0.0.1')}:{self.ports[node]}"


def make_tree(
    root: Path,
    *,
    parents: Mapping[str, str],
    serves: Mapping[str, list[int]],
    clients: int,
    hosts: Mapping[str, str] | None = None,
    edge_deploy: Mapping[str, Any] | None = None,
    **fed_kw: Any,
) -> Tree:
    """``parents`` maps each edge to its parent ("root" or another edge); ``serves`` maps each
    edge to the client indices of its subtree (a leaf's clients connect to it)."""
    hosts = dict(hosts or {})
    fed = make_fed(root, clients=clients, **fed_kw)
    make_keys(root / "edgekeys", sorted(parents))
    edges_file = str(root / "edgekeys" / "authorized_keys")
    fed.cfg["deploy"]["edges"] = edges_file

    def scopes(parent: str) -> dict[str, list[str]]:  # the clients each child edge may serve
        return {n: [fed.names[c] for c in serves[n]] for n, p in parents.items() if p == parent}

    fed.cfg["deploy"]["edge_clients"] = scopes("root")
    if "root" in hosts:
        fed.cfg["deploy"]["listen"] = f"{hosts['root']}:{fed.port}"
    write_toml(fed.config, fed.cfg)
    ports = {"root": fed.port}
    nodes: dict[str, Path] = {}
    for name in parents:
        ports[name] = free_port()
    leaf_of: dict[int, str] = {}
    for name, cs in serves.items():
        children = [n for n, p in parents.items() if p == name]
        if not children:
            for c in cs:
                leaf_of[c] = name
    tree = Tree(fed, nodes, ports, {}, hosts)
    for name, parent in parents.items():
        cfg = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in fed.cfg.items()}
        cfg["deploy"] = {
            **fed.cfg["deploy"],
            "listen": f"{hosts.get(name, '127.0.0.1')}:{ports[name]}",
            "state": str(root / f"state-{name}"),
            "parent": tree.address(parent),
            "edge_key": str(root / "edgekeys" / f"{name}.key"),
            "serves": [fed.names[c] for c in serves[name]],
            "edge_clients": scopes(name),
            **(edge_deploy or {}),
        }
        path = root / f"{name}.toml"
        write_toml(path, cfg)
        nodes[name] = path
        tree.deploy[name] = cfg["deploy"]
    tree.client_server = {c: tree.address(e) for c, e in leaf_of.items()}
    return tree


def start_node(
    tree: Tree, name: str, *, env: Mapping[str, str] | None = None, netns: str | None = None,
    flags: bool = False,
) -> subprocess.Popen[bytes]:  # fmt: skip
    """Start a node. ``flags``: an edge runs the root's own config, its role given by
    command-line flags (``--parent``, ``--edge-key``, ``--serves``, ``--listen``, ``--state``)."""
    config = tree.fed.config if name == "root" else tree.nodes[name]
    extra: list[str] = []
    if flags and name != "root":
        d = tree.deploy[name]
        config = tree.fed.config
        extra = ["--parent", d["parent"], "--edge-key", d["edge_key"], "--serves",
                 ",".join(d["serves"]), "--listen", d["listen"], "--state", d["state"]]  # fmt: skip
    prefix = ["ip", "netns", "exec", netns] if netns else []
    with open(tree.fed.dir / f"{name}.log", "ab") as out:
        p = subprocess.Popen(
            [*prefix, PY, "-m", "fedagg.cli", "server", str(config), *extra],
            stdout=out, stderr=subprocess.STDOUT, env=_env(env), start_new_session=True,
        )  # fmt: skip
    tree.procs.append(p)
    return p


def start_tree_client(tree: Tree, i: int, *, netns: str | None = None) -> subprocess.Popen[bytes]:
    fed = tree.fed
    server = tree.client_server.get(i, fed.address)
    prefix = ["ip", "netns", "exec", netns] if netns else []
    with open(fed.dir / f"client-{i}.log", "ab") as out:
        p = subprocess.Popen(
            [*prefix, PY, "-m", "fedagg.cli", "client", str(fed.config), "--key", str(fed.key(i)),
             "--server", server],
            stdout=out, stderr=subprocess.STDOUT, env=_env(None), start_new_session=True,
        )  # fmt: skip
    tree.procs.append(p)
    return p


@contextlib.contextmanager
def tree_context(root: Path, **kw: Any) -> Iterator[Tree]:
    tree = make_tree(root, **kw)
    try:
        yield tree
    finally:
        for p in tree.procs:
            kill(p)


def wait_node(tree: Tree, name: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    """Wait until a node accepts connections at its address (from this namespace)."""
    host, port = tree.address(name).rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{name} exited {proc.returncode}:\n{node_log(tree, name)}")
        with contextlib.suppress(OSError), socket.create_connection((host, int(port)), 0.2):
            return
        time.sleep(0.05)
    raise AssertionError(f"{name} not listening after {timeout}s:\n{node_log(tree, name)}")


def node_log(tree: Tree, name: str) -> str:
    return read_log(tree.fed, f"{name}.log")


def finish(tree: Tree, root: subprocess.Popen[bytes], others: list[subprocess.Popen[bytes]],
           timeout: float = 180.0) -> None:  # fmt: skip
    assert wait(root, timeout) == 0, node_log(tree, "root")
    for p in others:
        assert wait(p, 60) == 0, f"{p.args}\n" + "\n".join(
            f"--- {n}\n{node_log(tree, n)}" for n in tree.nodes
        )
