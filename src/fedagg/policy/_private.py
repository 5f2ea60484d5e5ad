"""Central differential privacy (DP-FedAvg) as a policy wrapper, with adaptive clipping and an
accountant that stops the run before its budget is exceeded.

Two pieces, both pure:

* :class:`DPSum`, an aggregator wrapper (put it in the strategy with :func:`dp_strategy`): it
  clips every update to the round's clip C (the factor goes into ``Update.scale``: the delta is
  never copied), gives it weight 1 (DP needs a bounded sensitivity: per-client example weights
  would let one client dominate the sum, so every client counts once), counts the updates
  that were already within C (adaptive clipping's bit, computed here from the plaintext norm:
  under central DP the server sees the updates), and at finalize adds Gaussian noise of std
  ``z_u * C`` to the SUM of the clipped updates (:func:`fedagg.privacy.add_gaussian_noise`,
  chunk by chunk from a per-round seed) and divides by the EXPECTED number of clients
  ``q * N`` (not by the number that took part, which is private), before the server
  optimizer. Partial aggregates from edges merge as usual (each edge folds clipped updates
  with the same C): the noise is added once, at the root's finalize.
* :class:`PrivatePolicy`, around a :class:`~fedagg.policy.SyncPolicy` with Poisson sampling
  (``sampling="poisson"``: each client independently with ``q = clients_per_round /
  num_clients``, what the accountant assumes): it owns what spans rounds, the accountant's
  step count, the adaptive clip C_t, the rounds' noise seeds. Before a round is dispatched it
  computes the epsilon the run would have after it; if that exceeds ``max_epsilon`` it drops
  the dispatch and emits :class:`~fedagg.policy.Finish` instead (the same in simulation and
  deployment: the deployment's server steps this same object). Each round's
  :class:`~fedagg.policy.RoundStats` carries ``epsilon``, the run's epsilon after it.

Accounting: every closed round is one step of the Poisson-subsampled Gaussian mechanism with
the run's ``noise_multiplier`` z (applied or not, even a round nobody was sampled for: this
over-counts, never under-counts). With adaptive clipping (``target_quantile > 0``) z is the
*combined* noise multiplier of the two queries (the clipped sum and the count of unclipped
updates, noise ``count_stddev``; Andrew et al. 2021, Thm. 1): the sum is noised with the
larger ``z_u = update_noise_multiplier(z, count_stddev)`` so that the two together cost z.
The clip then follows ``C <- C * exp(-eta * (b/m - gamma))`` with ``b`` the noised count and
``m = q * N``. Epsilon is given at ``delta`` (default ``1 / N**1.1``) by the ``"rdp"`` or
``"pld"`` accountant of :mod:`fedagg.privacy`.

Caveats: a round that folds fewer than ``min_updates`` updates is skipped (the model stays),
which reveals that the sample was that small; keep ``min_updates = 1`` and ``q * N`` large. The
noise key of each round derives from the context's ``noise_secret`` when it has one (a
deployment: 32 random bytes kept private in its state directory, the same after a restart)
and otherwise from the run's seed (a simulation, which must replay bit for bit): a released
model's noise can then be rebuilt, and removed, by whoever knows the seed. Floating-point
Gaussian noise (see :mod:`fedagg.privacy`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from fedagg import privacy
from fedagg._checkpoint import register
from fedagg.core import kernels
from fedagg.core.aggregate import Aggregator, Composed, Mean, check_update
from fedagg.core.spec import ArrayTree, ParamSpec
from fedagg.core.strategy import ServerState, Strategy
from fedagg.core.update import Update
from fedagg.errors import ConfigError, NonFiniteUpdate
from fedagg.policy._events import (
    Action,
    Applied,
    Dispatch,
    Event,
    Finish,
    PolicyContext,
    SetTimer,
    Start,
)
from fedagg.policy._sync import SyncPolicy
from fedagg.policy._wraps import Wraps

__all__ = ["DPSum", "DPSumState", "PrivatePolicy", "PrivateState", "dp_strategy"]

Arr = npt.NDArray[Any]


# -- the aggregator: clip, count, noise the sum --------------------------------------------
@register
@dataclass(eq=False)
class DPSumState:
    """:class:`DPSum`'s round state: the inner mean's, the round's clip, how many folded
    updates were within it, and the noise the finalize adds (``expected`` 0: none, plain
    mean of the clipped updates)."""

    inner: Any
    clip: float
    unclipped: int = 0
    std: float = 0.0
    seed: str = ""  # hex of the round's 32-byte noise key (secret)
    expected: float = 0.0
    folded: int = 0  # updates folded this round (n of the centred count)

    @property
    def spec(self) -> ParamSpec:
        spec: ParamSpec = self.inner.spec
        return spec

    @property
    def version(self) -> int | None:
        v: int | None = self.inner.version
        return v


@dataclass(frozen=True, slots=True)
class DPSum:
    """Clip each update to L2 norm C (weight 1), sum, add N(0, std^2) noise, divide by the
    expected cohort (see the module docs). ``inner`` is the mean (optionally composed with
    pre-transforms); ``clip`` is C unless the policy sets the round's own."""

    inner: Aggregator[Any]
    clip: float = 1.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"clip must be finite and > 0, got {self.clip!r}")
        agg = self.inner.inner if isinstance(self.inner, Composed) else self.inner
        if not isinstance(agg, Mean):
            raise ConfigError(
                "central DP needs the mean aggregator: a robust rule's output is not covered by "
                "the Gaussian mechanism's analysis (its sensitivity to one client is not C)"
            )

    @property
    def decomposable(self) -> bool:
        return self.inner.decomposable

    def init(self, spec: ParamSpec, *, version: int | None = None) -> DPSumState:
        return DPSumState(self.inner.init(spec, version=version), self.clip)

    def _clipped(self, state: DPSumState, update: Update) -> tuple[Update, bool]:
        check_update(state.spec, state.version, update)
        norm = _norm(state.spec, update) * abs(float(update.scale))
        if not math.isfinite(norm):
            raise NonFiniteUpdate(update.client_id, "delta holds NaN or Inf values")
        within = norm <= state.clip
        scale = update.scale if within else update.scale * (state.clip / norm)
        return replace(update, weight=1.0, scale=scale), within

    def fold(self, state: DPSumState, update: Update) -> DPSumState:
        return self.fold_many(state, (update,))

    def fold_many(self, state: DPSumState, updates: Iterable[Update]) -> DPSumState:
        pairs = [self._clipped(state, u) for u in updates]
        ups = [u for u, _ in pairs]
        inner = self.inner
        # checked (metadata), finite (the norm) and clipped (every coordinate <= C): the
        # mean's trusted fold skips its own second look (an undo copy, a finiteness test)
        pieces = [state.spec.segments(u.delta) for u in ups]
        if (
            isinstance(inner, Mean)
            and all(len(p) == 1 for p in pieces)
            and state.clip * (inner.count(state.inner) + len(ups)) < 1e30
        ):
            inner.fold_trusted(
                state.inner, [p[0] for p in pieces], [1.0] * len(ups), [u.scale for u in ups]
            )
        else:
            state.inner = inner.fold_many(state.inner, ups)
        state.unclipped += sum(int(w) for _, w in pairs)
        state.folded += len(ups)
        return state

    def merge(self, state: DPSumState, other: DPSumState) -> DPSumState:
        state.inner = self.inner.merge(state.inner, other.inner)
        state.unclipped += other.unclipped
        state.folded += other.folded
        return state

    def finalize_flat(self, state: DPSumState) -> Arr:
        if state.expected <= 0:
            return self.inner.finalize_flat(state.inner)
        n = self.inner.count(state.inner)
        if n:  # weights are 1: the mean times the count is the clipped sum
            out = self.inner.finalize_flat(state.inner)
            out *= out.dtype.type(n)
        else:
            out = np.zeros(state.spec.size, state.spec.dtype)
        if state.std > 0:
            privacy.add_gaussian_noise(out, bytes.fromhex(state.seed), state.std)
        out /= out.dtype.type(state.expected)
        return out

    def finalize(self, state: DPSumState) -> ArrayTree:
        return state.spec.unflatten(self.finalize_flat(state))

    def count(self, state: DPSumState) -> int:
        return self.inner.count(state.inner)


