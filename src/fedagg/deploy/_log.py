"""What ``fedagg server`` and ``fedagg client`` print while they run: Python logging to stderr.

Loggers: ``fedagg.server`` (the root server), ``fedagg.edge`` (an edge aggregator),
``fedagg.client`` (a client). Progress lines carry structured fields (``extra=``: ``event``,
``round``, ``version``, ``folded``, ``client``, ...) that :class:`JsonFormatter` writes as JSON
keys; the human format shows only the message. Levels: INFO for progress (connections,
waiting, rounds, tasks, uploads), WARNING for retries and refusals, DEBUG for every upload.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from typing import Any, TextIO

__all__ = ["HUMAN_FORMAT", "JsonFormatter", "configure_logging"]

#: the default line: ``2026-12-07 12:50:21,509 INFO fedagg.server: round 1 started: ...``
HUMAN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

#: a LogRecord's own attributes: anything else on a record came in through ``extra=``
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC, ISO 8601 with milliseconds), ``level``,
    ``logger``, ``message``, the record's structured fields (``extra=``), and ``exception``
    (the traceback's text) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        t = time.gmtime(record.created)
        ms = int(record.msecs)
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", t) + f".{ms:03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for k, v in record.__dict__.items():
            if k not in _STANDARD and not k.startswith("_") and k not in out:
                out[k] = v
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(_plain(out), default=str, allow_nan=False, separators=(",", ":"))


def _plain(v: Any) -> Any:
    """``v`` as strict JSON takes it: NaN and infinities become null."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def configure_logging(
    *, quiet: bool = False, json_lines: bool = False, verbose: bool = False,
    stream: TextIO | None = None,
) -> logging.Handler:  # fmt: skip
    """Log to ``stream`` (default stderr): INFO and up (``quiet``: warnings and errors only;
    ``verbose``: fedagg's DEBUG lines too, e.g. every upload), as human-readable lines with
    timestamps or, with ``json_lines``, one JSON object per line. Replaces the root logger's
    handlers; returns the new one."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(HUMAN_FORMAT))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(logging.WARNING if quiet else logging.INFO)
    level = logging.DEBUG if verbose and not quiet else logging.NOTSET
    logging.getLogger("fedagg").setLevel(level)
    return handler


# -- a client's lines (fedagg.client; the hooks in fedagg.deploy._client are one line each) -----
client_log = logging.getLogger("fedagg.client")


def client_connected(server: str, tls: bool, name: str, index: int, size: int, nbytes: int) -> None:
    client_log.info(
        "connected to %s (%s) as %s: client %d, a model of %d parameters (%d bytes)",
        server, "TLS" if tls else "insecure", name, index, size, nbytes,
        extra={"event": "connected", "server": server, "tls": tls, "client": name},
    )  # fmt: skip


def client_task(task: int, kind: str, version: int, epochs: int) -> None:
    kind = kind or "train"
    what = (
        f"train from model version {version}, {epochs} epoch{'' if epochs == 1 else 's'}"
        if kind == "train"
        else f"{kind} model version {version}"
    )
    client_log.info(
        "task %d: %s", task, what,
        extra={"event": "task", "task": task, "version": version, "epochs": epochs,
               "kind": kind},
    )  # fmt: skip


def client_uploaded(
    task: int, pull_s: float, train_s: float, nbytes: int, upload_s: float, duplicate: bool
) -> None:
    client_log.info(
        "task %d: trained in %.2fs, uploaded %d bytes in %.2fs%s", task, train_s, nbytes,
        upload_s, " (a retry: acknowledged as a duplicate)" if duplicate else "",
        extra={"event": "uploaded", "task": task, "pull_s": round(pull_s, 3),
               "train_s": round(train_s, 3), "bytes": nbytes, "upload_s": round(upload_s, 3),
               "duplicate": duplicate},
    )  # fmt: skip


def client_retry(what: str, code: str, details: str, n: int, pause: float) -> None:
    """A failed call retried (``pause``: the backoff delay; None: reconnecting at once)."""
    client_log.warning(
        "%s: %s: %s; retry %d in %.2fs", what, code, details[:300], n, pause,
        extra={"event": "retry", "call": what, "code": code, "delay_s": round(pause, 3)},
    )  # fmt: skip
