"""SecAgg+ as two pure state machines, :class:`ClientSession` and :class:`ServerSession`,
exchanging explicit message dataclasses (no I/O, no clock: the caller moves the messages and
decides when a stage's deadline has passed by calling the server's ``close_*``).

Stages (Bonawitz et al. CCS 2017, on the graph of Bell et al. CCS 2020):

0. **Advertise keys**: each client sends two ephemeral X25519 public keys (``c`` for share
   encryption, ``s`` for masks) signed by its Ed25519 identity over the round and its id. The
   server forwards to each client its neighbours' signed keys; the client checks every
   signature, that the keys are for its neighbours in the public graph, and that at least ``t``
   of them came.
1. **Share keys**: each client draws a self-mask seed ``b_u``, Shamir-splits ``b_u`` and its
   ``s`` private key ``t``-of-``k`` over its neighbours, and seals each neighbour's pair of
   shares with ChaCha20-Poly1305 (associated data: sender, receiver, round).
2. **Masked input**: ``y_u = x_u + PRG(b_u) + Σ_v ±PRG(s_uv)`` in Z_{2^32} (``+`` when ``u < v``),
   over the neighbours whose shares arrived. The server folds each ``y_u`` into one running
   sum as it arrives (wrap-around uint32 adds): O(d) memory whatever ``n``.
3. **Consistency**: the server sends the survivor set; each client checks it (it is in it, at
   least ``t`` of its neighbours are in it) and signs it.
4. **Unmasking**: the server sends the survivor set, the dropped set and the signatures; each
   client checks that every signature is valid over *its* survivor set, that at least ``t`` of
   its neighbours signed, and that the two sets are disjoint, then returns ``b`` shares of its
   surviving neighbours and ``s`` shares of its dropped ones, never both for one peer, once.
   The server rebuilds ``b_u`` of survivors and ``s_u`` of dropped clients and removes the masks
   chunk by chunk (PRG blocks generated per chunk), leaving the exact sum of the survivors'
   inputs.

Dropouts at any stage are tolerated while every client whose secrets are needed keeps ``t``
share holders alive; otherwise the server raises :class:`~fedagg.errors.SecAggError` and the
round is abandoned: only masked vectors and fewer than ``t`` shares of anything were seen.

**What holds, and what does not.** Against an honest-but-curious server that also controls
fewer than ``t`` of any client's neighbours, nothing but the survivors' sum is revealed. A
*malicious* server is caught when it replaces or drops a signature on an advertised key, sends
different survivor sets to different clients (their signatures do not verify over each other's
set), asks one client for both shares of a peer, or asks twice. Not covered: a server that
colludes with ``t`` or more of a client's neighbours (they hold its shares); a server that
splits the clients into disjoint groups each holding ``t`` signatures of every member's
neighbourhood (needs a sparse graph and many colluding/honest signers; complete graphs with
``t > n/2`` rule it out); the identity PKI itself (the ``identities`` map is trusted); and
input validity (a client can send any vector: clip before encoding).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedagg.errors import ConfigError, SecAggError
from fedagg.secagg._keys import (
    KEY_BYTES,
    agree,
    decrypt,
    encrypt,
    new_key_pair,
    public_bytes,
    sign,
    verify,
)
from fedagg.secagg._messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    ForwardedShares,
    KeyDirectory,
    MaskedInput,
    RoundConfig,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    bundle,
    key_parts,
    sign_of,
    survivor_digest,
    survivor_parts,
    unbundle,
)
from fedagg.secagg._prg import add_mask
from fedagg.secagg._shamir import combine, split

__all__ = [
    "AdvertiseKeys",
    "ClientSession",
    "ConsistencyRequest",
    "ConsistencySignature",
    "ForwardedShares",
    "KeyDirectory",
    "MaskedInput",
    "RoundConfig",
    "ServerSession",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskResponse",
]

U32 = np.dtype(np.uint32)


# -- the client -----------------------------------------------------------------------------------
class ClientSession:
    """One client's side of one round. Call the stages in order; a refusal (a
    :class:`SecAggError`) ends the session: every later call raises too.

    ``identities`` maps every client id to its long-term Ed25519 public key (a trusted PKI);
    ``randbelow`` is Shamir's randomness (tests only; default :func:`secrets.randbelow`)."""

    def __init__(
        self,
        config: RoundConfig,
        client_id: int,
        identity: Ed25519PrivateKey,
        identities: Mapping[int, Ed25519PublicKey],
        *,
        randbelow: Callable[[int], int] = secrets.randbelow,
    ) -> None:
        if client_id not in config.graph:
            raise ConfigError(f"client {client_id} is not in round {config.round_id}")
        self.config = config
        self.id = client_id
        self._identity = identity
        self._identities = dict(identities)
        self._randbelow = randbelow
        self._neighbours = config.graph[client_id]
        self._c_sk: X25519PrivateKey | None = new_key_pair()
        self._s_sk: X25519PrivateKey | None = new_key_pair()
        self._stage = 0
        self._peer_keys: dict[int, AdvertiseKeys] = {}
        self._own = AdvertiseKeys(client_id, b"", b"", b"")  # its own, once advertised
        self._b: bytes | None = None
        self._held: dict[int, tuple[int, int]] = {}  # sender -> (b share, s share)
        self._masked_with: frozenset[int] = frozenset()
        self._signed: frozenset[int] | None = None

    # - bookkeeping
    def _enter(self, stage: int) -> None:
        if self._stage < 0:
            raise SecAggError(f"client {self.id}: the session was aborted")
        if self._stage != stage:
            raise SecAggError(
                f"client {self.id}: stage {stage} requested while at stage {self._stage}"
            )

    def _refuse(self, why: str) -> SecAggError:
        self._stage = -1
        self._c_sk = self._s_sk = None
        self._b = None
        self._held.clear()
        return SecAggError(f"client {self.id} refuses: {why}")

    @property
    def aborted(self) -> bool:
        return self._stage < 0

    # - stage 0
    def advertise(self) -> AdvertiseKeys:
        self._enter(0)
        assert self._c_sk is not None and self._s_sk is not None
        c_pk, s_pk = public_bytes(self._c_sk), public_bytes(self._s_sk)
        sig = sign(self._identity, *key_parts(self.config.round_id, self.id, c_pk, s_pk))
        self._stage = 1
        self._own = AdvertiseKeys(self.id, c_pk, s_pk, sig)
        return self._own

    # - stage 1
    def share_keys(self, msg: KeyDirectory) -> ShareKeys:
        self._enter(1)
        cfg = self.config
        if msg.round_id != cfg.round_id:
            raise self._refuse(f"key directory of round {msg.round_id}, not {cfg.round_id}")
        seen: set[bytes] = set()
        for v, adv in msg.keys.items():
            if v != adv.sender or v not in self._neighbours:
                raise self._refuse(f"keys of client {adv.sender} (as {v}): not a neighbour")
            pk = self._identities.get(v)
            if pk is None:
                raise self._refuse(f"client {v} has no known identity")
            try:
                verify(
                    pk,
                    adv.signature,
                    *key_parts(cfg.round_id, v, adv.c_pk, adv.s_pk),
                    who=f"client {v}'s advertised keys",
                )
            except SecAggError as e:
                raise self._refuse(str(e)) from None
            if adv.c_pk == adv.s_pk or {adv.c_pk, adv.s_pk} & seen:
                raise self._refuse(f"client {v}'s advertised keys repeat a key")
            seen |= {adv.c_pk, adv.s_pk}
        if len(msg.keys) < cfg.threshold:
            raise self._refuse(
                f"{len(msg.keys)} neighbours advertised keys, fewer than the threshold "
                f"{cfg.threshold}"
            )
        assert self._c_sk is not None and self._s_sk is not None
        self._peer_keys = dict(msg.keys)
        self._b = secrets.token_bytes(KEY_BYTES)
        xs = sorted(msg.keys)
        b_sh = split(self._b, cfg.threshold, xs, self._randbelow)
        s_sh = split(self._s_sk.private_bytes_raw(), cfg.threshold, xs, self._randbelow)
        out: dict[int, bytes] = {}
        for v in xs:
            key = agree(
                self._c_sk,
                msg.keys[v].c_pk,
                purpose=b"share",
                round_id=cfg.round_id,
                a=self.id,
                b=v,
            )
            out[v] = encrypt(
                key,
                bundle(self.id, v, cfg.round_id, b_sh[v], s_sh[v]),
                sender=self.id,
                receiver=v,
                round_id=cfg.round_id,
            )
        self._stage = 2
        return ShareKeys(self.id, out)

    # - stage 2
    def masked_input(
        self, msg: ForwardedShares, x: np.ndarray[Any, np.dtype[np.uint32]]
    ) -> MaskedInput:
        """``y = x + PRG(b_u) + Σ_v ±PRG(s_uv)`` over the neighbours whose shares came."""
        self._enter(2)
        cfg = self.config
        x = np.asarray(x)
        if x.dtype != U32 or x.shape != (cfg.dim,):
            raise self._refuse(
                f"input must be uint32 of shape ({cfg.dim},), got {x.dtype} {x.shape}"
            )
        if msg.round_id != cfg.round_id:
            raise self._refuse(f"shares of round {msg.round_id}, not {cfg.round_id}")
        senders = frozenset(msg.ciphertexts)
        if not senders <= frozenset(self._peer_keys):
            raise self._refuse(
                f"shares from non-neighbours {sorted(senders - set(self._peer_keys))}"
            )
        if len(senders) < cfg.threshold:
            raise self._refuse(
                f"shares from {len(senders)} neighbours, fewer than the threshold {cfg.threshold}"
            )
        assert self._c_sk is not None and self._s_sk is not None and self._b is not None
        held: dict[int, tuple[int, int]] = {}
        for u in sorted(senders):
            key = agree(
                self._c_sk,
                self._peer_keys[u].c_pk,
                purpose=b"share",
                round_id=cfg.round_id,
                a=self.id,
                b=u,
            )
            try:
                raw = decrypt(
                    key, msg.ciphertexts[u], sender=u, receiver=self.id, round_id=cfg.round_id
                )
                held[u] = unbundle(raw, u, self.id, cfg.round_id)
            except SecAggError as e:
                raise self._refuse(str(e)) from None
        self._held = held
        self._masked_with = senders
        y = x.copy()
        add_mask(y, self._b, 0, 1)
        for v in sorted(senders):
            seed = agree(
                self._s_sk,
                self._peer_keys[v].s_pk,
                purpose=b"mask",
                round_id=cfg.round_id,
                a=self.id,
                b=v,
            )
            add_mask(y, seed, 0, sign_of(self.id, v))
        self._stage = 3
        return MaskedInput(self.id, y)

    # - stage 3
    def _check_survivors(self, survivors: frozenset[int]) -> None:
        cfg = self.config
        if self.id not in survivors:
            raise self._refuse("the survivor set leaves this client out")
        if not survivors <= set(cfg.graph):
            raise self._refuse("the survivor set names clients outside the round")
        mine = survivors & self._masked_with
        if len(mine) < cfg.threshold:
            raise self._refuse(
                f"{len(mine)} of its neighbours survive, fewer than the threshold {cfg.threshold}"
            )
        if (survivors & self._neighbours) - self._masked_with:
            raise self._refuse("the survivor set holds neighbours whose shares never came")

    def consistency(self, msg: ConsistencyRequest) -> ConsistencySignature:
        self._enter(3)
        if msg.round_id != self.config.round_id:
            raise self._refuse(f"survivor set of round {msg.round_id}")
        survivors = frozenset(msg.survivors)
        self._check_survivors(survivors)
        self._signed = survivors
        self._stage = 4
        own = self._own
        parts = survivor_parts(self.config.round_id, survivor_digest(survivors), own.c_pk, own.s_pk)
        sig = sign(self._identity, *parts)
        return ConsistencySignature(self.id, sig)

    # - stage 4
    def unmask(self, msg: UnmaskRequest) -> UnmaskResponse:
        """Reveal ``b`` shares of surviving neighbours and ``s`` shares of dropped ones, once."""
        self._enter(4)
        cfg = self.config
        survivors, dropped = frozenset(msg.survivors), frozenset(msg.dropped)
        if msg.round_id != cfg.round_id:
            raise self._refuse(f"unmask request of round {msg.round_id}")
        if survivors != self._signed:
            raise self._refuse("the unmasking survivor set differs from the one it signed")
        if survivors & dropped:
            raise self._refuse(
                f"clients {sorted(survivors & dropped)} are both survivors and "
                "dropped (a request for both shares of a peer)"
            )
        if not set(msg.signatures) <= survivors:
            raise self._refuse("signatures from clients outside the survivor set")
        digest = survivor_digest(survivors)  # encoded once: O(n), not per signature
        for v, sig in msg.signatures.items():
            pk = self._identities.get(v)
            keys = self._own if v == self.id else self._peer_keys.get(v)
            if pk is None or keys is None:
                raise self._refuse(f"a signature from client {v}, whose keys it does not know")
            parts = survivor_parts(cfg.round_id, digest, keys.c_pk, keys.s_pk)
            try:
                verify(pk, sig, *parts, who=f"client {v}'s survivor set")
            except SecAggError as e:
                raise self._refuse(f"{e}: the survivor sets disagree") from None
        if self.id not in msg.signatures:
            raise self._refuse("its own signature is missing")
        by_neighbours = len(set(msg.signatures) & self._masked_with)
        if by_neighbours < cfg.threshold:
            raise self._refuse(
                f"{by_neighbours} of its neighbours signed the survivor set, "
                f"fewer than the threshold {cfg.threshold}"
            )
        b_out = {v: self._held[v][0] for v in sorted(survivors & set(self._held)) if v != self.id}
        s_out = {v: self._held[v][1] for v in sorted(dropped & set(self._held))}
        self._stage = 5
        self._held.clear()
        self._c_sk = self._s_sk = None
        self._b = None
        return UnmaskResponse(self.id, b_out, s_out)