def _norm(spec: ParamSpec, update: Update) -> float:
    """The L2 norm of the delta (before its scale), accumulated in float64: 8 independent
    lanes per block (compiled, in a fixed order: the same bits on every replay), 3-5x faster
    than :func:`fedagg.core.pretransforms.update_norm`'s one-accumulator loop."""
    parts = []
    for seg in spec.segments(update.delta):
        native = seg.dtype in (np.float32, np.float64) and seg.flags.c_contiguous
        if _sumsq_lanes is not None and native and seg.size >= 1 << 16:
            parts.append(float(_sumsq_lanes(seg)))
        else:
            parts.append(kernels.sum_squares(seg, use_numba=kernels.HAVE_NUMBA))
    return math.sqrt(math.fsum(parts))


def _lanes_kernel() -> Any:
    if not kernels.HAVE_NUMBA:
        return None
    import numba

    @numba.njit(parallel=True, cache=True, nogil=True)
    def lanes(x: Arr) -> float:  # pragma: no cover - compiled
        n = x.size
        blk = 1 << 16
        nblk = (n + blk - 1) // blk
        part = np.zeros(nblk, np.float64)
        for b in numba.prange(nblk):
            lo = b * blk
            hi = min(n, lo + blk)
            a0 = a1 = a2 = a3 = a4 = a5 = a6 = a7 = 0.0
            m = lo + ((hi - lo) // 8) * 8
            for i in range(lo, m, 8):
                v0, v1 = np.float64(x[i]), np.float64(x[i + 1])
                v2, v3 = np.float64(x[i + 2]), np.float64(x[i + 3])
                v4, v5 = np.float64(x[i + 4]), np.float64(x[i + 5])
                v6, v7 = np.float64(x[i + 6]), np.float64(x[i + 7])
                a0 += v0 * v0
                a1 += v1 * v1
                a2 += v2 * v2
                a3 += v3 * v3
                a4 += v4 * v4
                a5 += v5 * v5
                a6 += v6 * v6
                a7 += v7 * v7
            s = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
            for i in range(m, hi):
                v = np.float64(x[i])
                s += v * v
            part[b] = s
        return float(part.sum())

    return lanes


_sumsq_lanes = _lanes_kernel()


def dp_strategy(strategy: Strategy, clip: float = 1.0) -> Strategy:
    """``strategy`` with its aggregator wrapped in :class:`DPSum` (what
    :class:`PrivatePolicy` needs); the server optimizer is unchanged."""
    if isinstance(strategy.aggregator, DPSum):
        return strategy
    return replace(strategy, aggregator=DPSum(strategy.aggregator, float(clip)))


# -- the policy: accountant, adaptive clip, budget -------------------------------------------
@register
@dataclass
class PrivateState:
    """:class:`PrivatePolicy`'s state: the inner's, the clip of the next round, the steps
    accounted, the epsilon so far, and the run's fixed privacy parameters."""

    inner: Any
    clip: float
    sample_rate: float
    delta: float
    count_stddev: float
    steps: int = 0
    epsilon: float = 0.0
    finished: bool = False
    rdp: Any = None  # the RDP of one step at DEFAULT_ORDERS (accountant "rdp")
    clips: list[float] = field(default_factory=list)  # the clip of each closed round

    @property
    def server(self) -> ServerState:
        server: ServerState = self.inner.server
        return server


@dataclass(frozen=True)
class PrivatePolicy(Wraps):
    """Central DP-FedAvg around a :class:`SyncPolicy` (module docs).

    Args:
        inner: sync rounds with ``sampling="poisson"``, a :func:`dp_strategy` strategy,
            example weighting (weights are replaced by 1), no SCAFFOLD.
        noise_multiplier: z, the accounted noise multiplier (>= 0; 0: no noise, epsilon inf).
        clip: C, or the initial clip when adaptive.
        target_quantile: gamma in (0, 1) for adaptive clipping; 0 for a fixed clip.
        clip_learning_rate: eta of the geometric clip update.
        count_stddev: the noise on the unclipped count (0: expected clients / 20).
        delta: the delta epsilon is given at (0: ``1 / num_clients**1.1``).
        max_epsilon: stop before a round whose epsilon would exceed this.
        accountant: ``"rdp"`` or ``"pld"``.
        rdp_curve: accounting only (distributed DP, where the clients add the noise): the
            RDP of ONE round, already subsampled, as ``((order, rdp), ...)`` (e.g.
            :func:`fedagg.privacy.rdp_poisson_subsampled` of
            :func:`fedagg.privacy.rdp_distributed_discrete_gaussian`). Then ``inner`` may be a
            :class:`~fedagg.policy.SecurePolicy` around the Poisson sync rounds, the strategy
            needs no :class:`DPSum`, ``noise_multiplier`` and the clip are not used, epsilon
            is RDP's over these orders (``accountant`` ignored), and adaptive clipping is
            refused. ``max_epsilon`` and ``RoundStats.epsilon`` work as in central DP.
    """

    inner: Any  # SyncPolicy (central), or a SecurePolicy around one (with rdp_curve)
    noise_multiplier: float
    clip: float = 1.0
    target_quantile: float = 0.0
    clip_learning_rate: float = 0.2
    count_stddev: float = 0.0
    delta: float = 0.0
    max_epsilon: float = math.inf
    accountant: str = "rdp"
    rdp_curve: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        inner = _sync(self.inner) if self.rdp_curve else self.inner
        if not isinstance(inner, SyncPolicy):
            raise ConfigError(
                "central DP runs with sync rounds (policy kind 'sync'): DP with async, FedBuff "
                "or FedAMD needs DP-FTRL (tree aggregation), which is not implemented"
            )
        if inner.sampling != "poisson":
            raise ConfigError(
                "central DP needs Poisson client sampling (SyncPolicy(sampling='poisson'), "
                "[privacy] sampling = 'poisson'): fixed-size sampling has no accountant here "
                "(sampling without replacement is only analysed under substitution adjacency)"
            )
        if inner.scaffold or inner.weighting is not None:
            raise ConfigError(
                "central DP weighs every client 1 and keeps no per-client server state: "
                "SCAFFOLD and participation weightings (FedAU) are not DP here"
            )
        if self.rdp_curve:
            self._check_curve()
        elif _find(inner.strategy.aggregator, DPSum) is None:
            raise ConfigError(
                "central DP needs the strategy's aggregator wrapped: use "
                "fedagg.policy.dp_strategy(strategy) for the SyncPolicy's strategy"
            )
        z = self.noise_multiplier
        if (
            isinstance(z, bool)
            or not isinstance(z, int | float)
            or not (math.isfinite(z) and z >= 0)
        ):
            raise ConfigError(f"noise_multiplier must be a finite number >= 0, got {z!r}")
        if not (math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"clip must be finite and > 0, got {self.clip!r}")
        if not 0 <= self.target_quantile < 1:
            raise ConfigError(f"target_quantile must be in [0, 1), got {self.target_quantile!r}")
        if not (math.isfinite(self.clip_learning_rate) and self.clip_learning_rate > 0):
            raise ConfigError("clip_learning_rate must be finite and > 0")
        if not (math.isfinite(self.count_stddev) and self.count_stddev >= 0):
            raise ConfigError("count_stddev must be finite and >= 0")
        if not 0 <= self.delta < 1:
            raise ConfigError(f"delta must be in [0, 1), got {self.delta!r}")
        if not self.max_epsilon > 0:
            raise ConfigError(f"max_epsilon must be > 0, got {self.max_epsilon!r}")
        if self.accountant not in privacy.ACCOUNTANTS:
            raise ConfigError(
                f"accountant must be one of {', '.join(privacy.ACCOUNTANTS)}, got "
                f"{self.accountant!r}"
            )
        if self.adaptive and self.noise_multiplier > 0 and self.count_stddev > 0:
            privacy.update_noise_multiplier(self.noise_multiplier, self.count_stddev)

    def _check_curve(self) -> None:
        curve = self.rdp_curve
        ok = isinstance(curve, tuple) and all(
            isinstance(p, tuple) and len(p) == 2 and float(p[0]) > 1 and float(p[1]) >= 0
            for p in curve
        )
        if not ok:
            raise ConfigError("rdp_curve must be ((order > 1, rdp >= 0), ...)")
        if self.adaptive:
            raise ConfigError("adaptive clipping is for central DP (not with rdp_curve)")

    # -- what the engines read ----------------------------------------------------------------
    @property
    def adaptive(self) -> bool:
        return self.target_quantile > 0

    def update_noise(self, state: PrivateState) -> float:
        """z_u: the noise multiplier of the clipped sum (z itself under a fixed clip)."""
        z = float(self.noise_multiplier)
        if not self.adaptive or z == 0:
            return z
        return privacy.update_noise_multiplier(z, state.count_stddev)

    def epsilon(self, state: PrivateState, steps: int) -> float:
        """The run's epsilon after ``steps`` rounds."""
        if steps == 0:
            return 0.0
        if self.noise_multiplier == 0 and not self.rdp_curve:
            return math.inf
        if self.rdp_curve:
            orders = [float(a) for a, _ in self.rdp_curve]
            rdp = np.array([float(r) for _, r in self.rdp_curve]) * steps
            return float(privacy.rdp_to_epsilon(orders, rdp, state.delta)[0])
        if state.rdp is not None:
            rdp = np.asarray(state.rdp) * steps
            return float(privacy.rdp_to_epsilon(privacy.DEFAULT_ORDERS, rdp, state.delta)[0])
        return privacy.epsilon(
            noise_multiplier=float(self.noise_multiplier),
            sample_rate=state.sample_rate,
            steps=steps,
            delta=state.delta,
            accountant="pld",
        )

    def init(self, server: ServerState, ctx: PolicyContext) -> PrivateState:
        n = ctx.num_clients
        q = min(1.0, _sync(self.inner).clients_per_round / n)
        delta = float(self.delta) or 1.0 / n**1.1
        sb = float(self.count_stddev) or q * n / 20
        if self.adaptive and self.noise_multiplier > 0:
            privacy.update_noise_multiplier(self.noise_multiplier, sb)  # refuse a too-small sb
        state = PrivateState(self.inner.init(server, ctx), float(self.clip), q, delta, sb)
        if self.accountant == "rdp" and self.noise_multiplier > 0 and not self.rdp_curve:
            state.rdp = privacy.rdp_subsampled_gaussian(
                float(self.noise_multiplier), q, privacy.DEFAULT_ORDERS
            )
        return state

    def step(self, state: PrivateState, event: Event, ctx: PolicyContext) -> list[Action]:
        if state.finished:
            return []
        if isinstance(event, Start) and self.epsilon(state, 1) > self.max_epsilon:
            state.finished = True
            return [Finish()]
        # the aggregate of the round open before the event (its count of unclipped updates)
        sync = _sync(state.inner)
        agg = _find(sync.agg, DPSumState) if sync.open else None
        return self._wrap(state, self.inner.step(state.inner, event, ctx), agg, ctx)

    def _wrap(
        self, state: PrivateState, actions: list[Action], agg: Any, ctx: PolicyContext
    ) -> list[Action]:
        out: list[Action] = []
        for a in actions:
            if isinstance(a, Applied):
                unclipped = agg.unclipped if isinstance(agg, DPSumState) else 0
                folded = agg.folded if isinstance(agg, DPSumState) else 0
                agg = None  # later Applied of this step: rounds nobody was dispatched to
                state.steps += 1
                state.epsilon = self.epsilon(state, state.steps)
                state.clips.append(state.clip)
                stats = a.stats
                m = state.sample_rate * ctx.num_clients
                omega = tuple(1.0 / m for _ in stats.omega)
                out.append(
                    Applied(replace(stats, epsilon=state.epsilon, omega=omega), a.client_states)
                )
                if self.adaptive:
                    self._adapt(state, unclipped, folded, m, ctx)
            elif isinstance(a, Dispatch):
                if self.epsilon(state, state.steps + 1) > self.max_epsilon:
                    inner = _sync(state.inner)
                    inner.open, inner.pending, inner.agg = False, set(), None
                    state.finished = True
                    out.append(Finish())
                    return out
                if not self.rdp_curve:
                    self._arm(state, ctx)
                out.append(a)
            elif isinstance(a, SetTimer | Finish):
                if isinstance(a, Finish):
                    state.finished = True
                out.append(a)
            else:
                out.append(a)
        return out

    def _arm(self, state: PrivateState, ctx: PolicyContext) -> None:
        """Set the now open round's clip, noise and divisor on its aggregate."""
        sync = _sync(state.inner)
        agg = _find(sync.agg, DPSumState)
        if agg is None:
            raise ConfigError("central DP needs the DPSum aggregator (dp_strategy)")
        agg.clip = state.clip
        agg.std = self.update_noise(state) * state.clip
        agg.seed = _round_key(ctx, sync.round, b"sum").hex()
        agg.expected = state.sample_rate * ctx.num_clients

    def _adapt(
        self, state: PrivateState, unclipped: int, folded: int, m: float, ctx: PolicyContext
    ) -> None:
        key = _round_key(ctx, _sync(state.inner).round - 1, b"count")
        rng = np.random.default_rng(int.from_bytes(key[:16], "little"))
        sb = state.count_stddev if self.noise_multiplier > 0 else 0.0
        b = privacy.noised_unclipped_fraction(int(unclipped), m, sb, rng, folded=int(folded))
        state.clip = privacy.adaptive_clip(
            state.clip, b, float(self.target_quantile), float(self.clip_learning_rate)
        )


def _sync(obj: Any) -> Any:
    """The sync policy (or its state) of ``obj``, or of the wrapper (SecurePolicy) around it."""
    return obj if isinstance(obj, SyncPolicy) or hasattr(obj, "pending") else obj.inner


def _find(obj: Any, kind: type[Any]) -> Any:
    """``obj`` or the first ``kind`` down its chain of ``.inner`` wrappers (a deployment's
    canonical-order aggregator wraps :class:`DPSum`), else None."""
    for _ in range(8):
        if isinstance(obj, kind):
            return obj
        obj = getattr(obj, "inner", None)
    return None


def _round_key(ctx: PolicyContext, round_: int, what: bytes) -> bytes:
    """The 32-byte noise key of one round's query: from the context's secret (a deployment)
    or else from the run's seed (a simulation; module docs)."""
    secret = getattr(ctx, "noise_secret", None)
    if isinstance(secret, bytes) and len(secret) >= 16:
        return hashlib.sha256(
            b"fedagg central dp secret\0" + what + b"\0" + secret + f"\0{round_}".encode()
        ).digest()
    return hashlib.sha256(
        b"fedagg central dp\0" + what + f"\0{ctx.seed}\0{round_}".encode()
    ).digest()
