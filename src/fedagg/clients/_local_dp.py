"""Local differential privacy as a client-algorithm wrapper.

:class:`LocalDP` trains with any client algorithm, then clips the whole update (all its
parameters together) to L2 norm ``clip`` and adds N(0, (noise_multiplier * clip)**2) to every
coordinate (:func:`fedagg.privacy.local_dp`) before the update leaves the client: the server,
simulated or deployed, only ever sees the noisy update. The noise is drawn from the
generator the engine gives the client's job (seeded by ``(seed, job)`` in simulation), after
the inner algorithm's training draws, so a simulation replays it exactly. Its guarantee is
local, per client, composed over the rounds the client took part in
(:func:`fedagg.privacy.local_epsilon`); the weight (``num_examples``) and the metrics the
client reports are not noised: under local DP the policy weighs every update 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedagg.errors import ConfigError
from fedagg.privacy import local_dp

__all__ = ["LocalDP", "noise_update"]


def noise_update(
    delta: dict[str, np.ndarray], clip: float, noise_multiplier: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """``delta`` (name -> array) clipped jointly to L2 norm ``clip`` plus Gaussian noise of
    standard deviation ``noise_multiplier * clip`` per coordinate, in each array's dtype."""
    names = list(delta)
    arrays = [np.asarray(delta[k]) for k in names]
    flat = np.concatenate([a.reshape(-1).astype(np.float64) for a in arrays])
    noisy = local_dp(flat, clip, noise_multiplier, rng)
    out: dict[str, np.ndarray] = {}
    at = 0
    for k, a in zip(names, arrays, strict=True):
        out[k] = noisy[at : at + a.size].reshape(a.shape).astype(a.dtype, copy=False)
        at += a.size
    return out


@dataclass(frozen=True, slots=True)
class LocalDP:
    """``inner``'s training, then clip + Gaussian noise on the update (module docs)."""

    inner: Any
    clip: float
    noise_multiplier: float

    def __post_init__(self) -> None:
        for meth in ("train", "train_many"):
            if not callable(getattr(self.inner, meth, None)):
                raise ConfigError(f"LocalDP needs a client algorithm with {meth}()")
        for name in ("clip", "noise_multiplier"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ConfigError(f"local DP {name} must be a finite number, got {v!r}")
            if v <= 0:
                raise ConfigError(f"local DP {name} must be > 0, got {v!r}")

    @property
    def name(self) -> str:
        return str(self.inner.name)

    @property
    def epochs(self) -> int:
        return int(self.inner.epochs)

    @property
    def batch_size(self) -> int:
        return int(self.inner.batch_size)

    def _noised(self, result: Any, rng: np.random.Generator) -> Any:
        if result.extra:
            raise ConfigError(
                f"local DP noises the update only; {self.name}'s extra payload "
                f"({sorted(result.extra)}) would leave the client un-noised"
            )
        delta = noise_update(result.delta, self.clip, self.noise_multiplier, rng)
        return replace(result, delta=delta)

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
        """``inner.train``, then the noised update."""
        res, st = self.inner.train(
            model, params, data, rng, epochs=epochs, state=state, server_state=server_state
        )
        return self._noised(res, rng), st

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
        """``inner.train_many``, then each client's update noised from its own generator."""
        out = self.inner.train_many(
            model, params, datas, rngs, epochs=epochs, states=states, server_state=server_state
        )
        return [(self._noised(r, g), s) for (r, s), g in zip(out, rngs, strict=True)]
