"""Bounds on what a client claims: its weight and the size of its update (issue 14, finding 6).

A client's upload carries a claimed weight (its sample count) and a delta; nothing checks
either against reality. Unbounded, one client claiming ``num_examples = 1e12`` or sending
values of ``1e30`` sets the global model on its own. The deployed server therefore bounds
every update before it is folded, relative to what the other clients claim:

* **weight**: capped at ``weight_cap`` times the (lower) median claimed weight of a
  reference set (``deploy.weight_cap``, default 10; 0 disables);
* **norm**: the L2 norm of the delta (one compiled pass over the spool file's view) is bounded
  by ``norm_cap`` times the reference's median norm (``deploy.norm_cap``, default 10; 0
  disables) and by the absolute ``deploy.max_norm`` (default 0: none); an update over the
  bound is scaled down to it through ``Update.scale`` (``norm_mode = "clip"``, the default:
  no copy of the delta) or refused (``"reject"``).

The reference is a sliding window over earlier rounds: the latest accepted claim (bounded
weight, bounded norm) of each of the last ``bound_window`` clients to have one (a client
sending many updates counts once). It is part of the round's aggregate state, so it is
checkpointed with it and rebuilt exactly by a replay. While it holds fewer than
``bound_warmup`` clients (or half the federation's, if fewer: the first round or rounds),
the round's updates are kept as read-only views of their spool files, as canonical order
does, and bounded at the round's close relative to that round's own claims (each client's
latest): an attacker is bounded from the very first round, even when its upload is the
first to arrive. Canonical order keeps
every round's updates until the close anyway, and bounds them relative to the window (or,
warming up, the round's own claims). Medians are lower medians (with two values, the
smaller), so one client of two cannot raise them.

An edge aggregator in aggregate mode bounds its own clients' updates the same way, with the
same ``[deploy]`` settings, before folding them into its partial (see
:mod:`fedagg.deploy._edge`); the root merges partial aggregates as they come.

What stays unbounded: a coalition holding half the reference (or half a warming-up round)
moves the medians; an edge's own sum (it is trusted with it, as the edge docstring says); an
asynchronous step whose buffer holds one client only (FedAsync, or a
first FedBuff buffer filled by one fast client) is bounded by ``max_norm`` alone until the
window is warm.

The mean family honours both bounds (``sum w_i s_i x_i / sum w_i``); the robust rules
(median, Krum, trimmed mean, ...) honour the clipped norm through ``scale`` and ignore
weights (RFA aside), being bounded in weight by their own nature.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from fedagg._checkpoint import register
from fedagg.core import kernels
from fedagg.core.aggregate import check_update
from fedagg.core.spec import ArrayTree, ParamSpec
from fedagg.core.strategy import Strategy
from fedagg.core.update import Update
from fedagg.deploy._canonical import Canonical, CanonicalState, spool_key
from fedagg.errors import ConfigError, NonFiniteUpdate, UpdateError

__all__ = [
    "Bounded",
    "BoundedState",
    "Bounds",
    "Claim",
    "OutOfBounds",
    "bound_update",
    "bounded_strategy",
    "bounds_of",
    "check_claim",
    "limits",
    "slide",
]

log = logging.getLogger("fedagg.server")
NormMode = Literal["clip", "reject"]


class OutOfBounds(UpdateError):
    """The update's norm is over the server's bound (``norm_mode = "reject"``)."""


@dataclass(frozen=True, slots=True)
class Bounds:
    """What the server bounds (see the module docstring); 0 disables a cap."""

    weight_cap: float = 10.0
    norm_cap: float = 10.0
    max_norm: float = 0.0
    norm_mode: NormMode = "clip"
    window: int = 64
    warmup: int = 5

    def __post_init__(self) -> None:
        for name in ("weight_cap", "norm_cap", "max_norm"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ConfigError(f"deploy.{name} must be a finite number >= 0, got {v!r}")
        for name in ("weight_cap", "norm_cap"):
            v = getattr(self, name)
            if 0 < v < 1:
                raise ConfigError(f"deploy.{name} must be 0 (off) or >= 1, got {v!r}")
        if self.norm_mode not in ("clip", "reject"):
            raise ConfigError(
                f"deploy.norm_mode must be 'clip' or 'reject', not {self.norm_mode!r}"
            )
        if not (isinstance(self.window, int) and self.window >= 1):
            raise ConfigError(f"deploy.bound_window must be an integer >= 1, got {self.window!r}")
        if not (isinstance(self.warmup, int) and 1 <= self.warmup <= self.window):
            raise ConfigError(
                f"deploy.bound_warmup must be an integer in [1, bound_window], got {self.warmup!r}"
            )

    @property
    def enabled(self) -> bool:
        return self.weight_cap > 0 or self.norm_cap > 0 or self.max_norm > 0


def bounds_of(deploy: Mapping[str, Any], *, clients: int | None = None) -> Bounds:
    """The bounds a resolved ``[deploy]`` table asks for; with ``clients`` (the federation's
    size), the warm-up ends once half the clients have a claim in the window, if that is
    sooner (a client whose updates are always refused must not keep it warming up)."""
    b = Bounds(
        weight_cap=float(deploy["weight_cap"]), norm_cap=float(deploy["norm_cap"]),
        max_norm=float(deploy["max_norm"]), norm_mode=deploy["norm_mode"],
        window=deploy["bound_window"], warmup=deploy["bound_warmup"],
    )  # fmt: skip
    if clients is not None and 1 <= (clients + 1) // 2 < b.warmup:
        b = replace(b, warmup=(clients + 1) // 2)
    return b


def lower_median(xs: Iterable[float]) -> float:
    """The lower median (an element: with two values, the smaller)."""
    s = sorted(xs)
    return s[(len(s) - 1) // 2]


@dataclass(frozen=True, slots=True)
class _Limits:
    weight: float | None  # the largest weight folded as claimed
    norm: float | None  # the largest norm folded as sent
    why: str  # what the limits are relative to (for the log)


#: one accepted update's bounded claim: (client, weight, norm)
Claim = tuple[str, float, float]


def slide(window: Iterable[Claim], claims: Iterable[Claim], size: int) -> list[Claim]:
    """``window`` with ``claims`` appended in order, each client's latest claim only (a
    client sending many updates still counts once), the last ``size`` clients kept."""
    out = list(window)
    for c in claims:
        out = [e for e in out if e[0] != c[0]]
        out.append(c)
    return out[-size:]


def limits(b: Bounds, ref: list[Claim], why: str) -> _Limits:
    """The limits relative to the reference claims ``ref`` (``why`` names them in the log)."""
    weights, norms = [w for _, w, _ in ref], [n for _, _, n in ref]
    wl = b.weight_cap * lower_median(weights) if b.weight_cap > 0 and weights else None
    nl = b.norm_cap * lower_median(norms) if b.norm_cap > 0 and norms else None
    if b.max_norm > 0:
        nl = b.max_norm if nl is None else min(nl, b.max_norm)
    return _Limits(wl, nl, why)


@register
@dataclass(eq=False)
class BoundedState(CanonicalState):
    """A round's aggregate under bounds: the canonical state (updates kept until the close,
    when ``held``), the reference window at the round's start, and the claims folded since."""

    #: the reference window (oldest first): each recent client's latest bounded claim
    window: list[Claim] = field(default_factory=list)
    #: whether this round keeps its updates until the close (canonical order, or warm-up)
    held: bool = True
    #: the norms of ``pending``, in the same order
    norms: list[float] = field(default_factory=list)
    #: the bounded claims folded this round, in fold order (they join the window at the close)
    claims: list[Claim] = field(default_factory=list)
    closed: bool = False


