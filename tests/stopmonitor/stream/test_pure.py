"""Stream mode's pure parts: the pre-check index, the watchdog, pushed fills, WebSocket API signing."""

from __future__ import annotations

import base64
from dataclasses import dataclass
from decimal import Decimal as D

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import BestAvailableEncryption, Encoding, NoEncryption, PrivateFormat
from hypothesis import given, strategies as st

from stopmonitor.rules import evaluate_trigger
from stopmonitor.stream.book import WatchedBook
from stopmonitor.stream.fills import Reports
from stopmonitor.stream.signing import Signer, signature_payload
from stopmonitor.stream.watchdog import Watchdog


@dataclass(frozen=True)
class W:
    operation_id: int
    symbol: str
    side: str
    stop_price: D | None
    target_price: D | None


# ----------------------------------------------------------------------------- book

def test_the_precheck_lets_through_exactly_the_quotes_that_cross_one_operation():
    book = WatchedBook([W(1, "BTCUSDT", "BUY", D("60000"), D("70000")), W(2, "BTCUSDT", "BUY", D("59000"), None),
                        W(3, "BTCUSDT", "SELL", D("65000"), D("50000"))])
    levels = book.by_symbol["BTCUSDT"]
    assert (levels.long_stop, levels.long_target, levels.short_stop, levels.short_target) == (
        D("60000"), D("70000"), D("65000"), D("50000"))
    assert levels.may_trigger(D("60000"), D("60001"))  # inclusive: the long stop at 60000
    assert not levels.may_trigger(D("60000.01"), D("60001"))
    assert levels.may_trigger(D("64000"), D("65000"))  # short stop on the ask
    assert levels.may_trigger(D("70000"), D("70001"))  # long target on the bid


levels_st = st.one_of(st.none(), st.decimals(min_value=1, max_value=200, places=2))


@given(ops=st.lists(st.tuples(st.sampled_from(["BUY", "SELL"]), levels_st, levels_st), min_size=1, max_size=8),
       bid=st.decimals(min_value=1, max_value=200, places=2), spread=st.decimals(min_value=0, max_value=5, places=2))
def test_precheck_never_hides_a_crossing(ops, bid, spread):
    """The O(1) pre-check is exact: it passes a quote iff the trigger rule crosses some operation."""
    ask = bid + spread
    watched = [W(i, "X", side, stop, target) for i, (side, stop, target) in enumerate(ops)]
    any_crossed = any(evaluate_trigger(w.side, w.stop_price, w.target_price, bid, ask) for w in watched)
    assert WatchedBook(watched).by_symbol["X"].may_trigger(bid, ask) == any_crossed


def test_replace_reports_added_and_removed_symbols_and_drop_forgets_closed_operations():
    book = WatchedBook([W(1, "A", "BUY", D("1"), None), W(2, "B", "BUY", D("1"), None)])
    assert book.replace([W(2, "B", "BUY", D("1"), None), W(3, "C", "SELL", D("5"), None)]) == ({"C"}, {"A"})
    book.drop({3})
    assert book.symbols == {"B"} and len(book) == 1


def test_update_reloads_only_the_given_symbols():
    book = WatchedBook([W(1, "A", "BUY", D("1"), None), W(2, "B", "BUY", D("1"), None)])
    # B moved its stop, C is new, A is gone; a symbol not named keeps its operations
    assert book.update({"A", "B", "C"}, [W(2, "B", "BUY", D("2"), None), W(3, "C", "SELL", D("5"), None)]) == (
        {"C"}, {"A"})
    assert book.by_symbol["B"].long_stop == D("2") and book.symbols == {"B", "C"}
    assert book.update({"C"}, []) == (set(), {"C"})
    assert book.symbols == {"B"} and book.by_symbol["B"].long_stop == D("2")


# ----------------------------------------------------------------------------- watchdog

def test_a_silent_symbol_falls_back_and_returns_only_after_the_hold_down():
    dog = Watchdog(silence_seconds=10, hold_down_seconds=30)
    dog.watch({"BTCUSDT", "ETHUSDT"}, now=0)
    dog.heard("BTCUSDT", 5)
    dog.heard("ETHUSDT", 5)
    assert dog.check(14) == (set(), set())
    dog.heard("BTCUSDT", 14)
    assert dog.check(15.5) == ({"ETHUSDT"}, {"ETHUSDT"})  # silent since 5 s: 10.5 s > 10 s
    assert dog.check(16) == (set(), {"ETHUSDT"})  # reported once
    for t in range(20, 50, 5):  # ETHUSDT back at 20, steady every 5 s
        dog.heard("ETHUSDT", t)
        dog.heard("BTCUSDT", t)
    assert dog.in_fallback == {"ETHUSDT"}  # 45 - 20 = 25 s < 30 s hold-down
    dog.heard("ETHUSDT", 50)
    assert dog.in_fallback == set()


def test_silence_during_the_hold_down_restarts_it():
    dog = Watchdog(silence_seconds=10, hold_down_seconds=30)
    dog.watch({"X"}, now=0)
    dog.force_fallback({"X"})
    dog.heard("X", 1)
    dog.heard("X", 25)  # 24 s gap > silence: hold-down starts again at 25
    dog.heard("X", 34)
    dog.heard("X", 43)
    assert dog.in_fallback == {"X"}
    dog.heard("X", 52)
    dog.heard("X", 55)
    assert dog.in_fallback == set()


# ----------------------------------------------------------------------------- pushed fills

