"""The data port's socket helpers (:mod:`fedagg.deploy._stream`): its TLS context, peer
names as gRPC writes them, its connection cap, keep-alives and the check that a paused
connection's peer is still there."""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import tempfile
from typing import Any

from fedagg.deploy._options import ServerOptions

__all__ = ["gone", "keepalive", "max_connections", "peer_name", "server_context"]

_TCP_CLOSE, _TCP_CLOSE_WAIT = 7, 8  # Linux's tcp_info.tcpi_state


def gone(transport: Any) -> bool:
    """Whether the peer of ``transport`` reset the connection or closed its side (a FIN
    before the end marker: the wire has clients never half-close before it)."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
            return True
        if hasattr(socket, "TCP_INFO"):
            state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
            return state in (_TCP_CLOSE, _TCP_CLOSE_WAIT)
    except OSError:
        return True
    return False


def server_context(cert: bytes, key: bytes) -> ssl.SSLContext:
    """A TLS server context with the gRPC port's certificate and key (PEM bytes)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.num_tickets = 0  # nothing from the server before the reply (see _stream_client)
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    with tempfile.TemporaryDirectory(prefix="fedagg-tls-") as d:  # ssl loads files only
        cert_path, key_path = os.path.join(d, "cert.pem"), os.path.join(d, "key.pem")
        for path, data in ((cert_path, cert), (key_path, key)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx


def peer_name(name: Any) -> str:
    if isinstance(name, tuple) and len(name) >= 2:
        host, port = name[0], name[1]
        return f"ipv6:[{host}]:{port}" if ":" in str(host) else f"ipv4:{host}:{port}"
    return f"unix:{name}"


def max_connections(options: ServerOptions) -> int:
    """The data port's connection cap, a backstop under the preauth caps: ``preauth`` (waiting
    for a preamble or lingering) + 1024 calls (authenticated, receiving or waiting for a slot;
    at least 4 x ``max_uploads`` x ``max_streams``), at most half the process's file
    descriptors. A connection over it gets :data:`fedagg.deploy._stream.FULL` and its client
    uploads over gRPC."""
    calls = max(1024, 4 * options.max_uploads * options.max_streams)
    cap = options.preauth + calls
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft != resource.RLIM_INFINITY:
            cap = min(cap, max(soft // 2, options.preauth + 16))
    return cap


def keepalive(transport: Any) -> None:
    """TCP keep-alives on an accepted connection, as the client sets them: a peer that
    vanished (no FIN, no RST) is noticed in about 25 s, even while its reading is paused."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        for opt, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
            if hasattr(socket, opt):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, opt), value)
