"""What a client expects of a secure round: its own config's protection, checked against the
server's stage-0 :class:`~fedagg.secagg.RoundParams`.

The server chooses every public parameter of a round; a malicious one could lower the
protection a client signed up for (no distributed-DP noise, a tiny noise multiplier, a huge
clip, ``noise_clients = 1``, a two-client cohort with a colluder, a low threshold). A client
builds :class:`SecureExpectations` from its own config and refuses, before it answers stage 0,
a round whose parameters fall short (:func:`check_params`: a :class:`SecAggError` naming the
parameter, the server's value and the client's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fedagg.errors import ConfigError, SecAggError
from fedagg.secagg._params import RoundParams

__all__ = ["MIN_COHORT", "SecureExpectations", "check_params"]

#: The fewest clients a secure round may have: with two, each learns the other's input.
MIN_COHORT = 3


@dataclass(frozen=True)
class SecureExpectations:
    """A client's own minimums for a secure round (module docs).

    ``None`` for ``clip``/``bits``/``max_weight``/``rotation``: not checked (a client that
    configured none of them). ``noise`` empty: the client asked for no distributed DP (a round
    with noise is accepted: noise only adds protection); otherwise the round must carry the
    same noise kind, ``noise_multiplier`` at least the client's and ``noise_clients`` at least
    the client's minimum. ``min_cohort``: the fewest client ids (at least :data:`MIN_COHORT`,
    and ``noise_clients`` under distributed DP). ``neighbors``/``threshold``: 0 is the default
    (only the protocol's own strict majority, which :class:`RoundParams` enforces)."""

    clip: float | None = None
    bits: int | None = None
    max_weight: float | None = None
    rotation: bool | None = None
    noise: str = ""
    noise_multiplier: float = 0.0
    noise_clients: int = 1
    min_cohort: int = MIN_COHORT
    neighbors: int = 0
    threshold: int = 0

    def __post_init__(self) -> None:
        if self.noise and not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ConfigError(f"noise_multiplier must be > 0, got {self.noise_multiplier}")
        for name in ("noise_clients", "neighbors", "threshold"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        object.__setattr__(self, "min_cohort", max(MIN_COHORT, int(self.min_cohort)))


def _refuse(name: str, got: object, want: str) -> SecAggError:
    return SecAggError(
        f"the server's round parameters lower this client's protection: {name} = {got!r}, "
        f"this client's config asks {want}"
    )


def check_params(params: RoundParams, exp: SecureExpectations) -> None:
    """Raise :class:`SecAggError` if ``params`` fall short of ``exp`` (module docs)."""
    if exp.clip is not None and not params.clip <= exp.clip:
        raise _refuse("clip", params.clip, f"<= {exp.clip!r}")
    if exp.bits is not None and params.bits != exp.bits:
        raise _refuse("bits", params.bits, f"{exp.bits!r}")
    if exp.max_weight is not None and params.max_weight != exp.max_weight:
        raise _refuse("max_weight", params.max_weight, f"{exp.max_weight!r}")
    if exp.rotation is not None and (params.rotation is not None) != exp.rotation:
        raise _refuse("rotation", params.rotation is not None, f"{exp.rotation!r}")
    cohort = exp.min_cohort
    if exp.noise:
        if params.noise != exp.noise:
            raise _refuse("noise", params.noise, f"{exp.noise!r}")
        if not params.noise_multiplier >= exp.noise_multiplier:
            raise _refuse(
                "noise_multiplier", params.noise_multiplier, f">= {exp.noise_multiplier!r}"
            )
        if params.noise_clients < exp.noise_clients:
            raise _refuse("noise_clients", params.noise_clients, f">= {exp.noise_clients}")
        cohort = max(cohort, exp.noise_clients)
    n = len(params.ids)
    if n < cohort:
        raise _refuse("cohort size (number of ids)", n, f">= {cohort}")
    if params.threshold < params.degree // 2 + 1:  # RoundParams enforces it; kept explicit
        raise _refuse("threshold", params.threshold, f"> {params.degree // 2} (a majority)")
    if exp.neighbors and params.degree < min(exp.neighbors, n - 1):
        raise _refuse("degree", params.degree, f">= {min(exp.neighbors, n - 1)}")
    if exp.threshold and params.threshold < exp.threshold:
        raise _refuse("threshold", params.threshold, f">= {exp.threshold}")
