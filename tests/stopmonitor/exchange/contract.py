"""The contract every exchange adapter (binance, paper, replay) must meet.

Subclass :class:`ExchangeContract` in a ``Test…`` class and override the ``exchange`` fixture
(and, if needed, the class attributes saying which symbols and order the adapter can serve)::

    class TestPaperContract(ExchangeContract):
        @pytest.fixture
        def exchange(self):
            return PaperExchange(...)

The base class's name does not start with ``Test``, so pytest collects it only through
subclasses.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest

from stopmonitor.exchange.base import Exchange, OrderRequest, OrderResult, Quote


class ExchangeContract:
    """Behaviour shared by all adapters of :class:`~stopmonitor.exchange.base.Exchange`."""

    #: symbols the adapter under test can quote
    known_symbols: tuple[str, ...] = ("BTCUSDT",)
    #: the order the contract places (closing side, base-asset quantity)
    order_symbol: str = "BTCUSDT"
    order_side: str = "SELL"
    order_quantity: Decimal = Decimal("0.00123")

    @pytest.fixture
    def exchange(self) -> Exchange:
        raise NotImplementedError("override the `exchange` fixture in the adapter's test class")

    @staticmethod
    def new_client_order_id() -> str:
        return f"contract-{uuid.uuid4().hex[:20]}"

    def place(self, exchange: Exchange, client_order_id: str | None = None) -> tuple[OrderRequest, OrderResult]:
        request = OrderRequest(
            symbol=self.order_symbol,
            side=self.order_side,
            quantity=self.order_quantity,
            client_order_id=client_order_id or self.new_client_order_id(),
        )
        return request, exchange.place_market_order(request)

    def test_implements_the_port(self, exchange):
        assert isinstance(exchange, Exchange)
        assert exchange.venue in ("binance", "binance-testnet", "paper", "replay")

    def test_book_tickers_gives_decimal_bid_not_above_ask(self, exchange):
        quotes = exchange.book_tickers(list(self.known_symbols))

        assert set(quotes) == set(self.known_symbols)
        for symbol, quote in quotes.items():
            assert isinstance(quote, Quote)
            assert quote.symbol == symbol
            for value in (quote.bid, quote.ask, quote.bid_qty, quote.ask_qty):
                assert isinstance(value, Decimal)
            assert Decimal(0) < quote.bid <= quote.ask
            assert quote.observed_at.tzinfo is not None and quote.observed_at.utcoffset().total_seconds() == 0

    def test_book_tickers_of_nothing_is_empty(self, exchange):
        assert exchange.book_tickers([]) == {}

    def test_place_market_order_answers_for_the_client_order_id(self, exchange):
        request, result = self.place(exchange)

        assert isinstance(result, OrderResult)
        assert result.client_order_id == request.client_order_id
        assert result.symbol == request.symbol
        assert result.side == request.side
        assert isinstance(result.executed_qty, Decimal)
        assert Decimal(0) <= result.executed_qty <= request.quantity
        if result.executed_qty > 0:
            assert result.avg_price is not None and result.avg_price > 0

    def test_get_order_finds_the_placed_order(self, exchange):
        request, placed = self.place(exchange)

        found = exchange.get_order(request.symbol, request.client_order_id)

        assert found is not None
        assert found.client_order_id == request.client_order_id
        assert found.exchange_order_id == placed.exchange_order_id
        assert found.executed_qty == placed.executed_qty
        assert found.status == placed.status

    def test_get_order_of_an_unknown_client_order_id_is_none(self, exchange):
        assert exchange.get_order(self.order_symbol, self.new_client_order_id()) is None
