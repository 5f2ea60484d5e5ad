"""The protocols shared by models and client algorithms: data, models, stacked models."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, TypeAlias, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = ["Examples", "Model", "Params", "ParamsLike", "StackedModel"]

#: A model's parameters (or a gradient, or a delta): named float32 arrays.
Params: TypeAlias = dict[str, npt.NDArray[np.float32]]
#: What a model accepts as parameters: any mapping of names to arrays.
ParamsLike: TypeAlias = Mapping[str, npt.NDArray[Any]]


class Examples(Protocol):
    """A client's labelled examples: ``x`` of shape (n, d), ``y`` of shape (n,) in
    ``[0, num_classes)``. Any object with these three attributes will do."""

    @property
    def x(self) -> npt.NDArray[np.float32]: ...

    @property
    def y(self) -> npt.NDArray[np.int64]: ...

    @property
    def num_classes(self) -> int: ...


class Model(Protocol):
    """A differentiable classifier over parameter dicts; losses are mean cross-entropies."""

    @property
    def name(self) -> str: ...

    def init(self, seed: int) -> Params:
        """Initial parameters, a deterministic function of ``seed``."""
        ...

    def loss_and_grad(
        self, params: ParamsLike, x: npt.NDArray[Any], y: npt.NDArray[Any]
    ) -> tuple[float, Params]:
        """The mean loss over the batch ``(x, y)`` and its exact gradient w.r.t. ``params``."""
        ...

    def evaluate(
        self, params: ParamsLike, x: npt.NDArray[Any], y: npt.NDArray[Any], batch: int = 4096
    ) -> tuple[float, float]:
        """``(mean loss, accuracy)`` over ``(x, y)``, computed ``batch`` examples at a time."""
        ...


@runtime_checkable
class StackedModel(Model, Protocol):
    """A model that also trains many clients at once on stacked parameters.

    Every parameter has a leading client axis ``(C, ...)``; ``xb`` is (C, B, d), ``yb`` (C, B)
    and ``mask`` (C, B) marks the valid examples of ragged batches. Returns the per-client
    mean loss over its valid examples, shape (C,), and the stacked gradients. A client with
    no valid example has loss 0 and gradient 0.
    """

    def loss_and_grad_stacked(
        self,
        params: ParamsLike,
        xb: npt.NDArray[Any],
        yb: npt.NDArray[Any],
        mask: npt.NDArray[np.bool_],
    ) -> tuple[npt.NDArray[np.float32], Params]: ...
