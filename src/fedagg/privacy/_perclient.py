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
docs: grid, scaling, headroom); the server sees only the noisy sum, local noise
s = z S / sqrt(n_e) per client with S = L / 2 + sqrt(p) (grid units), and ``clients`` = the
number whose noise is in the sum (by default n_e, the fewest survivors a round is unmasked
with, :attr:`fedagg.policy.SecurePolicy.min_survivors`). One round's RDP is
:func:`~fedagg.privacy.rdp_distributed_discrete_gaussian` (or
:func:`~fedagg.privacy.rdp_skellam` with the summed variance); rounds compose by adding RDP
curves; :func:`~fedagg.privacy.rdp_to_epsilon` converts.

*Against the server* (``neighbours="replace"``, the default, and what
:class:`fedagg.policy.ClientDPPolicy` reports and enforces): the server chooses the sample and
sees who uploaded (the unnoised weight element also carries the count), so there is no
amplification by sampling (``sample_rate`` must be 1) and the adjacency is replacing one
client's update by another, the count fixed. The L2 sensitivity is then 2S: two clients'
rounded, centred vectors q - L/2 differ by at most ||v - v'|| / Δ + 2 sqrt(p) <= 2C / Δ +
2 sqrt(p) = L + 2 sqrt(p) = 2S (clipped updates at most 2C apart, each element's rounding
moving it by < 1), the triangle inequality's bound on the encoder.

*Against third parties who do not see the sample* (``neighbours="add_remove"``): adding or
removing one client's centred vector moves the sum by at most S, and Poisson sampling at
rate q amplifies (:func:`~fedagg.privacy.rdp_poisson_subsampled`, Zhu & Wang's general
bound). This smaller figure does *not* hold against the server, nor against anyone who can
recompute the cohorts.

The guarantee is about the content of a client's update: who took part is visible to the
server, as under any secure aggregation.
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
    sample_rate: float = 1.0,
    *,
    clients: int | None = None,
    orders: Sequence[float] = DISTRIBUTED_ORDERS,
    neighbours: str = "replace",
) -> np.ndarray:
    """One round's RDP curve (at ``orders``) of a distributed-DP ``encoder`` (``noise`` set),
    with ``clients`` noise shares in the sum (default ``encoder.noise_clients``; module docs).

    ``neighbours="replace"`` (default): against the server, sensitivity 2S, no amplification
    (``sample_rate`` must be 1). ``neighbours="add_remove"``: against third parties who do
    not see the sample, sensitivity S, Poisson sampling at ``sample_rate``."""
    if not isinstance(encoder, Encoder) or not encoder.noise:
        raise ConfigError("distributed_rdp needs an Encoder with noise")
    n = encoder.noise_clients if clients is None else clients
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"clients must be an integer >= 1, got {n!r}")
    if neighbours == "replace":
        if sample_rate != 1:
            raise ConfigError(
                "against the server (neighbours='replace') there is no amplification by "
                "sampling: the server sees who took part; sample_rate must be 1"
            )
        l2 = 2 * encoder.sensitivity
    elif neighbours == "add_remove":
        l2 = encoder.sensitivity
    else:
        raise ConfigError(f"neighbours must be 'replace' or 'add_remove', got {neighbours!r}")
    p = encoder.padded(encoder.dim)
    s = encoder.noise_std
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
