"""A privacy loss distribution (PLD) accountant for the Poisson-subsampled Gaussian.

The tight (epsilon, delta) curve of a composition is that of the sum of the steps' privacy
losses (Koskela, Jälkö, Honkela 2020; Gopi, Lee, Wutschitz 2021). Here:

1. **One step, both directions.** Under add/remove-one adjacency the pair of output
   distributions is ``(mix, N(0, s^2))`` (remove) or ``(N(0, s^2), mix)`` (add), with
   ``mix = (1 - q) N(0, s^2) + q N(1, s^2)``. Each direction's privacy profile
   ``delta(eps) = P[L > eps] - e^eps Q[L > eps]`` has a closed form in the normal tail.
2. **Pessimistic discretisation ("connect the dots", Doroshenko et al. 2022).** On a grid
   ``eps_k = k h`` the discrete PLD whose profile equals ``delta`` at every grid point and is
   linear in ``e^eps`` between them: the profile is convex in ``e^eps``, so the chords lie
   above it and the discrete pair *dominates* the true one. The mass beyond the top of the
   grid (``delta`` there, at most ``tail``) becomes an atom at +infinity.
3. **Composition** by FFT convolution with repeated squaring. After each convolution the
   lower tail (mass <= ``tail``) is moved up to the lowest kept loss and the upper tail is
   moved to +infinity: both only increase losses, so the result still dominates.
4. **delta(eps)** of the composed discrete PLD in closed form per grid segment, and
   ``eps(delta)`` by inverting it; the final figure is the worse of the two directions.

Every approximation is pessimistic (the epsilon returned is never below the exact one,
up to floating-point rounding of the convolutions, about 1e-13 in delta). The excess over
the exact value comes from the grid step ``h`` (default 1e-4, coarsened automatically so that
the composed support stays below ~2**21 points); see :mod:`fedagg.privacy` for measured
precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["PLD", "pld_subsampled_gaussian"]

_ERFC = np.frompyfunc(math.erfc, 1, 1)
_MAX_POINTS = 1 << 21
#: Losses above this are treated as infinite when epsilon is computed.
_MAX_LOSS = 600.0
#: The lowest loss on a step's grid is that of the point this many standard deviations out
#: (the first distribution's mass beyond it is below 1e-17; it is rounded up onto the grid).
_SDS = 8.5


def _phi_c(z: np.ndarray) -> np.ndarray:
    """The standard normal upper tail ``P[N(0,1) > z]``, accurate far into the tail."""
    return 0.5 * np.asarray(_ERFC(np.asarray(z, dtype=np.float64) / math.sqrt(2)), np.float64)


def _profile(eps: np.ndarray, sigma: float, q: float, remove: bool) -> np.ndarray:
    """The one-step privacy profile ``delta(eps)`` of one direction, vectorised over eps."""
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        return _profile_raw(eps, sigma, q, remove)


def _profile_raw(eps: np.ndarray, sigma: float, q: float, remove: bool) -> np.ndarray:
    eps = np.asarray(eps, dtype=np.float64)
    out = np.empty_like(eps)
    s2 = sigma * sigma
    if remove:
        # L(x) = log(1 - q + q e^{(2x - 1)/(2 s^2)}), x ~ mix; L > eps  <=>  x > x*.
        low = eps <= math.log1p(-q) if q < 1 else np.zeros(eps.shape, dtype=bool)
        out[low] = -np.expm1(eps[low])
        e = eps[~low]
        xs = s2 * (np.log(np.expm1(e) + q) - math.log(q)) + 0.5
        t0, t1 = _phi_c(xs / sigma), _phi_c((xs - 1) / sigma)
        out[~low] = (1 - q) * t0 + q * t1 - np.exp(e) * t0
    else:
        # L(x) = -log(1 - q + q e^{(2x - 1)/(2 s^2)}), x ~ N(0, s^2); L > eps <=> x < x_*.
        high = eps >= -math.log1p(-q) if q < 1 else np.zeros(eps.shape, dtype=bool)
        out[high] = 0.0
        e = eps[~high]
        xs = s2 * (np.log(np.expm1(-e) + q) - math.log(q)) + 0.5
        u0, u1 = _phi_c(-xs / sigma), _phi_c(-(xs - 1) / sigma)
        out[~high] = u0 - np.exp(e) * ((1 - q) * u0 + q * u1)
    clipped: np.ndarray = np.clip(np.nan_to_num(out, nan=0.0), 0.0, 1.0)
    return clipped


@dataclass(frozen=True, slots=True)
class PLD:
    """A discrete privacy loss distribution: ``pmf[k]`` is the probability (under the first
    distribution of the pair) of the loss ``(offset + k) * step``; ``inf_mass`` is the
    probability of an infinite loss."""

    pmf: np.ndarray
    offset: int
    step: float
    inf_mass: float

    def compose(self, other: PLD, tail: float) -> PLD:
        """The PLD of the two mechanisms run one after the other (a pessimistic
        truncation of at most ``tail`` mass at each end)."""
        n = self.pmf.size + other.pmf.size - 1
        size = _fast_len(n)
        f = np.fft.rfft(self.pmf, size)
        f *= f if other is self else np.fft.rfft(other.pmf, size)
        conv = np.clip(np.fft.irfft(f, size)[:n], 0.0, None)
        inf_mass = 1.0 - (1.0 - self.inf_mass) * (1.0 - other.inf_mass)
        return _truncate(conv, self.offset + other.offset, self.step, inf_mass, tail)

    def self_compose(self, count: int, tail: float) -> PLD:
        """``count`` independent runs of this mechanism (repeated squaring)."""
        result: PLD | None = None
        base: PLD = self
        while count:
            if count & 1:
                result = base if result is None else result.compose(base, tail)
            count >>= 1
            if count:
                base = base.compose(base, tail)
        return result if result is not None else PLD(np.ones(1), 0, self.step, 0.0)

    def losses(self) -> np.ndarray:
        """The loss of each entry of :attr:`pmf`."""
        return (self.offset + np.arange(self.pmf.size)) * self.step

    def delta(self, epsilon: float) -> float:
        """``delta(epsilon) = P[L = inf] + E[(1 - e^{epsilon - L})_+]``."""
        losses = self.losses()
        above = losses > epsilon
        gain = -np.expm1(epsilon - losses[above])
        return float(min(1.0, self.inf_mass + np.sum(self.pmf[above] * gain)))

    def epsilon(self, delta: float) -> float:
        """The smallest epsilon >= 0 with ``delta(epsilon) <= delta`` (``inf`` if none).

        Losses below 0 cannot raise delta at an epsilon >= 0 and are left out; losses above
        :data:`_MAX_LOSS` are counted as infinite (pessimistic; such an epsilon is useless).
        """
        losses = self.losses()
        keep = (losses >= 0) & (losses <= _MAX_LOSS)
        inf_mass = self.inf_mass + float(np.sum(self.pmf[losses > _MAX_LOSS]))
        if inf_mass >= delta:
            return math.inf
        p, ls = self.pmf[keep], losses[keep]
        if p.size == 0:
            return 0.0
        # Tail sums from the top: A_k = sum_{j > k} p_j and B_k = sum_{j > k} p_j e^{l_0 - l_j};
        # on [l_k, l_{k+1}]: delta(eps) = inf + A_k - e^{eps - l_0} B_k (decreasing in eps).
        a = np.concatenate((np.cumsum(p[::-1])[::-1][1:], [0.0]))
        b = np.concatenate((np.cumsum((p * np.exp(ls[0] - ls))[::-1])[::-1][1:], [0.0]))
        d_grid = inf_mass + a - np.exp(ls - ls[0]) * b
        k = int(np.nonzero(d_grid <= delta)[0][0])  # the last point has delta = inf_mass
        if k == 0:
            # below l_0: delta(eps) = inf + A_0 + p_0 - e^{eps - l_0} (B_0 + p_0)
            total = inf_mass + float(a[0] + p[0])
            if total <= delta:
                return 0.0
            return max(0.0, float(ls[0]) + math.log((total - delta) / float(b[0] + p[0])))
        return max(0.0, float(ls[0]) + math.log((inf_mass + a[k - 1] - delta) / b[k - 1]))


def _fast_len(n: int) -> int:
    """The smallest 2^a 3^b 5^c >= n (sizes pocketfft transforms fast)."""
    best = 1 << (n - 1).bit_length()
    p5 = 1
    while p5 < best:
        p35 = p5
        while p35 < best:
            m = p35
            while m < n:
                m *= 2
            best = min(best, m)
            p35 *= 3
        p5 *= 5
    return best


def _truncate(p: np.ndarray, offset: int, step: float, inf_mass: float, tail: float) -> PLD:
    """Drop the ends of ``p`` pessimistically: the lower end's mass moves up to the lowest
    kept loss, the upper end's becomes infinite loss. An end is cut while its mass is at most
    ``tail``, and also while its entries are below the FFT's noise floor (1e-15 of the
    largest entry), which would otherwise never be cut and widen the support every round."""
    floor = 1e-15 * float(p.max())
    big = np.nonzero(p > floor)[0]
    c = np.cumsum(p)
    lo = max(int(np.searchsorted(c, tail, side="right")), int(big[0]))
    r = np.cumsum(p[::-1])
    hi = min(p.size - int(np.searchsorted(r, tail, side="right")), int(big[-1]) + 1)
    lo = min(lo, max(hi - 1, 0))
    kept = p[lo:hi].copy()
    kept[0] += c[lo - 1] if lo > 0 else 0.0
    moved_up = float(r[p.size - hi - 1]) if hi < p.size else 0.0
    return PLD(kept, offset + lo, step, min(1.0, inf_mass + moved_up))


def _discretise(sigma: float, q: float, remove: bool, step: float, tail: float) -> PLD:
    """The connect-the-dots discrete PLD of one direction on the grid ``k * step``."""
    s = sigma
    if remove:
        x = np.array([-_SDS * s]) if q < 1 else np.array([1 - _SDS * s])
        low = float(np.log1p(-q + q * np.exp((2 * x - 1) / (2 * s * s)))[0])
    else:
        x = np.array([1 + _SDS * s]) if q < 1 else np.array([_SDS * s])
        low = float(-np.log1p(-q + q * np.exp(np.minimum((2 * x - 1) / (2 * s * s), 700)))[0])
    k_lo = math.floor(low / step)
    # the top of the grid: the first eps with delta(eps) <= tail (bracketed, then bisected)
    hi = max(1.0, low + 1.0)
    while _profile(np.array([hi]), s, q, remove)[0] > tail:
        hi *= 2
    lo_b = low
    for _ in range(60):
        mid = 0.5 * (lo_b + hi)
        if _profile(np.array([mid]), s, q, remove)[0] > tail:
            lo_b = mid
        else:
            hi = mid
    k_hi = max(math.ceil(hi / step), k_lo + 1)
    grid = np.arange(k_lo, k_hi + 1) * step
    d = _profile(grid, s, q, remove)
    t = np.exp(grid)
    slope = np.diff(d) / np.diff(t)  # slope[i]: on [t_i, t_{i+1}]
    left = (d[0] - 1.0) / t[0]  # the chord from (0, 1)
    slopes = np.concatenate(([left], slope, [0.0]))
    pmf = np.clip(t * np.diff(slopes), 0.0, None)
    inf_mass = float(d[-1])
    return PLD(pmf, k_lo, step, inf_mass)


def pld_subsampled_gaussian(
    noise_multiplier: float, sample_rate: float, steps: int, step: float, tail: float
) -> tuple[PLD, PLD]:
    """The composed PLDs (remove direction, add direction) of ``steps`` runs of the
    Poisson-subsampled Gaussian mechanism, discretised with interval ``step``."""
    return tuple(  # type: ignore[return-value]
        _discretise(noise_multiplier, sample_rate, remove, step, tail).self_compose(steps, tail)
        for remove in (True, False)
    )


def auto_step(noise_multiplier: float, sample_rate: float, steps: int, finest: float) -> float:
    """The grid step: ``finest``, or coarser when the composed losses would need more than
    ~2**21 grid points (their spread estimated from the mean and variance of one step)."""
    coarse = max(finest, 1e-3)
    one = _discretise(noise_multiplier, sample_rate, True, coarse, 1e-15)
    losses = (one.offset + np.arange(one.pmf.size)) * coarse
    mean = float(np.sum(one.pmf * losses))
    var = float(np.sum(one.pmf * (losses - mean) ** 2))
    width = abs(mean) * steps + 40.0 * math.sqrt(var * steps) + float(losses[-1] - losses[0])
    return max(finest, width / _MAX_POINTS)
