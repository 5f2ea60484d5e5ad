"""Label flipping (data poisoning): a client that trains honestly on flipped labels.

:class:`LabelFlip` wraps any client algorithm and hands it the client's examples with labels
``y -> L - 1 - y`` (:func:`flip_labels`; ``9 - y`` for 10 classes); the rest of the training
is the inner algorithm's. In a simulation it is the Byzantine clients' algorithm
(``fedagg.sim.Simulation(byzantine_algorithm=LabelFlip(algorithm, 10))``); it is also
exported from :mod:`fedagg.attacks` next to the update attacks.

>>> import numpy as np
>>> flip_labels(np.array([0, 1, 9, 5]), 10)
array([9, 8, 0, 4])
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import numpy.typing as npt

from fedagg.errors import ConfigError

Arr: TypeAlias = npt.NDArray[Any]


def _num_classes(value: Any) -> int:
    """``value`` as an int ``>= 2`` (a bool or a non-integer is refused)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"num_classes must be an int, got {value!r}")
    v = int(value)
    if v < 2:
        raise ConfigError(f"num_classes must be >= 2, got {v}")
    return v


def flip_labels(y: npt.ArrayLike, num_classes: int) -> Arr:
    """``L - 1 - y`` for labels ``y`` in ``[0, L)``, ``L = num_classes`` (a new array, same
    dtype): ``9 - y`` for 10 classes."""
    big_l = _num_classes(num_classes)
    a = np.asarray(y)
    if a.dtype.kind not in "iu":
        raise ConfigError(f"labels must be integers, got dtype {a.dtype}")
    if a.size and (int(a.min()) < 0 or int(a.max()) >= big_l):
        raise ConfigError(f"labels must lie in [0, {big_l}), got [{int(a.min())}, {int(a.max())}]")
    return (big_l - 1 - a.astype(np.int64)).astype(a.dtype)


@dataclass(frozen=True, slots=True)
class _FlippedExamples:
    x: Arr
    y: Arr
    num_classes: int


def _flipped(data: Any, num_classes: int) -> Any:
    """A copy of ``data`` (anything with ``.x`` and ``.y``) with flipped labels."""
    try:
        x, y = data.x, data.y
    except AttributeError as e:
        raise ConfigError(f"client data needs attributes x and y: {e}") from e
    flipped = flip_labels(y, num_classes)
    if dataclasses.is_dataclass(data) and not isinstance(data, type):
        return dataclasses.replace(data, y=flipped)
    return _FlippedExamples(x, flipped, int(getattr(data, "num_classes", num_classes)))


@dataclass(frozen=True, slots=True)
class LabelFlip:
    """A client algorithm that trains ``inner`` on its data with labels ``y -> L - 1 - y``.

    ``inner`` is any client algorithm (``train`` / ``train_many``, see
    :class:`~fedagg.clients.ClientAlgorithm`); examples are copied with flipped labels
    (``dataclasses.replace`` for dataclasses, else a small ``(x, y, num_classes)`` record) and
    everything else is passed through. ``name``, ``epochs`` and ``batch_size`` are the inner
    algorithm's.
    """

    inner: Any
    num_classes: int

    def __post_init__(self) -> None:
        for meth in ("train", "train_many"):
            if not callable(getattr(self.inner, meth, None)):
                raise ConfigError(f"LabelFlip needs a client algorithm with {meth}()")
        object.__setattr__(self, "num_classes", _num_classes(self.num_classes))

    @property
    def name(self) -> str:
        return str(self.inner.name)

    @property
    def epochs(self) -> int:
        return int(self.inner.epochs)

    @property
    def batch_size(self) -> int:
        return int(self.inner.batch_size)

    def train(
        self,
        model: Any,
        params: Any,
        data: Any,
        rng: np.random.Generator,
        *,
        epochs: int | None = None,
        state: Any = None,
        server_state: Any = None,
    ) -> tuple[Any, Any]:
        """``inner.train`` on ``data`` with flipped labels."""
        out: tuple[Any, Any] = self.inner.train(
            model,
            params,
            _flipped(data, self.num_classes),
            rng,
            epochs=epochs,
            state=state,
            server_state=server_state,
        )
        return out

    def train_many(
        self,
        model: Any,
        params: Any,
        datas: Any,
        rngs: Any,
        *,
        epochs: Any = None,
        states: Any = None,
        server_state: Any = None,
    ) -> list[tuple[Any, Any]]:
        """``inner.train_many`` on every client's data with flipped labels."""
        out: list[tuple[Any, Any]] = self.inner.train_many(
            model,
            params,
            [_flipped(d, self.num_classes) for d in datas],
            rngs,
            epochs=epochs,
            states=states,
            server_state=server_state,
        )
        return out
