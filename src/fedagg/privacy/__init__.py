"""Differential privacy: accountants and mechanisms (pure numpy; library layer).

**Accounting.** :func:`epsilon` gives the epsilon of ``steps`` rounds of the
Poisson-subsampled Gaussian mechanism (each client sampled independently with probability
``sample_rate``, its update clipped to L2 norm C, Gaussian noise of standard deviation
``noise_multiplier * C`` on the sum; add/remove-one-client adjacency, i.e. user-level DP when
each client's whole update is clipped together). Two accountants:

* ``"rdp"``: Rényi DP (Mironov, Talwar, Zhang 2019) at :data:`DEFAULT_ORDERS` (those of
  Google's dp_accounting), converted with Canonne, Kamath, Steinke 2020 (Prop. 12).
  Low level: :func:`rdp_subsampled_gaussian`, :func:`rdp_to_epsilon`,
  :func:`rdp_to_delta`.
* ``"pld"``: a privacy-loss-distribution accountant (pessimistic "connect the dots"
  discretisation, Doroshenko et al. 2022, composed by FFT): tighter, 5-30% lower epsilon
  than RDP in the tests.

:func:`delta` is the inverse view of :func:`epsilon`; :func:`noise_multiplier_for` inverts
:func:`epsilon` in sigma by bisection; :func:`gaussian_delta` /
:func:`gaussian_epsilon` are the exact curve of the unsampled Gaussian mechanism (Balle &
Wang 2018). ``fedagg privacy plan`` prints the noise multiplier for a target.

**Precision** (measured by ``tests/privacy``):

* RDP values equal dp_accounting's published ones to 1e-7 relative (orders 1.5 ... 100 of
  its test); epsilon equals Opacus's published 7.32911 (sigma 1.5, q 0.04, 2250 steps, delta
  1e-5) within 3e-5 relative and :func:`noise_multiplier_for` its 1.416 / 1.3562; with the
  classic conversion ``min(rdp - log(delta)/(a-1))`` the RDP reproduces TF Privacy's MNIST
  table (2.92, 1.00, 1.04, 1.20 to the printed decimals, 9.74 as 9.754) and Abadi et al.'s
  1.26. Fractional orders use an upper bound of the series: never below numerical
  integration, at most 0.3% above it in the tests.
* PLD: never below the exact epsilon (every step of it is pessimistic) except for
  floating-point rounding of the FFTs (about 1e-13 in delta); with the default grid step
  1e-4 it is within 1e-4 of the exact epsilon at q = 1 (closed form) and moves by < 1e-4
  when the step shrinks 3x on the MNIST setting; it matches Koskela et al.'s published
  delta(1) = 4.2435e-6 (q 0.01, sigma 4, 10000 steps) within +0.23%. delta below
  ``steps * 1e-15`` is not resolved (the mass cut at each step's top loss counts as an
  infinite loss). The step grows automatically for long or low-noise runs (at most ~2**21
  grid points), which loosens the bound a little. One evaluation takes 0.05-1 s.
* :func:`noise_multiplier_for` returns a sigma that meets the target, at most ``rtol``
  (default 1e-3) above the smallest one.

**Mechanisms** (pure functions, no wiring into runs yet): :func:`gaussian_noise` /
:func:`add_gaussian_noise` (central DP noise, chunk by chunk from the seekable ChaCha20 PRG
of :func:`fedagg.secagg.mask`; needs the ``deploy`` extra's ``cryptography``),
:func:`clip_l2`, :func:`local_dp`, adaptive clipping (Andrew et al. 2021:
:func:`noised_unclipped_fraction`, :func:`adaptive_clip`, :func:`combined_noise_multiplier`,
:func:`update_noise_multiplier`), and the integer samplers for distributed DP,
:func:`discrete_gaussian` and :func:`skellam`, with their RDP
(:func:`rdp_distributed_discrete_gaussian`, Kairouz et al. 2021; :func:`rdp_skellam`, Agarwal
et al. 2021; :func:`rdp_poisson_subsampled`, Zhu & Wang 2019, for any RDP curve under Poisson
client sampling; convert with :func:`rdp_to_epsilon`). The client-side mechanisms' accounting:
:func:`local_epsilon`, :func:`distributed_rdp` / :func:`distributed_epsilon`, and
:func:`integer_noise` (the samplers a distributed-DP client passes to
:meth:`fedagg.secagg.SecureClient.masked`). Bad arguments raise
:class:`~fedagg.errors.ConfigError`.
"""

from __future__ import annotations

from ._accountant import (
    ACCOUNTANTS,
    Accountant,
    delta,
    epsilon,
    gaussian_delta,
    gaussian_epsilon,
    noise_multiplier_for,
)
from ._discrete import discrete_gaussian, skellam
from ._distributed import (
    DISTRIBUTED_ORDERS,
    rdp_distributed_discrete_gaussian,
    rdp_poisson_subsampled,
    rdp_skellam,
)
from ._mechanisms import (
    adaptive_clip,
    add_gaussian_noise,
    clip_l2,
    combined_noise_multiplier,
    gaussian_noise,
    local_dp,
    noised_unclipped_fraction,
    update_noise_multiplier,
)
from ._perclient import distributed_epsilon, distributed_rdp, integer_noise, local_epsilon
from ._rdp import DEFAULT_ORDERS, rdp_subsampled_gaussian, rdp_to_delta, rdp_to_epsilon

__all__ = [
    "ACCOUNTANTS",
    "DEFAULT_ORDERS",
    "DISTRIBUTED_ORDERS",
    "Accountant",
    "adaptive_clip",
    "add_gaussian_noise",
    "clip_l2",
    "combined_noise_multiplier",
    "delta",
    "discrete_gaussian",
    "distributed_epsilon",
    "distributed_rdp",
    "epsilon",
    "gaussian_delta",
    "gaussian_epsilon",
    "gaussian_noise",
    "integer_noise",
    "local_dp",
    "local_epsilon",
    "noise_multiplier_for",
    "noised_unclipped_fraction",
    "rdp_distributed_discrete_gaussian",
    "rdp_poisson_subsampled",
    "rdp_skellam",
    "rdp_subsampled_gaussian",
    "rdp_to_delta",
    "rdp_to_epsilon",
    "skellam",
    "update_noise_multiplier",
]
