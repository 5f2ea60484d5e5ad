"""Participation-aware aggregation weights (FedAU and its baselines).

A *weighting* decides, for a round whose participants are ``S``, each participant's weight
``w_n`` and the normaliser ``D`` of the aggregate ``sum_{n in S} w_n delta_n / D``. The
aggregator computes the weighted mean ``sum w delta / sum w``; the weighting returns the
factor ``mass = sum w / D`` that turns it into the wanted sum (``Strategy.apply(scale=)``).

* :func:`examples`: ``w_n = n_n`` (sample count), ``D = sum w``: FedAvg.
* :func:`participating`: ``w_n = 1``, ``D = |S|``: FedAU's "average participating".
* :func:`all_clients`: ``w_n = 1``, ``D = N``: "average all".
* :func:`known`: ``w_n = 1 / p_n``, ``D = N``: the known-probability oracle.
* :func:`fedau`: ``w_n`` = the online estimate of ``1 / p_n`` (below), ``D = N``: FedAU.

FedAU (Wang & Ji, arXiv 2306.03401) estimates ``1 / p_n`` as the mean interval between a
client's participations, from its own history only (O(1) memory per client). Per round, for
every client: a participant gets the mean of the intervals completed *before* this round (1
if none), then records ``c_n + 1`` and resets ``c_n``; a non-participant increments ``c_n``,
and when it reaches the cutoff ``K`` records a censored interval ``K`` and resets. Each
recorded interval is then ``min(G, K)`` with ``G`` the geometric gap, so under Bernoulli(p)
participation the estimate tends to :func:`interval_limit` ``= (1 - (1 - p)**K) / p``
(``1 / p`` as ``K -> inf``).

Everything here is pure: arrays in, arrays out, no clock and no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from fedagg.errors import ConfigError, StateError

__all__ = [
    "IntervalEstimator",
    "IntervalState",
    "Weighting",
    "all_clients",
    "examples",
    "fedau",
    "interval_limit",
    "known",
    "participating",
]

Arr = npt.NDArray[Any]


def interval_limit(p: float, cutoff: int) -> float:
    """What FedAU's estimate tends to under Bernoulli(``p``) participation with cutoff ``K``:
    ``E[min(G, K)] = sum_{j<K} (1-p)**j = (1 - (1-p)**K) / p``."""
    if not 0 < p <= 1 or cutoff < 1:
        raise ConfigError("interval_limit needs 0 < p <= 1 and cutoff >= 1")
    return (1.0 - (1.0 - p) ** cutoff) / p


@dataclass(slots=True)
class IntervalState:
    """Per client: rounds since its last participation (``counter``), the running mean of
    its recorded intervals (``mean``) and how many it recorded (``count``)."""

    counter: npt.NDArray[np.int64]
    mean: npt.NDArray[np.float64]
    count: npt.NDArray[np.int64]

    def check(self) -> None:
        n = self.counter.shape
        ok = (
            self.counter.ndim == 1
            and self.mean.shape == n
            and self.count.shape == n
            and self.counter.dtype == np.int64
            and self.count.dtype == np.int64
            and self.mean.dtype == np.float64
            and bool(np.all(self.counter >= 0))
            and bool(np.all(self.count >= 0))
            and bool(np.all(np.isfinite(self.mean)))
        )
        if not ok:
            raise StateError("inconsistent IntervalState")


@dataclass(frozen=True, slots=True)
class IntervalEstimator:
    """FedAU's online estimate of ``1 / p_n`` (see the module docstring)."""

    cutoff: int = 100_000

    def __post_init__(self) -> None:
        if isinstance(self.cutoff, bool) or not isinstance(self.cutoff, int) or self.cutoff < 1:
            raise ConfigError(f"cutoff must be an int >= 1, got {self.cutoff!r}")

    def init(self, num_clients: int) -> IntervalState:
        if num_clients < 1:
            raise ConfigError("num_clients must be >= 1")
        return IntervalState(
            np.zeros(num_clients, np.int64),
            np.zeros(num_clients, np.float64),
            np.zeros(num_clients, np.int64),
        )

    def weights(self, state: IntervalState, clients: Sequence[int] | Arr) -> Arr:
        """The current estimates for ``clients`` (1 for a client with no recorded interval)."""
        idx = np.asarray(clients, dtype=np.int64)
        return np.where(state.count[idx] > 0, state.mean[idx], 1.0)

    def observe(self, state: IntervalState, participants: Sequence[int] | Arr) -> None:
        """Advance one round in which exactly ``participants`` took part (in place)."""
        part = np.zeros(state.counter.shape, dtype=bool)
        part[np.asarray(participants, dtype=np.int64)] = True
        rec = np.zeros(state.counter.shape, dtype=np.int64)  # 0 = nothing recorded
        rec[part] = state.counter[part] + 1
        state.counter[part] = 0
        rest = ~part
        state.counter[rest] += 1
        cut = rest & (state.counter >= self.cutoff)
        rec[cut] = self.cutoff
        state.counter[cut] = 0
        hit = rec > 0
        m = state.count[hit]
        state.mean[hit] = (m * state.mean[hit] + rec[hit]) / (m + 1)
        state.count[hit] = m + 1