@dataclass
class _Tracker:
    """The window the next round starts from (set when a round closes, read by ``init``)."""

    window: tuple[Claim, ...] = ()


def update_norm(spec: ParamSpec, update: Update) -> float:
    """The delta's L2 norm times its scale (one compiled pass, float64 sums)."""
    use = kernels.HAVE_NUMBA
    segs = spec.segments(update.delta)
    norm = math.sqrt(math.fsum(kernels.sum_squares(s, use_numba=use) for s in segs))
    norm *= abs(float(update.scale))
    if not math.isfinite(norm):
        raise NonFiniteUpdate(update.client_id, "delta holds NaN or Inf values")
    return norm


def check_claim(b: Bounds, spec: ParamSpec, version: int | None, update: Update) -> float:
    """Metadata and norm of an arriving update (its L2 norm returned); the absolute bound
    ``max_norm`` refuses at once under ``norm_mode = "reject"`` (raises UpdateError)."""
    check_update(spec, version, update)
    norm = update_norm(spec, update)
    if b.max_norm > 0 and norm > b.max_norm and b.norm_mode == "reject":
        e = OutOfBounds(
            update.client_id, f"update norm {norm:.3g} over deploy.max_norm {b.max_norm:.3g}"
        )
        log.warning("%s", e)
        raise e
    return norm


