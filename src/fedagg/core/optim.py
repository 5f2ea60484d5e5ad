"""Server optimizers: composable (init, update) transforms on the aggregated delta.

Built as optax builds optimizers: small transforms chained, then applied to the parameters::

    adam = chain(scale_by_adam(b1, b2, tau, flavor), scale(lr))
    params, state = opt.step(state, params, delta)      # params + transform(delta)

Sign convention: ``delta = mean(client result) - global model`` (a descent step already),
so every optimizer *adds* its step. FedOpt's pseudo-gradient is ``-delta``.

``flavor`` picks the reference to match:

* ``"paper"`` (Reddi et al., ICLR 2021): ``v_{-1} = tau**2``, no bias correction; beta1
  defaults to 0.9 for FedAdam, FedYogi and FedAdagrad alike.
* ``"flower"`` (Flower 1.42): ``v_{-1} = 0``; FedAdam multiplies the learning rate by
  ``sqrt(1 - b2**(t+1)) / (1 - b1**(t+1))`` where t is the 1-based round; FedAdagrad's beta1
  defaults to 0 (Flower fixes it there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt

from fedagg.core.spec import ArrayTree, ParamSpec
from fedagg.errors import ConfigError, SpecError, StateError

__all__ = [
    "AdamState",
    "ChainState",
    "EmptyState",
    "Flavor",
    "OptState",
    "ServerOptimizer",
    "TraceState",
    "Transform",
    "adagrad",
    "adam",
    "chain",
    "momentum",
    "scale",
    "scale_by_adagrad",
    "scale_by_adam",
    "scale_by_yogi",
    "sgd",
    "trace",
    "yogi",
]

Arr = npt.NDArray[Any]
Flavor = Literal["paper", "flower"]
#: Elements per block of the adaptive optimizers' update (their temporaries are this size).
_BLOCK = 1 << 16


class Transform(Protocol):
    """A pure transform of the flat delta: ``init(params) -> state`` and
    ``update(state, delta, params) -> (step, state)``. ``update`` may reuse ``delta``'s
    memory for the step (the built-in ones do: they allocate nothing model-sized) and updates
    its state in place; the step must not be a buffer of its state."""

    def init(self, params: Arr) -> Any: ...

    def update(self, state: Any, delta: Arr, params: Arr) -> tuple[Arr, Any]: ...


@dataclass(slots=True)
class EmptyState:
    """State of a transform that remembers nothing."""


@dataclass(slots=True)
class TraceState:
    """Momentum buffer."""

    v: Arr


@dataclass(slots=True)
class AdamState:
    """Moments of Adam, Yogi and Adagrad; ``count`` is the number of steps taken."""

    count: int
    m: Arr
    v: Arr


@dataclass(slots=True)
class ChainState:
    """The states of a chain's transforms, in order."""

    states: list[Any]


def _check_flavor(flavor: str) -> None:
    if flavor not in ("paper", "flower"):
        raise ConfigError(f"flavor must be 'paper' or 'flower', not {flavor!r}")


def _check_beta(name: str, b: float) -> None:
    if not (0.0 <= b < 1.0):
        raise ConfigError(f"{name} must be in [0, 1), got {b!r}")


def _check_positive(name: str, x: float) -> None:
    if not (math.isfinite(x) and x > 0):
        raise ConfigError(f"{name} must be finite and > 0, got {x!r}")


@dataclass(frozen=True, slots=True)
class Scale:
    """``step = factor * delta``."""

    factor: float

    def init(self, params: Arr) -> EmptyState:
        return EmptyState()

    def update(self, state: EmptyState, delta: Arr, params: Arr) -> tuple[Arr, EmptyState]:
        if self.factor != 1.0:  # x * 1 is x, to the bit: no pass for lr = 1
            delta *= delta.dtype.type(self.factor)
        return delta, state


@dataclass(frozen=True, slots=True)
class Trace:
    """Heavy-ball momentum without dampening: ``v = beta*v + delta``, ``step = v``."""

    beta: float

    def init(self, params: Arr) -> TraceState:
        return TraceState(np.zeros_like(params))

    def update(self, state: TraceState, delta: Arr, params: Arr) -> tuple[Arr, TraceState]:
        v = state.v
        v *= v.dtype.type(self.beta)
        v += delta
        delta[...] = v  # the step, in delta's memory (not the state's buffer itself)
        return delta, state


