"""Local differential privacy as a client-algorithm wrapper.

:class:`LocalDP` trains with any client algorithm, then clips the whole update (all its
parameters together) to L2 norm ``clip`` and adds N(0, (noise_multiplier * clip)**2) to every
coordinate before the update leaves the client: the server, simulated or deployed, only ever
sees the noisy update. By default the noise comes from a fresh secret key (32 bytes from the
OS, ChaCha20 keystream through :func:`fedagg.privacy.gaussian_noise`): nobody, the server
included, can regenerate and subtract it. ``seeded=True`` (what the simulator builds, so a
simulation replays bit for bit) draws it instead from the generator the engine gives the
client's job, seeded by ``(seed, job)``, after the inner algorithm's training draws: never
use that in a deployment, where the server knows the seed. Its guarantee is
local, per client, composed over the rounds the client took part in
(:func:`fedagg.privacy.local_epsilon`); the weight (``num_examples``) and the metrics the
client reports are not noised: under local DP the policy weighs every update 1.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from fedagg.errors import ConfigError
from fedagg.privacy import clip_l2, gaussian_noise, local_dp

__all__ = ["LocalDP", "noise_update"]


def noise_update(
    delta: dict[str, np.ndarray],
    clip: float,
    noise_multiplier: float,
    rng: np.random.Generator | None,
) -> dict[str, np.ndarray]:
    """``delta`` (name -> array) clipped jointly to L2 norm ``clip`` plus Gaussian noise of
    standard deviation ``noise_multiplier * clip`` per coordinate, in each array's dtype. The
    noise is drawn from ``rng``, or with ``rng=None`` from a fresh secret ChaCha20 key."""
    names = list(delta)
    arrays = [np.asarray(delta[k]) for k in names]
    flat = np.concatenate([a.reshape(-1).astype(np.float64) for a in arrays])
    if rng is not None:
        noisy = local_dp(flat, clip, noise_multiplier, rng)
    else:
        noisy, _ = clip_l2(flat, clip)
        noisy = noisy + gaussian_noise(
            secrets.token_bytes(32), 0, noisy.size, float(noise_multiplier) * float(clip)
        )
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
    seeded: bool = False

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
        delta = noise_update(
            result.delta, self.clip, self.noise_multiplier, rng if self.seeded else None
        )
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
