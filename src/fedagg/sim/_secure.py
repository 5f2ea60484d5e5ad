"""The clients' side of secure aggregation in the simulator (:class:`fedagg.policy.SecurePolicy`).

The engine answers a :class:`~fedagg.policy.SecureRequest` by running each client's
:class:`~fedagg.secagg.SecureClient` in process; the replies reach the policy at the same
virtual time (control messages are modelled as instantaneous: only the model's download and
the masked upload take time, as the :class:`SystemModel` says). At a client's arrival, its
trained delta is encoded and masked (the stochastic rounding seeded by ``(seed, job)``) before
the policy sees it: the policy only ever receives uint32 masked vectors. A client that trained
before its stage-2 shares came holds its update until they do; one left out of the protocol
(it dropped out, refused a request, or the server excluded it) never uploads: its arrival
becomes a :class:`~fedagg.policy.Dropout`.

**Dropouts** (``[secure_aggregation] dropout``): a seeded draw per (seed, round, client) picks
whether the client drops out of the protocol, and if so at which of four stages, uniformly:
after advertising its keys (it sends no shares), after sharing (no masked upload), after the
masked upload (no consistency signature), or during unmasking (no shares revealed). It just
goes silent (the server's stage timers notice), as a crashed client would.

**Identities**: one Ed25519 key per client, made when first asked for (random: the keys, the
ephemeral keys and the masks differ between runs, but the unmasked sum is exact, so a run
replays bit for bit from its seed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedagg.core.spec import ParamSpec
from fedagg.errors import ConfigError, SecAggError
from fedagg.policy import Arrival, Dropout, Event, SecureReply, SecureRequest
from fedagg.privacy import integer_noise
from fedagg.secagg import RoundParams, SecureClient, encode_message

__all__ = ["SimSecure"]

#: the stage a client that does not drop out reaches (it answers every request)
_ALL = 4


class _Round:
    def __init__(self, params: RoundParams, jobs: Mapping[int, int]) -> None:
        self.params = params
        self.jobs = dict(jobs)  # client -> job
        self.clients: dict[int, SecureClient] = {}
        self.last: dict[int, int] = {}  # client -> the last stage it takes part in
        self.parked: dict[int, Arrival] = {}  # client -> its trained update, awaiting shares
        self.excluded: set[int] = set()


class SimSecure:
    """In-process clients for secure rounds (module docs)."""

    def __init__(self, seed: int, dropout: float = 0.0) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"secure_aggregation.dropout must be in [0, 1), got {dropout}")
        self.seed = seed
        self.dropout = dropout
        self._keys: dict[int, Ed25519PrivateKey] = {}
        self._rounds: dict[int, _Round] = {}
        self._job_round: dict[int, int] = {}  # job -> round id (open rounds)
        self._released: set[int] = set()  # jobs whose masked upload is already in the heap
        self.bytes_down = 0
        self.bytes_up = 0

    def identity(self, client: int) -> bytes:
        """Client ``client``'s Ed25519 public key (raw 32 bytes)."""
        return self._key(client).public_key().public_bytes_raw()

    def _key(self, client: int) -> Ed25519PrivateKey:
        k = self._keys.get(client)
        if k is None:
            k = self._keys[client] = Ed25519PrivateKey.generate()
        return k

    def last_stage(self, round_id: int, client: int) -> int:
        """The last stage ``client`` takes part in (4: all; see the module docs)."""
        if self.dropout <= 0.0:
            return _ALL
        rng = np.random.default_rng([self.seed, 0x5EC, round_id, client])
        if rng.random() >= self.dropout:
            return _ALL
        return int(rng.integers(4))

    # -- requests -----------------------------------------------------------------------------
    def request(self, a: SecureRequest, now: float) -> list[Event]:
        """The replies to ``a`` (each at ``now``), and the arrivals it releases."""
        if a.stage == 0 and a.messages:
            self._start(a)
        r = self._rounds.get(a.round)
        if r is None:
            return []
        out: list[Event] = []
        for c in sorted(a.messages):
            msg = a.messages[c]
            client = r.clients.get(c)
            self.bytes_down += len(encode_message(msg))
            if client is None or client.aborted or r.last[c] < a.stage:
                continue  # gone silent
            try:
                reply = client.handle(msg)
            except SecAggError:
                continue  # it refuses: out of the round
            if a.stage == 2:
                held = r.parked.pop(c, None)
                if held is not None:
                    out.append(self._upload(r, c, held, now))
                    self._released.add(held.job)
            else:
                self.bytes_up += len(encode_message(reply))
                out.append(SecureReply(now, c, a.jobs[c], a.round, a.stage, reply))
        if a.stage == 2:  # the others are out of the round: they never upload
            r.excluded = set(r.jobs) - set(a.messages)
            gone = [c for c in sorted(r.excluded) if c in r.parked]
            out.extend(Dropout(now, c, r.parked.pop(c).job) for c in gone)
        if a.stage == 4:
            self._forget(a.round)
        return out

    def _start(self, a: SecureRequest) -> None:
        params = next(iter(a.messages.values()))
        for rid in list(self._rounds):  # one secure round at a time (sync rounds)
            self._forget(rid)
        r = _Round(params, a.jobs)
        ids = {c + 1: self._key(c).public_key() for c in a.messages}
        for c in a.messages:
            r.clients[c] = SecureClient(params, c + 1, self._key(c), ids)
            r.last[c] = self.last_stage(a.round, c)
            self._job_round[a.jobs[c]] = a.round
        self._rounds[a.round] = r

    def _forget(self, rid: int) -> None:
        r = self._rounds.pop(rid, None)
        if r is not None:
            for j in r.jobs.values():
                self._job_round.pop(j, None)

    # -- uploads ------------------------------------------------------------------------------
    def arrival(self, ev: Arrival, spec: ParamSpec) -> Event | None:
        """What reaches the policy for a trained update: its masked upload, a ``Dropout`` (the
        client is out of the protocol), or nothing yet (parked until its shares come)."""
        if ev.job in self._released:  # a parked update, masked when its shares came
            self._released.discard(ev.job)
            return ev
        rid = self._job_round.get(ev.job)
        r = self._rounds.get(rid) if rid is not None else None
        if r is None or r.jobs.get(ev.client) != ev.job:
            return Dropout(ev.now, ev.client, ev.job)  # its round is over: never plaintext
        c = ev.client
        client = r.clients[c]
        if r.last[c] < 2 or c in r.excluded or client.aborted:
            return Dropout(ev.now, c, ev.job)
        if not client.ready:
            r.parked[c] = replace(
                ev, update=replace(ev.update, delta=spec.as_flat(ev.update.delta))
            )
            return None
        return self._upload(r, c, ev, ev.now, spec)

    def _upload(
        self, r: _Round, c: int, ev: Arrival, now: float, spec: ParamSpec | None = None
    ) -> Event:
        delta = ev.update.delta if spec is None else spec.as_flat(ev.update.delta)
        rng = np.random.default_rng([self.seed, 0x5EC2, ev.job])
        noise = r.clients[c].params.noise
        sampler = integer_noise(noise) if noise else None  # distributed DP, seeded by the job
        try:
            y = r.clients[c].masked(delta, float(ev.update.weight), rng, sampler, keep=False)
        except SecAggError:  # e.g. a diverged client's NaN update: it cannot take part
            return Dropout(now, c, ev.job)
        update = replace(ev.update, delta=y, weight=1.0, scale=1.0)
        return Arrival(now, c, ev.job, update, {}, ev.client_state, int(y.nbytes))
