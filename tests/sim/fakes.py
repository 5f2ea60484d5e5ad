"""Tiny stand-ins for data, model and client algorithm: the engine is tested on its own."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Examples:
    x: np.ndarray
    y: np.ndarray
    num_classes: int = 2

    def __len__(self) -> int:
        return len(self.y)


def examples(n: int) -> Examples:
    return Examples(np.zeros((n, 1), np.float32), np.zeros(n, np.int64))


@dataclass
class FakeData:
    sizes: Sequence[int]
    clients: list[Examples] = field(init=False)
    test: Examples = field(default_factory=lambda: examples(4))
    client_tests: Any = None
    num_features: int = 1
    num_classes: int = 2

    def __post_init__(self) -> None:
        self.clients = [examples(n) for n in self.sizes]


class FakeModel:
    """params {"w": (4,)}; "loss" is w[0] and "accuracy" w[1] (so tests can read the model)."""

    def init(self, seed: int) -> dict[str, np.ndarray]:
        return {"w": np.zeros(4, np.float32)}

    def evaluate(self, params: dict[str, np.ndarray], x: Any, y: Any) -> tuple[float, float]:
        return float(params["w"][0]), float(params["w"][1])


@dataclass(frozen=True)
class Result:
    delta: dict[str, np.ndarray]
    num_examples: int
    steps: int
    metrics: dict[str, float]
    extra: dict[str, Any]


@dataclass
class FakeAlgorithm:
    """Client c's delta is (c, random, epochs, 1): the server mean is checkable by hand."""

    epochs: int = 1
    batch_size: int = 1
    calls: list[list[int]] = field(default_factory=list)
    last_epochs: list[int] = field(default_factory=list)

    def train_many(
        self,
        model: Any,
        params: dict[str, np.ndarray],
        datas: Sequence[Examples],
        rngs: Sequence[np.random.Generator],
        *,
        epochs: Sequence[int],
        states: Sequence[Any],
        server_state: Any,
    ) -> list[tuple[Result, Any]]:
        self.calls.append([len(d) for d in datas])
        self.last_epochs = list(epochs)
        out = []
        for d, rng, e in zip(datas, rngs, epochs, strict=True):
            delta = np.array([len(d), rng.random(), e, 1.0], np.float32)
            out.append((Result({"w": delta}, len(d), e * len(d), {"train_loss": 1.0}, {}), None))
        return out