def bound_update(b: Bounds, u: Update, norm: float, lim: _Limits) -> tuple[Update, float, float]:
    """``u`` (of L2 norm ``norm``) bounded by ``lim``: (the update to fold, its bounded
    weight, its bounded norm); raises :class:`OutOfBounds` under ``norm_mode = "reject"``."""
    w, scale, what = float(u.weight), 1.0, []
    if lim.weight is not None and w > lim.weight:
        what.append(f"weight {w:.3g} capped to {lim.weight:.3g}")
        w = lim.weight
    if lim.norm is not None and norm > lim.norm:
        if b.norm_mode == "reject":
            e = OutOfBounds(
                u.client_id, f"update norm {norm:.3g} over the bound {lim.norm:.3g} "
                f"({b.norm_cap:g} x {lim.why}, or deploy.max_norm)",
            )  # fmt: skip
            log.warning("%s", e)
            raise e
        what.append(f"norm {norm:.3g} clipped to {lim.norm:.3g}")
        scale, norm = lim.norm / norm, lim.norm
    if not what:
        return u, w, norm
    log.warning(
        "update from client %r bounded (relative to %s): %s", u.client_id, lim.why,
        ", ".join(what),
    )  # fmt: skip
    return replace(u, weight=w, scale=float(u.scale) * scale), w, norm


def _arrival_key(update: Update) -> int:
    return 0  # a stable sort by a constant key keeps the arrival order


