"""Secure aggregation (SecAgg+): the server learns only the sum of the survivors' inputs.

The protocol core (pure, in process: explicit messages, no I/O):
:class:`ClientSession` and :class:`ServerSession` run one round over a :class:`RoundConfig`
(the clients, the vector length, the public graph seed, the degree ``k`` and threshold ``t``);
:func:`neighbours` is the random ``k``-regular communication graph.
"""

from fedagg.secagg._graph import default_degree, default_threshold, neighbours
from fedagg.secagg._protocol import (
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
    "default_degree",
    "default_threshold",
    "neighbours",
]
