"""The lazy Binance adapter forwards the whole port, read from the protocol (issue 11's leftover)."""

from __future__ import annotations

from stopmonitor.exchange.base import ProtectionPort, port_members
from stopmonitor.exchange.binance import BinanceExchange
from stopmonitor.exchange.factory import LazyBinance


def test_every_call_of_the_port_reaches_the_real_adapter_and_nothing_else_does():
    lazy = LazyBinance("binance-testnet")
    sentinel = object()

    class Real:  # stands for the built BinanceExchange: each name answers itself
        def __getattr__(self, name):
            return (name, sentinel)

    lazy._real = Real()
    forwarded = port_members(ProtectionPort) - {"venue", "clock"}
    assert forwarded == {"account_trades", "amend_quantity", "book_tickers", "cancel_order", "cancel_replace",
                         "free_balances", "get_order", "open_orders", "place_market_order", "place_oco",
                         "place_stop_order", "symbol_filters"}
    for name in forwarded | {"close", "state", "key_type"}:
        assert getattr(lazy, name) == (name, sentinel)
    assert lazy.venue == "binance-testnet" and lazy.clock().tzinfo is not None
    for name in ("advance", "set_quote", "_client"):  # a replay's or paper's own calls build nothing
        try:
            getattr(lazy, name)
        except AttributeError:
            pass
        else:
            raise AssertionError(f"{name} forwarded")
    assert forwarded <= {n for n in dir(BinanceExchange) if not n.startswith("_")}  # the adapter implements them
