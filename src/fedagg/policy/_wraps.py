"""What an engine reads from a policy that wraps another one (secure aggregation, central
and client-side DP): the inner policy's strategy, rounds and cohort size."""

from __future__ import annotations

from typing import Any

from fedagg.core.strategy import Strategy

__all__ = ["Wraps"]


class Wraps:
    """A mixin for a policy dataclass with an ``inner`` policy: the properties the engines
    read pass through to it."""

    inner: Any

    @property
    def strategy(self) -> Strategy:
        s: Strategy = self.inner.strategy
        return s

    @property
    def rounds(self) -> int:
        return int(self.inner.rounds)

    @property
    def clients_per_round(self) -> int:
        return int(self.inner.clients_per_round)
