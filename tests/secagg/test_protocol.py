"""SecAgg+'s protocol core: exact sums under dropouts at every stage, abandonment beyond the
threshold, a server that never holds an input, and a lying server caught by the clients."""

from __future__ import annotations

import dataclasses
from collections.abc import Set as AbstractSet
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedagg.errors import ConfigError, SecAggError
from fedagg.secagg import Encoder
from fedagg.secagg._graph import default_degree, default_threshold, neighbours
from fedagg.secagg._keys import public_bytes
from fedagg.secagg._protocol import (
    ClientSession,
    ConsistencyRequest,
    ConsistencySignature,
    ForwardedShares,
    KeyDirectory,
    MaskedInput,
    RoundConfig,
    ServerSession,
    UnmaskRequest,
)

U32 = np.uint32


class Fixture:
    """n clients with identities, their sessions and a server for one round."""

    def __init__(
        self,
        n: int,
        d: int,
        *,
        degree: int = 0,
        threshold: int = 0,
        chunk: int = 256,
        seed: int = 0,
    ) -> None:
        self.ids = list(range(1, n + 1))
        self.cfg = RoundConfig(
            round_id=7,
            clients=tuple(self.ids),
            dim=d,
            graph_seed=b"g%d" % seed,
            degree=degree,
            threshold=threshold,
            chunk=chunk,
        )
        self.ident = {u: Ed25519PrivateKey.generate() for u in self.ids}
        self.pub = {u: k.public_key() for u, k in self.ident.items()}
        self.clients = {u: ClientSession(self.cfg, u, self.ident[u], self.pub) for u in self.ids}
        self.server = ServerSession(self.cfg, self.pub)
        rng = np.random.default_rng(seed)
        self.x = {u: rng.integers(0, 2**32, d, dtype=U32) for u in self.ids}

    def plain_sum(self, ids: Any) -> np.ndarray:
        out = np.zeros(self.cfg.dim, dtype=U32)
        for u in ids:
            out += self.x[u]
        return out

    # one stage each: `drop` are the clients that stop answering at that stage
    def advertise(self, drop: AbstractSet[int] = frozenset()) -> dict[int, KeyDirectory]:
        for u in self.ids:
            if u not in drop:
                self.server.receive_advertise(self.clients[u].advertise())
        return self.server.close_advertise()

    def share(
        self, msgs: dict[int, KeyDirectory], drop: AbstractSet[int] = frozenset()
    ) -> dict[int, ForwardedShares]:
        for u, m in msgs.items():
            if u not in drop:
                self.server.receive_shares(self.clients[u].share_keys(m))
        return self.server.close_shares()

    def mask(
        self, msgs: dict[int, ForwardedShares], drop: AbstractSet[int] = frozenset()
    ) -> dict[int, ConsistencyRequest]:
        for u, m in msgs.items():
            if u not in drop:
                self.server.receive_masked(self.clients[u].masked_input(m, self.x[u]))
        return self.server.close_masked()

    def consist(
        self, msgs: dict[int, ConsistencyRequest], drop: AbstractSet[int] = frozenset()
    ) -> dict[int, UnmaskRequest]:
        for u, m in msgs.items():
            if u not in drop:
                self.server.receive_signature(self.clients[u].consistency(m))
        return self.server.close_consistency()

    def unmask(
        self, msgs: dict[int, UnmaskRequest], drop: AbstractSet[int] = frozenset()
    ) -> np.ndarray:
        for u, m in msgs.items():
            if u not in drop:
                self.server.receive_unmask(self.clients[u].unmask(m))
        return self.server.finish()

    def run(self, stage: int = 0, drop: AbstractSet[int] = frozenset()) -> np.ndarray:
        m: Any = self.advertise(drop if stage == 0 else set())
        for s, step in enumerate((self.share, self.mask, self.consist, self.unmask), start=1):
            m = step(m, drop if stage == s else set())
        assert isinstance(m, np.ndarray)
        return m


def feasible_dropouts(cfg: RoundConfig, count: int, seed: int) -> set[int]:
    """``count`` clients whose loss leaves every client ``t`` live neighbours."""
    rng = np.random.default_rng(seed)
    drop: set[int] = set()
    if count == 0:
        return drop
    for u in rng.permutation(cfg.clients):
        trial = drop | {int(u)}
        if all(len(cfg.graph[v] - trial) >= cfg.threshold for v in cfg.clients):
            drop = trial
        if len(drop) == count:
            return drop
    raise AssertionError("no feasible dropout set")


