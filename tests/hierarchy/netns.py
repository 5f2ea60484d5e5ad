"""Hosts for multi-host tests: Linux network namespaces joined by a bridge (needs root).

``hosts(names)`` creates one namespace per name, each with its own IP on a private /24 behind
a bridge in the test's namespace, and yields ``{name: (namespace, ip)}``; everything is torn
down on exit. ``available()`` says whether this machine lets us (root and ``ip netns``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator, Sequence

_PREFIX = "fa"


def _ip(*args: str, ns: str | None = None) -> None:
    cmd = ["ip", "netns", "exec", ns, "ip", *args] if ns else ["ip", *args]
    subprocess.run(cmd, check=True, capture_output=True, timeout=10)


def available() -> bool:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return False
    probe = f"{_PREFIX}{os.getpid() % 100000}p"
    try:
        subprocess.run(["ip", "netns", "add", probe], check=True, capture_output=True, timeout=10)
    except (subprocess.SubprocessError, OSError):
        return False
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return True


@contextlib.contextmanager
def hosts(names: Sequence[str], subnet: int = 201) -> Iterator[dict[str, tuple[str, str]]]:
    tag = f"{_PREFIX}{os.getpid() % 100000}"
    bridge = f"{tag}br"
    made: list[str] = []
    out: dict[str, tuple[str, str]] = {}
    try:
        _ip("link", "add", bridge, "type", "bridge")
        _ip("addr", "add", f"10.{subnet}.0.254/24", "dev", bridge)
        _ip("link", "set", bridge, "up")
        for i, name in enumerate(names, 1):
            ns, host_end, ns_end = f"{tag}n{i}", f"{tag}h{i}", f"{tag}v{i}"
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
            made.append(ns)
            _ip("link", "add", host_end, "type", "veth", "peer", "name", ns_end)
            _ip("link", "set", ns_end, "netns", ns)
            _ip("link", "set", host_end, "master", bridge, "up")
            addr = f"10.{subnet}.0.{i}"
            _ip("addr", "add", f"{addr}/24", "dev", ns_end, ns=ns)
            _ip("link", "set", ns_end, "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
            out[name] = (ns, addr)
        yield out
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True, timeout=10)
