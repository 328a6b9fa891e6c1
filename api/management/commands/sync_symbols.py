"""``python manage.py sync_symbols [SYMBOL …] [--venue V]``: refresh the symbols table from exchangeInfo.

Reads the filters through the exchange port (``exchange.symbol_filters``; Binance answers
``GET /api/v3/exchangeInfo?symbols=[…]``) for the symbols named, or for every symbol already in
the table when none is named. Creates or updates each row (base/quote asset, tickSize,
stepSize, minQty, minNotional; active when the status is TRADING). A symbol already in the table
that the exchange does not list is marked inactive; a named symbol it does not list is
reported and not created. Prints one line per symbol and a summary line.

A symbol the exchange does not know is simply absent from its answer (the Binance adapter asks
symbol by symbol when Binance refuses the list for it, -1121). Exit status: 0 when the sync ran; 1 when the exchange could not be read (nothing changed).
"""

from __future__ import annotations

from collections import Counter

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction

from stopmonitor.preflight import require_migrated


class Command(BaseCommand):
    help = "Refresh symbols and their filters (tickSize, stepSize, minQty, minNotional) from exchangeInfo."

    def add_arguments(self, parser):
        parser.add_argument("symbols", nargs="*", help="symbols to sync (default: every symbol in the table)")
        parser.add_argument("--venue", choices=["binance", "binance-testnet", "paper", "replay"],
                            help="override EXCHANGE_VENUE")

    def handle(self, *args, **opts):
        require_migrated()  # one line "run migrate" and exit 1, never a traceback (stopmonitor/preflight.py)
        from stopmonitor.exchange.base import ExchangeError

        wanted = self._wanted(opts["symbols"])
        exchange = self._exchange(opts["venue"])
        try:
            filters = exchange.symbol_filters(wanted)
        except ExchangeError as exc:
            raise CommandError(f"exchangeInfo unavailable for {len(wanted)} symbols: {exc}") from None
        with transaction.atomic():
            counts = self._sync(wanted, filters, exchange.venue)
        self.stdout.write(
            f"synced {len(wanted)} symbols from {exchange.venue}: {counts['created']} created, "
            f"{counts['updated']} updated, {counts['deactivated']} deactivated, {counts['missing']} not listed"
        )

    @staticmethod
    def _wanted(named: list[str]) -> list[str]:
        """The symbols named (upper-cased, sorted, once each), else every symbol in the table."""
        from api.models import Symbol

        wanted = sorted({s.strip().upper() for s in named if s.strip()})
        if not wanted:
            wanted = list(Symbol.objects.order_by("symbol").values_list("symbol", flat=True))
        if not wanted:
            raise CommandError("no symbols to sync: name some (e.g. sync_symbols BTCUSDT ETHUSDT)")
        return wanted

    @staticmethod
    def _exchange(venue: str | None):
        from stopmonitor.exchange.factory import build_exchange

        try:
            return build_exchange(venue)
        except (ValueError, ImportError) as exc:
            raise CommandError(f"cannot build the exchange: {exc}") from None

    def _sync(self, wanted: list[str], filters: dict, venue: str) -> Counter:
        """Each wanted symbol's row brought to its filters (under the rows' locks, in the
        caller's transaction), one line each; returns how many were created, updated,
        deactivated and missing (not listed and not in the table)."""
        from api.models import Symbol

        existing = {s.symbol: s for s in Symbol.objects.select_for_update(no_key=True).filter(symbol__in=wanted)}
        counts: Counter = Counter()
        for name in wanted:
            f = filters.get(name)
            if f is None:
                outcome = self._not_listed(name, existing.get(name), venue)
            else:
                outcome = self._listed(name, f, existing.get(name))
            counts[outcome] += 1
        return counts

    def _not_listed(self, name: str, row, venue: str) -> str | None:
        """A symbol the exchange does not list: an active row is marked inactive ("deactivated"),
        no row is "missing" (not created); an inactive row stays as it is (None, no line)."""
        if row is not None and row.is_active:
            row.is_active = False
            row.save(update_fields=["is_active", "updated_at"])
            self.stdout.write(f"{name}: not listed by {venue}; marked inactive")
            return "deactivated"
        if row is None:
            self.stdout.write(f"{name}: not listed by {venue}; not created")
            return "missing"
        return None

    def _listed(self, name: str, f, row) -> str:
        """A listed symbol's row created or updated to its filters (active when TRADING);
        returns "created", "updated" or "unchanged"."""
        from api.models import Symbol

        values = _row_values(f)
        if row is None:
            Symbol.objects.create(symbol=name, **values)
            self.stdout.write(f"{name}: created ({f.status})")
            return "created"
        if any(getattr(row, k) != v for k, v in values.items()):
            for k, v in values.items():
                setattr(row, k, v)
            row.save()
            self.stdout.write(f"{name}: updated ({f.status})")
            return "updated"
        self.stdout.write(f"{name}: unchanged")
        return "unchanged"


def _row_values(f) -> dict:
    """The symbols table's columns from one symbol's filters (:class:`~stopmonitor.exchange.base.SymbolFilters`)."""
    return {
        "base_asset": f.base_asset,
        "quote_asset": f.quote_asset,
        "tick_size": f.tick_size,
        "step_size": f.step_size,
        "min_qty": f.min_qty,
        "min_notional": f.min_notional,
        "market_max_qty": f.market_max_qty,
        "is_active": f.status == "TRADING",
    }
