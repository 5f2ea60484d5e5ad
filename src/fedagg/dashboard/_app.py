"""The dashboard's routes: HTML pages, static files and JSON endpoints, as plain functions of
a path and a query (no sockets here: :mod:`fedagg.dashboard._http` serves them).

Pages (one HTML shell; ``static/dash.js`` draws each page from the JSON endpoints)::

    /                   the runs (filters: kind, status, name)
    /runs/ID            a run: accuracy and loss against round and virtual time,
                        participation, staleness, bytes, refusals, its config
    /compare?ids=1,2    the runs overlaid, their config diff
    /live               a running deployment (--state), polled every second

JSON endpoints::

    /api/runs[?kind=&status=&name=]   /api/runs/ID   /api/runs/ID/rounds
    /api/compare?ids=1,2              /api/live

A bad query is a 400, an unknown run or path a 404, each with ``{"error": "..."}``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from fedagg.dashboard._reader import RunReader, clean, parse_refusals, round_progress
from fedagg.deploy import read_status
from fedagg.errors import FedaggError
from fedagg.runs import KINDS, STATUSES, config_diff

__all__ = ["MAX_COMPARE", "Dashboard", "Response"]

#: at most this many runs on the compare page
MAX_COMPARE = 12
_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
    ".html": "text/html",
}
_PAGES = {"/": "runs", "/compare": "compare", "/live": "live"}
_PAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "runs": ("kind", "status", "name"), "compare": ("ids",), "live": (),
}  # fmt: skip
_RUN_PAGE = re.compile(r"/runs/(\d{1,18})/?")
_RUN_API = re.compile(r"/api/runs/(\d{1,18})(/rounds)?")
#: the columns the compare page overlays
_COMPARE_COLUMNS = ("round", "virtual_time", "test_accuracy", "test_loss")


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    content_type: str
    body: bytes


class BadRequest(Exception):
    """A 400: the query is malformed."""


class NotFound(Exception):
    """A 404: no such run."""


def _json(status: int, data: Any) -> Response:
    body = json.dumps(clean(data), separators=(",", ":"), allow_nan=False).encode()
    return Response(status, "application/json", body)


def _error(status: int, message: str) -> Response:
    return _json(status, {"error": message})


def _static() -> dict[str, bytes]:
    root = resources.files("fedagg.dashboard") / "static"
    return {f.name: f.read_bytes() for f in root.iterdir() if f.name.endswith(tuple(_TYPES))}


def _query(text: str, allowed: tuple[str, ...]) -> dict[str, str]:
    try:
        q = parse_qs(text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=20)
    except ValueError as e:
        raise BadRequest(f"malformed query: {e}") from None
    unknown = sorted(set(q) - set(allowed))
    if unknown:
        raise BadRequest(
            f"unknown parameter {', '.join(unknown)} (allowed: {', '.join(allowed) or 'none'})"
        )
    for k, v in q.items():
        if len(v) > 1:
            raise BadRequest(f"parameter {k} given {len(v)} times")
    return {k: v[0] for k, v in q.items()}


def _ids(text: str | None) -> list[int]:
    if not text:
        raise BadRequest("ids is required: /api/compare?ids=1,2")
    parts = text.split(",")
    if not all(re.fullmatch(r"\d{1,18}", p) for p in parts):
        raise BadRequest(f"ids must be run ids separated by commas, not {text[:40]!r}")
    ids = list(dict.fromkeys(int(p) for p in parts))
    if len(ids) > MAX_COMPARE:
        raise BadRequest(f"at most {MAX_COMPARE} runs to compare, not {len(ids)}")
    return ids


class Dashboard:
    """The routes over a run database (``db``) and, for the live page, a server's state
    directory (``state``, or None). Reads only."""

    def __init__(self, db: str | os.PathLike[str], state: str | os.PathLike[str] | None = None):
        self.reader = RunReader(db)
        self.state = None if state is None else Path(state)
        self.files = _static()

    def handle(self, path: str, query: str = "") -> Response:
        """The response to ``GET path?query``."""
        try:
            return self._route(path, query)
        except BadRequest as e:
            return _error(400, str(e))
        except NotFound as e:
            return _error(404, str(e))
        except FedaggError as e:
            return _error(500, str(e))

    def _route(self, path: str, query: str) -> Response:
        if path.startswith("/api/"):
            return self._api(path, query)
        if path.startswith("/static/"):
            name = path.removeprefix("/static/")
            if name not in self.files:
                return _error(404, f"no static file {name}")
            return Response(200, _TYPES[Path(name).suffix], self.files[name])
        if path == "/favicon.ico":
            return Response(200, _TYPES[".svg"], self.files["favicon.svg"])
        page = _PAGES.get(path)
        if page is not None:
            _query(query, _PAGE_PARAMS[page])
            return self._page(page)
        m = _RUN_PAGE.fullmatch(path)
        if m and query == "":
            if self.reader.run(int(m.group(1))) is None:
                return self._page("missing", 404)
            return self._page("run")
        return self._page("missing", 404)

    def _page(self, page: str, status: int = 200) -> Response:
        html = self.files["page.html"].replace(b"{{page}}", page.encode())
        return Response(status, "text/html; charset=utf-8", html)

    # -- JSON ----------------------------------------------------------------------------------
    def _api(self, path: str, query: str) -> Response:
        if path == "/api/runs":
            q = _query(query, ("kind", "status", "name"))
            return _json(200, self.runs(q.get("kind"), q.get("status"), q.get("name")))
        m = _RUN_API.fullmatch(path)
        if m:
            _query(query, ())
            rid = int(m.group(1))
            run = self.reader.run(rid)
            if run is None:
                return _error(404, f"no run {rid} in {self.reader.path}")
            if m.group(2):
                return _json(200, self.reader.rounds(rid))
            rows = self.reader.rounds(rid, ("refusals",))
            refusals: dict[str, int] = {}
            for text in rows["refusals"]:
                for k, n in parse_refusals(text).items():
                    refusals[k] = refusals.get(k, 0) + n
            return _json(200, {**run, "refusals": refusals})
        if path == "/api/compare":
            return _json(200, self.compare(_ids(_query(query, ("ids",)).get("ids"))))
        if path == "/api/live":
            _query(query, ())
            return self.live()
        return _error(404, f"no endpoint {path}")

    def runs(self, kind: str | None, status: str | None, name: str | None) -> dict[str, Any]:
        if kind and kind not in KINDS:
            raise BadRequest(f"kind must be one of {', '.join(KINDS)}, not {kind[:40]!r}")
        if status and status not in STATUSES:
            raise BadRequest(f"status must be one of {', '.join(STATUSES)}, not {status[:40]!r}")
        runs = self.reader.runs()
        total = len(runs)
        if kind:
            runs = [r for r in runs if r["kind"] == kind]
        if status:
            runs = [r for r in runs if r["status"] == status]
        if name:
            runs = [r for r in runs if name.lower() in str(r["name"]).lower()]
        return {
            "db": str(self.reader.path),
            "exists": self.reader.exists(),
            "total": total,
            "runs": runs,
            "kinds": list(KINDS),
            "statuses": list(STATUSES),
        }

    def compare(self, ids: list[int]) -> dict[str, Any]:
        runs = []
        for rid in ids:
            run = self.reader.run(rid)
            if run is None:
                raise NotFound(f"no run {rid} in {self.reader.path}")
            rounds = self.reader.rounds(rid, _COMPARE_COLUMNS)
            acc = [a for a in rounds["test_accuracy"] if a is not None]
            runs.append(
                {
                    "id": rid,
                    "name": run["name"],
                    "kind": run["kind"],
                    "status": run["status"],
                    "rounds": run["rounds"],
                    "final_accuracy": acc[-1] if acc else None,
                    "best_accuracy": max(acc) if acc else None,
                    "series": rounds,
                    "config": {"kind": run["kind"], **run["config"]},
                }
            )
        diff = config_diff([r.pop("config") for r in runs])
        return {"runs": runs, "diff": [{"key": k, "values": v} for k, v in diff]}

    def live(self) -> Response:
        if self.state is None:
            return _json(
                200,
                {
                    "ok": False,
                    "error": "no state directory: start the dashboard "
                    "with --state DIR (the server's deploy.state)",
                },
            )
        try:
            status = read_status(self.state)
        except FedaggError as e:  # not started yet, or not a state directory
            return _json(200, {"ok": False, "state": str(self.state), "error": str(e)})
        status.pop("config", None)
        progress = round_progress(self.state, bool(status["server"]["running"]))
        return _json(200, {"ok": True, **status, "progress": progress})