# -- weightings --------------------------------------------------------------------------------
class Weighting(Protocol):
    """How a round weighs its participants and what it divides by (module docstring)."""

    @property
    def name(self) -> str: ...

    def init(self, num_clients: int) -> Any: ...

    def weight(self, state: Any, client: int, examples: float) -> float:
        """The weight of ``client``'s update (``examples`` is its sample count)."""
        ...

    def mass(self, state: Any, weights: Sequence[float], num_clients: int) -> float:
        """``sum(weights) / D``: the factor applied to the weighted mean."""
        ...

    def observe(self, state: Any, participants: Sequence[int]) -> None:
        """Advance the state past a round with these participants."""
        ...


@dataclass(frozen=True, slots=True)
class _Fixed:
    """Weights known up front: sample counts, ones, or ``1 / p_n``."""

    name: str
    over_all: bool  # D = N (else D = sum of weights)
    inverse_p: tuple[float, ...] | None = None

    def init(self, num_clients: int) -> None:
        if self.inverse_p is not None and len(self.inverse_p) != num_clients:
            raise ConfigError(
                f"known probabilities for {len(self.inverse_p)} clients, "
                f"the federation has {num_clients}"
            )

    def weight(self, state: Any, client: int, examples: float) -> float:
        if self.name == "examples":
            return float(examples)
        return 1.0 if self.inverse_p is None else self.inverse_p[client]

    def mass(self, state: Any, weights: Sequence[float], num_clients: int) -> float:
        return math.fsum(weights) / num_clients if self.over_all else 1.0

    def observe(self, state: Any, participants: Sequence[int]) -> None:
        pass


@dataclass(frozen=True, slots=True)
class _FedAU:
    estimator: IntervalEstimator

    @property
    def name(self) -> str:
        return "fedau"

    def init(self, num_clients: int) -> IntervalState:
        return self.estimator.init(num_clients)

    def weight(self, state: IntervalState, client: int, examples: float) -> float:
        return float(self.estimator.weights(state, [client])[0])

    def mass(self, state: Any, weights: Sequence[float], num_clients: int) -> float:
        return math.fsum(weights) / num_clients

    def observe(self, state: IntervalState, participants: Sequence[int]) -> None:
        self.estimator.observe(state, participants)


def examples() -> Weighting:
    """FedAvg's weights: sample counts, normalised over the participants."""
    return _Fixed("examples", over_all=False)


def participating() -> Weighting:
    """Equal weights, divided by the number of participants."""
    return _Fixed("participating", over_all=False)


def all_clients() -> Weighting:
    """Equal weights, divided by the number of clients ``N``."""
    return _Fixed("all", over_all=True)


def known(p: Sequence[float] | Arr) -> Weighting:
    """The oracle: weights ``1 / p_n`` from the true participation probabilities, over N."""
    arr = np.asarray(p, dtype=np.float64)
    if arr.ndim != 1 or not np.all((arr > 0) & (arr <= 1)):
        raise ConfigError("known probabilities must be a 1-D array in (0, 1]")
    return _Fixed("known", over_all=True, inverse_p=tuple((1.0 / arr).tolist()))


def fedau(cutoff: int = 100_000) -> Weighting:
    """FedAU: the online interval estimate of ``1 / p_n``, over N."""
    return _FedAU(IntervalEstimator(cutoff))
