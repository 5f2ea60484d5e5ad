"""PyTorch adapter: any ``torch.nn.Module`` classifier as a fedagg :class:`~fedagg.models.Model`.

Needs the optional extra ``torch`` (``pip install 'fedagg[torch]'``); importing
:mod:`fedagg.models` does not import torch, this module does.

Parameters are the module's floating-point ``named_parameters()``, keyed by their names
(``"0.weight"``, ...) and copied to float32 numpy arrays. **Buffers are not parameters**: neither
float buffers (BatchNorm's running mean and variance) nor others (``num_batches_tracked``)
are in the dict, so they are not federated; they stay in the module, which every simulated
client shares. Prefer normalisation without running statistics (GroupNorm, LayerNorm) for
federated training.

The module receives ``x`` as given, a float tensor of shape (n, d); a convolutional network
reshapes it itself (e.g. ``nn.Unflatten(1, (1, 8, 8))`` as its first layer).

    model = TorchModel(net)                 # loss: cross-entropy (mean over the batch)
    params = model.init(seed=0)             # or to_params(net) for the current weights
    loss, grads = model.loss_and_grad(params, x, y)
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from fedagg.errors import ConfigError
from fedagg.models._types import Params, ParamsLike

__all__ = ["LossFn", "TorchModel", "load_params", "to_params"]

#: ``loss_fn(outputs, labels) -> mean loss over the batch`` (a 0-d tensor).
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.is_floating_point()]


def _tensor(a: npt.NDArray[Any]) -> torch.Tensor:
    """A tensor viewing ``a`` without a copy where torch allows it (writeable, contiguous)."""
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:
        a = a.copy()
    return torch.from_numpy(a)


def to_params(module: nn.Module) -> Params:
    """Copies of the module's float parameters as float32 numpy arrays, by name."""
    return {
        name: p.detach().cpu().numpy().astype(np.float32, copy=True)
        for name, p in _parameters(module)
    }


def load_params(module: nn.Module, params: ParamsLike) -> None:
    """Copy ``params`` (names and shapes as :func:`to_params` gives) into the module."""
    named = _parameters(module)
    if set(params) != {n for n, _ in named}:
        missing = sorted({n for n, _ in named} - set(params))
        extra = sorted(set(params) - {n for n, _ in named})
        raise ConfigError(f"params do not fit the module: missing {missing}, unexpected {extra}")
    with torch.no_grad():
        for name, p in named:
            a = np.asarray(params[name])
            if a.shape != tuple(p.shape):
                raise ConfigError(f"{name!r} has shape {a.shape}, the module's is {tuple(p.shape)}")
            p.copy_(_tensor(a))


@dataclass(frozen=True, slots=True)
class TorchModel:
    """A ``torch.nn.Module`` classifier behind the :class:`~fedagg.models.Model` protocol.

    Every call loads the given parameters into ``module`` (which it therefore modifies).
    ``loss_and_grad`` runs the module in training mode and gets exact gradients by autograd;
    ``evaluate`` runs it in eval mode without gradients. ``loss_fn`` must return the mean
    loss over the batch (default: cross-entropy on logits). Parameters without a gradient
    (frozen or unused) get a zero gradient.
    """

    module: nn.Module
    loss_fn: LossFn = F.cross_entropy

    @property
    def name(self) -> str:
        return f"torch:{type(self.module).__name__}"

    def _dtype(self) -> torch.dtype:
        named = _parameters(self.module)
        if not named:
            raise ConfigError("the module has no floating-point parameters")
        return named[0][1].dtype

    def init(self, seed: int) -> Params:
        """Fresh parameters: a copy of the module re-initialised by every submodule's
        ``reset_parameters()`` under ``torch.manual_seed(seed)`` (the global torch RNG is
        left as it was). Parameters of submodules without ``reset_parameters`` keep the
        module's current values."""
        fresh = copy.deepcopy(self.module)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for sub in fresh.modules():
                reset = getattr(sub, "reset_parameters", None)
                if callable(reset):
                    reset()
        return to_params(fresh)

    def loss_and_grad(
        self, params: ParamsLike, x: npt.NDArray[Any], y: npt.NDArray[Any]
    ) -> tuple[float, Params]:
        """Mean loss over the batch ``(x, y)`` and its gradient (float32 arrays) by autograd."""
        dtype = self._dtype()
        load_params(self.module, params)
        self.module.train()
        self.module.zero_grad(set_to_none=True)
        xt = _tensor(np.asarray(x)).to(dtype)
        yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
        loss = self.loss_fn(self.module(xt), yt)
        torch.autograd.backward(loss)
        grads: Params = {}
        for name, p in _parameters(self.module):
            g = p.grad
            grads[name] = (
                np.zeros(tuple(p.shape), dtype=np.float32)
                if g is None
                else g.detach().cpu().numpy().astype(np.float32, copy=True)
            )
        return float(loss.item()), grads

    def evaluate(
        self, params: ParamsLike, x: npt.NDArray[Any], y: npt.NDArray[Any], batch: int = 4096
    ) -> tuple[float, float]:
        """``(mean loss, accuracy)`` over ``(x, y)``, in eval mode, ``batch`` at a time."""
        xa, ya = np.asarray(x), np.asarray(y, dtype=np.int64)
        n = len(ya)
        if not n or len(xa) != n:
            raise ConfigError(f"cannot evaluate on x of shape {xa.shape} and y of {ya.shape}")
        if batch < 1:
            raise ConfigError(f"batch must be >= 1, got {batch!r}")
        dtype = self._dtype()
        load_params(self.module, params)
        self.module.eval()
        total, correct = 0.0, 0
        with torch.no_grad():
            for lo in range(0, n, batch):
                xt = _tensor(xa[lo : lo + batch]).to(dtype)
                yt = torch.from_numpy(ya[lo : lo + batch])
                out = self.module(xt)
                total += float(self.loss_fn(out, yt).item()) * len(yt)
                correct += int((out.argmax(dim=1) == yt).sum().item())
        return total / n, correct / n
