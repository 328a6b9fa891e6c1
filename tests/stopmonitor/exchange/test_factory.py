"""The lazy Binance adapter forwards the whole port, read from the protocol (issue 11's leftover)."""

from __future__ import annotations

import pytest

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


@pytest.mark.parametrize("api_key, secret", [("", "s"), ("k", ""), (None, "s"), ("k", None)])
def test_an_account_without_its_own_key_never_falls_back_to_the_deployments(api_key, secret):
    """A LazyBinance without a key signs with the environment's keys (the default account): an
    account row with an empty key would have traded on the deployment's balance (review)."""
    from stopmonitor.exchange.factory import build_account_exchange

    with pytest.raises(ValueError, match="needs its own API key and secret"):
        build_account_exchange("binance-testnet", api_key, secret)
