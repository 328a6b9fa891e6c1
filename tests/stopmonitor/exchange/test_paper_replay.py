"""The shared exchange contract against the paper and replay adapters, plus their own behaviour."""

from __future__ import annotations

from datetime import datetime, timezone
from decimal import Decimal as D

import pytest

from stopmonitor.exchange.base import (
    CancelReplaceCancelFailed,
    CancelReplaceUnknown,
    OrderOutcomeUnknown,
    OrderRejected,
    OrderRequest,
    StopOrderRequest,
)
from stopmonitor.exchange.paper import PaperExchange, Scripted
from stopmonitor.exchange.replay import ReplayExchange

from .contract import ExchangeContract, ProtectionContract

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)


class PaperHooks:
    def script_partial_expiry(self, exchange, fill_qty, reason):
        exchange.push(Scripted("expire", fill_qty=fill_qty, expiry_reason=reason))

    def script_free_balance(self, exchange, asset, amount):
        exchange.track_balances = True
        exchange.balances[asset] = amount


class TestPaperContract(PaperHooks, ExchangeContract):
    @pytest.fixture
    def exchange(self):
        paper = PaperExchange(now=NOW)
        paper.set_quote("BTCUSDT", "60741.67", "60741.68", bid_qty="0.3658", ask_qty="0.45178")
        return paper


class TestReplayContract(PaperHooks, ExchangeContract):
    known_symbols = ("BTCUSDT", "ADAUSDT")

    @pytest.fixture
    def exchange(self):
        return ReplayExchange()


def test_paper_sell_walks_the_book_with_slippage_per_level():
    paper = PaperExchange(now=NOW, slippage_bps=D("1"))
    paper.set_quote("BTCUSDT", "60000.00", "60000.01", bid_qty="0.2")
    result = paper.place_market_order(OrderRequest("BTCUSDT", "SELL", D("0.5"), "t1"))
    assert [(f.price, f.qty) for f in result.fills] == [
        (D("60000.00"), D("0.2")), (D("59994.00"), D("0.2")), (D("59988.00"), D("0.1"))]
    assert result.avg_price == D("59995.2")
    assert (result.status, result.executed_qty, result.commission_asset) == ("FILLED", D("0.5"), "USDT")


def test_paper_scripted_fates():
    paper = PaperExchange(now=NOW)
    paper.set_quote("BTCUSDT", "100", "100.01")
    paper.push(Scripted("reject", code=-2010))
    with pytest.raises(OrderRejected) as err:
        paper.place_market_order(OrderRequest("BTCUSDT", "SELL", D("1"), "a"))
    assert err.value.code == -2010 and paper.get_order("BTCUSDT", "a") is None
    paper.push(Scripted("timeout_after"))
    with pytest.raises(OrderOutcomeUnknown):
        paper.place_market_order(OrderRequest("BTCUSDT", "SELL", D("1"), "b"))
    assert paper.get_order("BTCUSDT", "b").status == "FILLED"
    paper.push(Scripted("expire", fill_qty=D("0.4")))
    expired = paper.place_market_order(OrderRequest("BTCUSDT", "SELL", D("1"), "c"))
    assert (expired.status, expired.executed_qty) == ("EXPIRED", D("0.4"))


def test_replay_plays_the_recorded_candles_in_path_order():
    replay = ReplayExchange()
    # first BTCUSDT candle 2018-04-28 01:52: O 9094.18 H 9098 L 9090 C 9097.12 (bullish: O→L→H→C)
    seen = []
    for _ in range(4):
        q = replay.book_tickers(["BTCUSDT"])["BTCUSDT"]
        seen.append((q.bid, q.ask))
        replay.advance()
    assert seen == [(D("9094.18"), D("9094.19")), (D("9090"), D("9090.01")), (D("9098"), D("9098.01")),
                    (D("9097.12"), D("9097.13"))]
    assert replay.filters["ADAUSDT"].tick_size == D("0.00001")


class _PaperProtection(ProtectionContract):
    def cross(self, exchange, price):
        exchange.set_last_price(self.symbol, price)  # triggers
        exchange.set_last_price(self.symbol, price)  # fills at the next observation


class TestPaperProtectionContract(_PaperProtection):
    @pytest.fixture
    def exchange(self):
        paper = PaperExchange(now=NOW, balances={"BTC": D("1"), "USDT": D("0")})
        paper.set_quote("BTCUSDT", "60000", "60000.01")
        return paper


class TestReplayProtectionContract(_PaperProtection):
    @pytest.fixture
    def exchange(self):
        replay = ReplayExchange(balances={"BTC": D("1"), "USDT": D("0")})
        replay.set_quote("BTCUSDT", "60000", "60000.01")
        return replay


def test_paper_stop_triggers_on_one_price_and_fills_at_the_next():
    paper = PaperExchange(now=NOW, balances={"BTC": D("1"), "USDT": D("0")})
    paper.set_quote("BTCUSDT", "100", "100.01")
    paper.place_stop_order(StopOrderRequest("BTCUSDT", "SELL", D("1"), D("95"), "sp1-1"))

    paper.set_quote("BTCUSDT", "94", "94.01")
    assert paper.get_order("BTCUSDT", "sp1-1").status == "NEW"  # triggered, filling: not cancellable
    with pytest.raises(CancelReplaceCancelFailed):
        paper.cancel_replace("BTCUSDT", "sp1-1", OrderRequest("BTCUSDT", "SELL", D("1"), "sm1-S1-x"))
    paper.set_quote("BTCUSDT", "93", "93.01")

    fired = paper.get_order("BTCUSDT", "sp1-1")
    assert (fired.status, fired.executed_qty, fired.avg_price) == ("FILLED", D("1"), D("93"))
    assert paper.balances == {"BTC": D("0"), "USDT": D("93")} and paper.locked == {"BTC": D("0")}


def test_paper_scripted_unknown_cancel_replace():
    paper = PaperExchange(now=NOW, balances={"BTC": D("1"), "USDT": D("0")})
    paper.set_quote("BTCUSDT", "100", "100.01")
    paper.place_stop_order(StopOrderRequest("BTCUSDT", "SELL", D("1"), D("95"), "sp1-1"))
    paper.push(Scripted("timeout_after"), call="cancel_replace")

    with pytest.raises(CancelReplaceUnknown) as info:
        paper.cancel_replace("BTCUSDT", "sp1-1", OrderRequest("BTCUSDT", "SELL", D("1"), "sm1-S1-x"))

    assert (info.value.cancel_client_order_id, info.value.new_client_order_id) == ("sp1-1", "sm1-S1-x")
    assert paper.get_order("BTCUSDT", "sp1-1").status == "CANCELED"
    assert paper.get_order("BTCUSDT", "sm1-S1-x").status == "FILLED"