@dataclass(frozen=True)
class Bounded(Canonical):
    """:class:`~fedagg.deploy._fed.Canonical` with every update bounded (see the module
    docstring). ``hold=True`` (canonical order) keeps every round's updates until its close;
    ``hold=False`` (arrival order) folds them as they arrive once the reference window is
    warm, and keeps them only while it warms up."""

    bounds: Bounds = field(default_factory=Bounds)
    hold: bool = True
    tracker: _Tracker = field(default_factory=_Tracker, compare=False, repr=False)

    def init(self, spec: ParamSpec, *, version: int | None = None) -> BoundedState:
        window = list(self.tracker.window)
        held = self.hold or len(window) < self.bounds.warmup
        inner = self.inner.init(spec, version=version)
        return BoundedState(inner, spec, version, window=window, held=held)

    # -- engine hooks ----------------------------------------------------------------------
    def holds(self, state: Any) -> bool:
        """Whether an update arriving now is kept until the round closes (so must be read as
        a view of its spool file, not into a reused buffer)."""
        return not isinstance(state, BoundedState) or state.held

    def adopt(self, state: Any) -> None:
        """Make the next round start from ``state``'s window (the policy's current aggregate;
        called before every event, so a state loaded from a checkpoint carries on exactly)."""
        if state is None:
            self.tracker.window = ()
        elif isinstance(state, BoundedState) and not state.closed:
            self.tracker.window = tuple(state.window)

    # -- bounding --------------------------------------------------------------------------
    def _norm(self, state: CanonicalState, update: Update) -> float:
        return update_norm(state.spec, update)

    def _check(self, state: CanonicalState, update: Update) -> float:
        """Metadata and norm of an arriving update; the absolute bound refuses at once."""
        return check_claim(self.bounds, state.spec, state.version, update)

    def _window_limits(self, state: BoundedState) -> _Limits:
        return limits(self.bounds, state.window, "the recent rounds' median")

    def _bound(self, u: Update, norm: float, lim: _Limits) -> tuple[Update, float, float]:
        """``u`` bounded: (the update to fold, its bounded weight, its bounded norm)."""
        return bound_update(self.bounds, u, norm, lim)

    # -- the monoid ------------------------------------------------------------------------
    def fold(self, state: CanonicalState, update: Update) -> CanonicalState:
        return self.fold_many(state, (update,))

    def fold_many(self, state: CanonicalState, updates: Iterable[Update]) -> CanonicalState:
        assert isinstance(state, BoundedState)
        ups = list(updates)
        if state.held:
            total, norms = state.bound, []
            for u in ups:
                n = self._check(state, u)
                total = self._admit(state, total, u, peak=n)  # max|x| <= |x|: a safe bound
                norms.append(n)
            state.pending += ups
            state.norms += norms
            state.bound = total
            return state
        lim = self._window_limits(state)
        out, claims = [], []
        for u in ups:
            b, w, n = self._bound(u, self._check(state, u), lim)
            out.append(b)
            claims.append((u.client_id, w, n))
        state.inner = self.inner.fold_many(state.inner, out)
        state.claims += claims
        return state

    def merge(self, state: CanonicalState, other: CanonicalState) -> CanonicalState:
        assert isinstance(state, BoundedState)
        super().merge(state, other)
        if isinstance(other, BoundedState):
            state.norms += other.norms
        return state

    def _refuse(self, state: CanonicalState, u: Update, e: UpdateError, out: list[Update]) -> None:
        state.refused.append((e.client_id, e.reason))
        out.append(u)
        log.warning("at the round's fold: %s", e)

    def _flush(self, state: CanonicalState) -> list[Update]:
        assert isinstance(state, BoundedState)
        refused: list[Update] = []
        if not state.pending:
            return refused
        ups, norms = state.pending, state.norms
        state.pending, state.norms, state.bound = [], [], 0.0
        order = sorted(range(len(ups)), key=lambda i: self.key(ups[i]))
        if len(state.window) >= self.bounds.warmup:
            lim = self._window_limits(state)
        else:  # warming up: relative to this round's own claims (each client's latest)
            own = [(ups[i].client_id, float(ups[i].weight), norms[i]) for i in order]
            lim = limits(self.bounds, slide((), own, len(own)), "this round's median")
        kept: list[tuple[Update, Update, float, float]] = []  # (as sent, bounded, w, norm)
        for i in order:
            try:
                kept.append((ups[i], *self._bound(ups[i], norms[i], lim)))
            except UpdateError as e:
                self._refuse(state, ups[i], e, refused)
        if self.hold:  # canonical order: one batched fold, one by one only if it is refused
            try:
                state.inner = self.inner.fold_many(state.inner, [b for _, b, _, _ in kept])
                state.claims += [(u.client_id, w, n) for u, _, w, n in kept]
                return refused
            except UpdateError:
                pass
        for u, b, w, n in kept:  # arrival order: as if folded on arrival, one by one
            try:
                state.inner = self.inner.fold(state.inner, b)
            except UpdateError as e:
                self._refuse(state, u, e, refused)
                continue
            state.claims.append((u.client_id, w, n))
        return refused

    def _close(self, state: CanonicalState) -> Any:
        """Fold what is kept, and start the next round's window from this round's claims."""
        assert isinstance(state, BoundedState)
        self._flush(state)
        if not state.closed:
            self.tracker.window = tuple(slide(state.window, state.claims, self.bounds.window))
            state.closed = True
        return state.inner

    def finalize_flat(self, state: CanonicalState) -> Any:
        return self.inner.finalize_flat(self._close(state))

    def finalize(self, state: CanonicalState) -> ArrayTree:
        return self.inner.finalize(self._close(state))


def bounded_strategy(strategy: Strategy, bounds: Bounds, *, canonical: bool) -> Strategy:
    """``strategy`` with every update bounded; ``canonical``: folded in the spool files' order
    at each round's close, else as they arrive (once the reference window is warm)."""
    key = spool_key if canonical else _arrival_key
    agg = Bounded(strategy.aggregator, key, bounds=bounds, hold=canonical)
    return replace(strategy, aggregator=agg)