@dataclass(frozen=True, slots=True)
class ScaleByAdaptive:
    """FedOpt's adaptive step ``m / (sqrt(v) + tau)`` with Adam, Yogi or Adagrad's ``v``."""

    rule: Literal["adam", "yogi", "adagrad"]
    b1: float
    b2: float
    tau: float
    flavor: Flavor

    def __post_init__(self) -> None:
        _check_flavor(self.flavor)
        _check_beta("beta1", self.b1)
        _check_beta("beta2", self.b2)
        _check_positive("tau", self.tau)

    def init(self, params: Arr) -> AdamState:
        m = np.zeros_like(params)
        v = np.zeros_like(params)
        if self.flavor == "paper":
            v += v.dtype.type(self.tau * self.tau)
        return AdamState(0, m, v)

    def update(self, state: AdamState, delta: Arr, params: Arr) -> tuple[Arr, AdamState]:
        state.count += 1
        factor = None
        if self.rule == "adam" and self.flavor == "flower":
            t = state.count
            factor = math.sqrt(1.0 - self.b2 ** (t + 1)) / (1.0 - self.b1 ** (t + 1))
        # a block at a time, the step written over the delta block it came from: the same
        # element-wise operations as on whole arrays (so the same bits), no model-sized temporary
        for lo in range(0, delta.size, _BLOCK):
            hi = min(delta.size, lo + _BLOCK)
            self._block(state.m[lo:hi], state.v[lo:hi], delta[lo:hi], factor)
        return delta, state

    def _block(self, m: Arr, v: Arr, delta: Arr, factor: float | None) -> None:
        dt = delta.dtype.type
        m *= dt(self.b1)
        m += dt(1.0 - self.b1) * delta
        d2 = delta * delta
        if self.rule == "adam":
            v *= dt(self.b2)
            v += dt(1.0 - self.b2) * d2
        elif self.rule == "yogi":
            v -= dt(1.0 - self.b2) * d2 * np.sign(v - d2)
        else:
            v += d2
        np.sqrt(v, out=d2)
        d2 += dt(self.tau)
        np.divide(m, d2, out=delta)
        if factor is not None:
            delta *= dt(factor)


@dataclass(frozen=True, slots=True)
class Chain:
    """Transforms applied one after another."""

    transforms: tuple[Transform, ...]

    def init(self, params: Arr) -> ChainState:
        return ChainState([t.init(params) for t in self.transforms])

    def update(self, state: ChainState, delta: Arr, params: Arr) -> tuple[Arr, ChainState]:
        if len(state.states) != len(self.transforms):
            raise ConfigError("chain state does not match the chain's transforms")
        for i, t in enumerate(self.transforms):
            delta, state.states[i] = t.update(state.states[i], delta, params)
        return delta, state


def scale(factor: float) -> Scale:
    return Scale(float(factor))


def trace(beta: float) -> Trace:
    _check_beta("momentum", beta)
    return Trace(float(beta))


def scale_by_adam(b1: float, b2: float, tau: float, flavor: Flavor) -> ScaleByAdaptive:
    return ScaleByAdaptive("adam", b1, b2, tau, flavor)


def scale_by_yogi(b1: float, b2: float, tau: float, flavor: Flavor) -> ScaleByAdaptive:
    return ScaleByAdaptive("yogi", b1, b2, tau, flavor)


def scale_by_adagrad(b1: float, tau: float, flavor: Flavor) -> ScaleByAdaptive:
    return ScaleByAdaptive("adagrad", b1, 0.0, tau, flavor)


def chain(*transforms: Transform) -> Chain:
    if not transforms:
        raise ConfigError("chain needs at least one transform")
    return Chain(tuple(transforms))


# --------------------------------------------------------------------------------------------
# Server optimizers: a transform applied to the parameters
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class OptState:
    """A server optimizer's state: the spec it was built for, its step count and the
    transform's state."""

    spec: ParamSpec
    count: int
    inner: Any

    def check(self) -> None:
        """Raise StateError unless every buffer of the transforms' state fits the spec."""
        n = self.spec.size

        def walk(x: Any) -> None:
            if isinstance(x, np.ndarray):
                if x.shape != (n,):
                    raise StateError("optimizer state buffers do not match the spec")
            elif isinstance(x, (list, tuple)):
                for y in x:
                    walk(y)
            elif hasattr(x, "__dataclass_fields__"):
                for f in x.__dataclass_fields__:
                    walk(getattr(x, f))

        if not isinstance(self.count, int) or self.count < 0:
            raise StateError("optimizer step count must be a non-negative integer")
        walk(self.inner)


@dataclass(frozen=True, slots=True)
class ServerOptimizer:
    """``params <- params + transform(delta)``, on any list, dict or flat parameters."""

    name: str
    transform: Transform
    hyperparams: dict[str, Any] = field(default_factory=dict)

    def init(self, params: ArrayTree | Arr) -> OptState:
        spec, flat = _flat_params(params)
        return OptState(spec, 0, self.transform.init(flat))

    def step(
        self,
        state: OptState,
        params: ArrayTree | Arr,
        delta: ArrayTree | Arr,
        *,
        donate: bool = False,
    ) -> tuple[Any, OptState]:
        """The new parameters (same structure as ``params``) and the new state.

        ``params`` is not modified. ``state`` is updated in place and returned. ``donate``:
        ``delta`` (a flat array) is the caller's to give: the step and then the new
        parameters are computed in its memory (no model-sized allocation with the built-in
        transforms); else ``delta`` is left as it was.
        """
        spec = state.spec
        flat_p = _flat_of(spec, params, "params")
        flat_d = _flat_of(spec, delta, "delta")
        mine = donate or not (flat_d is delta or _leaves_of(spec, delta, flat_d))
        if not (mine and flat_d.flags.writeable):
            flat_d = flat_d.copy()  # the caller's own memory (or a view of it): left as it was
        step, state.inner = self.transform.update(state.inner, flat_d, flat_p)
        if step.dtype == flat_p.dtype and np.may_share_memory(step, flat_d):
            new = np.add(step, flat_p, out=step)  # p + s == s + p, to the bit
        else:  # a step in a buffer of its own (a custom transform's)
            new = flat_p + step
        state.count += 1
        if isinstance(params, np.ndarray):
            return new, state
        out = spec.unflatten(new)
        if not spec.keyed and isinstance(params, tuple):
            return tuple(out), state
        return out, state


