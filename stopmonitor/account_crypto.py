"""Exchange-account secrets at rest: Fernet encryption with rotation (``cryptography``'s MultiFernet).

Keys come from ``settings.ACCOUNT_ENCRYPTION_KEYS`` (environment ``ACCOUNT_ENCRYPTION_KEYS``:
comma-separated urlsafe-base64 32-byte Fernet keys, as ``Fernet.generate_key()`` prints). The first
key encrypts; every key decrypts, so a new key is put first, ``rotate_account_keys`` re-encrypts
every stored secret with it, and then the old key can be dropped. In development only, with no
key configured, one key is derived from ``SECRET_KEY`` (SHA-256) so a laptop needs no setup;
staging and production refuse to encrypt or decrypt without a configured key.

Plaintext secrets are returned only to the exchange factory; nothing here logs them.
"""

from __future__ import annotations

import base64
import hashlib

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings


class AccountCryptoError(Exception):
    """No usable key, or a stored secret none of the keys decrypts. The message names no secret."""


def _keys() -> list[bytes]:
    raw = getattr(settings, "ACCOUNT_ENCRYPTION_KEYS", "") or ""
    keys = [k.strip().encode() for k in raw.split(",") if k.strip()]
    if keys:
        return keys
    if getattr(settings, "ENVIRONMENT", "development") == "development":
        return [base64.urlsafe_b64encode(hashlib.sha256(("account-secrets:" + settings.SECRET_KEY).encode()).digest())]
    raise AccountCryptoError("ACCOUNT_ENCRYPTION_KEYS is not set: account secrets cannot be encrypted or read")


def box() -> MultiFernet:
    """The MultiFernet of the configured keys (first encrypts). Raises :class:`AccountCryptoError`."""
    try:
        return MultiFernet([Fernet(k) for k in _keys()])
    except (ValueError, TypeError) as exc:  # a malformed key: say which position, not its value
        raise AccountCryptoError("ACCOUNT_ENCRYPTION_KEYS holds a key that is not a urlsafe-base64 32-byte Fernet key") from exc


def encrypt(plaintext: str) -> str:
    """The Fernet token (text) of ``plaintext`` under the first key."""
    return box().encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    """The plaintext of a stored token. Raises :class:`AccountCryptoError` when no key decrypts it."""
    from config.secrets import register_secret

    try:
        plaintext = box().decrypt(token.encode()).decode()
    except InvalidToken as exc:
        raise AccountCryptoError("no configured ACCOUNT_ENCRYPTION_KEYS key decrypts this secret") from exc
    register_secret(plaintext)  # from now on masked in this process's logs and error pages
    return plaintext


def rotate(token: str) -> str:
    """``token`` re-encrypted under the first key (MultiFernet.rotate). Raises :class:`AccountCryptoError`."""
    try:
        return box().rotate(token.encode()).decode()
    except InvalidToken as exc:
        raise AccountCryptoError("no configured ACCOUNT_ENCRYPTION_KEYS key decrypts this secret") from exc
