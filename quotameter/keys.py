"""API keys: generated once, shown once, stored only as a salted hash.

A key reads ``qm_<key id>_<secret>``. The key id is public (it appears in
events and logs); the secret never leaves the client and the CLI output.
The secret carries 256 random bits, so a fast salted SHA-256 is the right
hash here: there is nothing for a slow password hash to protect.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from quotameter.errors import KeyFormatError

KEY_PREFIX = "qm"
_KEY_ID_BYTES = 6


@dataclass(frozen=True, slots=True)
class NewKey:
    key_id: str
    plaintext: str  # shown once, never stored
    salt_hex: str
    hash_hex: str


def _digest(salt: bytes, secret: str) -> str:
    return hashlib.sha256(salt + secret.encode()).hexdigest()


def generate_key() -> NewKey:
    key_id = secrets.token_hex(_KEY_ID_BYTES)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    return NewKey(key_id, f"{KEY_PREFIX}_{key_id}_{secret}", salt.hex(), _digest(salt, secret))


def split_key(presented: str) -> tuple[str, str]:
    """(key id, secret) of a presented key, or KeyFormatError."""
    prefix, _, rest = presented.partition("_")
    key_id, _, secret = rest.partition("_")
    if prefix != KEY_PREFIX or len(key_id) != 2 * _KEY_ID_BYTES or not secret:
        raise KeyFormatError("not a quotameter API key")
    return key_id, secret


def verify_secret(secret: str, salt_hex: str, hash_hex: str) -> bool:
    return hmac.compare_digest(_digest(bytes.fromhex(salt_hex), secret), hash_hex)