def _leaves_of(spec: ParamSpec, tree: ArrayTree | Arr, flat: Arr) -> bool:
    """Whether ``flat`` (``spec.as_flat(tree)``) may share memory with ``tree``'s arrays."""
    if isinstance(tree, np.ndarray):
        return bool(np.may_share_memory(flat, tree))
    if not isinstance(tree, (dict, list, tuple)):
        return True  # a bytes-like buffer: not ours either
    leaves = tree.values() if isinstance(tree, dict) else tree
    return any(isinstance(a, np.ndarray) and np.may_share_memory(flat, a) for a in leaves)


def _flat_params(params: ArrayTree | Arr) -> tuple[ParamSpec, Arr]:
    if isinstance(params, np.ndarray):
        if params.ndim != 1:
            raise SpecError("flat parameters must be 1-D; pass a list or dict of arrays")
        spec = ParamSpec.from_arrays([params])
        return spec, params
    spec = ParamSpec.from_arrays(params)
    return spec, spec.as_flat(params)


def _flat_of(spec: ParamSpec, x: ArrayTree | Arr, what: str) -> Arr:
    problem = spec.mismatch(x)
    if problem is not None:
        raise SpecError(f"{what} do not match the optimizer's spec: {problem}")
    return spec.as_flat(x)


def _opt(name: str, *ts: Transform, **hp: Any) -> ServerOptimizer:
    return ServerOptimizer(name, chain(*ts), dict(hp))


def sgd(lr: float = 1.0) -> ServerOptimizer:
    """``x <- x + lr * delta``. With lr=1 on the mean delta, this is FedAvg."""
    _check_positive("lr", lr)
    return _opt("sgd", scale(lr), lr=lr)


def momentum(lr: float = 1.0, beta: float = 0.9, flavor: Flavor = "paper") -> ServerOptimizer:
    """FedAvgM: ``v <- beta*v + delta``, ``x <- x + lr*v``. Both flavors agree (Flower's
    first momentum vector is the first delta, which is what ``v_{-1} = 0`` gives)."""
    _check_positive("lr", lr)
    _check_flavor(flavor)
    return _opt("momentum", trace(beta), scale(lr), lr=lr, beta=beta, flavor=flavor)


def adam(
    lr: float = 0.1,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
    flavor: Flavor = "paper",
) -> ServerOptimizer:
    """FedAdam: ``m = b1 m + (1-b1) d``, ``v = b2 v + (1-b2) d^2``, ``x += lr m/(sqrt v + tau)``."""
    _check_positive("lr", lr)
    return _opt(
        "adam",
        scale_by_adam(beta1, beta2, tau, flavor),
        scale(lr),
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        tau=tau,
        flavor=flavor,
    )


def yogi(
    lr: float = 0.01,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
    flavor: Flavor = "paper",
) -> ServerOptimizer:
    """FedYogi: as FedAdam with ``v = v - (1-b2) d^2 sign(v - d^2)``."""
    _check_positive("lr", lr)
    return _opt(
        "yogi",
        scale_by_yogi(beta1, beta2, tau, flavor),
        scale(lr),
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        tau=tau,
        flavor=flavor,
    )


def adagrad(
    lr: float = 0.1, beta1: float | None = None, tau: float = 1e-3, flavor: Flavor = "paper"
) -> ServerOptimizer:
    """FedAdagrad: ``m = b1 m + (1-b1) d``, ``v = v + d^2``, ``x += lr m/(sqrt v + tau)``.

    ``beta1=None`` takes the flavor's default: 0.9 for ``"paper"`` (Reddi et al. use the same
    beta1 for FedAdagrad, FedAdam and FedYogi), 0 for ``"flower"`` (Flower's FedAdagrad fixes
    beta1 at 0, so ``m = d``).
    """
    _check_positive("lr", lr)
    _check_flavor(flavor)
    b1 = (0.9 if flavor == "paper" else 0.0) if beta1 is None else beta1
    return _opt(
        "adagrad",
        scale_by_adagrad(b1, tau, flavor),
        scale(lr),
        lr=lr,
        beta1=b1,
        tau=tau,
        flavor=flavor,
    )
