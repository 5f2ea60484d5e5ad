"""Serving :class:`~fedagg.dashboard._app.Dashboard` over HTTP with the standard library
(``http.server.ThreadingHTTPServer``): GET and HEAD only, every response with a
Content-Security-Policy that allows nothing but this origin (no CDN, no inline script).

A request whose ``Host`` header names neither loopback nor the address served on is refused
(403): a web page elsewhere cannot read the dashboard through DNS rebinding. Listening on a
wildcard address (``0.0.0.0``) accepts any host name."""

from __future__ import annotations

import http.server
import logging
import urllib.parse
from typing import Any

from fedagg.dashboard._app import Dashboard, Response

__all__ = ["make_server"]

log = logging.getLogger("fedagg.dashboard")

_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


def _hostname(header: str) -> str:
    """``Host: name:port`` or ``[v6]:port`` -> the name, lower case."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[: h.find("]") + 1]
    return h.rpartition(":")[0] if ":" in h else h


class _Handler(http.server.BaseHTTPRequestHandler):
    server_version = "fedagg-dashboard"
    app: Dashboard
    hosts: frozenset[str] | None  # the Host names accepted (None: any)

    def _respond(self, head_only: bool) -> None:
        url = urllib.parse.urlsplit(self.path)
        host = _hostname(self.headers.get("Host", ""))
        try:
            if self.hosts is not None and host not in self.hosts:
                r = Response(403, "text/plain", b"forbidden: unexpected Host header")
            else:
                r = self.app.handle(urllib.parse.unquote(url.path), url.query)
        except Exception as e:  # a bug must not take the server down: a 500, logged
            log.exception("GET %s failed", self.path)
            r = Response(500, "text/plain", f"internal error: {type(e).__name__}".encode())
        self.send_response(r.status)
        self.send_header("Content-Type", r.content_type)
        self.send_header("Content-Length", str(len(r.body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("Content-Security-Policy", _CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if not head_only:
            self.wfile.write(r.body)

    def do_GET(self) -> None:
        self._respond(False)

    def do_HEAD(self) -> None:
        self._respond(True)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.address_string(), *args)


def make_server(app: Dashboard, host: str, port: int) -> http.server.ThreadingHTTPServer:
    """A server for ``app`` bound to ``host:port`` (0: a free port; see ``server_address``);
    call ``serve_forever()``."""
    hosts = None
    if host not in ("", "0.0.0.0", "::"):
        hosts = frozenset({"127.0.0.1", "localhost", "[::1]", host.lower(), f"[{host.lower()}]"})
    handler = type("Handler", (_Handler,), {"app": app, "hosts": hosts})
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server
