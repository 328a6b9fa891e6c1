"""``python manage.py sync_symbols [SYMBOL …] [--venue V]``: refresh the symbols table from exchangeInfo.

Reads the filters through the exchange port (``exchange.symbol_filters``; Binance answers
``GET /api/v3/exchangeInfo?symbols=[…]``) for the symbols named, or for every symbol already in
the table when none is named. Creates or updates each row (base/quote asset, tickSize,
stepSize, minQty, minNotional; active when the status is TRADING). A symbol already in the table
that the exchange does not list is marked inactive; a named symbol it does not list is
reported and not created. Prints one line per symbol and a summary line.

Binance refuses the whole request when one symbol is unknown (-1121); the command then asks
symbol by symbol. Exit status: 0 when the sync ran; 1 when the exchange could not be read (nothing changed).
"""

from __future__ import annotations

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
        from api.models import Symbol
        from stopmonitor.exchange.base import ExchangeError
        from stopmonitor.exchange.factory import build_exchange

        wanted = sorted({s.strip().upper() for s in opts["symbols"] if s.strip()})
        if not wanted:
            wanted = list(Symbol.objects.order_by("symbol").values_list("symbol", flat=True))
        if not wanted:
            raise CommandError("no symbols to sync: name some (e.g. sync_symbols BTCUSDT ETHUSDT)")
        try:
            exchange = build_exchange(opts["venue"])
        except (ValueError, ImportError) as exc:
            raise CommandError(f"cannot build the exchange: {exc}") from None
        try:
            filters = self._read_filters(exchange, wanted)
        except ExchangeError as exc:
            raise CommandError(f"exchangeInfo unavailable for {len(wanted)} symbols: {exc}") from None

        created = updated = deactivated = missing = 0
        with transaction.atomic():
            existing = {s.symbol: s for s in Symbol.objects.select_for_update(no_key=True).filter(symbol__in=wanted)}
            for name in wanted:
                f = filters.get(name)
                row = existing.get(name)
                if f is None:
                    if row is not None and row.is_active:
                        row.is_active = False
                        row.save(update_fields=["is_active", "updated_at"])
                        deactivated += 1
                        self.stdout.write(f"{name}: not listed by {exchange.venue}; marked inactive")
                    elif row is None:
                        missing += 1
                        self.stdout.write(f"{name}: not listed by {exchange.venue}; not created")
                    continue
                values = {
                    "base_asset": f.base_asset,
                    "quote_asset": f.quote_asset,
                    "tick_size": f.tick_size,
                    "step_size": f.step_size,
                    "min_qty": f.min_qty,
                    "min_notional": f.min_notional,
                    "market_max_qty": f.market_max_qty,
                    "is_active": f.status == "TRADING",
                }
                if row is None:
                    Symbol.objects.create(symbol=name, **values)
                    created += 1
                    self.stdout.write(f"{name}: created ({f.status})")
                elif any(getattr(row, k) != v for k, v in values.items()):
                    for k, v in values.items():
                        setattr(row, k, v)
                    row.save()
                    updated += 1
                    self.stdout.write(f"{name}: updated ({f.status})")
                else:
                    self.stdout.write(f"{name}: unchanged")
        self.stdout.write(
            f"synced {len(wanted)} symbols from {exchange.venue}: {created} created, {updated} updated, "
            f"{deactivated} deactivated, {missing} not listed"
        )

    @staticmethod
    def _read_filters(exchange, wanted: list[str]) -> dict:
        """One request for all; when Binance refuses it for an unknown symbol (-1121), one
        request per symbol so the listed ones still sync. Raises ExchangeError otherwise."""
        from stopmonitor.exchange.base import ExchangeError

        try:
            return exchange.symbol_filters(wanted)
        except ExchangeError as exc:
            if exc.code != -1121 or len(wanted) == 1:
                if exc.code == -1121:
                    return {}
                raise
        filters = {}
        for name in wanted:
            try:
                filters.update(exchange.symbol_filters([name]))
            except ExchangeError as exc:
                if exc.code != -1121:
                    raise
        return filters