# -- exact sums --------------------------------------------------------------------------------
@pytest.mark.parametrize("degree", [19, 10], ids=["complete", "k10"])
@pytest.mark.parametrize("rate", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("stage", [0, 1, 2, 3, 4])
def test_exact_sum_of_survivors_under_dropouts(degree: int, rate: float, stage: int) -> None:
    f = Fixture(20, 300, degree=degree, chunk=64, seed=stage)
    assert f.cfg.degree == degree
    drop = feasible_dropouts(f.cfg, round(rate * 20), seed=stage)
    total = f.run(stage, drop)
    # dropping at the consistency or unmasking stage comes after the masked input: still summed
    survivors = set(f.ids) - drop if stage <= 2 else set(f.ids)
    assert f.server.survivors == survivors
    np.testing.assert_array_equal(total, f.plain_sum(survivors))


def test_larger_vector_and_chunkwise_unmasking_equals_whole() -> None:
    d = 5000
    sums = []
    for chunk in (d, 333, 1):  # whole, uneven chunks (not a multiple of 16 words), word by word
        f = Fixture(8, d, chunk=chunk, seed=3) if chunk != 1 else Fixture(8, 50, chunk=1, seed=3)
        drop = {2, 5}
        total = f.run(2, drop)
        np.testing.assert_array_equal(total, f.plain_sum(set(f.ids) - drop))
        sums.append(total)
    np.testing.assert_array_equal(sums[0], sums[1])


@pytest.mark.parametrize("stage", [0, 1, 2, 3, 4])
def test_beyond_the_threshold_the_round_is_abandoned(stage: int) -> None:
    f = Fixture(10, 64)  # complete: k = 9, t = 5; losing 5 leaves 4 neighbours
    assert (f.cfg.degree, f.cfg.threshold) == (9, 5)
    with pytest.raises(SecAggError, match="abandoned"):
        f.run(stage, {1, 2, 3, 4, 5})
    assert f.server.stage == -1
    assert f.server._sum is None  # nothing kept: no masked sum, no shares
    assert not f.server._b_shares and not f.server._s_shares
    with pytest.raises(SecAggError, match="abandoned"):
        f.server.finish()


# -- the server never holds an input ----------------------------------------------------------
def _arrays(obj: Any, seen: set[int] | None = None) -> list[np.ndarray]:
    """Every numpy array reachable from ``obj``'s attributes and containers."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, dict):
        return [a for k, v in obj.items() for a in _arrays(k, seen) + _arrays(v, seen)]
    if isinstance(obj, list | tuple | set | frozenset):
        return [a for v in obj for a in _arrays(v, seen)]
    if dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
        return [a for v in vars(obj).values() for a in _arrays(v, seen)]
    return []


def test_the_server_state_never_holds_an_individual_input() -> None:
    f = Fixture(6, 500)
    fwd = f.share(f.advertise())
    first = f.clients[1].masked_input(fwd[1], f.x[1])
    f.server.receive_masked(first)
    held = _arrays(f.server)
    assert len(held) == 1  # only the running sum
    assert not np.array_equal(held[0], f.x[1])
    assert np.mean(held[0] == f.x[1]) < 0.01  # the fold is masked word by word
    for u in range(2, 7):
        f.server.receive_masked(f.clients[u].masked_input(fwd[u], f.x[u]))
        for a in _arrays(f.server):
            for v in f.ids:
                assert np.mean(a == f.x[v]) < 0.01
    total = f.unmask(f.consist(f.server.close_masked()))
    np.testing.assert_array_equal(total, f.plain_sum(f.ids))
    assert f.server._sum is None and not f.server._b_shares


# -- a lying server ---------------------------------------------------------------------------
def test_a_replaced_or_unsigned_public_key_is_refused() -> None:
    f = Fixture(5, 8)
    dirs = f.advertise()
    adv = dirs[1].keys[2]
    fake = public_bytes(Ed25519PrivateKey.generate().public_key())  # any 32 bytes
    for forged in (
        dataclasses.replace(adv, c_pk=fake),
        dataclasses.replace(adv, s_pk=fake),
        dataclasses.replace(adv, signature=bytes(64)),
        dataclasses.replace(adv, sender=3),
    ):
        c = ClientSession(f.cfg, 1, f.ident[1], f.pub)
        c.advertise()
        with pytest.raises(SecAggError, match="refuses"):
            c.share_keys(KeyDirectory(7, {**dirs[1].keys, 2: forged}))
        assert c.aborted
        with pytest.raises(SecAggError, match="aborted"):
            c.share_keys(dirs[1])
    # a key signed by its owner for another round is refused too
    c = ClientSession(f.cfg, 1, f.ident[1], f.pub)
    c.advertise()
    with pytest.raises(SecAggError, match="round"):
        c.share_keys(KeyDirectory(8, dirs[1].keys))


def test_keys_of_non_neighbours_or_too_few_keys_are_refused() -> None:
    f = Fixture(12, 8, degree=4)  # sparse: k = 4, t = 3
    dirs = f.advertise()
    stranger = next(v for v in f.ids if v != 1 and v not in f.cfg.graph[1])
    c = ClientSession(f.cfg, 1, f.ident[1], f.pub)
    c.advertise()
    with pytest.raises(SecAggError, match="not a neighbour"):
        c.share_keys(KeyDirectory(7, {**dirs[1].keys, stranger: f.server._keys[stranger]}))
    c = ClientSession(f.cfg, 1, f.ident[1], f.pub)
    c.advertise()
    few = dict(list(dirs[1].keys.items())[:2])
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        c.share_keys(KeyDirectory(7, few))


def test_tampered_or_misattributed_ciphertexts_are_refused() -> None:
    g = Fixture(5, 8)
    fwd = g.share(g.advertise())
    cts = dict(fwd[1].ciphertexts)
    bad = bytearray(cts[2])
    bad[30] ^= 0x40
    with pytest.raises(SecAggError, match="fails authentication"):
        g.clients[1].masked_input(ForwardedShares(7, {**cts, 2: bytes(bad)}), g.x[1])
    assert g.clients[1].aborted
    with pytest.raises(SecAggError, match="fails authentication"):
        g.clients[2].masked_input(
            ForwardedShares(
                7, {**fwd[2].ciphertexts, 3: fwd[2].ciphertexts[4], 4: fwd[2].ciphertexts[3]}
            ),
            g.x[2],
        )
    with pytest.raises(SecAggError, match="truncated"):
        g.clients[3].masked_input(ForwardedShares(7, {**fwd[3].ciphertexts, 1: b"short"}), g.x[3])
    # a bundle sent to client 4 and replayed to client 5 (same sender) fails its associated data
    with pytest.raises(SecAggError, match="fails authentication"):
        g.clients[5].masked_input(
            ForwardedShares(7, {**fwd[5].ciphertexts, 1: fwd[4].ciphertexts[1]}), g.x[5]
        )


def _to_consistency(f: Fixture, drop: set[int]) -> dict[int, ConsistencyRequest]:
    return f.mask(f.share(f.advertise()), drop)


def test_inconsistent_survivor_sets_are_refused() -> None:
    """The server tells half the clients that client 6 dropped (to get its mask key shares)
    and the other half that it survived (to get its self-mask shares)."""
    f = Fixture(10, 16)
    reqs = _to_consistency(f, set())
    everyone = frozenset(f.ids)
    lie = everyone - {6}
    group_a, group_b = [1, 2, 3, 4, 5], [7, 8, 9, 10]
    sigs_a = {
        u: f.clients[u].consistency(ConsistencyRequest(7, everyone)).signature for u in group_a
    }
    sigs_b = {u: f.clients[u].consistency(ConsistencyRequest(7, lie)).signature for u in group_b}
    # shown with every signature: the other group's do not verify over this client's set
    with pytest.raises(SecAggError, match="survivor sets disagree"):
        f.clients[1].unmask(UnmaskRequest(7, everyone, frozenset(), {**sigs_a, **sigs_b}))
    with pytest.raises(SecAggError, match="survivor sets disagree"):
        f.clients[7].unmask(UnmaskRequest(7, lie, frozenset({6}), {**sigs_a, **sigs_b}))
    # shown only its own group's signatures: fewer than the threshold (t = 5 of 9 neighbours)
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        f.clients[8].unmask(UnmaskRequest(7, lie, frozenset({6}), sigs_b))
    # a set other than the one it signed
    with pytest.raises(SecAggError, match="differs from the one it signed"):
        f.clients[2].unmask(UnmaskRequest(7, lie, frozenset({6}), sigs_a))
    assert set(reqs) == everyone  # the honest requests, never sent


def test_signatures_from_another_session_under_the_same_round_id_are_refused() -> None:
    """A server that ran session A (everyone survived), aborted it, and opens session B under
    the same round id cannot replay A's consistency signatures in B: they are bound to each
    signer's ephemeral keys of A."""
    a = Fixture(6, 16)
    sigs_a = {
        u: a.clients[u].consistency(r).signature for u, r in _to_consistency(a, set()).items()
    }
    b = Fixture(6, 16)
    b.clients = {u: ClientSession(b.cfg, u, a.ident[u], a.pub) for u in b.ids}
    b.server = ServerSession(b.cfg, a.pub)
    reqs = _to_consistency(b, set())
    own = b.clients[1].consistency(reqs[1]).signature
    replayed = {**{u: s for u, s in sigs_a.items() if u != 1}, 1: own}
    with pytest.raises(SecAggError, match="survivor sets disagree"):
        b.clients[1].unmask(UnmaskRequest(7, frozenset(b.ids), frozenset(), replayed))
    with pytest.raises(SecAggError, match="survivor set"):
        b.server.receive_signature(ConsistencySignature(2, sigs_a[2]))


def test_a_request_for_both_shares_of_a_peer_is_refused() -> None:
    f = Fixture(6, 16)
    reqs = f.consist(_to_consistency(f, {6}))
    honest = reqs[1]
    overlap = dataclasses.replace(honest, dropped=honest.dropped | {2})
    with pytest.raises(SecAggError, match="both survivors and dropped"):
        f.clients[1].unmask(overlap)
    assert f.clients[1].aborted
    # the honest request is answered once, with one kind of share per peer
    r = f.clients[2].unmask(reqs[2])
    assert set(r.b_shares) == {1, 3, 4, 5} and set(r.s_shares) == {6}
    with pytest.raises(SecAggError, match="stage 4 requested while at stage 5"):
        f.clients[2].unmask(
            dataclasses.replace(reqs[2], survivors=frozenset(), dropped=frozenset(f.ids))
        )


def test_survivor_sets_a_client_cannot_accept() -> None:
    f = Fixture(6, 16)
    _to_consistency(f, set())
    with pytest.raises(SecAggError, match="leaves this client out"):
        f.clients[1].consistency(ConsistencyRequest(7, frozenset({2, 3, 4, 5, 6})))
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        f.clients[2].consistency(ConsistencyRequest(7, frozenset({2, 3})))
    with pytest.raises(SecAggError, match="outside the round"):
        f.clients[3].consistency(ConsistencyRequest(7, frozenset({*f.ids, 99})))


def test_unsigned_survivor_sets_are_refused() -> None:
    f = Fixture(6, 16)
    reqs = f.consist(_to_consistency(f, set()))
    req = reqs[1]
    with pytest.raises(SecAggError, match="survivor sets disagree"):
        f.clients[1].unmask(dataclasses.replace(req, signatures={**req.signatures, 3: bytes(64)}))
    with pytest.raises(SecAggError, match="own signature is missing"):
        f.clients[2].unmask(
            dataclasses.replace(
                reqs[2], signatures={u: s for u, s in req.signatures.items() if u != 2}
            )
        )


def test_stages_out_of_order_are_refused() -> None:
    f = Fixture(4, 8)
    with pytest.raises(SecAggError, match="stage 2 requested while at stage 0"):
        f.clients[1].masked_input(ForwardedShares(7, {}), f.x[1])
    with pytest.raises(SecAggError, match="stage 2 while at stage 0"):
        f.server.receive_masked(MaskedInput(1, f.x[1]))
    f.server.receive_advertise(f.clients[1].advertise())
    with pytest.raises(SecAggError, match="unknown or repeated"):
        f.server.receive_advertise(f.server._keys[1])
    with pytest.raises(SecAggError, match="bad Ed25519 signature"):
        f.server.receive_advertise(
            dataclasses.replace(f.clients[2].advertise(), s_pk=f.server._keys[1].s_pk)
        )


# -- the graph and the parameters -------------------------------------------------------------
def test_graph_is_symmetric_regular_seeded_and_complete_when_small() -> None:
    ids = list(range(1, 101))
    g = neighbours(ids, 12, b"seed")
    assert all(u not in g[u] and len(g[u]) == 12 for u in ids)
    assert all(u in g[v] for u in ids for v in g[u])
    assert g == neighbours(ids, 12, b"seed") and g != neighbours(ids, 12, b"other")
    assert neighbours(ids, 11, b"seed") == g  # odd degree rounds up
    small = neighbours([3, 5, 9], 8, b"s")
    assert small == {3: {5, 9}, 5: {3, 9}, 9: {3, 5}}
    assert default_degree(10) == 9 and default_degree(1000) == 30
    assert default_threshold(10) == 6
    # connected: a breadth-first walk reaches everyone
    seen, todo = {1}, [1]
    while todo:
        for v in g[todo.pop()] - seen:
            seen.add(v)
            todo.append(v)
    assert seen == set(ids)


def test_bad_parameters_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="threshold must be in"):
        RoundConfig(round_id=1, clients=(1, 2, 3, 4, 5), dim=4, graph_seed=b"", threshold=2)
    with pytest.raises(ConfigError, match="threshold must be in"):
        RoundConfig(round_id=1, clients=(1, 2, 3, 4, 5), dim=4, graph_seed=b"", threshold=5)
    with pytest.raises(ConfigError, match="distinct ints >= 1"):
        RoundConfig(round_id=1, clients=(0, 1, 2), dim=4, graph_seed=b"")
    with pytest.raises(ConfigError, match="dim"):
        RoundConfig(round_id=1, clients=(1, 2, 3), dim=0, graph_seed=b"")
    # what a malicious server may ask a client to build is bounded (checked before the graph)
    many = tuple(range(1, 1001))
    with pytest.raises(ConfigError, match="degree must be at most 128"):
        RoundConfig(round_id=1, clients=many, dim=4, graph_seed=b"", degree=2**32 - 1)
    with pytest.raises(ConfigError, match="at most 65536 clients"):
        RoundConfig(round_id=1, clients=tuple(range(1, 65538)), dim=4, graph_seed=b"")
    assert RoundConfig(round_id=1, clients=(1, 2, 3), dim=4, graph_seed=b"", degree=9).degree == 2
    cfg = RoundConfig(round_id=1, clients=(1, 2, 3), dim=4, graph_seed=b"")
    with pytest.raises(ConfigError, match="not in round"):
        ClientSession(cfg, 9, Ed25519PrivateKey.generate(), {})
    c = ClientSession(cfg, 1, Ed25519PrivateKey.generate(), {})
    c.advertise()
    c._stage = 2
    with pytest.raises(SecAggError, match="uint32"):
        c.masked_input(ForwardedShares(1, {}), np.zeros(4, dtype=np.float32))


