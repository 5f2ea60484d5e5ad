"""Accounting for the client-side DP mechanisms, as a policy wrapper: local DP and distributed
DP (the noise itself is added by the clients: :class:`fedagg.clients.LocalDP`, and the
noisy encoding of a :class:`~fedagg.policy.SecurePolicy` with ``noise`` set).

:class:`ClientDPPolicy` steps its inner policy (a :class:`~fedagg.policy.SyncPolicy` or a
:class:`~fedagg.policy.SecurePolicy`) and only counts, reports and enforces; like every policy
it is pure, so simulation and deployment stop at the same round.

* ``mechanism="local"``: every client a round dispatches counts one local release (it may
  upload its noisy update, whether or not the server applies it). The epsilon reported after
  each round is the largest over clients of :func:`fedagg.privacy.local_epsilon` (the
  Gaussian mechanism at z / 2 under replacement, composed over that client's releases, no
  amplification by sampling). Before a dispatch, the epsilon of its most-used client after it
  is checked against ``max_epsilon``.
* ``mechanism="distributed"``: the inner is a SecurePolicy with noise around a sync policy
  with Poisson sampling (``sampling="poisson"``). One round's RDP is
  :func:`fedagg.privacy.distributed_rdp` of the round's encoder *against the server*:
  replacement of one client's update (sensitivity 2S) and no amplification by sampling
  (``q = 1``), since the server chooses the sample and sees who uploaded (its ratio of
  sensitivity to noise is 2 sqrt(n_e) / z whatever the round's size: the headroom changes
  the grid, not that ratio); every closed round counts (applied, skipped or abandoned:
  over-counts, never under-counts), and epsilon after t rounds is
  :func:`fedagg.privacy.distributed_epsilon`. That is what is reported and what
  ``max_epsilon`` enforces; the smaller amplified figure against third parties who do not
  see the sample is :meth:`ClientDPPolicy.third_party_epsilon` (never enforced). The round's
  sum is accounted with the
  SecurePolicy's ``min_survivors`` noise shares: a round with fewer survivors is never
  unmasked (the policy abandons it, and honest clients refuse to unmask it), and more
  survivors only add noise. Clients that skip their noise (dishonest or colluding with the
  server) are not covered, as in Kairouz et al.

Before a round whose epsilon would exceed ``max_epsilon``, the wrapper drops the dispatch and
emits :class:`~fedagg.policy.Finish`. ``delta`` 0 means ``1 / num_clients**1.1``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

from fedagg import privacy
from fedagg._checkpoint import register
from fedagg.core.strategy import ServerState
from fedagg.errors import ConfigError
from fedagg.policy._events import Action, Applied, Dispatch, Event, Finish, PolicyContext, Start
from fedagg.policy._secure import SecurePolicy
from fedagg.policy._sync import SyncPolicy
from fedagg.policy._wraps import Wraps

__all__ = ["ClientDPPolicy", "ClientDPState"]

MECHANISMS = ("local", "distributed")


@register
@dataclass
class ClientDPState:
    """:class:`ClientDPPolicy`'s state: the inner's, the run's q and delta, the rounds
    accounted, the epsilon so far, per-client releases (local) and one round's RDP curve
    (distributed)."""

    inner: Any
    sample_rate: float
    delta: float
    steps: int = 0
    epsilon: float = 0.0
    finished: bool = False
    taken: list[int] = field(default_factory=list)  # local: releases per client
    rdp: Any = None  # distributed: one round's RDP at DISTRIBUTED_ORDERS

    @property
    def server(self) -> ServerState:
        server: ServerState = self.inner.server
        return server


@dataclass(frozen=True)
class ClientDPPolicy(Wraps):
    """Local or distributed DP's accountant around a sync or secure policy (module docs)."""

    inner: Any
    mechanism: str
    noise_multiplier: float
    delta: float = 0.0
    max_epsilon: float = math.inf

    def __post_init__(self) -> None:
        if self.mechanism not in MECHANISMS:
            raise ConfigError(f"mechanism must be one of {MECHANISMS}, got {self.mechanism!r}")
        z = self.noise_multiplier
        if isinstance(z, bool) or not isinstance(z, int | float) or not 0 < z < math.inf:
            raise ConfigError(f"noise_multiplier must be a finite number > 0, got {z!r}")
        if not 0 <= self.delta < 1:
            raise ConfigError(f"delta must be in [0, 1), got {self.delta!r}")
        if not self.max_epsilon > 0:
            raise ConfigError(f"max_epsilon must be > 0, got {self.max_epsilon!r}")
        inner = self.inner
        if self.mechanism == "distributed":
            if not isinstance(inner, SecurePolicy) or not inner.noise:
                raise ConfigError(
                    "distributed DP runs under secure aggregation: the inner policy must be a "
                    "SecurePolicy with noise ([secure_aggregation] kind = 'secagg+')"
                )
            if float(inner.noise_multiplier) != float(z):
                raise ConfigError("the SecurePolicy's noise_multiplier is not the accounted one")
            if inner.inner.sampling != "poisson":
                raise ConfigError(
                    "distributed DP is accounted under Poisson sampling: SyncPolicy("
                    "sampling='poisson') ([privacy] sampling = 'poisson')"
                )
        elif not isinstance(inner, SyncPolicy | SecurePolicy):
            raise ConfigError(
                "local DP is accounted per round: sync rounds only (async, FedBuff and FedAMD "
                "are not covered)"
            )

    # -- what the engines read ----------------------------------------------------------------
    def init(self, server: ServerState, ctx: PolicyContext) -> ClientDPState:
        n = ctx.num_clients
        q = min(1.0, self.clients_per_round / n)
        delta = float(self.delta) or 1.0 / n**1.1
        state = ClientDPState(self.inner.init(server, ctx), q, delta)
        if self.mechanism == "local":
            state.taken = [0] * n
        else:
            enc = self.inner.dp_encoder(server.spec.size, max(2, self.clients_per_round))
            # noise sized for enc.noise_clients = min_survivors shares, the fewest unmasked
            state.rdp = privacy.distributed_rdp(enc, 1.0).tolist()  # against the server
        return state

    def epsilon(self, state: ClientDPState, steps: int, most: int | None = None) -> float:
        """The run's epsilon after ``steps`` rounds (distributed) or with ``most`` releases of
        the most-used client (local; default: the state's)."""
        if self.mechanism == "local":
            k = max(state.taken, default=0) if most is None else most
            return privacy.local_epsilon(float(self.noise_multiplier), k, state.delta)
        return privacy.distributed_epsilon(state.rdp, steps, state.delta)

    def third_party_epsilon(self, state: ClientDPState, steps: int, dim: int) -> float:
        """Distributed DP only: the epsilon after ``steps`` rounds of ``dim``-long updates
        against third parties who do not see the sample (add/remove adjacency, sensitivity
        S, Poisson amplification at the state's q). Informational: it does not hold against
        the server, and ``max_epsilon`` enforces :meth:`epsilon`."""
        if self.mechanism != "distributed":
            raise ConfigError("third_party_epsilon is for distributed DP")
        enc = self.inner.dp_encoder(dim, max(2, self.clients_per_round))
        rdp = privacy.distributed_rdp(enc, state.sample_rate, neighbours="add_remove")
        return privacy.distributed_epsilon(rdp, steps, state.delta)

    def _next(self, state: ClientDPState, clients: tuple[int, ...]) -> float:
        if self.mechanism == "local":
            most = max([state.taken[c] + 1 for c in clients] + [max(state.taken, default=0)])
            return self.epsilon(state, state.steps, most)
        return self.epsilon(state, state.steps + 1)

    def step(self, state: ClientDPState, event: Event, ctx: PolicyContext) -> list[Action]:
        if state.finished:
            return []
        if isinstance(event, Start) and self._next(state, (0,)) > self.max_epsilon:
            state.finished = True
            return [Finish()]
        out: list[Action] = []
        for a in self.inner.step(state.inner, event, ctx):
            if isinstance(a, Dispatch):
                if self._next(state, tuple(a.clients)) > self.max_epsilon:
                    self._close(state)
                    state.finished = True
                    out.append(Finish())
                    return out
                for c in a.clients if self.mechanism == "local" else ():
                    state.taken[c] += 1
                out.append(a)
            elif isinstance(a, Applied):
                state.steps += 1
                state.epsilon = self.epsilon(state, state.steps)
                out.append(Applied(replace(a.stats, epsilon=state.epsilon), a.client_states))
            else:
                if isinstance(a, Finish):
                    state.finished = True
                out.append(a)
        return out

    def _close(self, state: ClientDPState) -> None:
        """Forget the round the dropped dispatch opened (and its secure round)."""
        sync = state.inner
        if isinstance(self.inner, SecurePolicy):
            sync.open = None
            sync = sync.inner
        sync.open, sync.pending, sync.agg = False, set(), None
