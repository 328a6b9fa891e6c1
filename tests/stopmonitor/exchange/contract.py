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

from datetime import timedelta

from stopmonitor.exchange.base import (
    Exchange,
    OrderRejectedMaybeFilled,
    OrderRequest,
    OrderResult,
    Quote,
    StopOrderRequest,
    SymbolFilters,
    Trade,
)


class ExchangeContract:
    """Behaviour shared by all adapters of :class:`~stopmonitor.exchange.base.Exchange`."""

    #: symbols the adapter under test can quote
    known_symbols: tuple[str, ...] = ("BTCUSDT",)
    #: symbols the adapter under test has filters for
    filter_symbols: tuple[str, ...] = ("BTCUSDT", "ETHUSDT")
    #: a symbol no adapter knows (Binance: -1121 "Invalid symbol")
    unknown_symbol: str = "NOPEUSDT"
    #: the order the contract places (closing side, base-asset quantity)
    order_symbol: str = "BTCUSDT"
    order_side: str = "SELL"
    order_quantity: Decimal = Decimal("0.00123")

    @pytest.fixture
    def exchange(self) -> Exchange:
        raise NotImplementedError("override the `exchange` fixture in the adapter's test class")

    # hooks for the evidence contract: override to script the adapter (default: not supported)
    def script_partial_expiry(self, exchange, fill_qty: Decimal, reason: str) -> None:
        pytest.skip("this adapter cannot script an expiry")

    def script_free_balance(self, exchange, asset: str, amount: Decimal) -> None:
        pytest.skip("this adapter has no account balances")

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

    def test_book_tickers_with_an_unknown_symbol_answers_the_known_ones(self, exchange):
        """Binance refuses the whole list for one unknown symbol (-1121): the adapter still
        answers the others; the unknown one is absent, not an error."""
        quotes = exchange.book_tickers([*self.known_symbols, self.unknown_symbol])

        assert set(quotes) == set(self.known_symbols)
        assert all(isinstance(q, Quote) and q.symbol == s for s, q in quotes.items())

    def test_book_tickers_of_only_an_unknown_symbol_is_empty(self, exchange):
        assert exchange.book_tickers([self.unknown_symbol]) == {}

    def test_symbol_filters_with_an_unknown_symbol_answer_the_known_ones(self, exchange):
        filters = exchange.symbol_filters([*self.filter_symbols, self.unknown_symbol])

        assert set(filters) == set(self.filter_symbols)
        assert all(isinstance(f, SymbolFilters) and f.symbol == s for s, f in filters.items())

    def test_symbol_filters_take_any_iterable_of_symbols(self, exchange):
        # the paper adapter read its argument twice: a generator gave {}
        assert sorted(exchange.symbol_filters(s for s in self.filter_symbols)) == sorted(self.filter_symbols)

    def test_symbol_filters_of_only_an_unknown_symbol_are_empty(self, exchange):
        assert exchange.symbol_filters([self.unknown_symbol]) == {}

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

    # ------------------------------------------------------------------ evidence (issue #12)

    def test_account_trades_of_a_placed_order_are_its_fills(self, exchange):
        _, placed = self.place(exchange)

        trades = exchange.account_trades(self.order_symbol, order_id=placed.exchange_order_id)

        assert trades and all(isinstance(t, Trade) for t in trades)
        assert {t.order_id for t in trades} == {placed.exchange_order_id}
        assert sum((t.qty for t in trades), Decimal(0)) == placed.executed_qty
        for t in trades:
            assert isinstance(t.price, Decimal) and t.price > 0
            assert isinstance(t.commission, Decimal) and t.commission_asset
            assert t.time.utcoffset().total_seconds() == 0
            assert t.is_buyer is (self.order_side == "BUY")

    def test_account_trades_since_before_an_order_include_it(self, exchange):
        before = exchange.clock() - timedelta(seconds=5)
        _, placed = self.place(exchange)

        trades = exchange.account_trades(self.order_symbol, since=before)

        assert placed.exchange_order_id in {t.order_id for t in trades}
        assert [t.trade_id for t in trades] == sorted(t.trade_id for t in trades)

    def test_account_trades_of_an_order_that_never_was_are_empty(self, exchange):
        assert exchange.account_trades(self.order_symbol, order_id=1) == []

    def test_free_balances_are_decimals_or_none(self, exchange):
        balances = exchange.free_balances()

        assert balances is None or all(isinstance(v, Decimal) for v in balances.values())

    def test_an_expired_partial_fill_says_why_it_expired(self, exchange):
        self.script_partial_expiry(exchange, Decimal("0.001"), "EXECUTION_RULE_PRICE_RANGE_EXCEEDED")

        _, result = self.place(exchange)

        assert (result.status, result.executed_qty) == ("EXPIRED", Decimal("0.001"))
        assert result.expiry_reason == "EXECUTION_RULE_PRICE_RANGE_EXCEEDED"
        trades = exchange.account_trades(self.order_symbol, order_id=result.exchange_order_id)
        assert sum((t.qty for t in trades), Decimal(0)) == Decimal("0.001")

    def test_a_close_larger_than_the_free_balance_is_rejected_maybe_filled(self, exchange):
        self.script_free_balance(exchange, "BTC", self.order_quantity / 2)

        with pytest.raises(OrderRejectedMaybeFilled) as info:
            self.place(exchange)

        assert info.value.code == -2010 and info.value.maybe_filled is True

    def test_a_fill_moves_the_free_balance_by_its_quantity(self, exchange):
        self.script_free_balance(exchange, "BTC", Decimal("1"))

        _, placed = self.place(exchange)

        assert exchange.free_balances()["BTC"] == Decimal("1") - placed.executed_qty

