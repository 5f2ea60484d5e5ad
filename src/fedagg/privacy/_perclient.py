"""Accounting for the client-side mechanisms: local DP and distributed DP over SecAgg+.

**Local DP** (:func:`local_epsilon`): a client that clipped its update to C and added
N(0, (z C)**2) to every coordinate (:func:`~fedagg.privacy.local_dp`) in k rounds is
(epsilon, delta)-DP *locally*: against anyone who sees its noisy updates (the server
included), for any two datasets of that client. That is replacement adjacency, so the
sensitivity is 2 C and the guarantee is the exact Gaussian mechanism's (Balle & Wang 2018) at
noise multiplier z / 2 composed over the k rounds (z / (2 sqrt(k))); there is no amplification
by sampling (the client knows it was picked, and the server sees who uploaded).

**Distributed DP** (:func:`distributed_rdp`, :func:`distributed_epsilon`): each client adds
integer noise to its encoded update before masking (:class:`fedagg.secagg.Encoder`'s module
docs: grid, scaling, headroom); the server sees only the noisy sum. One round's RDP is
:func:`~fedagg.privacy.rdp_distributed_discrete_gaussian` (or
:func:`~fedagg.privacy.rdp_skellam` with the summed variance) with the encoder's L2
sensitivity S = L / 2 + sqrt(p) (grid units), local noise s = z S / sqrt(n_e) and
``clients`` = the number whose noise is in the sum (by default n_e, the fewest survivors a
round is unmasked with, :attr:`fedagg.policy.SecurePolicy.min_survivors`), under Poisson
sampling at rate q (:func:`~fedagg.privacy.rdp_poisson_subsampled`, Zhu &
Wang's general bound); rounds compose by adding RDP curves;
:func:`~fedagg.privacy.rdp_to_epsilon` converts. The guarantee is about the content of a
client's update (its update against none): who took part is visible to the server, as under
any secure aggregation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from fedagg.errors import ConfigError
from fedagg.secagg import Encoder

from ._accountant import gaussian_epsilon
from ._discrete import discrete_gaussian, skellam
from ._distributed import DISTRIBUTED_ORDERS, rdp_distributed_discrete_gaussian, rdp_skellam
from ._rdp import rdp_to_epsilon

__all__ = ["distributed_epsilon", "distributed_rdp", "integer_noise", "local_epsilon"]


def integer_noise(kind: str) -> Callable[[float, int, np.random.Generator], np.ndarray]:
    """The sampler ``(std, size, rng) -> int64 noise`` of a distributed-DP ``kind``:
    ``"gaussian"`` (:func:`discrete_gaussian` of sigma std) or ``"skellam"`` (variance
    std**2), as :meth:`fedagg.secagg.SecureClient.masked` takes it."""
    if kind == "gaussian":
        return lambda std, size, rng: discrete_gaussian(std, size, rng)
    if kind == "skellam":
        return lambda std, size, rng: skellam(std * std, size, rng)
    raise ConfigError(f"unknown distributed-DP noise {kind!r}; valid: gaussian, skellam")


def local_epsilon(noise_multiplier: float, rounds: int, delta: float) -> float:
    """The local epsilon of a client that took part in ``rounds`` rounds of local DP at
    ``noise_multiplier`` z (module docs: z / 2 for replacement, composed); 0 for 0 rounds.

    >>> round(local_epsilon(10.0, 1, 1e-5), 3)
    0.726
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ConfigError(f"rounds must be an integer >= 0, got {rounds!r}")
    if isinstance(noise_multiplier, bool) or not noise_multiplier > 0:
        raise ConfigError(f"noise_multiplier must be > 0, got {noise_multiplier!r}")
    if rounds == 0:
        return 0.0
    return gaussian_epsilon(delta, float(noise_multiplier) / 2, rounds)


def distributed_rdp(
    encoder: Encoder,
    sample_rate: float,
    *,
    clients: int | None = None,
    orders: Sequence[float] = DISTRIBUTED_ORDERS,
) -> np.ndarray:
    """One round's RDP curve (at ``orders``) of a distributed-DP ``encoder`` (``noise`` set)
    under Poisson sampling at ``sample_rate``, with ``clients`` noise shares in the sum
    (default ``encoder.noise_clients``; module docs)."""
    if not isinstance(encoder, Encoder) or not encoder.noise:
        raise ConfigError("distributed_rdp needs an Encoder with noise")
    n = encoder.noise_clients if clients is None else clients
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"clients must be an integer >= 1, got {n!r}")
    p = encoder.padded(encoder.dim)
    s, l2 = encoder.noise_std, encoder.sensitivity
    if encoder.noise == "gaussian":
        return rdp_distributed_discrete_gaussian(
            l2_sensitivity=l2, local_stddev=s, clients=n, dim=p, orders=orders,
            sample_rate=sample_rate,
        )  # fmt: skip
    return rdp_skellam(
        l2_sensitivity=l2, variance=n * s * s, dim=p, orders=orders, sample_rate=sample_rate
    )


def distributed_epsilon(
    rdp_per_round: Sequence[float] | np.ndarray,
    rounds: int,
    delta: float,
    orders: Sequence[float] = DISTRIBUTED_ORDERS,
) -> float:
    """Epsilon after ``rounds`` rounds of the same per-round RDP curve (summed curves of
    different rounds: pass their sum with ``rounds=1``)."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise ConfigError(f"rounds must be an integer >= 0, got {rounds!r}")
    if rounds == 0:
        return 0.0
    r = np.asarray(rdp_per_round, dtype=np.float64) * rounds
    eps, _ = rdp_to_epsilon([math.floor(float(a)) for a in orders], r, delta)
    return eps
