"""Shamir secret sharing: a hand-checkable small field, round trips, refusals."""

from __future__ import annotations

import itertools
import secrets

import pytest

from fedagg.errors import SecAggError
from fedagg.secagg import PRIME, SHARE_BYTES, combine, split


def test_prime_is_the_documented_mersenne_prime() -> None:
    assert PRIME == 2**521 - 1
    assert PRIME > 2**256
    assert pow(3, PRIME - 1, PRIME) == 1  # Fermat witness (M521 is a known prime)
    assert SHARE_BYTES == 66


def test_known_answer_in_a_small_field() -> None:
    # p = 17, secret 13, f(x) = 13 + 10x + 2x^2 (coefficients 10 then 2 from the "rng").
    coeffs = iter([10, 2])
    shares = split(bytes([13]), 3, [1, 2, 3, 4, 5], lambda _p: next(coeffs), prime=17)
    # f(1) = 25 = 8, f(2) = 41 = 7, f(3) = 61 = 10, f(4) = 85 = 0, f(5) = 113 = 11 (mod 17)
    assert shares == {1: 8, 2: 7, 3: 10, 4: 0, 5: 11}
    # Lagrange at 0 from x = 1, 2, 3: 3*8 - 3*7 + 1*10 = 13.
    assert combine({1: 8, 2: 7, 3: 10}, 3, length=1, prime=17) == bytes([13])
    for subset in itertools.combinations(shares.items(), 3):
        assert combine(dict(subset), 3, length=1, prime=17) == bytes([13])
    # A tampered share in the small field gives a different secret (nothing detects it).
    assert combine({1: 9, 2: 7, 3: 10}, 3, length=1, prime=17) != bytes([13])


@pytest.mark.parametrize(("t", "n"), [(1, 1), (1, 3), (2, 3), (3, 5), (5, 5), (4, 7)])
def test_any_t_of_n_shares_recover_the_secret(t: int, n: int) -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, t, list(range(1, n + 1)))
    assert len(shares) == n and all(0 <= y < PRIME for y in shares.values())
    for subset in itertools.combinations(shares.items(), t):
        assert combine(dict(subset), t) == secret
    assert combine(shares, t) == secret  # all of them: consistent, checked


def test_arbitrary_xs_and_short_secrets() -> None:
    secret = b"\x00\x01seed"
    shares = split(secret, 3, [7, 1000, 2**64, 3])
    assert combine({x: shares[x] for x in (1000, 2**64, 3)}, 3, length=len(secret)) == secret
    assert combine(split(b"", 2, [1, 2]), 2, length=0) == b""


def test_fewer_than_t_shares_are_refused() -> None:
    shares = split(secrets.token_bytes(32), 3, [1, 2, 3, 4])
    with pytest.raises(SecAggError, match="2 shares cannot recover a 3-of-n"):
        combine({1: shares[1], 2: shares[2]}, 3)


def test_t_minus_one_shares_say_nothing_in_a_small_field() -> None:
    # Over GF(17) with t = 2: for every secret s there is exactly one line through (0, s) and
    # the single share (1, y), so one share is consistent with every secret equally.
    for y in range(17):
        completions = {combine({1: y, 2: z}, 2, length=1, prime=17) for z in range(17)}
        assert len(completions) == 17


def test_tampered_share_is_refused_or_gives_another_secret() -> None:
    secret = secrets.token_bytes(32)
    shares = split(secret, 3, [1, 2, 3, 4, 5])
    exact = {x: shares[x] for x in (1, 2, 3)}
    # With exactly t shares a small change moves the secret by d * l_2(0) = d * (1*3)/(1*-1).
    moved = combine({**exact, 2: (exact[2] + 1) % PRIME}, 3, length=33)
    assert int.from_bytes(moved, "big") == (int.from_bytes(secret, "big") - 3) % PRIME
    assert moved[1:] != secret
    # A share replaced by a random value moves it to a random field element, which (but for
    # a 2**-265 chance) no longer fits in 32 bytes.
    with pytest.raises(SecAggError, match="does not fit"):
        combine({**exact, 2: secrets.randbelow(PRIME)}, 3)
    # With more than t shares the extra ones are checked against the polynomial.
    more = dict(shares)
    more[5] = (more[5] + 1) % PRIME
    with pytest.raises(SecAggError, match="x=5 is inconsistent"):
        combine(more, 3)


@pytest.mark.parametrize(
    ("xs", "message"),
    [
        ([1, 2, 2], "distinct"),
        ([0, 1, 2], r"\[1, "),
        ([-1, 1, 2], r"\[1, "),
        ([1, 2, PRIME], r"\[1, "),
        ([1, True, 3], r"\[1, "),
    ],
)
def test_bad_xs_are_refused(xs: list[int], message: str) -> None:
    with pytest.raises(SecAggError, match=message):
        split(b"s", 2, xs)


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(SecAggError, match="at most 32 bytes"):
        split(bytes(33), 2, [1, 2])
    with pytest.raises(SecAggError, match="threshold must be an integer >= 1"):
        split(b"s", 0, [1, 2])
    with pytest.raises(SecAggError, match="threshold 3 exceeds the 2 shares"):
        split(b"s", 3, [1, 2])
    with pytest.raises(SecAggError, match="does not fit in the field"):
        split(bytes([20]), 2, [1, 2], prime=17)
    with pytest.raises(SecAggError, match="outside"):
        split(b"s", 2, [1, 2], lambda p: p)
    with pytest.raises(SecAggError, match=r"\[1, "):
        combine({0: 5, 1: 6}, 2)
    with pytest.raises(SecAggError, match="share y at x=1"):
        combine({1: PRIME, 2: 6}, 2)
    with pytest.raises(SecAggError, match="threshold"):
        combine({1: 5}, 0)
