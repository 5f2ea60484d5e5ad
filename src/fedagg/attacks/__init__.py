"""Byzantine attacks: what the ``f`` malicious clients of a round send instead of their update.

Every attack works on flat update vectors (a client's delta flattened to 1-D). The omniscient
attacks see the honest updates of the round as a 2-D array ``honest`` of shape ``(h, d)``, one
row per honest client, and return ONE malicious vector of length ``d`` that all ``f`` attackers
send. Below, ``g_i`` are the rows of ``honest``, ``mu`` their coordinate-wise mean and
``sigma`` their coordinate-wise standard deviation (``ddof = 0`` unless stated).

* ``sign_flip(own, scale)``: ``-scale * own``, the attacker's own honest update negated
  ("bit flipping"; the Flag Aggregator repo's ``reverse`` is ``scale = 10``).
* ``gaussian(rng, d, sigma)``: ``N(0, sigma^2 I)``. RFA's "gauss" corruption draws each
  corrupted update with ``sigma = np.std(u)``, the std over the coordinates of that client's
  own update ``u``; :func:`honest_std` gives the std over all coordinates of the honest set.
* ``alie(honest, n, f, z)``: ``mu - z * sigma`` ("A Little Is Enough", Baruch et al. 2019) with
  ``s = floor(n/2 + 1) - f`` and ``z`` = ``Phi^-1((n - s) / n)`` (``"paper"``) or
  ``Phi^-1((n - f - s) / (n - f))`` (``"code"``, the KHJ / byzantine-robust-optimizer code).
* ``ipm(honest, eps)``: ``-eps * mu`` (inner-product manipulation, "Fall of Empires",
  Xie et al. 2019).
* ``min_max(honest, direction)``: ``m = mu - gamma * p`` with the largest ``gamma`` such that
  ``max_i |m - g_i| <= max_{i,j} |g_i - g_j|`` (Shejwalkar & Houmansadr, NDSS 2021).
* ``min_sum(honest, direction)``: the same with
  ``sum_i |m - g_i|^2 <= min_i sum_j |g_i - g_j|^2``.
* ``random_uniform(rng, d, low, high)``: ``U[low, high)^d`` (the Flag Aggregator's ``random``).
* ``flip_labels`` / :class:`LabelFlip`: data poisoning, ``y -> L - 1 - y``; the client then
  trains honestly on the flipped labels. ``LabelFlip`` is a client algorithm
  (:mod:`fedagg.clients`), re-exported here.

All arithmetic is in float64; vectors come back in the dtype of the honest updates (of ``own``
for :func:`sign_flip`, ``dtype`` for the random ones). Inputs are never modified. Bad
parameters, empty or non-finite inputs and mismatched shapes raise
:class:`~fedagg.errors.ConfigError`, as does a result that overflows its dtype.

For a simulator, :func:`attack` builds an :class:`Attack` object whose
:meth:`Attack.malicious` returns the ``f`` malicious rows of a round, and :meth:`Attack.craft`
also the coefficient used (``z``, ``gamma``, ``sigma``) so that it can be recorded. The
simulator's adversary hook (``fedagg.sim.Simulation(byzantine=..., attack=...)``) calls it
with the honest updates of each dispatch; ``byzantine_algorithm=LabelFlip(...)`` makes the
Byzantine clients train on flipped labels instead.

The modules, one concept each: ``_vectors`` (the attacks from simple statistics: sign flip,
Gaussian, uniform random, ALIE, IPM), ``_search`` (Min-Max / Min-Sum and their ``gamma``
searches), ``_kinds`` (the :class:`Attack` objects and :func:`attack`), ``_checks`` (the
argument checks they share) and ``fedagg.clients._label_flip`` (label flipping).

>>> import numpy as np
>>> from fedagg import attacks
>>> round(attacks.alie_z(25, 5, "paper"), 4), round(attacks.alie_z(25, 5, "code"), 4)
(0.4677, 0.2533)
>>> attacks.ipm(np.array([[1.0, 2.0], [3.0, 4.0]]), eps=0.5)
array([-1. , -1.5])
>>> attacks.attack("ipm", eps=0.5).malicious(np.array([[1.0, 2.0], [3.0, 4.0]]),
...                                          np.zeros((2, 2)), n=4, f=2)
array([[-1. , -1.5],
       [-1. , -1.5]])
"""

from fedagg.attacks._kinds import (
    ALIE,
    ATTACK_KINDS,
    IPM,
    Attack,
    Crafted,
    Gaussian,
    MinMax,
    MinSum,
    NoAttack,
    RandomUniform,
    SignFlip,
    attack,
)
from fedagg.attacks._search import min_max, min_max_gamma, min_sum, min_sum_gamma, search_gamma
from fedagg.attacks._vectors import (
    alie,
    alie_z,
    gaussian,
    honest_std,
    ipm,
    random_uniform,
    sign_flip,
)
from fedagg.clients import LabelFlip, flip_labels

__all__ = [
    "ALIE",
    "ATTACK_KINDS",
    "IPM",
    "Attack",
    "Crafted",
    "Gaussian",
    "LabelFlip",
    "MinMax",
    "MinSum",
    "NoAttack",
    "RandomUniform",
    "SignFlip",
    "alie",
    "alie_z",
    "attack",
    "flip_labels",
    "gaussian",
    "honest_std",
    "ipm",
    "min_max",
    "min_max_gamma",
    "min_sum",
    "min_sum_gamma",
    "random_uniform",
    "search_gamma",
    "sign_flip",
]
