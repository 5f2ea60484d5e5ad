"""Secure aggregation (SecAgg+) at a deployed client: its rounds, by job.

A training task of a secure round carries the round's public parameters (stage 0,
:class:`fedagg.secagg.RoundParams`); the client builds a :class:`fedagg.secagg.SecureClient`
from them with its own identity (its auth Ed25519 key) and its peers' identities, which it
reads from its own copy of the federation's ``authorized_keys`` (the trusted PKI: a server
cannot replace a peer's key). Without a keyring a client refuses secure aggregation. Its
index (secure id = index + 1) is its name's position in that keyring, not what the server
says. Each stage request is answered with the client's reply (idempotent: a request sent
again gets the same reply); stage 2's shares are kept until the update is trained, then the
masked update (uint32) is uploaded. A request the client's :class:`SecureClient` refuses (a
lying server: a replaced key, an inconsistent survivor set) ends the client's part in that
round: it answers nothing more and uploads nothing.

**Its own minimums.** Before its stage-0 reply the client checks the round's parameters
against what its own config asks (:class:`fedagg.secagg.SecureExpectations`, built by
:func:`secure_expectations` from its ``[secure_aggregation]``, ``[privacy]`` and ``[policy]``
sections: clip at most its own, the same bits, max_weight and rotation, under distributed DP
the same noise kind, a noise multiplier at least its own and ``noise_clients`` at least what
the config implies, a cohort of at least 3 clients (and ``noise_clients``), a threshold not
below its configured one): a server that lowers any of them is refused
(:func:`fedagg.secagg.check_params`: a ``SecAggError`` naming the parameter, logged) and the
client takes no part in that round (a dropout). A client built without expectations (the
Python API's default) checks only the cohort size and the protocol's own majority threshold.

**One masked upload per model version.** Two unmasked sums over (nearly) the same updates
reveal one update by their difference; a round restarted or re-run at the same model version
would give the server just that. So a client that already sent a masked upload for a model
version refuses every other secure round at that version (at stage 0, or before masking): the
round proceeds without it. This is kept in memory: a restarted client process does not
remember its uploads (the server's idempotent upload log still holds them, keyed by task).
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives import serialization

from fedagg.config import secure_noise
from fedagg.deploy._auth import ClientKey, Keyring
from fedagg.errors import ConfigError, SecAggError
from fedagg.privacy import integer_noise
from fedagg.secagg import (
    SecureClient,
    SecureExpectations,
    check_params,
    decode_request,
    encode_message,
)

__all__ = ["SecureJobs", "secure_expectations"]

log = logging.getLogger("fedagg.client")


def secure_expectations(config: Mapping[str, Any]) -> SecureExpectations | None:
    """A deployed client's :class:`SecureExpectations` from its resolved config (the same
    ``[secure_aggregation]`` / ``[privacy]`` / ``[policy]`` values the server's
    :class:`~fedagg.policy.SecurePolicy` is built from: ``[privacy] clip`` replaces the
    secure clip under distributed DP, and ``noise_clients`` is what
    :attr:`SecurePolicy.min_survivors` gives, ``ceil(clients_per_round / 2)``); None if the
    config runs no secure aggregation."""
    sa = config.get("secure_aggregation", {"kind": "none"})
    if sa.get("kind", "none") == "none":
        return None
    noise = secure_noise(config)
    cpr = int(config["policy"]["clients_per_round"])
    return SecureExpectations(
        clip=float(noise.get("clip", sa["clip"])),
        bits=int(sa["bits"]),
        max_weight=float(sa["max_weight"]),
        rotation=bool(sa["rotation"]),
        noise=str(noise.get("noise", "")),
        noise_multiplier=float(noise.get("noise_multiplier", 0.0)),
        noise_clients=max(1, math.ceil(cpr / 2)) if noise else 1,
        neighbors=int(sa["neighbors"]),
        threshold=int(sa["threshold"]),
    )


@dataclass
class _Job:
    round: int
    client: SecureClient
    version: int | None = None
    shares: asyncio.Event = field(default_factory=asyncio.Event)  # stage 2 arrived
    failed: str | None = None


class SecureJobs:
    """A client's secure rounds, by job (see the module's docstring)."""

    def __init__(
        self, key: ClientKey, keyring: Keyring | None, expect: SecureExpectations | None = None
    ) -> None:
        self.key, self.keyring = key, keyring
        #: this client's own minimums (None: the defaults, cohort and majority only)
        self.expect = expect if expect is not None else SecureExpectations()
        self._uploaded: dict[int, int] = {}  # model version -> the job masked and uploaded
        self.jobs: dict[int, _Job] = {}
        self.refused = 0  # rounds this client refused (a lying server)
        self._sent: set[int] = set()  # jobs whose stage-0 reply this process got acknowledged
        #: the round ids this client took part in: a server reusing one could replay a past
        #: session's signed messages (docs/secure-aggregation.md, what does not hold)
        self._rounds: set[int] = set()

    def sent(self, job: int) -> bool:
        return job in self._sent

    def mark_sent(self, job: int) -> None:
        self._sent.add(job)

    def _identities(self) -> tuple[int, dict[int, bytes]]:
        if self.keyring is None:
            raise ConfigError(
                "the server runs secure aggregation, and this client has no keyring to check "
                "its peers' keys with: give it the federation's authorized_keys "
                "([deploy] keys)"
            )
        ring = self.keyring
        raw = serialization.Encoding.Raw, serialization.PublicFormat.Raw
        mine = self.key.private.public_key().public_bytes(*raw)
        if self.key.name not in ring.index or ring.keys[self.key.name].public_bytes(*raw) != mine:
            raise ConfigError(
                f"this client's key is not the one the keyring registers as {self.key.name!r}"
            )
        ids = {ring.index[n] + 1: k.public_bytes(*raw) for n, k in ring.keys.items()}
        return ring.index[self.key.name] + 1, ids

    def _once(self, job: int, version: int | None) -> None:
        """Refuse a second masked upload at one model version (module docs)."""
        other = None if version is None else self._uploaded.get(version)
        if other is not None and other != job:
            raise SecAggError(
                f"this client already sent a masked upload for model version {version} "
                f"(task {other}): a second sum at that version would reveal it by difference"
            )

    def begin(
        self, job: int, round_: int, payload: bytes, version: int | None = None
    ) -> bytes | None:
        """Stage 0 of ``job``'s round (its parameters) for model ``version``: this client's
        reply (its signed keys), or None if it refuses the round (logged): parameters below
        its own minimums, or a model version it already sent a masked upload for."""
        if job not in self.jobs:
            me, ids = self._identities()
            try:
                params = decode_request(0, payload)
                if params.round_id != round_:
                    raise SecAggError(f"parameters of round {params.round_id} sent as {round_}")
                check_params(params, self.expect)
                if params.round_id in self._rounds:
                    raise SecAggError(
                        f"round id {params.round_id} was already used for another task: a "
                        "server never reuses one"
                    )
                self._once(job, version)
                client = SecureClient(params, me, self.key.private, ids)
                self.jobs[job] = _Job(round_, client, version)
                self._rounds.add(params.round_id)
            except SecAggError as e:
                self._refuse(job, round_, 0, e)
                return None
        return self.answer(job, round_, 0, payload)

    def answer(self, job: int, round_: int, stage: int, payload: bytes) -> bytes | None:
        """This client's reply to a stage request (None: nothing to send, or refused)."""
        j = self.jobs.get(job)
        if j is None or j.failed is not None or j.round != round_:
            return None  # not ours (a restarted client, a finished round) or refused: silent
        try:
            reply = j.client.handle(decode_request(stage, payload))
        except SecAggError as e:
            self._refuse(job, round_, stage, e)
            return None
        if stage == 2:
            j.shares.set()
            return None
        return None if reply is None else bytes(encode_message(reply))

    async def masked(
        self, job: int, delta: np.ndarray[Any, Any], weight: float, timeout: float
    ) -> np.ndarray[Any, Any] | None:
        """The masked update of ``job`` (uint32) once its stage-2 request has come (None if
        the round ended for this client first)."""
        j = self.jobs.get(job)
        if j is None:
            return None
        try:
            await asyncio.wait_for(j.shares.wait(), timeout)
        except TimeoutError:
            log.warning("task %d: no masking request within %gs: not uploaded", job, timeout)
            return None
        if j.failed is not None:
            return None
        try:
            self._once(job, j.version)
        except SecAggError as e:
            self._refuse(job, j.round, 2, e)
            return None
        # stochastic rounding and distributed-DP noise: fresh OS randomness, never the
        # federation's seed (the server knows it and could take seeded noise back out)
        rng = np.random.default_rng()
        noise = j.client.params.noise
        sampler = integer_noise(noise) if noise else None
        try:
            flat = np.asarray(delta, dtype=np.float64).ravel()
            out = j.client.masked(flat, weight, rng, sampler)
        except SecAggError as e:
            self._refuse(job, j.round, 2, e)
            return None
        if j.version is not None:
            self._uploaded[j.version] = job
        return np.ascontiguousarray(out, dtype=np.uint32)

    def abandon(self, job: int, why: str) -> None:
        """Stop taking part in ``job``'s round (its stage-0 reply was another process's)."""
        j = self.jobs.get(job)
        if j is not None and j.failed is None:
            j.failed = why
            j.shares.set()
            log.warning("task %d: left its secure round: %s", job, why)

    def _refuse(self, job: int, round_: int, stage: int, e: Exception) -> None:
        self.refused += 1
        log.error("secure round %d (task %d), stage %d refused: %s", round_, job, stage, e,
                  extra={"event": "secagg_refused"})  # fmt: skip
        j = self.jobs.get(job)
        if j is not None:
            j.failed = str(e)
            j.shares.set()