# -- the server -----------------------------------------------------------------------------------
class ServerSession:
    """The server's side of one round. Feed each arriving message to ``receive_*``; call
    ``close_*`` when a stage is over (all replies, or its deadline) to get the next stage's
    messages, keyed by receiver; :meth:`finish` returns the sum of the survivors' inputs
    (uint32, wrap-around). The state holds public keys, ciphertexts in transit, the one running
    sum of masked vectors and, at the end, shares: never an individual input. Any stage whose
    dropouts exceed the threshold raises :class:`SecAggError` and abandons the round."""

    def __init__(self, config: RoundConfig, identities: Mapping[int, Ed25519PublicKey]) -> None:
        self.config = config
        self._identities = dict(identities)
        self._stage = 0
        self._keys: dict[int, AdvertiseKeys] = {}
        self._u1: frozenset[int] = frozenset()
        self._shares: dict[int, Mapping[int, bytes]] = {}
        self._u2: frozenset[int] = frozenset()
        self._sum: np.ndarray[Any, np.dtype[np.uint32]] | None = None
        self._u3: set[int] = set()
        self._sigs: dict[int, bytes] = {}
        self._u3_digest = b""
        self._u4: frozenset[int] = frozenset()
        self._b_shares: dict[int, dict[int, int]] = {}
        self._s_shares: dict[int, dict[int, int]] = {}
        self._u5: set[int] = set()

    @property
    def stage(self) -> int:
        """0..4 while running, 5 once finished, -1 once abandoned."""
        return self._stage

    @property
    def survivors(self) -> frozenset[int]:
        return frozenset(self._u3)

    def _enter(self, stage: int) -> None:
        if self._stage < 0:
            raise SecAggError(f"round {self.config.round_id} was abandoned")
        if self._stage != stage:
            raise SecAggError(f"server: stage {stage} while at stage {self._stage}")

    def _abandon(self, why: str) -> SecAggError:
        self._stage = -1
        self._sum = None
        self._shares.clear()
        self._b_shares.clear()
        self._s_shares.clear()
        return SecAggError(f"round {self.config.round_id} abandoned: {why}")

    def _prune(self, alive: set[int]) -> frozenset[int]:
        """Drop clients left with fewer than ``t`` live neighbours, until none is."""
        g, t = self.config.graph, self.config.threshold
        while True:
            weak = {u for u in alive if len(g[u] & alive) < t}
            if not weak:
                return frozenset(alive)
            alive -= weak

    # - stage 0
    def receive_advertise(self, msg: AdvertiseKeys) -> None:
        self._enter(0)
        u = msg.sender
        if u not in self.config.graph or u in self._keys:
            raise SecAggError(f"advertised keys from unknown or repeated client {u}")
        verify(
            self._identities[u],
            msg.signature,
            *key_parts(self.config.round_id, u, msg.c_pk, msg.s_pk),
            who=f"client {u}'s advertised keys",
        )
        self._keys[u] = msg

    def close_advertise(self) -> dict[int, KeyDirectory]:
        self._enter(0)
        self._u1 = self._prune(set(self._keys))
        if not self._u1:
            raise self._abandon("too few clients advertised keys for the threshold")
        self._stage = 1
        g, r = self.config.graph, self.config.round_id
        return {
            u: KeyDirectory(r, {v: self._keys[v] for v in sorted(g[u] & self._u1)})
            for u in sorted(self._u1)
        }

    # - stage 1
    def receive_shares(self, msg: ShareKeys) -> None:
        self._enter(1)
        u = msg.sender
        if u not in self._u1 or u in self._shares:
            raise SecAggError(f"shares from unexpected or repeated client {u}")
        if set(msg.ciphertexts) != set(self.config.graph[u] & self._u1):
            raise SecAggError(f"client {u}'s shares are not addressed to its neighbours")
        self._shares[u] = dict(msg.ciphertexts)

    def close_shares(self) -> dict[int, ForwardedShares]:
        self._enter(1)
        self._u2 = self._prune(set(self._shares))
        if not self._u2:
            raise self._abandon("too few clients shared keys for the threshold")
        g, r = self.config.graph, self.config.round_id
        out = {
            v: ForwardedShares(r, {u: self._shares[u][v] for u in sorted(g[v] & self._u2)})
            for v in sorted(self._u2)
        }
        self._shares.clear()  # forwarded: the server keeps no ciphertext
        self._sum = np.zeros(self.config.dim, dtype=np.uint32)
        self._stage = 2
        return out

    # - stage 2
    def receive_masked(self, msg: MaskedInput) -> None:
        """Fold ``y_u`` into the running sum (wrap-around, chunk by chunk) and forget it."""
        self._enter(2)
        u = msg.sender
        if u not in self._u2 or u in self._u3:
            raise SecAggError(f"masked input from unexpected or repeated client {u}")
        y = np.asarray(msg.values)
        if y.dtype != U32 or y.shape != (self.config.dim,):
            raise SecAggError(
                f"client {u}'s masked input is not uint32 of shape ({self.config.dim},)"
            )
        assert self._sum is not None
        c = self.config.chunk
        for o in range(0, self.config.dim, c):
            np.add(self._sum[o : o + c], y[o : o + c], out=self._sum[o : o + c])
        self._u3.add(u)

    def receive_masked_sum(
        self, senders: Iterable[int], values: np.ndarray[Any, np.dtype[np.uint32]]
    ) -> None:
        """Fold the wrap-around sum of several clients' masked inputs at once (an edge's
        partial, which never saw an input): the same checks as :meth:`receive_masked` for
        each sender, all or none."""
        self._enter(2)
        ids = list(senders)
        if not ids or len(set(ids)) != len(ids):
            raise SecAggError("a masked sum must name one or more distinct senders")
        bad = sorted(u for u in ids if u not in self._u2 or u in self._u3)
        if bad:
            raise SecAggError(f"masked sum from unexpected or repeated clients {bad[:8]}")
        y = np.asarray(values)
        if y.dtype != U32 or y.shape != (self.config.dim,):
            raise SecAggError(f"a masked sum is not uint32 of shape ({self.config.dim},)")
        assert self._sum is not None
        c = self.config.chunk
        for o in range(0, self.config.dim, c):
            np.add(self._sum[o : o + c], y[o : o + c], out=self._sum[o : o + c])
        self._u3.update(ids)

    def _check_holders(self, alive: frozenset[int], what: str) -> None:
        """Every survivor's ``b`` and every dropped client's ``s`` (when a survivor masked
        with it) needs ``t`` share holders in ``alive``."""
        g, t = self.config.graph, self.config.threshold
        u3 = frozenset(self._u3)
        for u in sorted(self._u2):
            needed = u in u3 or bool(g[u] & u3)
            if needed and len(g[u] & self._u2 & alive) < t:
                raise self._abandon(
                    f"client {u}'s secrets have {len(g[u] & alive)} share "
                    f"holders {what}, fewer than the threshold {t}"
                )

    def close_masked(self) -> dict[int, ConsistencyRequest]:
        self._enter(2)
        u3 = frozenset(self._u3)
        self._check_holders(u3, "among the survivors")
        self._stage = 3
        return {u: ConsistencyRequest(self.config.round_id, u3) for u in sorted(u3)}

    # - stage 3
    def receive_signature(self, msg: ConsistencySignature) -> None:
        self._enter(3)
        u = msg.sender
        if u not in self._u3 or u in self._sigs:
            raise SecAggError(f"signature from unexpected or repeated client {u}")
        if not self._u3_digest:  # the survivor set is fixed from stage 3 on: encode it once
            self._u3_digest = survivor_digest(frozenset(self._u3))
        keys = self._keys[u]
        parts = survivor_parts(self.config.round_id, self._u3_digest, keys.c_pk, keys.s_pk)
        verify(self._identities[u], msg.signature, *parts, who=f"client {u}'s survivor set")
        self._sigs[u] = msg.signature

    def close_consistency(self) -> dict[int, UnmaskRequest]:
        self._enter(3)
        self._u4 = frozenset(self._sigs)
        self._check_holders(self._u4, "that signed")
        u3 = frozenset(self._u3)
        dropped = self._u2 - u3
        self._stage = 4
        r, g = self.config.round_id, self.config.graph
        # each client is sent its own and its neighbours' signatures: what it checks (>= t
        # neighbours signed the set it signed) and no more, so a client verifies at most k + 1
        # signatures, not n (n^2 verifications per round at n clients)
        return {
            u: UnmaskRequest(
                r, u3, dropped, {v: self._sigs[v] for v in sorted((g[u] | {u}) & self._u4)}
            )
            for u in sorted(self._u4)
        }

    # - stage 4
    def receive_unmask(self, msg: UnmaskResponse) -> None:
        self._enter(4)
        u = msg.sender
        if u not in self._u4 or u in self._u5:
            raise SecAggError(f"unmask response from unexpected or repeated client {u}")
        g = self.config.graph
        if set(msg.b_shares) & set(msg.s_shares):
            raise SecAggError(f"client {u} sent both shares of one peer")
        for v, y in msg.b_shares.items():
            if v in self._u3 and v in g[u]:
                self._b_shares.setdefault(v, {})[u] = y
        for v, y in msg.s_shares.items():
            if v in self._u2 - self._u3 and v in g[u]:
                self._s_shares.setdefault(v, {})[u] = y
        self._u5.add(u)

    def finish(self) -> np.ndarray[Any, np.dtype[np.uint32]]:
        """Rebuild the secrets and remove every mask chunk by chunk: the survivors' sum."""
        self._enter(4)
        cfg, g, t = self.config, self.config.graph, self.config.threshold
        u3 = frozenset(self._u3)
        seeds: list[tuple[bytes, int]] = []  # (PRG seed, sign to apply to the sum)
        try:
            seeds += [(combine(self._b_shares.get(u, {}), t, KEY_BYTES), -1) for u in sorted(u3)]
            for u in sorted(self._u2 - u3):
                live = g[u] & u3
                if not live:
                    continue
                raw = combine(self._s_shares.get(u, {}), t, KEY_BYTES)
                s_sk = X25519PrivateKey.from_private_bytes(raw)
                if public_bytes(s_sk) != self._keys[u].s_pk:
                    raise SecAggError(f"client {u}'s rebuilt mask key does not match its key")
                for v in sorted(live):  # v added sign(v, u) * PRG(s_vu): take it away
                    seed = agree(
                        s_sk, self._keys[v].s_pk, purpose=b"mask", round_id=cfg.round_id, a=u, b=v
                    )
                    seeds.append((seed, -sign_of(v, u)))
        except SecAggError as e:
            raise self._abandon(str(e)) from None
        assert self._sum is not None
        total = self._sum
        for o in range(0, cfg.dim, cfg.chunk):
            view = total[o : o + cfg.chunk]
            for seed, sgn in seeds:
                add_mask(view, seed, o, sgn)
        self._sum = None
        self._b_shares.clear()
        self._s_shares.clear()
        self._stage = 5
        return total
