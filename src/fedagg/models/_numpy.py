"""Numpy classifiers with exact gradients: multinomial logistic regression and a small MLP.

Both are dense networks ``x -> [act(h W_l + b_l)]* -> logits`` trained on the mean softmax
cross-entropy, so they share one forward/backward pass. That pass is written on the last two
axes only: with a leading client axis on every array it trains many clients at once
(batched ``matmul``), which is what :meth:`loss_and_grad_stacked` does.

Arithmetic is in the model's ``dtype`` (float32 by default; pass ``dtype=np.float64`` for
gradient checks). The softmax is computed stably (logits minus their row maximum, then
log-sum-exp).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from fedagg.errors import ConfigError
from fedagg.models._types import Params, ParamsLike

__all__ = ["MLP", "Activation", "LogReg"]

Arr = npt.NDArray[Any]
Activation = Literal["relu", "tanh"]
_Layers = list[tuple[Arr, Arr]]


# --------------------------------------------------------------------------------------------
# The shared dense network (any number of leading batch axes)
# --------------------------------------------------------------------------------------------


def _forward(layers: _Layers, act: str, x: Arr) -> tuple[Arr, list[Arr]]:
    """Logits of ``x`` (..., B, d), and the input of every layer (for the backward pass)."""
    inputs = [x]
    h = x
    for w, b in layers[:-1]:
        a = np.matmul(h, w)
        a += b[..., None, :]
        h = np.maximum(a, 0, out=a) if act == "relu" else np.tanh(a, out=a)
        inputs.append(h)
    w, b = layers[-1]
    z = np.matmul(h, w)
    z += b[..., None, :]
    return z, inputs


#: Numpy reduces along a short axis with one inner loop per row, slow for many rows; a loop
#: over the short axis (up to _SHORT long, for at least _MANY rows) is then faster.
_SHORT = 32
_MANY = 512


def _row_max(z2: Arr) -> Arr:
    """Maximum of each row of a 2-D array."""
    if z2.shape[1] > _SHORT or z2.shape[0] < _MANY:
        top: Arr = z2.max(axis=1)
        return top
    out = z2[:, 0].copy()
    for j in range(1, z2.shape[1]):
        np.maximum(out, z2[:, j], out=out)
    return out


def _sum_rows(d: Arr) -> Arr:
    """Sum over the second-to-last axis (the batch), in row order."""
    if d.ndim < 3 or d.shape[-2] > _SHORT or d.shape[-2] == 0 or d.size < _MANY * d.shape[-1]:
        total: Arr = d.sum(axis=-2)
        return total
    out = d[..., 0, :].copy()
    for i in range(1, d.shape[-2]):
        out += d[..., i, :]
    return out


_ONES: dict[tuple[int, np.dtype[Any]], Arr] = {}


def _ones(k: int, dtype: np.dtype[Any]) -> Arr:
    """A cached read-only vector of ``k`` ones."""
    key = (k, dtype)
    v = _ONES.get(key)
    if v is None:
        v = np.ones(k, dtype=dtype)
        v.flags.writeable = False
        _ONES[key] = v
    return v


def _xent(z: Arr, y: Arr, weight: Arr) -> tuple[Arr, Arr]:
    """Weighted cross-entropy of logits ``z`` (..., B, K) at labels ``y`` (..., B).

    Returns ``sum_b weight * nll`` over the last batch axis and the gradient w.r.t. ``z``,
    ``weight * (softmax(z) - onehot(y))``. ``weight`` is a 0-d array (``1/n`` for a mean)
    or has ``y``'s shape (0 for padding). Overwrites ``z``.
    """
    k = z.shape[-1]
    z2 = z.reshape(-1, k)
    z2 -= _row_max(z2)[:, None]
    e = np.exp(z2)
    s = e @ _ones(k, e.dtype)
    at = np.arange(0, s.size * k, k)
    at += y.reshape(-1)
    nll = np.log(s)
    nll -= z2.reshape(-1)[at]
    w = weight.reshape(-1) if weight.ndim else weight
    nll *= w
    e *= (w / s)[:, None]
    e.reshape(-1)[at] -= w
    return nll.reshape(y.shape).sum(axis=-1), e.reshape(z.shape)


def _backward(layers: _Layers, act: str, inputs: list[Arr], d: Arr) -> list[tuple[Arr, Arr]]:
    """Gradients of every layer's (W, b) given the gradient ``d`` w.r.t. the logits."""
    grads: list[tuple[Arr, Arr]] = []
    for i in range(len(layers) - 1, -1, -1):
        h = inputs[i]
        grads.append((np.matmul(h.swapaxes(-1, -2), d), _sum_rows(d)))
        if i:
            d = np.matmul(d, layers[i][0].swapaxes(-1, -2))
            if act == "relu":
                d *= h > 0
            else:
                d *= 1 - h * h
    grads.reverse()
    return grads


