"""Encoding float updates as uint32 vectors whose sum over clients never wraps.

An :class:`Encoder` (public parameters: ``clip`` C, ``bits`` b <= 32, ``clients`` n, and an
optional public ``rotation`` seed) maps a client's update x (d floats) and weight w as follows:

1. **Clip** x to L2 norm at most C: ``x * min(1, C / ||x||)``.
2. **Weight**: v = w * x, with 0 < w <= 1. Raw weights (e.g. example counts) are divided by a
   public cap W_max first; the weighted mean does not change.
3. **Rotate** (optional): pad v with zeros to p = the next power of two >= d, and apply the
   randomised Hadamard rotation R = H D / sqrt(p), where D is a diagonal of random signs drawn
   from the public seed (ChaCha20 keystream keyed by SHA-256 of the seed) and H the
   Walsh–Hadamard matrix (a fast transform, O(p log p)). R is orthogonal, so ||R v|| = ||v||;
   its inverse is D H / sqrt(p). Without rotation p = d.
4. **Quantise** each coordinate, all in [-C, C] since ||v|| <= C, to the grid of
   L = 2**(b - h) - 1 steps of size Δ = 2C / L, where h = ceil(log2 n) bits of headroom, by
   stochastic rounding: u = (v + C) / Δ, q = floor(u) + Bernoulli(u - floor(u)) (computed as
   floor(u + U) with U uniform on [0, 1)), so that E[q Δ - C] = v and |q Δ - C - v| < Δ.
5. **Append the weight** as one more element: q_w = stochastic rounding of w * L (unbiased,
   error < 1 / L in w).

The result has ``length(d) = p + 1`` uint32 elements, each in [0, L]. A sum of m <= n encodings
has every element at most n L <= 2**b - 2**h < 2**32, so it never wraps: adding uint32 vectors
modulo 2**32 (the masks' arithmetic) leaves the exact integer sum once the masks cancel.

**Decoding** a sum S of m encodings: sum_i w_i x_i ≈ R^-1 (S[:p] Δ - m C)[:d] and
sum_i w_i ≈ S[p] / L; the weighted mean is their ratio (:meth:`Encoder.mean`).

**Error bound** (:meth:`Encoder.error_bound`). Per client and coordinate the rounding error is
below Δ, so in L2 it is below Δ sqrt(p) per client (rotation is orthogonal and dropping the
padding only shrinks it) and below **m Δ sqrt(p)** for a sum of m encodings, deterministically;
:meth:`Encoder.error_bound` multiplies it by 1 + 2**-19 for float64 rounding (at most ~2**-20 of
a step, at bits = 32). The errors are independent, zero-mean and of variance <= Δ² / 4 per
coordinate, so typically the L2 error is about (Δ / 2) sqrt(m p). The weight sum's error is
below m / L. For the weighted mean, with E_v and E_w these two bounds, W = sum_i w_i and
||sum_i w_i x_i|| <= W C: ||mean_hat - mean|| <= (E_v + C E_w) / (W - E_w) whenever W > E_w.

**Limits.** The grid covers [-C, C] in every coordinate, which any vector of norm <= C fits,
so nothing is clamped and nothing wraps; the rotation therefore does not shrink this bound (it
is orthogonal and the bound is in L2). It spreads a spiky update over all coordinates, which a
narrower per-coordinate range would need; no such range is offered yet (distributed DP below
also keeps the full [-C, C] range). The encoding bounds honest clients only: a client may
submit any uint32 vector and so corrupt the sum (secure aggregation hides inputs, it does not
validate them). Stochastic rounding draws from a numpy Generator: its randomness makes
rounding unbiased and need not be secret (the masks hide the encoding).

**Distributed DP** (``noise`` = ``"gaussian"``: the discrete Gaussian of Kairouz et al. 2021,
or ``"skellam"``: Agarwal et al. 2021; with ``noise_multiplier`` z, ``noise_clients`` n_e, the
fewest contributions a decoded sum holds, and ``dim`` d, the update length). Each client adds
integer noise of standard deviation s = z S / sqrt(n_e) (grid units) to every one of its p
value elements after rounding, where S = L / 2 + sqrt(p) bounds the L2 norm of a client's
rounded, centred vector q - L/2 (||v / Δ|| <= C / Δ = L / 2, and rounding moves each element
by < 1): the sum of n_e clients' noise has standard deviation z S, i.e. z C (1 + 2 sqrt(p) /
L) in update units, as central DP's z C (more contributions only add noise). Each client
also adds a bias B = ceil(10 s) and the grid
shrinks to the largest L with L + 2B <= 2**(b - h) - 1, so a sum of m <= n noisy encodings lies
in [0, m (L + 2B)] (hence never wraps modulo 2**32) unless the summed noise of some element
leaves [-m B, m B], a 10 sqrt(m)-sigma event (probability below 1e-22 per element for the
discrete Gaussian; the Skellam noise of variance s**2 >> 1 has nearly Gaussian tails).
**Overflow choice**: no modular clipping; a sum outside the range is refused by
:meth:`Encoder.decode` (:class:`SecAggError`: the round is abandoned, nothing wrapped is ever
decoded). A single client's element may leave [0, L + 2B] (its noise is not bounded): it is
reduced modulo 2**32 and the masked sum, computed modulo 2**32, is still exact. The weight
element carries no noise (weights are 1 under DP: the count of survivors is public). The
noise is drawn by a caller-supplied ``sampler(std, size, rng)``
(:func:`fedagg.privacy.integer_noise`; secagg does not import privacy). Decoding subtracts
m B and m C: the error is the rounding's plus the summed noise, of variance m s**2 Δ**2 per
element (plus <= m Δ**2 / 4).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedagg.errors import ConfigError, SecAggError

from ._prg import mask

__all__ = ["Encoder"]

_ROTATION_DOMAIN = b"fedagg.secagg.rotation.v1"
#: float64 rounding in encode and decode, relative to the bound (module docs)
_ROUNDING = 1.0 + 2.0**-19
#: the bias of each client's noisy elements, in its noise's standard deviations (module docs)
TAIL = 10.0
NOISES = ("gaussian", "skellam")
#: ``sampler(std, size, rng)``: ``size`` int64 noise values of standard deviation ``std``
Sampler = Callable[[float, int, np.random.Generator], np.ndarray]


def _butterflies(y: np.ndarray, h: int) -> None:
    """The Walsh–Hadamard butterflies of strides h, 2h, ... < y.size on ``y``, in place."""
    while h < y.size:
        v = y.reshape(-1, 2, h)
        a = v[:, 0, :].copy()
        b = v[:, 1, :]
        v[:, 0, :] += b
        np.subtract(a, b, out=b)
        h *= 2


def _fwht(y: np.ndarray) -> None:
    """The unnormalised Walsh–Hadamard transform of ``y`` (float64, size a power of 2), in
    place. Small strides are slow in numpy, so a large ``y`` is viewed as an r x c matrix:
    the strides >= c (across rows) run on it, then the in-row ones on its transpose, where
    they become strides >= r (the butterfly levels commute)."""
    n = y.size
    if n < 1 << 12:
        _butterflies(y, 1)
        return
    c = 1 << ((n.bit_length() - 1) // 2)
    r = n // c
    _butterflies(y, c)
    t = np.ascontiguousarray(y.reshape(r, c).T)
    _butterflies(t.reshape(-1), r)
    y.reshape(r, c)[...] = t.T


@dataclass(frozen=True)
class Encoder:
    """Clip, optionally rotate, and stochastically round updates to uint32 (module docs)."""

    clip: float
    bits: int = 32
    clients: int = 1
    rotation: int | None = None
    noise: str = ""
    noise_multiplier: float = 0.0
    noise_clients: int = 1
    dim: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.clip, int | float) and math.isfinite(self.clip) and self.clip > 0):
            raise ConfigError(f"clip must be a finite number > 0, got {self.clip!r}")
        for name in ("bits", "clients"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {v!r}")
        if self.bits > 32:
            raise ConfigError(f"bits must be at most 32 (uint32 on the wire), got {self.bits}")
        if self.bits - self.headroom < 1:
            raise ConfigError(
                f"bits={self.bits} leaves no value bits after {self.headroom} bits of headroom "
                f"for {self.clients} clients"
            )
        r = self.rotation
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 0):
            raise ConfigError(f"rotation must be None or an integer seed >= 0, got {r!r}")
        if r is not None and r >= 2**256:
            raise ConfigError("rotation seed must be below 2**256")
        if self.noise:
            self._check_noise()

    def _check_noise(self) -> None:
        if self.noise not in NOISES:
            raise ConfigError(f"noise must be one of {NOISES} (or ''), got {self.noise!r}")
        z = self.noise_multiplier
        if isinstance(z, bool) or not isinstance(z, int | float) or not 0 < z < math.inf:
            raise ConfigError(f"noise_multiplier must be a finite number > 0, got {z!r}")
        for name in ("noise_clients", "dim"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be an integer >= 1 with noise, got {v!r}")
        if self.levels < 1:
            raise ConfigError(
                f"bits={self.bits} leave no grid for noise multiplier {z:g} over "
                f"{self.noise_clients} expected clients ({self.clients} at most): raise bits"
            )

    # -- the grid ---------------------------------------------------------------------------
    @property
    def headroom(self) -> int:
        """ceil(log2 clients): the bits a sum of ``clients`` encodings may need."""
        return (self.clients - 1).bit_length()

    @property
    def levels(self) -> int:
        """L = 2**(bits - headroom) - 1: the largest value of one encoded element (with noise:
        the largest L with L + 2 B <= that, module docs)."""
        top = (1 << (self.bits - self.headroom)) - 1
        if not self.noise:
            return top
        got = self.__dict__.get("_levels")
        if got is None:
            a = TAIL * float(self.noise_multiplier) / math.sqrt(self.noise_clients)
            sp = math.sqrt(self.padded(self.dim))
            got = max(0, math.floor((top - 2 - 2 * a * sp) / (1 + a)))
            while got > 0 and got + 2 * self._bias(got) > top:
                got -= 1
            object.__setattr__(self, "_levels", got)
        return int(got)

    def _std(self, levels: int) -> float:
        s = levels / 2 + math.sqrt(self.padded(self.dim))
        return float(self.noise_multiplier) * s / math.sqrt(self.noise_clients)

    def _bias(self, levels: int) -> int:
        return math.ceil(TAIL * self._std(levels))

    @property
    def sensitivity(self) -> float:
        """S = L / 2 + sqrt(p): the L2 bound on a client's centred rounded vector (grid units).
        Two clients' vectors differ by at most 2S (replace-one neighbours), the sensitivity the
        distributed-DP accounting uses against the server (module docs;
        :func:`fedagg.privacy.distributed_rdp`)."""
        return self.levels / 2 + math.sqrt(self.padded(self.dim))

    @property
    def noise_std(self) -> float:
        """s: the standard deviation of each client's noise per element (grid units; 0 without
        noise)."""
        return self._std(self.levels) if self.noise else 0.0

    @property
    def bias(self) -> int:
        """B: what each client adds to its noisy elements (0 without noise)."""
        return self._bias(self.levels) if self.noise else 0

    @property
    def step(self) -> float:
        """Δ = 2 clip / L: the grid's step."""
        return 2.0 * float(self.clip) / self.levels

    def padded(self, d: int) -> int:
        """p: the rotated length (next power of two >= d) or d without rotation."""
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise SecAggError(f"the update length must be an integer >= 1, got {d!r}")
        return d if self.rotation is None else 1 << (d - 1).bit_length()

    def length(self, d: int) -> int:
        """The encoded length of a d-element update: p + 1 (the weight is the last element)."""
        return self.padded(d) + 1

    def error_bound(self, d: int, count: int = 1) -> float:
        """The L2 bound m Δ sqrt(p) (1 + 2**-19) on the error of a decoded sum of
        m = ``count`` encodings of d-element updates (the weight sum's bound is m / L)."""
        self._check_count(count)
        return count * self.step * math.sqrt(self.padded(d)) * _ROUNDING

    # -- rotation ---------------------------------------------------------------------------
    def _signs(self, p: int) -> np.ndarray:
        assert self.rotation is not None
        key = hashlib.sha256(_ROTATION_DOMAIN + self.rotation.to_bytes(32, "big")).digest()
        words = mask(key, 0, -(-p // 32)).astype("<u4")
        bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:p]
        return 1.0 - 2.0 * bits.astype(np.float64)

    def rotate(self, v: np.ndarray) -> np.ndarray:
        """R v (float64, padded to p); the identity copy without rotation."""
        v = np.asarray(v, dtype=np.float64).reshape(-1)
        p = self.padded(v.size)
        if self.rotation is None:
            return v.copy()
        y = np.zeros(p)
        y[: v.size] = v
        y *= self._signs(p)
        _fwht(y)
        y *= 1.0 / math.sqrt(p)
        return y

    def unrotate(self, y: np.ndarray, d: int) -> np.ndarray:
        """R^-1 y truncated to its first d elements (float64)."""
        p = self.padded(d)
        y = np.asarray(y, dtype=np.float64).reshape(-1)
        if y.size != p:
            raise SecAggError(f"expected {p} rotated elements for d={d}, got {y.size}")
        if self.rotation is None:
            return y.copy()
        z = y.copy()
        _fwht(z)
        z *= self._signs(p) / math.sqrt(p)
        return z[:d]

    # -- encode / decode --------------------------------------------------------------------
    def encode(
        self,
        x: Any,
        weight: float = 1.0,
        *,
        rng: np.random.Generator | None = None,
        sampler: Sampler | None = None,
    ) -> np.ndarray:
        """The uint32 encoding of ``weight * clip(x)`` and ``weight`` (0 < weight <= 1); with
        noise, ``sampler`` draws it from ``rng`` (module docs) and ``weight`` must be 1."""
        x = np.asarray(x, dtype=np.float64).reshape(-1)
        if x.size < 1:
            raise SecAggError("cannot encode an empty update")
        if not np.isfinite(x).all():
            raise SecAggError("the update holds NaN or Inf")
        w = float(weight)
        if not (math.isfinite(w) and 0.0 < w <= 1.0):
            raise SecAggError(f"weight must be in (0, 1] (divide by a public cap), got {weight!r}")
        if self.noise:
            if sampler is None:
                raise SecAggError("a distributed-DP encoding needs a noise sampler")
            if w != 1.0:
                raise SecAggError("under distributed DP every client's weight is 1")
            if x.size != self.dim:
                raise SecAggError(f"the update has {x.size} elements, the noise is for {self.dim}")
        rng = np.random.default_rng() if rng is None else rng
        clip = float(self.clip)
        norm = float(np.linalg.norm(x))
        scale = w * (clip / norm if norm > clip else 1.0)
        L = self.levels
        # u = (v + C) / Δ for v = R(scale x); then floor(u + U), U ~ U[0, 1), is floor(u) + 1
        # with probability frac(u): stochastic rounding in one pass.
        a = scale * L / (2.0 * clip)
        if self.rotation is None:
            u = np.multiply(x, a)
        else:
            u = self.rotate(x)
            u *= a
        u += 0.5 * L
        u += rng.random(u.size)
        np.floor(u, out=u)
        q = np.clip(u, 0.0, float(L), out=u)
        out = np.empty(q.size + 1, dtype=np.uint32)
        if self.noise:
            assert sampler is not None
            z = np.asarray(sampler(self.noise_std, q.size, rng), dtype=np.int64)
            if z.shape != q.shape:
                raise SecAggError(f"the sampler gave {z.size} values for {q.size}")
            z += q.astype(np.int64)
            z += self.bias
            np.bitwise_and(z, 0xFFFFFFFF, out=z)  # modulo 2**32: the masked sum stays exact
            out[:-1] = z
        else:
            out[:-1] = q
        uw = w * L
        out[-1] = math.floor(uw) + int(rng.random() < uw - math.floor(uw))
        return out

    def _check_count(self, count: int) -> None:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise SecAggError(f"count must be an integer >= 1, got {count!r}")
        if count > self.clients:
            raise SecAggError(
                f"a sum of {count} encodings exceeds the {self.clients} clients the headroom "
                "was sized for"
            )

    def decode(self, total: np.ndarray, count: int, d: int) -> tuple[np.ndarray, float]:
        """``(sum of weight * clip(x), sum of weight)`` from the sum of ``count`` encodings of
        d-element updates: float64 of length d and a float."""
        self._check_count(count)
        if not isinstance(total, np.ndarray) or total.dtype != np.uint32 or total.ndim != 1:
            raise SecAggError("the encoded sum must be a 1-D uint32 array")
        if total.size != self.length(d):
            raise SecAggError(f"expected {self.length(d)} encoded elements, got {total.size}")
        cap = count * self.levels
        b = self.bias
        if int(total[-1]) > cap or int(total[:-1].max()) > count * (self.levels + 2 * b):
            raise SecAggError(
                f"an element exceeds {count} x {self.levels + 2 * b}: not a sum of {count} "
                "encodings (wrong count, masks that did not cancel, or noise beyond its "
                "headroom)"
            )
        s = total[:-1].astype(np.float64)
        if b:
            s -= float(count * b)
        s *= self.step
        s -= count * float(self.clip)
        return self.unrotate(s, d), float(total[-1]) / self.levels

    def mean(self, total: np.ndarray, count: int, d: int) -> np.ndarray:
        """The weighted mean sum(w x) / sum(w) from the sum of ``count`` encodings."""
        vec, w = self.decode(total, count, d)
        if w <= 0.0:
            raise SecAggError("the decoded total weight is zero")
        return vec / w
