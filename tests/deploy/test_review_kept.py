"""A client's kept updates are bounded (review M2, client side: :mod:`fedagg.deploy._kept`):
with the server's watermark stuck, at most ``MAX_KEPT`` updates stay referenced, the oldest
dropped with a log line; a dropped task given again (the server lost it) is trained again,
a kept one sent again, one listed twice on the same task stream left alone."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedagg.deploy import ClientKey
from fedagg.deploy import fedagg_pb2 as pb
from fedagg.deploy._client import Client
from fedagg.deploy._kept import MAX_KEPT, Kept, KeptUpdates


def _kept(stream: int = 1) -> Kept:
    return Kept(0, 1, "", stream, np.zeros(4, np.float32), b"", 1.0, {})


def test_a_client_keeps_at_most_max_kept_updates(caplog: pytest.LogCaptureFixture) -> None:
    client = Client("127.0.0.1:1", ClientKey("c0", Ed25519PrivateKey.generate()),
                    lambda m, t: None, insecure=True)  # fmt: skip
    deltas: list[Any] = []
    with caplog.at_level(logging.WARNING, "fedagg.client"):
        for task in range(3 * MAX_KEPT):  # the watermark stuck at 0 (a straggler's task)
            delta = np.full(16, task, np.float32)
            deltas.append(delta)
            reply = pb.PushReply(task=task, retain=True, watermark=0)
            client._keep(pb.Task(task=task, version=0, epochs=1), reply, delta, 1.0, {})
            assert len(client.kept) <= MAX_KEPT
    assert sorted(client.kept) == list(range(2 * MAX_KEPT, 3 * MAX_KEPT))  # the newest
    assert sum("kept update dropped" in r.message for r in caplog.records) == 2 * MAX_KEPT
    client._covered(2 * MAX_KEPT + 3)
    assert sorted(client.kept) == list(range(2 * MAX_KEPT + 3, 3 * MAX_KEPT))
    assert not client.kept.dropped  # below the watermark: durable, forgotten


def test_a_dropped_update_is_trained_again_if_lost() -> None:
    kept = KeptUpdates(most=2)
    for task in (5, 6, 7):
        kept.keep(task, _kept(stream=1), watermark=0)
    assert sorted(kept) == [6, 7] and kept.dropped == {5: 1}
    assert kept.lost(5, streams=1) is None  # the same task stream: listed twice
    assert kept.lost(6, streams=1) is None
    assert kept.lost(6, streams=2) == "resend"  # a later stream: the server lost it
    assert kept.lost(5, streams=2) == "train"  # lost, its copy dropped: trained again
    assert kept.lost(5, streams=3) is None and 5 not in kept.dropped
    assert kept.lost(9, streams=2) is None  # never kept (acknowledged as durable)
    kept.keep(5, _kept(stream=2), watermark=0)  # kept again: the newest are 6, 7 and ...
    assert sorted(kept) == [6, 7] and 5 in kept.dropped  # ... 5 is the oldest, dropped
