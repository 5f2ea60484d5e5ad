"""Shamir's t-of-n secret sharing over the prime field GF(p), p = 2**521 - 1.

``PRIME`` is the Mersenne prime M521 (the field of NIST P-521). A secret of up to 32 bytes is
read as a big-endian integer s < 2**256 < p, the constant term of a random polynomial
``f(x) = s + a_1 x + ... + a_{t-1} x^{t-1}`` whose coefficients are drawn uniformly from GF(p)
with ``secrets.randbelow`` (cryptographic; a callable of the same shape may be passed for
tests). The share of the holder at ``x`` (1 <= x < p, distinct) is ``f(x)``. Any ``t`` shares
give ``s = f(0)`` by Lagrange interpolation; ``t - 1`` shares are independent of ``s``.

:func:`combine` interpolates from the ``t`` shares with the smallest x; when more are given it
checks that every other share lies on the same polynomial and refuses them otherwise (a
tampered share is detected whenever more than ``t`` are at hand). With exactly ``t`` shares
nothing can detect it: changing share j by d moves the result by d * l_j(0) (its Lagrange
coefficient), a different secret; it is refused only when that result does not fit in
``length`` bytes (true of all but a 2**-265 fraction of shares replaced by random values).
Authenticating shares (SecAgg+ encrypts them with an AEAD) is the protocol's job.

Each share ``y`` is an integer below p: :data:`SHARE_BYTES` (66) bytes on the wire.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping, Sequence

from fedagg.errors import SecAggError

__all__ = ["PRIME", "SECRET_BYTES", "SHARE_BYTES", "combine", "split"]

#: The field's modulus: the Mersenne prime 2**521 - 1.
PRIME = (1 << 521) - 1
#: The longest secret :func:`split` takes, in bytes.
SECRET_BYTES = 32
#: The bytes of one share's value (an integer below :data:`PRIME`).
SHARE_BYTES = (PRIME.bit_length() + 7) // 8


def _check_threshold(threshold: int) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 1:
        raise SecAggError(f"threshold must be an integer >= 1, got {threshold!r}")


def _check_x(x: object, prime: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or not 1 <= x < prime:
        raise SecAggError(f"share x must be an integer in [1, {prime}), got {x!r}")
    return x


def split(
    secret: bytes,
    threshold: int,
    xs: Sequence[int],
    randbelow: Callable[[int], int] = secrets.randbelow,
    *,
    prime: int = PRIME,
) -> dict[int, int]:
    """Share ``secret`` so that any ``threshold`` of the shares at ``xs`` recover it.

    Returns ``{x: f(x)}`` for each x. ``randbelow(p)`` draws the polynomial's coefficients
    (default ``secrets.randbelow``). ``prime`` is for hand-checkable small-field tests only.
    """
    if not isinstance(secret, bytes | bytearray) or len(secret) > SECRET_BYTES:
        raise SecAggError(f"the secret must be at most {SECRET_BYTES} bytes")
    s = int.from_bytes(secret, "big")
    if s >= prime:
        raise SecAggError("the secret does not fit in the field")
    _check_threshold(threshold)
    points = [_check_x(x, prime) for x in xs]
    if len(set(points)) != len(points):
        raise SecAggError(f"share x values must be distinct, got {sorted(points)}")
    if threshold > len(points):
        raise SecAggError(f"threshold {threshold} exceeds the {len(points)} shares")
    coeffs = [s] + [randbelow(prime) for _ in range(threshold - 1)]
    if any(not 0 <= c < prime for c in coeffs[1:]):
        raise SecAggError("randbelow returned a value outside [0, prime)")
    out: dict[int, int] = {}
    for x in points:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % prime
        out[x] = y
    return out


def _lagrange_at(target: int, points: Sequence[tuple[int, int]], prime: int) -> int:
    """The interpolating polynomial through ``points`` evaluated at ``target``.

    One modular inverse per evaluation, not one per point (Montgomery's trick: invert the
    product of the denominators, then peel each off with two products): an inverse modulo a
    521-bit prime costs tens of products, and the server rebuilds n secrets per round."""
    nums: list[int] = []
    dens: list[int] = []
    for j, (xj, _) in enumerate(points):
        num, den = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                num = num * (target - xm) % prime
                den = den * (xj - xm) % prime
        nums.append(num)
        dens.append(den)
    prefix = [1]
    for d in dens:
        prefix.append(prefix[-1] * d % prime)
    inv = pow(prefix[-1], -1, prime)  # 1 / (d_0 ... d_{t-1})
    total = 0
    for j in range(len(points) - 1, -1, -1):
        inv_j = inv * prefix[j] % prime  # 1 / d_j
        inv = inv * dens[j] % prime  # now 1 / (d_0 ... d_{j-1})
        total = (total + points[j][1] * nums[j] * inv_j) % prime
    return total


def combine(
    shares: Mapping[int, int], threshold: int, length: int = SECRET_BYTES, *, prime: int = PRIME
) -> bytes:
    """The ``length``-byte secret from at least ``threshold`` shares ``{x: y}``.

    Raises :class:`~fedagg.errors.SecAggError` on fewer than ``threshold`` shares, a bad x or
    y, shares that do not lie on one polynomial of degree < ``threshold``, or a result that
    does not fit in ``length`` bytes.
    """
    _check_threshold(threshold)
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise SecAggError(f"length must be an integer >= 0, got {length!r}")
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares cannot recover a {threshold}-of-n secret")
    points: list[tuple[int, int]] = []
    for x, y in sorted(shares.items()):
        _check_x(x, prime)
        if isinstance(y, bool) or not isinstance(y, int) or not 0 <= y < prime:
            raise SecAggError(f"share y at x={x} is not an integer in [0, prime)")
        points.append((x, y))
    base, rest = points[:threshold], points[threshold:]
    for x, y in rest:
        if _lagrange_at(x, base, prime) != y:
            raise SecAggError(f"share at x={x} is inconsistent with the others")
    s = _lagrange_at(0, base, prime)
    if s.bit_length() > 8 * length:
        raise SecAggError(f"the recovered secret does not fit in {length} bytes (bad shares)")
    return s.to_bytes(length, "big")
