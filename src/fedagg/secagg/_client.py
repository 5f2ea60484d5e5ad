"""A client's whole part in one secure round, shared by the simulator and the deployment.

:class:`SecureClient` wraps a :class:`~fedagg.secagg.ClientSession` with what a transport
needs: it is built from the stage-0 :class:`~fedagg.secagg.RoundParams`, answers each stage's
request with :meth:`SecureClient.handle` (the ``ForwardedShares`` of stage 2 are kept, and
answered by :meth:`SecureClient.masked` once the update is trained), and encodes the update
(clip, weight, rotate, round) before masking it. It is pure (no I/O, no clock).

**Idempotent.** A request it already answered gets the same reply again (compared byte for
byte in the wire encoding), so a server that re-sends after a restart is answered
consistently; a *different* request for a stage already answered is refused (a lying or
confused server), as is a second masked upload with other inputs: :meth:`masked` returns its
first result again (two different masked vectors of one round would reveal the difference of
the inputs).

**Distributed DP.** A round whose ``RoundParams`` carry noise has each client add its share of
integer noise before masking (:meth:`SecureClient.masked` with a ``sampler``), and the client
refuses the consistency and unmasking requests of a survivor set smaller than
``params.noise_clients``: the noise is sized for at least that many shares, so no sum with
less noise than the accounting assumes is ever unmasked with its help.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedagg.errors import ConfigError, SecAggError
from fedagg.secagg._encode import Sampler
from fedagg.secagg._messages import (
    AdvertiseKeys,
    ConsistencyRequest,
    ConsistencySignature,
    ForwardedShares,
    KeyDirectory,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedagg.secagg._params import RoundParams
from fedagg.secagg._protocol import ClientSession
from fedagg.secagg._wire import encode_message, message_stage

__all__ = ["SecureClient", "public_identity"]

U32 = np.dtype(np.uint32)
Reply = AdvertiseKeys | ShareKeys | ConsistencySignature | UnmaskResponse | None


def public_identity(key: Ed25519PublicKey | bytes) -> Ed25519PublicKey:
    """An Ed25519 public key from its raw 32 bytes (or the key itself)."""
    if isinstance(key, Ed25519PublicKey):
        return key
    if not isinstance(key, bytes) or len(key) != 32:
        raise SecAggError("an Ed25519 identity must be 32 raw bytes")
    try:
        return Ed25519PublicKey.from_public_bytes(key)
    except ValueError as e:
        raise SecAggError(f"bad Ed25519 identity: {e}") from None


class SecureClient:
    """One client's side of one secure round (module docs).

    Args:
        params: the round's public parameters (the stage-0 request).
        client_id: this client's id in ``params.ids`` (the deployment's client index + 1).
        identity: this client's long-term Ed25519 private key.
        identities: every client id of the round -> its Ed25519 public key (or raw 32
            bytes): the client's trusted PKI, never taken from the server.
        randbelow: Shamir's randomness (tests only).
    """

    def __init__(
        self,
        params: RoundParams,
        client_id: int,
        identity: Ed25519PrivateKey,
        identities: Mapping[int, Ed25519PublicKey | bytes],
        *,
        randbelow: Callable[[int], int] = secrets.randbelow,
    ) -> None:
        if not isinstance(params, RoundParams):
            raise SecAggError("a secure client needs the round's RoundParams")
        pub = {int(u): public_identity(k) for u, k in identities.items()}
        missing = [u for u in params.ids if u not in pub]
        if missing:
            raise SecAggError(f"no known identity for clients {missing[:8]} of the round")
        try:
            self._session = ClientSession(
                params.config(), client_id, identity, pub, randbelow=randbelow
            )
        except ConfigError as e:
            raise SecAggError(str(e)) from None
        self.params = params
        self.id = client_id
        self._params_raw = encode_message(params)
        self._answered: dict[int, tuple[bytes, Reply]] = {}
        self._shares: ForwardedShares | None = None
        self._masked: np.ndarray[Any, np.dtype[np.uint32]] | None = None
        self._refused = False

    @property
    def aborted(self) -> bool:
        """Whether the client refused a request (every later call raises)."""
        return self._refused or self._session.aborted

    def _enough(self, survivors: frozenset[int]) -> None:
        """Distributed DP: refuse to help unmask a sum of fewer than ``params.noise_clients``
        inputs (its noise would be below what the accounting assumes)."""
        n = self.params.noise_clients
        if self.params.noise and len(survivors) < n:
            self._refused = True
            raise SecAggError(
                f"client {self.id} refuses: {len(survivors)} survivors, fewer than the "
                f"{n} whose noise shares the distributed-DP accounting assumes"
            )

    @property
    def ready(self) -> bool:
        """Whether stage 2's shares came: :meth:`masked` can run."""
        return self._shares is not None and not self.aborted

    def handle(self, request: Any) -> Reply:
        """The reply to a stage request: ``RoundParams`` -> ``AdvertiseKeys``,
        ``KeyDirectory`` -> ``ShareKeys``, ``ForwardedShares`` -> None (kept for
        :meth:`masked`), ``ConsistencyRequest`` -> ``ConsistencySignature``,
        ``UnmaskRequest`` -> ``UnmaskResponse``. A refusal raises :class:`SecAggError` and
        ends the client's round."""
        stage, is_request = message_stage(request)
        if not is_request:
            raise SecAggError(f"client {self.id}: a stage-{stage} reply is not a request")
        raw = encode_message(request)
        seen = self._answered.get(stage)
        if seen is not None:
            if seen[0] != raw:
                raise SecAggError(
                    f"client {self.id} refuses: a different stage-{stage} request after it "
                    "answered one"
                )
            return seen[1]
        if self.aborted:
            raise SecAggError(f"client {self.id}: the session was aborted")
        reply: Reply
        if isinstance(request, RoundParams):
            if raw != self._params_raw:
                raise SecAggError(f"client {self.id} refuses: other round parameters")
            reply = self._session.advertise()
        elif isinstance(request, KeyDirectory):
            reply = self._session.share_keys(request)
        elif isinstance(request, ForwardedShares):
            if len(self._answered) != 2:
                raise SecAggError(f"client {self.id}: shares before its keys were shared")
            if request.round_id != self.params.round_id:
                raise SecAggError(f"client {self.id} refuses: shares of round {request.round_id}")
            self._shares = request
            reply = None
        elif isinstance(request, ConsistencyRequest):
            self._enough(request.survivors)
            reply = self._session.consistency(request)
        else:
            assert isinstance(request, UnmaskRequest)
            self._enough(request.survivors)
            reply = self._session.unmask(request)
        self._answered[stage] = (raw, reply)
        return reply

    def masked(
        self,
        delta: Any,
        weight: float,
        rng: np.random.Generator | None = None,
        sampler: Sampler | None = None,
        *,
        keep: bool = True,
    ) -> np.ndarray[Any, np.dtype[np.uint32]]:
        """The stage-2 upload: ``delta`` (d floats, flat) clipped, weighted by
        ``min(weight, max_weight) / max_weight``, encoded (``rng``: stochastic rounding) and
        masked; uint32 of length ``params.dim``. Under distributed DP (``params.noise``) the
        weight is 1 and ``sampler`` (:func:`fedagg.privacy.integer_noise`) draws the noise
        from ``rng`` before masking. Once computed, the same vector is returned again (module
        docs); with ``keep=False`` it is not kept (a caller that never retries the upload,
        such as the simulator, holding n clients), and a second call raises."""
        if self._masked is not None:
            return self._masked
        if self._shares is None:
            raise SecAggError(f"client {self.id}: no shares yet (stage 2 request missing)")
        x = np.asarray(delta).reshape(-1)
        if x.size != self.params.d:
            raise SecAggError(f"the update has {x.size} elements, the round {self.params.d}")
        w = self.params.weight(weight)
        enc = self.params.encoder().encode(x, w, rng=rng, sampler=sampler)
        y = self._session.masked_input(self._shares, enc).values
        if keep:
            self._masked = y
        return y
