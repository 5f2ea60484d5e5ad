"""What the virtual clock models: each client's speed, link and availability.

Every draw is a pure function of ``(seed, client)`` (speeds, links, phases) or
``(seed, client, slot)`` (availability), so a simulation replays bit-for-bit and 100,000
virtual clients cost a few arrays of floats, not objects.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fedagg.errors import ConfigError

__all__ = ["Availability", "Distribution", "SystemModel", "Timing"]

Arr = npt.NDArray[Any]
_SPEED, _DOWN, _UP, _LAT, _DROP, _AVAIL, _PHASE, _JITTER = range(8)


@dataclass(frozen=True, slots=True)
class Distribution:
    """A positive random quantity: ``constant`` (= mean), or ``lognormal`` with the given mean
    and ``sigma`` (the log-space standard deviation), or ``uniform`` on [low, high]."""

    kind: Literal["constant", "lognormal", "uniform"] = "constant"
    mean: float = 1.0
    sigma: float = 0.0
    low: float = 0.0
    high: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "lognormal", "uniform"):
            raise ConfigError(f"unknown distribution {self.kind!r}")
        if self.kind == "uniform" and not (0 < self.low <= self.high):
            raise ConfigError("uniform needs 0 < low <= high (speeds and links are positive)")
        if self.kind == "constant" and not (math.isfinite(self.mean) and self.mean >= 0):
            raise ConfigError("a constant needs a finite mean >= 0")
        if self.kind == "lognormal" and not (self.mean > 0 and self.sigma >= 0):
            raise ConfigError("a lognormal distribution needs mean > 0 and sigma >= 0")

    def sample(self, rng: np.random.Generator, n: int) -> Arr:
        if self.kind == "constant":
            return np.full(n, self.mean)
        if self.kind == "uniform":
            return rng.uniform(self.low, self.high, n)
        mu = math.log(self.mean) - self.sigma**2 / 2  # so that E[X] = mean
        return rng.lognormal(mu, self.sigma, n)


@dataclass(frozen=True, slots=True)
class Availability:
    """When a client can be selected: per time slot (a round for synchronous policies).

    * ``always``.
    * ``bernoulli``: available in each slot with probability ``p``, independently.
    * ``markov``: a two-state chain with stationary probability ``p`` whose switch-on
      probability is at most ``max_on`` (FedAU's "markov-0.05").
    * ``cyclic``: available ``round(period * p)`` (at least 1) consecutive slots of every
      ``period``, with a random phase per client (FedAU's "cyclic-100").

    ``p`` may be a scalar or set per client with :meth:`SystemModel.with_probabilities`.
    """

    kind: Literal["always", "bernoulli", "markov", "cyclic"] = "always"
    p: float = 1.0
    max_on: float = 0.05
    period: int = 100

    def __post_init__(self) -> None:
        if self.kind not in ("always", "bernoulli", "markov", "cyclic"):
            raise ConfigError(f"unknown availability {self.kind!r}")
        if not 0 < self.p <= 1:
            raise ConfigError(f"availability p must be in (0, 1], got {self.p}")
        if self.period < 1 or not 0 < self.max_on <= 1:
            raise ConfigError("availability needs period >= 1 and 0 < max_on <= 1")


@dataclass(frozen=True, slots=True)
class Timing:
    """How long one client's job takes, split into its parts (virtual seconds)."""

    download: float
    compute: float
    upload: float

    @property
    def total(self) -> float:
        return self.download + self.compute + self.upload


@dataclass
class SystemModel:
    """Client speeds, links, dropouts and availability for ``num_clients`` virtual clients.

    Args:
        compute: examples processed per virtual second, per client.
        downlink: bytes per virtual second, per client.
        uplink: bytes per virtual second, per client.
        latency: one-way latency in virtual seconds, per client.
        dropout: probability that a dispatched client drops out before it reports.
        availability: see :class:`Availability`.
        jitter: per-job variation of compute time: each job's compute time is multiplied by
            a lognormal factor of mean 1 and this log-space sigma (0: every job of a client
            takes the same time).
    """

    num_clients: int
    seed: int = 0
    compute: Distribution = field(default_factory=lambda: Distribution("constant", 1000.0))
    downlink: Distribution = field(default_factory=lambda: Distribution("constant", 1.25e6))
    uplink: Distribution = field(default_factory=lambda: Distribution("constant", 1.25e6))
    latency: Distribution = field(default_factory=lambda: Distribution("constant", 0.05))
    dropout: float = 0.0
    availability: Availability = field(default_factory=Availability)
    jitter: float = 0.0
    _speed: Arr = field(init=False, repr=False)
    _down: Arr = field(init=False, repr=False)
    _up: Arr = field(init=False, repr=False)
    _lat: Arr = field(init=False, repr=False)
    _p: Arr = field(init=False, repr=False)
    _phase: Arr = field(init=False, repr=False)
    _markov_cache: tuple[int, Arr] | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.num_clients < 1:
            raise ConfigError("num_clients must be >= 1")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not (math.isfinite(self.jitter) and self.jitter >= 0):
            raise ConfigError(f"jitter must be finite and >= 0, got {self.jitter}")
        for name, d in (("compute", self.compute), ("downlink", self.downlink),
                        ("uplink", self.uplink)):  # fmt: skip
            if d.kind == "constant" and d.mean == 0:
                raise ConfigError(f"{name} must be > 0 (it divides work and bytes)")
        n = self.num_clients
        self._speed = self.compute.sample(np.random.default_rng([self.seed, _SPEED]), n)
        self._down = self.downlink.sample(np.random.default_rng([self.seed, _DOWN]), n)
        self._up = self.uplink.sample(np.random.default_rng([self.seed, _UP]), n)
        self._lat = self.latency.sample(np.random.default_rng([self.seed, _LAT]), n)
        self._p = np.full(n, self.availability.p)
        self._phase = np.random.default_rng([self.seed, _PHASE]).integers(
            0, self.availability.period, n
        )
        self._markov_cache = None

    def with_speeds(self, compute: Arr) -> SystemModel:
        """Set each client's compute speed (examples per virtual second), in place (e.g.
        FedFix's F-X scenarios); returns the model for chaining."""
        c = np.asarray(compute, dtype=np.float64)
        if c.shape != (self.num_clients,) or not np.all(np.isfinite(c) & (c > 0)):
            raise ConfigError("per-client speeds must be (num_clients,), finite and > 0")
        self._speed = c.copy()
        return self

    def with_probabilities(self, p: Arr) -> SystemModel:
        """Set per-client availability probabilities (e.g. FedAU's label-correlated ones), in
        place; returns the model for chaining."""
        p = np.asarray(p, dtype=np.float64)
        if p.shape != (self.num_clients,) or not np.all((p > 0) & (p <= 1)):
            raise ConfigError("per-client probabilities must be (num_clients,) in (0, 1]")
        self._p = p.copy()
        self._markov_cache = None
        return self

    # -- time ---------------------------------------------------------------------------------
    def timing(
        self, client: int, work_examples: int, down_bytes: int, up_bytes: int, job: int = 0
    ) -> Timing:
        """Job ``job``'s duration: download, ``work_examples`` of compute, upload."""
        lat = float(self._lat[client])
        compute = work_examples / float(self._speed[client])
        if self.jitter:
            rng = np.random.default_rng([self.seed, _JITTER, job, client])
            compute *= float(rng.lognormal(-(self.jitter**2) / 2, self.jitter))
        return Timing(
            download=lat + down_bytes / float(self._down[client]),
            compute=compute,
            upload=lat + up_bytes / float(self._up[client]),
        )

    def drops_out(self, client: int, job: int) -> float | None:
        """If the client drops out of job ``job``, the fraction of the job done by then."""
        if self.dropout == 0.0:
            return None
        rng = np.random.default_rng([self.seed, _DROP, job, client])
        if rng.random() < self.dropout:
            return float(rng.random())
        return None

    # -- availability ---------------------------------------------------------------------
    def available(self, client: int, slot: int) -> bool:
        """Whether ``client`` can be selected in time slot ``slot`` (a round)."""
        return bool(self._mask(slot)[client])

    def available_clients(self, slot: int) -> Arr:
        """Indices of the clients available in ``slot``, ascending."""
        return np.flatnonzero(self._mask(slot))

    def _uniforms(self, slot: int) -> Arr:
        return np.random.default_rng([self.seed, _AVAIL, slot]).random(self.num_clients)

    def _mask(self, slot: int) -> Arr:
        if slot < 0:
            raise ConfigError("slots start at 0")
        a = self.availability
        if a.kind == "always":
            return np.ones(self.num_clients, dtype=bool)
        if a.kind == "bernoulli":
            return self._uniforms(slot) < self._p
        if a.kind == "cyclic":
            on = np.maximum(1, np.round(a.period * self._p)).astype(np.int64)
            return (slot + self._phase) % a.period < on
        return self._markov_mask(slot)

    def _markov_mask(self, slot: int) -> Arr:
        """Two-state chains: P(off->on) = q_on, P(on->off) = q_off, stationary P(on) = p."""
        p = self._p
        q_on = np.minimum(self.availability.max_on, p)
        q_off = np.where(p < 1, q_on * (1 - p) / p, 0.0)
        last, state = self._markov_cache if self._markov_cache else (-1, np.zeros(0, bool))
        if slot < last or last < 0:  # start (or rewind) in the stationary distribution
            last, state = 0, self._uniforms(0) < p
        for s in range(last + 1, slot + 1):
            u = self._uniforms(s)
            state = np.where(state, u >= q_off, u < q_on)
        self._markov_cache = (slot, state)
        return state