class ProtectionContract:
    """The protection port (:class:`~stopmonitor.exchange.base.ProtectionPort`) on every adapter.

    The ``exchange`` fixture must give an account holding ``1`` BTC free (USDT 0) with the last
    BTCUSDT trade at :attr:`last` ; :meth:`cross` prints trades at a price until resting orders
    reached by it have filled (the paper model fills at the next observation, the fake at once).
    """

    symbol = "BTCUSDT"
    last = Decimal("60000")

    @pytest.fixture
    def exchange(self):
        raise NotImplementedError("override the `exchange` fixture in the adapter's test class")

    def cross(self, exchange, price: Decimal) -> None:
        raise NotImplementedError

    @staticmethod
    def free(exchange) -> Decimal:
        return exchange.free_balances()["BTC"]

    @staticmethod
    def cid(prefix: str = "sp") -> str:
        return f"{prefix}{uuid.uuid4().hex[:12]}-1"

    def stop(self, quantity="0.4", stop="57000", cid=None, side="SELL") -> StopOrderRequest:
        return StopOrderRequest(self.symbol, side, Decimal(quantity), Decimal(stop), cid or self.cid())

    def test_implements_the_protection_port(self, exchange):
        from stopmonitor.exchange.base import ProtectionPort

        assert isinstance(exchange, ProtectionPort)

    def test_a_resting_stop_is_new_open_and_locks_its_quantity(self, exchange):
        request = self.stop()
        placed = exchange.place_stop_order(request)

        assert (placed.status, placed.order_type, placed.stop_price, placed.requested_qty, placed.executed_qty) == (
            "NEW", "STOP_LOSS", Decimal("57000"), Decimal("0.4"), Decimal("0"))
        assert [o.client_order_id for o in exchange.open_orders(self.symbol)] == [request.client_order_id]
        assert [o.client_order_id for o in exchange.open_orders()] == [request.client_order_id]
        assert exchange.get_order(self.symbol, request.client_order_id).status == "NEW"
        assert self.free(exchange) == Decimal("0.6")

    def test_a_stop_already_through_the_last_price_is_refused(self, exchange):
        from stopmonitor.exchange.base import OrderRejected

        with pytest.raises(OrderRejected) as info:
            exchange.place_stop_order(self.stop(stop="60001"))
        assert info.value.code == -2010
        assert exchange.open_orders(self.symbol) == [] and self.free(exchange) == Decimal("1")

    def test_the_stop_fires_when_the_last_price_reaches_it(self, exchange):
        request = self.stop()
        exchange.place_stop_order(request)

        self.cross(exchange, Decimal("56990"))

        fired = exchange.get_order(self.symbol, request.client_order_id)
        assert (fired.status, fired.executed_qty) == ("FILLED", Decimal("0.4"))
        assert fired.avg_price is not None and fired.avg_price > 0
        assert exchange.open_orders(self.symbol) == []
        assert self.free(exchange) == Decimal("0.6")

    def test_cancel_replace_by_a_market_close_cancels_then_sells(self, exchange):
        request = self.stop()
        exchange.place_stop_order(request)
        close = OrderRequest(self.symbol, "SELL", Decimal("0.4"), self.cid("sm"))

        result = exchange.cancel_replace(self.symbol, request.client_order_id, close)

        assert (result.cancelled.client_order_id, result.cancelled.status) == (request.client_order_id, "CANCELED")
        assert (result.new.client_order_id, result.new.status, result.new.executed_qty) == (
            close.client_order_id, "FILLED", Decimal("0.4"))
        assert exchange.open_orders(self.symbol) == []
        assert self.free(exchange) == Decimal("0.6")

    def test_cancel_replace_after_the_stop_fired_fails_and_sends_nothing(self, exchange):
        from stopmonitor.exchange.base import CancelReplaceCancelFailed

        request = self.stop()
        exchange.place_stop_order(request)
        self.cross(exchange, Decimal("56990"))
        close = OrderRequest(self.symbol, "SELL", Decimal("0.4"), self.cid("sm"))

        with pytest.raises(CancelReplaceCancelFailed) as info:
            exchange.cancel_replace(self.symbol, request.client_order_id, close)

        assert info.value.cancel_code == -2011
        assert exchange.get_order(self.symbol, close.client_order_id) is None
        assert self.free(exchange) == Decimal("0.6")  # sold once, by the stop

    def test_cancel_replace_whose_new_order_fails_leaves_it_cancelled(self, exchange):
        from stopmonitor.exchange.base import CancelReplaceNewFailed

        request = self.stop()
        exchange.place_stop_order(request)
        too_much = OrderRequest(self.symbol, "SELL", Decimal("1.5"), self.cid("sm"))

        with pytest.raises(CancelReplaceNewFailed) as info:
            exchange.cancel_replace(self.symbol, request.client_order_id, too_much)

        assert info.value.new_code == -2010
        assert (info.value.cancelled.client_order_id, info.value.cancelled.status) == (request.client_order_id, "CANCELED")
        assert exchange.open_orders(self.symbol) == [] and self.free(exchange) == Decimal("1")

    def test_cancel_replace_moves_the_stop(self, exchange):
        first = self.stop()
        exchange.place_stop_order(first)
        moved = self.stop(stop="58000", cid=first.client_order_id[:-1] + "2")

        result = exchange.cancel_replace(self.symbol, first.client_order_id, moved)

        assert (result.cancelled.status, result.new.status, result.new.stop_price) == ("CANCELED", "NEW", Decimal("58000"))
        assert [o.client_order_id for o in exchange.open_orders(self.symbol)] == [moved.client_order_id]
        assert self.free(exchange) == Decimal("0.6")

    def test_amend_reduces_the_quantity_and_keeps_the_client_order_id(self, exchange):
        request = self.stop()
        exchange.place_stop_order(request)

        amended = exchange.amend_quantity(self.symbol, request.client_order_id, Decimal("0.25"))

        assert (amended.client_order_id, amended.requested_qty, amended.status) == (
            request.client_order_id, Decimal("0.25"), "NEW")
        assert [o.requested_qty for o in exchange.open_orders(self.symbol)] == [Decimal("0.25")]
        assert self.free(exchange) == Decimal("0.75")

    def test_cancel_unlocks_and_a_second_cancel_is_refused(self, exchange):
        from stopmonitor.exchange.base import OrderRejected

        request = self.stop()
        exchange.place_stop_order(request)

        cancelled = exchange.cancel_order(self.symbol, request.client_order_id)

        assert (cancelled.client_order_id, cancelled.status) == (request.client_order_id, "CANCELED")
        assert exchange.open_orders(self.symbol) == [] and self.free(exchange) == Decimal("1")
        with pytest.raises(OrderRejected) as info:
            exchange.cancel_order(self.symbol, request.client_order_id)
        assert info.value.code == -2011

    def test_an_oco_rests_two_legs_and_the_stop_leg_expires_the_other(self, exchange):
        from stopmonitor.exchange.base import OcoRequest

        stop_id = self.cid()
        request = OcoRequest(self.symbol, "SELL", Decimal("0.4"), Decimal("57000"), Decimal("65000"), stop_id,
                             stop_id + "t", stop_id + "l")
        placed = exchange.place_oco(request)

        assert {(o.order_type, o.client_order_id, o.status) for o in placed.orders} == {
            ("STOP_LOSS", stop_id, "NEW"), ("LIMIT_MAKER", stop_id + "t", "NEW")}
        assert placed.leg("STOP_LOSS").stop_price == Decimal("57000")
        assert placed.leg("LIMIT_MAKER").price == Decimal("65000")
        assert len(exchange.open_orders(self.symbol)) == 2
        assert self.free(exchange) == Decimal("0.6")

        self.cross(exchange, Decimal("56990"))

        assert exchange.get_order(self.symbol, stop_id).status == "FILLED"
        assert exchange.get_order(self.symbol, stop_id + "t").status == "EXPIRED"
        assert exchange.open_orders(self.symbol) == [] and self.free(exchange) == Decimal("0.6")
