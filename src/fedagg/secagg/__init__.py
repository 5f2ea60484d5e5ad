"""Secure aggregation (SecAgg+, Bell et al. CCS 2020 on Bonawitz et al. CCS 2017): the pure core.

The primitives:

* :func:`split` / :func:`combine`: Shamir t-of-n secret sharing over GF(2**521 - 1), for the
  self-mask seeds and mask keys (secrets of up to 32 bytes, cryptographic randomness).
* :func:`mask` / :func:`add_mask`: the seekable mask PRG, ChaCha20 (RFC 8439) keystream as
  uint32 words; chunk-wise masks equal the whole mask, and masks add modulo 2**32.
* :class:`Encoder`: clipping to an L2 bound, an optional randomised Hadamard rotation (public
  seed) and stochastic rounding to uint32 with ceil(log2 n) bits of headroom, so that the sum
  of n encodings never wraps; decoding a sum, its documented error bound, and the weighted
  mean from the sums of w * x and of w (the weight travels as the last element).

The protocol (pure, in process: explicit message dataclasses, no I/O):

* :class:`ClientSession` and :class:`ServerSession` run one round over a :class:`RoundConfig`
  (the clients, the vector length, the public graph seed, the degree ``k`` and threshold
  ``t``): signed ephemeral keys, encrypted shares, masked inputs folded on arrival, a signed
  consistency round, and chunk-wise unmasking to the exact sum of the survivors' inputs.
* :func:`neighbours`: the seeded random ``k``-regular communication graph;
  :func:`default_degree` and :func:`default_threshold` its defaults.

Shared by the simulator and the deployment:

* :class:`RoundParams`: a round's public parameters (the stage-0 request), with its
  :class:`RoundConfig` and :class:`Encoder`; :class:`SecureClient`: a client's whole part in
  a round (idempotent stage replies, the encoded and masked upload).
* :func:`encode_message` / :func:`decode_message` (:func:`decode_request`,
  :func:`decode_reply`): the strict byte encodings of every message (no pickle).

Everything here is pure (no I/O, threads or clock); SecAgg errors are
:class:`~fedagg.errors.SecAggError`.
"""

from __future__ import annotations

from ._client import SecureClient, public_identity
from ._encode import Encoder
from ._expect import MIN_COHORT, SecureExpectations, check_params
from ._graph import default_degree, default_threshold, neighbours
from ._params import RoundParams
from ._prg import CHUNK_WORDS, MAX_WORDS, add_mask, mask
from ._protocol import (
    AdvertiseKeys,
    ClientSession,
    ConsistencyRequest,
    ConsistencySignature,
    ForwardedShares,
    KeyDirectory,
    MaskedInput,
    RoundConfig,
    ServerSession,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from ._shamir import PRIME, SECRET_BYTES, SHARE_BYTES, combine, split
from ._wire import (
    CIPHERTEXT_BYTES,
    WIRE_VERSION,
    decode_message,
    decode_reply,
    decode_request,
    encode_message,
    message_stage,
)

__all__ = [
    "CHUNK_WORDS",
    "CIPHERTEXT_BYTES",
    "MAX_WORDS",
    "MIN_COHORT",
    "PRIME",
    "SECRET_BYTES",
    "SHARE_BYTES",
    "WIRE_VERSION",
    "AdvertiseKeys",
    "ClientSession",
    "ConsistencyRequest",
    "ConsistencySignature",
    "Encoder",
    "ForwardedShares",
    "KeyDirectory",
    "MaskedInput",
    "RoundConfig",
    "RoundParams",
    "SecureClient",
    "SecureExpectations",
    "ServerSession",
    "ShareKeys",
    "UnmaskRequest",
    "UnmaskResponse",
    "add_mask",
    "check_params",
    "combine",
    "decode_message",
    "decode_reply",
    "decode_request",
    "default_degree",
    "default_threshold",
    "encode_message",
    "mask",
    "message_stage",
    "neighbours",
    "public_identity",
    "split",
]
