"""Key agreement, share encryption and signatures for SecAgg+, all from ``cryptography``.

* Each client draws two **ephemeral X25519 key pairs** per round: ``c`` (the pairwise keys that
  encrypt the Shamir shares it sends) and ``s`` (the pairwise mask seeds).
* A pair's shared secret goes through **HKDF-SHA256** (32 bytes) with a context
  ``fedagg/secagg/v1 | purpose | round | min(id) | max(id)``: both ends derive the same key, and
  a key never serves two rounds, two pairs or two purposes (``b"share"`` vs ``b"mask"``).
* Share bundles are sealed with **ChaCha20-Poly1305** (a random 96-bit nonce in front of the
  ciphertext; the pair key serves both directions, so the nonce must never repeat: random
  nonces from ``secrets``) with associated data ``(sender, receiver, round)``: a ciphertext
  replayed to another receiver, attributed to another sender or moved to another round fails
  authentication.
* Each client's long-term **Ed25519 identity** signs its two ephemeral public keys together with
  the round and its id, and later the survivor set of the consistency round. A server that
  replaces a public key must forge that signature.

Every fault raises :class:`~fedagg.errors.SecAggError` (never a raw ``cryptography`` error).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedagg.errors import SecAggError

__all__ = [
    "KEY_BYTES",
    "NONCE_BYTES",
    "agree",
    "decrypt",
    "encrypt",
    "fields",
    "id_set",
    "new_key_pair",
    "public_bytes",
    "sign",
    "verify",
]

#: Bytes of an X25519 public or private key, of a derived key and of a mask seed.
KEY_BYTES = 32
#: Bytes of the ChaCha20-Poly1305 nonce prefixed to each ciphertext.
NONCE_BYTES = 12
_DOMAIN = b"fedagg/secagg/v1"


def fields(*parts: int | bytes | str) -> bytes:
    """A canonical, unambiguous byte string of ``parts``: each one tagged by type and length
    prefixed, so that no two different tuples encode alike (what is signed or bound as
    context)."""
    out = bytearray()
    for p in parts:
        if isinstance(p, bool):
            raise TypeError("fields: bool is not an accepted part")
        if isinstance(p, int):
            raw, tag = p.to_bytes(max(1, (p.bit_length() + 8) // 8), "big", signed=True), b"i"
        elif isinstance(p, bytes):
            raw, tag = p, b"b"
        else:
            raw, tag = p.encode(), b"s"
        out += tag + len(raw).to_bytes(4, "big") + raw
    return bytes(out)


def new_key_pair() -> X25519PrivateKey:
    """A fresh ephemeral X25519 key pair (its public half via :func:`public_bytes`)."""
    return X25519PrivateKey.generate()


def public_bytes(key: X25519PrivateKey | X25519PublicKey | Ed25519PublicKey) -> bytes:
    """The raw 32-byte public key."""
    pub = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return pub.public_bytes_raw()


def agree(
    private: X25519PrivateKey, peer_public: bytes, *, purpose: bytes, round_id: int, a: int, b: int
) -> bytes:
    """The 32-byte key of the pair ``{a, b}`` for ``purpose`` in round ``round_id``: X25519 then
    HKDF-SHA256, the context binding the purpose, the round and both ids (in id order, so both
    ends derive the same key)."""
    if a == b:
        raise SecAggError(f"key agreement of client {a} with itself")
    try:
        peer = X25519PublicKey.from_public_bytes(peer_public)
        shared = private.exchange(peer)
    except ValueError as e:  # wrong length, or a low-order point (all-zero shared secret)
        raise SecAggError(f"bad X25519 public key for the pair ({a}, {b}): {e}") from None
    info = fields(_DOMAIN, purpose, round_id, min(a, b), max(a, b))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def _ad(sender: int, receiver: int, round_id: int) -> bytes:
    return fields(_DOMAIN, b"share-ad", sender, receiver, round_id)


def encrypt(key: bytes, plaintext: bytes, *, sender: int, receiver: int, round_id: int) -> bytes:
    """``nonce | ChaCha20-Poly1305(key, nonce, plaintext, ad=(sender, receiver, round))``."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, plaintext, _ad(sender, receiver, round_id))


def decrypt(key: bytes, ciphertext: bytes, *, sender: int, receiver: int, round_id: int) -> bytes:
    """The plaintext of :func:`encrypt`; a tampered, truncated or misattributed ciphertext
    raises :class:`SecAggError`."""
    if len(ciphertext) < NONCE_BYTES + 16:
        raise SecAggError(f"ciphertext from client {sender} to {receiver} is truncated")
    nonce, body = ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:]
    try:
        return ChaCha20Poly1305(key).decrypt(nonce, body, _ad(sender, receiver, round_id))
    except InvalidTag:
        raise SecAggError(
            f"ciphertext from client {sender} to {receiver} in round {round_id} fails "
            "authentication (tampered, replayed or misattributed)"
        ) from None


def sign(identity: Ed25519PrivateKey, *parts: int | bytes | str) -> bytes:
    """An Ed25519 signature over :func:`fields` of ``parts``."""
    return identity.sign(fields(_DOMAIN, *parts))


def verify(
    identity: Ed25519PublicKey, signature: bytes, *parts: int | bytes | str, who: str = "message"
) -> None:
    """Check :func:`sign`'s signature; a bad one raises :class:`SecAggError` naming ``who``."""
    try:
        identity.verify(signature, fields(_DOMAIN, *parts))
    except InvalidSignature:
        raise SecAggError(f"bad Ed25519 signature on {who}") from None


def id_set(ids: Iterable[int]) -> bytes:
    """A canonical encoding of a set of client ids (sorted), to sign."""
    return fields(*sorted(ids))
