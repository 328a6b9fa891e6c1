"""Signing of WebSocket API requests (Binance "WebSocket API", "SIGNED request security").

The payload is every parameter but ``signature``, sorted by name, as ``name=value`` joined by
``&``, UTF-8, not percent-encoded. Ed25519 keys (recommended by Binance, required for
``session.logon``) sign it and send the signature base64-encoded; HMAC keys send the hex
HMAC-SHA256 of the same payload. Secrets never appear in a repr or a log line.
"""

from __future__ import annotations

import base64
import hashlib
import hmac


def signature_payload(params: dict) -> str:
    """``k=v&…`` of ``params`` (without ``signature``) sorted by name."""
    return "&".join(f"{k}={v}" for k, v in sorted(params.items()) if k != "signature")


class Signer:
    """Signs WebSocket API parameters with an Ed25519 private key (PEM) or an HMAC secret."""

    def __init__(self, api_key: str, *, private_key_pem: str | None = None, passphrase: str | None = None,
                 secret: str | None = None) -> None:
        if not api_key:
            raise ValueError("an API key is needed to subscribe to the user data stream")
        self.api_key = api_key
        self._secret = secret
        self._private_key = None
        if private_key_pem:
            from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
            from cryptography.hazmat.primitives.serialization import load_pem_private_key

            try:
                key = load_pem_private_key(private_key_pem.encode(), password=passphrase.encode() if passphrase else None)
            except (ValueError, TypeError) as exc:
                raise ValueError(f"BINANCE_PRIVATE_KEY is not a readable PEM private key: {type(exc).__name__}") from None
            if not isinstance(key, Ed25519PrivateKey):
                raise ValueError("BINANCE_PRIVATE_KEY is not an Ed25519 key")
            self._private_key = key
        elif not secret:
            raise ValueError("set BINANCE_PRIVATE_KEY(_FILE) (Ed25519) or BINANCE_API_SECRET (HMAC)")

    @property
    def kind(self) -> str:
        return "ed25519" if self._private_key is not None else "hmac"

    def sign(self, params: dict) -> dict:
        """``params`` with ``apiKey`` added and ``signature`` computed over all of them."""
        params = {**params, "apiKey": self.api_key}
        payload = signature_payload(params).encode()
        if self._private_key is not None:
            signature = base64.b64encode(self._private_key.sign(payload)).decode("ascii")
        else:
            signature = hmac.new(self._secret.encode(), payload, hashlib.sha256).hexdigest()
        return {**params, "signature": signature}

    def __repr__(self) -> str:
        return f"Signer(kind={self.kind!r})"
