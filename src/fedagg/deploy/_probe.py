"""A TLS/plaintext mismatch between a client and its server, named instead of retried.

gRPC reports an ``--insecure`` client against a TLS server as "Socket closed", and a TLS
client against a plaintext server as a failed handshake ("WRONG_VERSION_NUMBER"), both
UNAVAILABLE, like a server that is restarting: the client would retry until ``retry_for``
runs out. When the first call fails so, :func:`transport_mismatch` asks the port itself, once
per failure: an insecure client tries a TLS handshake (certificates not checked: it only asks
whether the other side speaks TLS); a TLS client sends the HTTP/2 client preface in plaintext
and looks for the server's SETTINGS frame. Only a conclusive answer (a completed handshake, a
SETTINGS frame) is a mismatch; anything else (refused, timed out, closed) leaves the client
retrying as before. An insecure client asks before its first call too: a TLS server holds
its plaintext connection until its handshake timeout (``deploy.first_timeout``) before gRPC
reports "Socket closed".
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl

__all__ = ["looks_like_mismatch", "split_address", "transport_mismatch"]

#: what gRPC's details say when the two sides disagree on TLS (lower case)
_SIGNS = ("socket closed", "handshake", "wrong_version_number", "wrong version number", "ssl",
          "tls", "connection reset")  # fmt: skip
#: the HTTP/2 client connection preface and an empty SETTINGS frame
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def looks_like_mismatch(details: str) -> bool:
    """Whether an UNAVAILABLE's ``details`` could come from a TLS/plaintext mismatch."""
    d = details.lower()
    return any(s in d for s in _SIGNS)


def split_address(address: str) -> tuple[str, int] | None:
    """``host:port`` (``[v6]:port``, a ``dns:``/``ipv4:`` prefix) as (host, port), or None."""
    a = address
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if a.startswith(prefix):
            a = a[len(prefix) :]
    host, sep, port = a.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return None
    return host.strip("[]"), int(port)


async def _speaks_tls(host: str, port: int, timeout: float) -> bool:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only: does it speak TLS at all?
    ctx.set_alpn_protocols(["h2"])
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx), timeout)
    except (OSError, ssl.SSLError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(writer.wait_closed(), timeout)
    return True


async def _speaks_plain_h2(host: str, port: int, timeout: float) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError):
        return False
    try:
        writer.write(_PREFACE)
        await asyncio.wait_for(writer.drain(), timeout)
        head = await asyncio.wait_for(reader.readexactly(9), timeout)
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), timeout)
    return head[3] == 0x04 and head[5:9] == b"\x00\x00\x00\x00"  # SETTINGS on stream 0


async def transport_mismatch(
    address: str, tls: bool, details: str | None, *, timeout: float = 3.0
) -> str | None:
    """What is wrong if this client (``tls`` or not) and the server at ``address`` disagree on
    TLS, as a message saying how to fix it; None if they agree or it cannot be told. Asks
    only if gRPC's ``details`` could come from a mismatch (None: ask anyway)."""
    where = split_address(address)
    if where is None or (details is not None and not looks_like_mismatch(details)):
        return None
    host, port = where
    if not tls and await _speaks_tls(host, port, timeout):
        return (
            f"the server at {address} speaks TLS but this client is --insecure "
            "(deploy.insecure): drop --insecure and give the client the CA certificate "
            "(deploy.certs: the directory with the ca.pem 'fedagg certs' wrote)"
        )
    if tls and await _speaks_plain_h2(host, port, timeout):
        return (
            f"the server at {address} does not speak TLS (it runs --insecure) but this "
            "client uses TLS: run the server with TLS (without --insecure, deploy.certs "
            "holding server.pem and server.key from 'fedagg certs'), or, on a trusted network "
            "only, run this client with --insecure too"
        )
    return None