def report(x, X, exec_id, *, l="0", z="0", L="0", Z="0", t=-1, n="0", N=None, c="sm7-S1-abcdef01"):
    return {"e": "executionReport", "E": 1700000000000 + exec_id, "s": "BTCUSDT", "c": c, "S": "SELL", "o": "MARKET",
            "q": "0.30000000", "x": x, "X": X, "i": 4242, "l": l, "z": z, "L": L, "Z": Z, "t": t, "n": n, "N": N,
            "I": exec_id, "T": 1700000000000, "C": ""}


TWO_TRADES = [
    report("NEW", "NEW", 1),
    report("TRADE", "PARTIALLY_FILLED", 2, l="0.10000000", z="0.10000000", L="60000.00", Z="6000.00", t=11,
           n="6.0", N="USDT"),
    report("TRADE", "FILLED", 3, l="0.20000000", z="0.30000000", L="59990.00", Z="17998.00", t=12, n="11.998",
           N="USDT"),
]


@pytest.mark.parametrize("order", [[0, 1, 2], [2, 1, 0], [0, 2, 1], [2, 0, 1]])
def test_reports_in_any_order_and_twice_give_one_result_from_the_trades(order):
    reports = Reports()
    seen = []
    for i in order + order:  # every report delivered twice (a reconnect replays)
        tracker, new = reports.add(TWO_TRADES[i])
        seen.append(new)
    assert seen == [True] * 3 + [False] * 3
    assert tracker.complete and tracker.status == "FILLED"
    result = tracker.result()
    assert (result.executed_qty, result.cummulative_quote_qty, result.exchange_order_id) == (D("0.3"), D("17998.00"), 4242)
    assert [(f.price, f.qty, f.commission, f.commission_asset) for f in result.fills] == [
        (D("60000.00"), D("0.1"), D("6.0"), "USDT"), (D("59990.00"), D("0.2"), D("11.998"), "USDT")]
    assert result.avg_price == (D("6000.00") + D("11998.00")) / D("0.3")


def test_a_final_report_missing_a_trade_or_with_nothing_filled_is_not_proof():
    reports = Reports()
    tracker, _ = reports.add(TWO_TRADES[2])  # FILLED arrives, the first trade has not
    assert tracker.final and not tracker.complete and tracker.needs_rest
    with pytest.raises(ValueError):
        tracker.result()
    expired, _ = reports.add(report("EXPIRED", "EXPIRED", 9, c="sm8-S1-00000000"))
    assert expired.final and expired.needs_rest  # "0 filled" is checked against trades by REST


# ----------------------------------------------------------------------------- signing

def test_ed25519_signature_verifies_over_the_sorted_payload_and_secrets_stay_out_of_repr():
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, BestAvailableEncryption(b"pass-phrase")).decode()
    signer = Signer("my-api-key", private_key_pem=pem, passphrase="pass-phrase")
    params = signer.sign({"timestamp": 1747385641636})
    assert signature_payload(params) == "apiKey=my-api-key&timestamp=1747385641636"
    key.public_key().verify(base64.b64decode(params["signature"]), signature_payload(params).encode())
    assert repr(signer) == "Signer(kind='ed25519')" and "PRIVATE" not in repr(signer)


def test_hmac_signature_and_bad_keys_are_clear_errors():
    assert Signer("k", secret="s").sign({"timestamp": 1})["signature"] == (
        __import__("hmac").new(b"s", b"apiKey=k&timestamp=1", "sha256").hexdigest())
    with pytest.raises(ValueError, match="not a readable PEM private key"):
        Signer("k", private_key_pem="-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----\n")
    pem = Ed25519PrivateKey.generate().private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()).decode()
    with pytest.raises(ValueError, match="set BINANCE_PRIVATE_KEY"):
        Signer("k")
    assert Signer("k", private_key_pem=pem).kind == "ed25519"


# ----------------------------------------------------------------------------- liveness probe

def test_the_probe_passes_on_recent_progress_and_fails_on_none_or_old(tmp_path):
    import os
    import subprocess
    import sys
    import time

    path = tmp_path / "progress"

    def probe(max_age="60"):
        return subprocess.run([sys.executable, "-m", "stopmonitor.stream.probe", str(path), max_age],
                              capture_output=True, text=True, timeout=20)

    missing = probe()
    assert (missing.returncode, missing.stderr.strip()) == (1, f"no progress yet: {path} does not exist")
    path.write_text("1\n")
    assert probe().returncode == 0
    os.utime(path, (time.time() - 120, time.time() - 120))
    old = probe()
    assert old.returncode == 1 and old.stderr.startswith("no progress for 12") and "(max 60s)" in old.stderr


@given(deliveries=st.lists(st.sampled_from([0, 1, 2]), min_size=3, max_size=12).filter(lambda d: set(d) == {0, 1, 2}))
def test_any_interleaving_with_duplicates_folds_to_the_same_order(deliveries):
    """Whatever the order and however often each report arrives, the tracker ends FILLED with the
    same two trades, and counts each execution id once."""
    reports = Reports()
    news = [reports.add(TWO_TRADES[i])[1] for i in deliveries]
    tracker = reports.orders["sm7-S1-abcdef01"]
    assert sum(news) == 3
    assert tracker.complete and tracker.result().fills == reference_fills()


def reference_fills():
    reports = Reports()
    for r in TWO_TRADES:
        reports.add(r)
    return reports.orders["sm7-S1-abcdef01"].result().fills