# --------------------------------------------------------------------------------------------
# The models
# --------------------------------------------------------------------------------------------


def _check_dim(what: str, v: int) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
        raise ConfigError(f"{what} must be an int >= 1, got {v!r}")


def _float_dtype(dtype: npt.DTypeLike) -> np.dtype[Any]:
    try:
        dt = np.dtype(dtype)
    except TypeError as e:
        raise ConfigError(f"dtype must be float32 or float64, got {dtype!r}") from e
    if dt not in (np.float32, np.float64):
        raise ConfigError(f"dtype must be float32 or float64, got {dt}")
    return dt


@dataclass(frozen=True, slots=True)
class _Net:
    """The dense network behind LogReg and MLP: layer names, widths, activation, dtype."""

    name: str
    names: tuple[tuple[str, str], ...]
    widths: tuple[int, ...]
    act: str
    dt: np.dtype[Any]
    shapes: dict[str, tuple[int, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        out: dict[str, tuple[int, ...]] = {}
        pairs = zip(self.widths, self.widths[1:], strict=False)
        for (wn, bn), (fan_in, fan_out) in zip(self.names, pairs, strict=True):
            out[wn] = (fan_in, fan_out)
            out[bn] = (fan_out,)
        object.__setattr__(self, "shapes", out)

    def layers(self, params: ParamsLike, stacked: bool) -> _Layers:
        dt = self.dt
        lead = 1 if stacked else 0
        try:
            layers = [
                (np.asarray(params[wn], dtype=dt), np.asarray(params[bn], dtype=dt))
                for wn, bn in self.names
            ]
        except KeyError as e:
            raise ConfigError(f"{self.name}: parameter {e} is missing") from e
        count = {w.shape[0] for w, _ in layers} | {b.shape[0] for _, b in layers}
        for (wn, bn), (w, b) in zip(self.names, layers, strict=True):
            if w.shape[lead:] != self.shapes[wn] or b.shape[lead:] != self.shapes[bn]:
                raise ConfigError(
                    f"{self.name}: parameters {wn!r}, {bn!r} have shapes {w.shape}, {b.shape}; "
                    f"expected {'(C, ...) + ' if stacked else ''}"
                    f"{self.shapes[wn]}, {self.shapes[bn]}"
                )
        if stacked and len(count) != 1:
            raise ConfigError(f"{self.name}: stacked parameters differ in their client axis")
        return layers

    def xy(self, x: npt.ArrayLike, y: npt.ArrayLike, nd: int) -> tuple[Arr, Arr]:
        xa = np.asarray(x, dtype=self.dt)
        ya = np.asarray(y)
        d = self.widths[0]
        if xa.ndim != nd or xa.shape[-1] != d or ya.shape != xa.shape[:-1]:
            lead = "(C, B" if nd == 3 else "(n"
            raise ConfigError(
                f"{self.name}: expected x of shape {lead}, {d}) and y of shape {lead}), "
                f"got {xa.shape} and {ya.shape}"
            )
        if ya.dtype.kind not in "iu":
            raise ConfigError(f"{self.name}: labels must be integers, got dtype {ya.dtype}")
        if ya.size and (ya.min() < 0 or ya.max() >= self.widths[-1]):
            raise ConfigError(f"{self.name}: labels must lie in [0, {self.widths[-1]})")
        return xa, ya

    def as_params(self, grads: list[tuple[Arr, Arr]]) -> Params:
        out: Params = {}
        for (wn, bn), (gw, gb) in zip(self.names, grads, strict=True):
            out[wn] = gw
            out[bn] = gb
        return out

    def loss_and_grad(self, params: ParamsLike, x: Arr, y: Arr) -> tuple[float, Params]:
        xa, ya = self.xy(x, y, 2)
        if not len(ya):
            raise ConfigError(f"{self.name}: the batch is empty")
        layers = self.layers(params, stacked=False)
        z, inputs = _forward(layers, self.act, xa)
        weight = np.asarray(1.0 / len(ya), dtype=self.dt)
        loss, d = _xent(z, ya, weight)
        return float(loss), self.as_params(_backward(layers, self.act, inputs, d))

    def loss_and_grad_stacked(
        self, params: ParamsLike, xb: Arr, yb: Arr, mask: npt.NDArray[np.bool_]
    ) -> tuple[npt.NDArray[np.float32], Params]:
        xa, ya = self.xy(xb, yb, 3)
        m = np.asarray(mask, dtype=bool)
        if m.shape != ya.shape:
            raise ConfigError(f"{self.name}: mask has shape {m.shape}, expected {ya.shape}")
        layers = self.layers(params, stacked=True)
        if layers[0][0].shape[0] != xa.shape[0]:
            raise ConfigError(
                f"{self.name}: {layers[0][0].shape[0]} stacked parameter sets "
                f"for {xa.shape[0]} clients"
            )
        if m.all():  # the common case: every batch full
            weight = np.asarray(1.0 / m.shape[1], dtype=self.dt)
        else:
            inv = (1.0 / np.maximum(m.sum(axis=1), 1)).astype(self.dt)
            weight = m * inv[:, None]
        z, inputs = _forward(layers, self.act, xa)
        loss, d = _xent(z, ya, weight)
        return loss, self.as_params(_backward(layers, self.act, inputs, d))

    def evaluate(self, params: ParamsLike, x: Arr, y: Arr, batch: int) -> tuple[float, float]:
        xa, ya = self.xy(x, y, 2)
        n = len(ya)
        if not n:
            raise ConfigError(f"{self.name}: cannot evaluate on zero examples")
        _check_dim("batch", batch)
        layers = self.layers(params, stacked=False)
        total = 0.0
        correct = 0
        one = np.asarray(1.0, dtype=self.dt)
        for lo in range(0, n, batch):
            xs, ys = xa[lo : lo + batch], ya[lo : lo + batch]
            z, _ = _forward(layers, self.act, xs)
            correct += int(np.count_nonzero(z.argmax(axis=1) == ys))
            total += float(_xent(z, ys, one)[0])
        return total / n, correct / n


class _DenseModel:
    """The Model methods of LogReg and MLP, delegated to their ``_net``."""

    __slots__ = ()
    _net: _Net

    @property
    def name(self) -> str:
        return self._net.name

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of every parameter, in order."""
        return dict(self._net.shapes)

    def loss_and_grad(self, params: ParamsLike, x: Arr, y: Arr) -> tuple[float, Params]:
        """Mean cross-entropy over the batch ``(x, y)`` (n >= 1) and its exact gradient."""
        return self._net.loss_and_grad(params, x, y)

    def loss_and_grad_stacked(
        self, params: ParamsLike, xb: Arr, yb: Arr, mask: npt.NDArray[np.bool_]
    ) -> tuple[npt.NDArray[np.float32], Params]:
        """Per-client mean losses (C,) and stacked gradients, for C clients at once.

        Every parameter carries a leading client axis; ``xb`` is (C, B, d), ``yb`` and
        ``mask`` (C, B). Only examples where ``mask`` is true count; a client with none gets
        loss 0 and gradient 0. Labels of masked-out examples must still be valid classes.
        """
        return self._net.loss_and_grad_stacked(params, xb, yb, mask)

    def evaluate(
        self, params: ParamsLike, x: Arr, y: Arr, batch: int = 4096
    ) -> tuple[float, float]:
        """``(mean cross-entropy, accuracy)`` over ``(x, y)``, ``batch`` examples at a time."""
        return self._net.evaluate(params, x, y, batch)


@dataclass(frozen=True, slots=True)
class LogReg(_DenseModel):
    """Multinomial logistic regression ``softmax(x @ W + b)``: W (d, C), b (C,).

    ``init`` returns zeros, as the FedProx reference code does, whatever the seed.
    ``dtype`` is the arithmetic's dtype: float32, or float64 for gradient checks.
    """

    num_features: int
    num_classes: int
    dtype: npt.DTypeLike = np.float32
    _net: _Net = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_dim("num_features", self.num_features)
        _check_dim("num_classes", self.num_classes)
        dt = _float_dtype(self.dtype)
        object.__setattr__(self, "dtype", dt)
        widths = (int(self.num_features), int(self.num_classes))
        object.__setattr__(self, "_net", _Net("logreg", (("W", "b"),), widths, "relu", dt))

    def init(self, seed: int) -> Params:
        """All-zero parameters (the loss is convex; the seed is not used)."""
        return {k: np.zeros(s, dtype=self._net.dt) for k, s in self._net.shapes.items()}


@dataclass(frozen=True, slots=True)
class MLP(_DenseModel):
    """A multilayer perceptron with ``len(hidden)`` hidden layers (typically 1 or 2).

    Parameters are ``W1, b1, ..., W{L+1}, b{L+1}`` with ``W{l}`` of shape (fan_in, fan_out).
    ``init`` draws hidden weights He-normal (ReLU) or Glorot-uniform (tanh), the output layer
    Glorot-uniform, all from ``np.random.default_rng(seed)``; biases start at 0. ``dtype`` is
    the arithmetic's dtype: float32, or float64 for gradient checks.
    """

    num_features: int
    hidden: tuple[int, ...]
    num_classes: int
    activation: Activation = "relu"
    dtype: npt.DTypeLike = np.float32
    _net: _Net = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_dim("num_features", self.num_features)
        _check_dim("num_classes", self.num_classes)
        given: Any = self.hidden
        if not isinstance(given, (tuple, list)):
            raise ConfigError(f"hidden must be a tuple of layer widths, got {given!r}")
        hidden = tuple(given)
        if not hidden:
            raise ConfigError("an MLP needs at least one hidden layer; use LogReg for none")
        for h in hidden:
            _check_dim("hidden layer width", h)
        if self.activation not in ("relu", "tanh"):
            raise ConfigError(f"activation must be 'relu' or 'tanh', got {self.activation!r}")
        dt = _float_dtype(self.dtype)
        object.__setattr__(self, "hidden", hidden)
        object.__setattr__(self, "dtype", dt)
        widths = (int(self.num_features), *map(int, hidden), int(self.num_classes))
        names = tuple((f"W{i}", f"b{i}") for i in range(1, len(hidden) + 2))
        object.__setattr__(self, "_net", _Net("mlp", names, widths, self.activation, dt))

    def init(self, seed: int) -> Params:
        """He-normal / Glorot-uniform weights and zero biases, from ``default_rng(seed)``."""
        rng = np.random.default_rng(seed)
        net = self._net
        out: Params = {}
        last = len(net.names) - 1
        for i, (wn, bn) in enumerate(net.names):
            fan_in, fan_out = net.shapes[wn]
            if i < last and self.activation == "relu":
                w = rng.standard_normal((fan_in, fan_out)) * math.sqrt(2.0 / fan_in)
            else:
                limit = math.sqrt(6.0 / (fan_in + fan_out))
                w = rng.uniform(-limit, limit, (fan_in, fan_out))
            out[wn] = w.astype(net.dt)
            out[bn] = np.zeros(fan_out, dtype=net.dt)
        return out