# -- end to end with the encoding -------------------------------------------------------------
def test_floats_end_to_end_weighted_mean_within_the_quantisation_bound() -> None:
    """Float updates, clipped and rotated by the Encoder, masked, 30% dropped after sharing:
    the decoded weighted mean of the survivors is within the documented bound."""
    n, d = 10, 300
    enc = Encoder(clip=5.0, bits=32, clients=n, rotation=11)
    rng = np.random.default_rng(5)
    upd = {u: rng.standard_normal(d) * 0.1 for u in range(1, n + 1)}
    w = {u: float(rng.uniform(0.2, 1.0)) for u in upd}
    f = Fixture(n, enc.length(d), seed=5)
    f.x = {u: enc.encode(upd[u], w[u], rng=np.random.default_rng(u)) for u in upd}
    drop = {3, 6, 9}
    total = f.run(2, drop)
    alive = sorted(set(upd) - drop)
    np.testing.assert_array_equal(total, f.plain_sum(alive))  # exact in Z_{2^32}
    got = enc.mean(total, len(alive), d)
    wsum = sum(w[u] for u in alive)
    want = sum(w[u] * upd[u] for u in alive) / wsum
    e_v, e_w = enc.error_bound(d, len(alive)), len(alive) / enc.levels
    bound = (e_v + enc.clip * e_w) / (wsum - e_w)
    assert np.linalg.norm(got - want) <= bound
    assert np.linalg.norm(got - want) < 1e-4  # and far from a vacuous bound
