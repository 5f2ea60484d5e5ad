"""SecureClient (the client side shared by sim and deploy) and ServerSession.receive_masked_sum:
the decoded sum is the weighted sum of clipped updates within the bound, replies are
idempotent, a lying or confused server is refused."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedagg.errors import SecAggError
from fedagg.secagg import (
    AdvertiseKeys,
    ConsistencyRequest,
    KeyDirectory,
    MaskedInput,
    RoundParams,
    SecureClient,
    ServerSession,
)

D = 40


class Round:
    """n SecureClients and a server, driven stage by stage."""

    def __init__(self, n: int = 5, **kw: Any) -> None:
        self.ids = tuple(range(1, n + 1))
        self.params = RoundParams.make(
            11, self.ids, D, b"g", clip=kw.get("clip", 2.0), max_weight=10.0,
            rotation=kw.get("rotation"), bits=kw.get("bits", 24),
        )  # fmt: skip
        self.keys = {u: Ed25519PrivateKey.generate() for u in self.ids}
        self.pub = {u: k.public_key().public_bytes_raw() for u, k in self.keys.items()}
        self.clients = {u: SecureClient(self.params, u, self.keys[u], self.pub) for u in self.ids}
        self.server = ServerSession(
            self.params.config(), {u: k.public_key() for u, k in self.keys.items()}
        )
        self.requests: dict[int, dict[int, Any]] = {}

    def keys_and_shares(self) -> dict[int, Any]:
        for u in self.ids:
            self.server.receive_advertise(self.clients[u].handle(self.params))
        self.requests[1] = self.server.close_advertise()
        for u, m in self.requests[1].items():
            self.server.receive_shares(self.clients[u].handle(m))
        self.requests[2] = self.server.close_shares()
        for u, m in self.requests[2].items():
            assert self.clients[u].handle(m) is None
        return self.requests[2]

    def unmask(self) -> np.ndarray:
        for u, m in self.server.close_masked().items():
            self.server.receive_signature(self.clients[u].handle(m))
        for u, m in self.server.close_consistency().items():
            self.server.receive_unmask(self.clients[u].handle(m))
        return self.server.finish()


def test_a_round_decodes_to_the_weighted_sum_of_clipped_updates() -> None:
    r = Round(6, rotation=3)
    r.keys_and_shares()
    rng = np.random.default_rng(0)
    xs = {u: rng.standard_normal(D) * (0.2 if u % 2 else 1.0) for u in r.ids}
    ws = {u: float(3 * u) for u in r.ids}  # 15 and 18 exceed max_weight = 10
    survivors = [u for u in r.ids if u != 4]
    for u in survivors:
        r.server.receive_masked(MaskedInput(u, r.clients[u].masked(xs[u], ws[u], rng)))
    total = r.unmask()
    enc = r.params.encoder()
    vec, w = enc.decode(total, len(survivors), D)
    want_w = sum(min(ws[u], 10.0) / 10.0 for u in survivors)
    want = sum(
        min(ws[u], 10.0) / 10.0 * xs[u] * min(1.0, 2.0 / np.linalg.norm(xs[u])) for u in survivors
    )
    assert abs(w - want_w) <= len(survivors) / enc.levels
    assert np.linalg.norm(vec - want) <= enc.error_bound(D, len(survivors))


def test_replies_are_idempotent_and_a_different_request_is_refused() -> None:
    r = Round(4)
    c = r.clients[1]
    first = c.handle(r.params)
    assert c.handle(RoundParams.from_bytes(r.params.to_bytes())) is first  # same bytes
    fwd = r.keys_and_shares()
    y = c.masked(np.ones(D), 1.0)
    assert c.masked(np.zeros(D), 1.0) is y  # one masked vector per round, whatever is asked
    r.server.receive_masked(MaskedInput(1, y))
    y2 = r.clients[2].masked(np.ones(D), 1.0, keep=False)  # not kept (the simulator's way)
    with pytest.raises(SecAggError, match="stage"):  # so never a second, different vector
        r.clients[2].masked(np.zeros(D), 1.0)
    r.server.receive_masked(MaskedInput(2, y2))
    for u in (3, 4):
        r.server.receive_masked(MaskedInput(u, r.clients[u].masked(np.ones(D), 1.0)))
    reqs = r.server.close_masked()
    sig = c.handle(reqs[1])
    assert c.handle(reqs[1]) is sig
    other = ConsistencyRequest(reqs[1].round_id, frozenset({1, 2, 3}))
    with pytest.raises(SecAggError, match="different stage-3 request"):
        c.handle(other)
    assert c.handle(fwd[1]) is None  # stage 2's request again: still answered alike
    with pytest.raises(SecAggError, match="different stage-1 request"):
        c.handle(KeyDirectory(r.params.round_id, {}))


def test_a_lying_or_confused_server_is_refused() -> None:
    r = Round(4)
    c = r.clients[2]
    other = RoundParams.make(12, r.ids, D, b"g", clip=2.0, max_weight=10.0, bits=24)
    with pytest.raises(SecAggError, match="other round parameters"):
        c.handle(other)
    for u in r.ids:
        r.server.receive_advertise(r.clients[u].handle(r.params))
    dirs = r.server.close_advertise()
    d2 = dirs[2]
    adv = d2.keys[1]
    forged = AdvertiseKeys(1, adv.s_pk, adv.c_pk, adv.signature)  # a replaced public key
    with pytest.raises(SecAggError, match="signature"):
        c.handle(KeyDirectory(d2.round_id, {**d2.keys, 1: forged}))
    assert c.aborted
    with pytest.raises(SecAggError, match="aborted"):
        c.handle(dirs[2])
    fresh = r.clients[3]
    with pytest.raises(SecAggError, match="no shares"):
        fresh.masked(np.ones(D), 1.0)
    with pytest.raises(SecAggError, match="not a request"):
        fresh.handle(adv)


def test_bad_construction_and_inputs() -> None:
    r = Round(3)
    key = Ed25519PrivateKey.generate()
    with pytest.raises(SecAggError, match="no known identity"):
        SecureClient(r.params, 1, key, {1: r.pub[1]})
    with pytest.raises(SecAggError, match="not in round"):
        SecureClient(r.params, 9, key, {**r.pub, 9: r.pub[1]})
    with pytest.raises(SecAggError, match="32 raw bytes"):
        SecureClient(r.params, 1, key, {**r.pub, 2: b"short"})
    r.keys_and_shares()
    with pytest.raises(SecAggError, match="elements"):
        r.clients[1].masked(np.ones(D + 1), 1.0)
    for w in (0.0, -1.0, float("nan")):
        with pytest.raises(SecAggError, match="weight"):
            r.clients[2].masked(np.ones(D), w)
    with pytest.raises(SecAggError, match="NaN"):
        r.clients[3].masked(np.full(D, np.nan), 1.0)


def test_receive_masked_sum_folds_several_senders_at_once() -> None:
    r = Round(5)
    r.keys_and_shares()
    rng = np.random.default_rng(2)
    xs = {u: rng.standard_normal(D) * 0.1 for u in r.ids}  # inside the clip
    ys = {u: r.clients[u].masked(xs[u], 1.0, rng) for u in r.ids}
    r.server.receive_masked(MaskedInput(1, ys[1]))
    edge = ys[2] + ys[3] + ys[4]  # wrap-around uint32: what an edge forwards
    s = r.server
    for bad_ids, bad_values in (
        ([2, 2], edge), ([1, 2], edge), ([9], edge), ([], edge),
        ([2, 3, 4], edge.astype(np.int64)), ([2, 3, 4], edge[:-1]),
    ):  # fmt: skip
        with pytest.raises(SecAggError):
            s.receive_masked_sum(bad_ids, bad_values)
    s.receive_masked_sum([2, 3, 4], edge)
    assert s.survivors == {1, 2, 3, 4}
    total = r.unmask()  # client 5 dropped after sharing: its pair masks are rebuilt
    enc = r.params.encoder()
    vec, w = enc.decode(total, 4, D)
    assert abs(w - 4 * 0.1) <= 4 / enc.levels
    want = sum(0.1 * xs[u] for u in (1, 2, 3, 4))
    assert np.linalg.norm(vec - want) <= enc.error_bound(D, 4)


def test_round_params_checks() -> None:
    p = RoundParams.make(1, (3, 1, 2), 10, b"s", clip=2.0, rotation=5)
    assert p.ids == (1, 2, 3) and p.dim == 17 and p.encoder().clients == 3
    assert p.weight(50.0) == 1.0 and p.weight(0.5) == 0.5
    with pytest.raises(Exception, match="distinct, sorted"):
        RoundParams(1, (2, 1), p.dim, 10, b"s", p.degree, p.threshold, 2.0)
    with pytest.raises(Exception, match="not the encoded length"):
        dataclasses.replace(p, dim=11)
    with pytest.raises(Exception, match="effective"):
        dataclasses.replace(p, degree=1)
