"""A fold lease commits with its own attempt's arrival only (review L1): an arrival row of
the same (client, job) whose spool file is another attempt's revokes the lease."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np

from fedagg.aggregators import mean
from fedagg.core.spec import ParamSpec
from fedagg.deploy._ingest import FoldIngest, Lease
from fedagg.deploy._rows import EventRow, UploadRow


def _lease(path: str | None) -> Lease:
    agg: Any = mean("float32")
    st = agg.init(ParamSpec.from_arrays([np.zeros(8, np.float32)]))
    lease = Lease((1, 7), agg, st, 1.0)
    lease.complete, lease.path = True, path
    return lease


def _arrival(path: str) -> EventRow:
    u = UploadRow(1, 7, path, 1.0, 0, {}, 32, b"", b"")
    return EventRow(5, "arrival", 0.0, 1, 7, None, u)


def _before(lease: Lease, row: EventRow) -> str:
    revoked: list[Lease] = []
    ingest = SimpleNamespace(lease=lease, committing=None, revoke=lambda: revoked.append(lease))
    FoldIngest.before(ingest, row)  # type: ignore[arg-type]
    return "revoked" if revoked else "commits" if ingest.committing is lease else "?"


def test_the_lease_commits_with_its_own_attempts_file_only() -> None:
    assert _before(_lease("/s/0007-1-aaa.upd"), _arrival("/s/0007-1-aaa.upd")) == "commits"
    assert _before(_lease("/s/0007-1-aaa.upd"), _arrival("/s/0007-1-bbb.upd")) == "revoked"
    assert _before(_lease(None), _arrival("/s/0007-1-bbb.upd")) == "commits"  # (path unknown)
