"""One exchange client per exchange account, built from the port and cached for one run (issue #20).

Market data (best bid/ask, exchangeInfo) stays on the default client: one bulk quote request per
pass for every account's symbols (invariant 9). Balances, orders and order queries go through the
client of the operation's account, so operations sharing an account share its balance whatever
their tenant, and operations on different accounts never spend each other's coins (invariant 5).
The ban horizon of 418/429 is the venue's (stored per venue, shared by every client: Binance
counts request weight per IP); a refusal that is the account's (a revoked key, ``-1015`` orders per
account) stays with that account's client.
"""

from __future__ import annotations

import logging
from typing import Callable

from stopmonitor.engine import store

log = logging.getLogger("stopmonitor.engine")


class AccountUnavailable(Exception):
    """The account's client cannot be built (no such account, secret not decryptable, venue mismatch).
    The message names the account id and label, never a key or secret."""


def _build_client(account_id: int, default_venue: str):
    from stopmonitor import account_crypto, metrics
    from stopmonitor.exchange.factory import build_account_exchange

    try:
        creds = store.account_credentials(account_id)
    except account_crypto.AccountCryptoError as exc:
        raise AccountUnavailable(f"account {account_id}: {exc}") from exc
    except Exception as exc:  # DoesNotExist (store keeps the model private to it)
        raise AccountUnavailable(f"account {account_id} does not exist") from exc
    if creds.venue != default_venue:
        raise AccountUnavailable(f"account {account_id} ({creds.label}) is on {creds.venue}, this deployment on "
                                 f"{default_venue}")
    try:
        client = build_account_exchange(creds.venue, creds.api_key, creds.secret, creds.key_type)
    except ValueError as exc:
        raise AccountUnavailable(f"account {account_id} ({creds.label}): {exc}") from exc
    return metrics.instrument(client)


class AccountClients:
    """The clients of one run: ``for_account(None)`` is the default client (the environment's keys);
    ``for_account(id)`` the account's own, built once per run and cached.

    On a venue without keys (paper, replay) every account uses the default client: nothing is signed.
    ``build(account_id, venue)`` is injectable for tests.
    """

    def __init__(self, default, build: Callable[[int, str], object] | None = None):
        self.default = default
        self._build = build or _build_client
        self._clients: dict[int, object] = {}

    def for_account(self, account_id: int | None):
        """The client for ``account_id``. Raises :class:`AccountUnavailable`."""
        if account_id is None or not self.default.venue.startswith("binance"):
            return self.default
        client = self._clients.get(account_id)
        if client is None:
            client = self._clients[account_id] = self._build(account_id, self.default.venue)
        return client

    def close(self) -> None:
        """Close the HTTP sessions of the account clients built in this run."""
        for client in self._clients.values():
            closer = getattr(client, "close", None)
            if callable(closer):
                try:
                    closer()
                except Exception:  # closing is best effort
                    log.debug("closing an account client failed", exc_info=True)
        self._clients.clear()


def clients_for(exchange) -> AccountClients:
    """``exchange`` as an :class:`AccountClients` (the default client of a new registry unless it is one)."""
    return exchange if isinstance(exchange, AccountClients) else AccountClients(exchange)
