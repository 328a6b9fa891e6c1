"""Exchange accounts' use cases (issue #20): set or replace credentials, check them, disable, rotate.

The one place that writes ``ExchangeAccount.secret_encrypted``: the API and the admin call these.
A secret goes in once and is never read back: it is encrypted here (:mod:`stopmonitor.account_crypto`)
and decrypted only by the engine's store when it builds the account's exchange client.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.db import transaction

from stopmonitor import account_crypto
from stopmonitor.exchange.base import ExchangeError, ExchangeUnavailable

log = logging.getLogger("stopmonitor.accounts")


class CredentialsRefused(Exception):
    """Binance refused the credentials on a signed read (``code``, Binance's reason in the message)."""

    def __init__(self, message: str, code: int | None):
        super().__init__(message)
        self.code = code


class CredentialsUncheckable(Exception):
    """The signed read could not be made (network, 5XX, rate limit): nothing was stored."""


def check_credentials(venue: str, api_key: str, secret: str, key_type: str) -> None:
    """One signed read (``GET /api/v3/account``) with the given credentials, on ``venue``.

    Skipped when the deployment does not trade on a Binance venue (paper, replay: nothing to ask).
    Raises :class:`CredentialsRefused` (a Binance code: -2015 invalid key/IP/permissions, -1022 bad
    signature, …) or :class:`CredentialsUncheckable`. Must be called outside any transaction.
    """
    if not settings.EXCHANGE_VENUE.startswith("binance"):
        return
    from stopmonitor.exchange.factory import build_account_exchange

    client = build_account_exchange(venue, api_key, secret, key_type)
    try:
        client.free_balances()
    except ExchangeUnavailable as exc:
        if exc.code is None:
            raise CredentialsUncheckable(str(exc)) from None
        raise CredentialsRefused(str(exc), exc.code) from None
    except ExchangeError as exc:
        raise CredentialsUncheckable(str(exc)) from None
    finally:
        try:
            client.close()
        except Exception:  # noqa: BLE001 - closing the session is best effort
            pass


def create_account(client, *, label: str, venue: str, key_type: str, api_key: str, secret: str, check: bool = True):
    """A new enabled account of tenant ``client`` with its secret encrypted. Checks the credentials
    first (``check``). Raises :class:`CredentialsRefused`, :class:`CredentialsUncheckable`,
    :class:`~stopmonitor.account_crypto.AccountCryptoError`."""
    from api.models import ExchangeAccount

    token = account_crypto.encrypt(secret)  # fails before any network call when no key is configured
    if check:
        check_credentials(venue, api_key, secret, key_type)
    account = ExchangeAccount.objects.create(client=client, label=label, venue=venue, key_type=key_type,
                                             api_key=api_key, secret_encrypted=token)
    log.info("exchange account created", extra={"account_id": account.pk, "tenant_id": client.pk,
                                                 "label": label, "venue": venue, "key_type": key_type})
    return account


def replace_secret(account, *, secret: str, api_key: str | None = None, key_type: str | None = None,
                   check: bool = True):
    """Replace the account's secret (and key id / key type when given), checked first. Same errors
    as :func:`create_account`."""
    api_key = api_key or account.api_key
    key_type = key_type or account.key_type
    token = account_crypto.encrypt(secret)
    if check:
        check_credentials(account.venue, api_key, secret, key_type)
    account.api_key, account.key_type, account.secret_encrypted = api_key, key_type, token
    account.save(update_fields=["api_key", "key_type", "secret_encrypted", "updated_at"])
    log.info("exchange account secret replaced", extra={"account_id": account.pk, "tenant_id": account.client_id})
    return account


def set_enabled(account, enabled: bool, reason: str = ""):
    """Enable or disable the account. A disabled account's operations are ``BLOCKED``
    ``ACCOUNT_DISABLED`` at their next trigger (once) and none of its orders is sent."""
    account.enabled, account.disabled_reason = enabled, "" if enabled else reason[:300]
    account.save(update_fields=["enabled", "disabled_reason", "updated_at"])
    log.info("exchange account %s", "enabled" if enabled else "disabled",
             extra={"account_id": account.pk, "tenant_id": account.client_id})
    return account


def rotate_all() -> tuple[int, list[int]]:
    """Re-encrypt every account's secret with the first ``ACCOUNT_ENCRYPTION_KEYS`` key, one row
    at a time under its row lock. Returns (rotated count, ids no configured key decrypts)."""
    from api.models import ExchangeAccount

    rotated, failed = 0, []
    for pk in ExchangeAccount.objects.order_by("pk").values_list("pk", flat=True):
        with transaction.atomic():
            row = ExchangeAccount.objects.select_for_update().get(pk=pk)
            try:
                row.secret_encrypted = account_crypto.rotate(row.secret_encrypted)
            except account_crypto.AccountCryptoError:
                failed.append(pk)
                continue
            row.save(update_fields=["secret_encrypted", "updated_at"])
            rotated += 1
    return rotated, failed


def undecryptable() -> list[tuple[int, str]]:
    """(id, label) of every account whose secret no configured key decrypts (``doctor``)."""
    from api.models import ExchangeAccount

    bad = []
    for pk, label, token in ExchangeAccount.objects.order_by("pk").values_list("pk", "label", "secret_encrypted"):
        try:
            account_crypto.decrypt(token)
        except account_crypto.AccountCryptoError:
            bad.append((pk, label))
    return bad
