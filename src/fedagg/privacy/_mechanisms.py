"""The DP mechanisms as pure functions: seekable Gaussian noise, clipping, local DP and
adaptive clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021).

**Gaussian noise from the ChaCha20 PRG.** Noise element ``i`` (counted from 0 over the whole
vector) comes from keystream words ``4k .. 4k+3`` of :func:`fedagg.secagg.mask` with
``k = i // 2``, read as two little-endian 64-bit integers ``A`` (words 4k, 4k+1) and ``B``
(words 4k+2, 4k+3): two 53-bit uniforms ``u1 = ((A >> 11) + 1) / 2**53`` in (0, 1] and
``u2 = (B >> 11) / 2**53`` in [0, 1), then Box–Muller:
``z_{2k} = r cos(2 pi u2)``, ``z_{2k+1} = r sin(2 pi u2)`` with ``r = sqrt(-2 log u1)``.
Any chunking of a range gives the same values as the whole range, so a server adds noise to a
10M-parameter sum chunk by chunk in O(chunk) memory, and a replay with the same seed adds the
same noise. ``|z| <= sqrt(2 * 53 log 2) ~ 8.57`` (the tail beyond has probability ~1e-17).
This is floating-point noise: like every floating-point Gaussian sampler it is not exactly
the distribution the accountant assumes at the last bit (Mironov 2012 shows such gaps can
matter for Laplace noise); the discrete samplers of :mod:`._discrete` avoid this for
integer-encoded updates. The seed must be secret (fresh, never logged, never sent).
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from fedagg.errors import ConfigError

__all__ = [
    "CHUNK",
    "adaptive_clip",
    "add_gaussian_noise",
    "clip_l2",
    "combined_noise_multiplier",
    "gaussian_noise",
    "local_dp",
    "noised_unclipped_fraction",
    "update_noise_multiplier",
]

#: Noise values generated at a time by :func:`add_gaussian_noise` (2 MiB of float64).
CHUNK = 1 << 18
_INV53 = 2.0**-53


def _positive(name: str, v: object, allow_zero: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float | np.floating | np.integer):
        raise ConfigError(f"{name} must be a number, got {v!r}")
    x = float(v)
    if not math.isfinite(x) or x < 0 or (x == 0 and not allow_zero):
        raise ConfigError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0")
    return x


def gaussian_noise(
    seed: bytes,
    offset: int,
    count: int,
    std: float = 1.0,
    dtype: type[np.floating[Any]] = np.float64,
) -> np.ndarray:
    """Noise elements ``[offset, offset + count)`` of the stream keyed by ``seed`` (32 bytes),
    each N(0, std**2) (see the module docstring for the transform).

    ``dtype`` float64 (default) or float32: float32 runs Box–Muller in float32 (17x faster
    sin/cos/log; the values are the float64 stream's to about 1e-7 relative), and is what
    :func:`add_gaussian_noise` uses for a float32 sum. Each dtype's stream is seekable.

    >>> a = gaussian_noise(bytes(32), 0, 10)
    >>> bool(np.array_equal(a[3:7], gaussian_noise(bytes(32), 3, 4)))
    True
    """
    from fedagg.errors import SecAggError
    from fedagg.secagg import mask

    s = _positive("std", std, allow_zero=True)
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ConfigError(f"offset must be an integer >= 0, got {offset!r}")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ConfigError(f"count must be an integer >= 0, got {count!r}")
    if dtype not in (np.float32, np.float64):
        raise ConfigError(f"dtype must be numpy.float32 or numpy.float64, got {dtype!r}")
    first, last = offset // 2, (offset + count + 1) // 2
    try:
        words = mask(seed, 4 * first, 4 * (last - first))
    except SecAggError as e:
        raise ConfigError(str(e)) from None
    # two little-endian 64-bit integers per pair; their top 53 bits are the uniforms
    top = (np.ascontiguousarray(words).view("<u8") >> np.uint64(11)).reshape(-1, 2)
    a = ((top[:, 0] + np.uint64(1)).astype(np.float64) * _INV53).astype(dtype, copy=False)
    b = (top[:, 1].astype(np.float64) * _INV53).astype(dtype, copy=False)
    r = np.sqrt(dtype(-2.0) * np.log(a))
    theta = dtype(2.0 * math.pi) * b
    z = np.empty(2 * (last - first), dtype=dtype)
    z[0::2], z[1::2] = r * np.cos(theta), r * np.sin(theta)
    start = offset - 2 * first
    out = z[start : start + count]
    if s != 1.0:
        out *= dtype(s)
    return out


def add_gaussian_noise(
    values: np.ndarray,
    seed: bytes,
    std: float,
    offset: int = 0,
    chunk: int = CHUNK,
    workers: int = 2,
) -> None:
    """``values += gaussian_noise(seed, offset, values.size, std, values.dtype)`` in place,
    ``chunk`` elements at a time (central DP: the server noises the clipped sum with
    std = sigma * C). About 70 ms per 10M float32 values on one core; ``workers`` threads
    noise disjoint chunks at once (ChaCha20 and numpy's transcendental functions release the
    GIL): the stream is seekable, so the bits do not depend on ``workers`` or ``chunk``.

    ``values`` must be a writable, C-contiguous float32 or float64 array (any shape).
    """
    if not isinstance(values, np.ndarray) or values.dtype not in (np.float32, np.float64):
        raise ConfigError("values must be a float32 or float64 numpy array")
    if not (values.flags.c_contiguous and values.flags.writeable):
        raise ConfigError("values must be writable and C-contiguous")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ConfigError(f"chunk must be an integer >= 1, got {chunk!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ConfigError(f"workers must be an integer >= 1, got {workers!r}")
    flat = values.reshape(-1)
    kind = np.float32 if values.dtype == np.float32 else np.float64

    def noise(start: int) -> None:
        part = flat[start : start + chunk]
        part += gaussian_noise(seed, offset + start, part.size, std, kind)

    starts = range(0, flat.size, chunk)
    if workers == 1 or len(starts) < 2:
        for start in starts:
            noise(start)
        return
    with ThreadPoolExecutor(min(workers, len(starts))) as pool:
        for _ in pool.map(noise, starts):  # re-raises a chunk's error
            pass


def clip_l2(update: np.ndarray, clip: float) -> tuple[np.ndarray, bool]:
    """``update`` scaled down to L2 norm at most ``clip`` (a new float64 array), and whether
    it was already within the bound (the bit adaptive clipping counts)."""
    c = _positive("clip", clip)
    x = np.asarray(update, dtype=np.float64)
    if not np.all(np.isfinite(x)):
        raise ConfigError("update must be finite")
    norm = float(np.linalg.norm(x))
    if norm <= c:
        return x.copy(), True
    return x * (c / norm), False


def local_dp(
    update: np.ndarray, clip: float, noise_multiplier: float, rng: np.random.Generator
) -> np.ndarray:
    """Local DP on the client: clip ``update`` to L2 norm ``clip``, add N(0, (sigma*clip)**2)
    to every coordinate. One call is the Gaussian mechanism with sensitivity ``clip`` (under
    replacement of a client's update the sensitivity is ``2 * clip``: use
    :func:`gaussian_epsilon` with ``noise_multiplier / 2`` for that relation)."""
    sigma = _positive("noise_multiplier", noise_multiplier)
    clipped, _ = clip_l2(update, clip)
    return clipped + rng.normal(0.0, sigma * float(clip), size=clipped.shape)


def noised_unclipped_fraction(
    unclipped: int,
    expected_clients: float,
    count_stddev: float,
    rng: np.random.Generator,
    *,
    folded: int,
) -> float:
    """Andrew et al.'s private estimate of the fraction of updates within the clip (their
    Alg. 1 / Thm. 1), from the *centred* count:
    ``(unclipped - folded / 2 + N(0, count_stddev**2)) / expected_clients + 1/2``.

    ``unclipped`` is the number of the round's ``folded`` updates whose norm was <= the clip.
    Each client contributes its bit minus 1/2 (+-1/2), so adding or removing one client moves
    the released sum ``unclipped - folded / 2`` by exactly 1/2: the count query has
    sensitivity 1/2 and noise multiplier ``2 * count_stddev``, what
    :func:`combined_noise_multiplier` and :func:`update_noise_multiplier` account. (The raw
    count ``unclipped`` would move by 1, at twice that sensitivity.) ``expected_clients`` is
    the expected cohort (q * N under Poisson sampling), public, so the estimate leaks nothing
    more.
    """
    for name, v in (("unclipped", unclipped), ("folded", folded)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise ConfigError(f"{name} must be an integer, got {v!r}")
        if v < 0:
            raise ConfigError(f"{name} must be >= 0, got {v}")
    if unclipped > folded:
        raise ConfigError(f"unclipped ({unclipped}) exceeds folded ({folded})")
    m = _positive("expected_clients", expected_clients)
    sb = _positive("count_stddev", count_stddev, allow_zero=True)
    centred = int(unclipped) - int(folded) / 2
    return (centred + (float(rng.normal(0.0, sb)) if sb > 0 else 0.0)) / m + 0.5


def adaptive_clip(
    clip: float, unclipped_fraction: float, target_quantile: float, learning_rate: float = 0.2
) -> float:
    """The geometric clip update of Andrew et al. 2021:
    ``clip * exp(-learning_rate * (unclipped_fraction - target_quantile))``.

    Too many updates within the clip (fraction above the target quantile) shrinks it, too few
    grows it. ``unclipped_fraction`` is the *noised* estimate of
    :func:`noised_unclipped_fraction` (it may fall outside [0, 1]).

    >>> adaptive_clip(1.0, 0.5, 0.5)
    1.0
    """
    c = _positive("clip", clip)
    lr = _positive("learning_rate", learning_rate, allow_zero=True)
    if isinstance(target_quantile, bool) or not 0 <= float(target_quantile) <= 1:
        raise ConfigError(f"target_quantile must be in [0, 1], got {target_quantile!r}")
    b = float(unclipped_fraction)
    if not math.isfinite(b):
        raise ConfigError("unclipped_fraction must be finite")
    return c * math.exp(-lr * (b - float(target_quantile)))


def combined_noise_multiplier(update_noise_multiplier: float, count_stddev: float) -> float:
    """The noise multiplier of the two Gaussian queries of a round with adaptive clipping
    together: the update sum (noise multiplier ``z_u``) and the unclipped count (noise
    ``count_stddev`` on bits of sensitivity 1/2, noise multiplier ``2 * count_stddev``):
    ``(z_u**-2 + (2 count_stddev)**-2) ** -1/2``. Account the run with this value.

    >>> round(combined_noise_multiplier(1.0, 5.0), 6)
    0.995037
    """
    zu = _positive("update_noise_multiplier", update_noise_multiplier)
    sb = _positive("count_stddev", count_stddev)
    return float((zu**-2 + (2 * sb) ** -2) ** -0.5)


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """The update noise multiplier that, with the count query, gives a total of
    ``noise_multiplier``: ``(z**-2 - (2 count_stddev)**-2) ** -1/2`` (Andrew et al. 2021,
    Sec. 3). Raises :class:`ConfigError` when ``2 * count_stddev <= noise_multiplier`` (the
    count alone would spend the whole budget).

    >>> round(update_noise_multiplier(combined_noise_multiplier(1.0, 5.0), 5.0), 9)
    1.0
    """
    z = _positive("noise_multiplier", noise_multiplier)
    sb = _positive("count_stddev", count_stddev)
    if 2 * sb <= z:
        raise ConfigError(
            f"count_stddev {sb:g} is too small for noise multiplier {z:g}: need 2 * "
            "count_stddev > noise_multiplier (Andrew et al. suggest expected_clients / 20)"
        )
    return float((z**-2 - (2 * sb) ** -2) ** -0.5)
