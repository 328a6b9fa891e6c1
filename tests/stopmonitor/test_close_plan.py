"""plan_close without a database: the guardrail order (kill switch, breaker, rate limit, slippage,
quantity), the re-check under the lock, and the close it starts."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta, timezone
from decimal import Decimal as D

import pytest

from stopmonitor.close_plan import Close, CloseSnapshot, Hold, Skip, plan_close
from stopmonitor.exchange.base import Quote
from stopmonitor.guardrails import BreakerState
from stopmonitor.rules import MANUAL, STOP_LOSS, Trigger, execution_token

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=timezone.utc)
QUOTE = Quote("BTCUSDT", D("9150"), D("9150.01"), D("1"), D("1"), NOW)
TRIGGER = Trigger(STOP_LOSS, D("9200"), D("9150"))

# a long of 0.5 BTC with its stop at 9200, nothing holding it back
CLEAR = CloseSnapshot(
    operation_id=7, status="ACTIVE", side="BUY", stop_price=D("9200"), target_price=None, remaining=D("0.5"),
    kill_switch=False, kill_switch_reason="", kill_switch_at=None, breaker=BreakerState(), close_in_flight=False,
    triggers_last_minute=0, triggers_last_hour=0, max_per_minute=10, max_per_hour=100,
    max_slippage_pct=D("2"), slippage_action="block", step_size=D("0.00001"), min_qty=D("0.00001"),
    min_notional=D("5"), max_qty=None, free_base=D("1"), free_quote=D("100000"), attempt=1,
)
OPEN_BREAKER = BreakerState("OPEN", 3, NOW - timedelta(minutes=1), NOW + timedelta(minutes=4), "-2010: no")
KILL = dict(kill_switch=True, kill_switch_reason="incident 7", kill_switch_at=NOW)
RATE = dict(triggers_last_minute=10)
SLIP = dict(max_slippage_pct=D("0.1"))   # 9150 is 0.5435% under the 9200 stop
DUST = dict(free_base=D("0.000001"))


def reason(plan) -> str:
    return plan.block.reason if isinstance(plan, Hold) else type(plan).__name__


@pytest.mark.parametrize("changes, expected", [
    pytest.param({}, "Close", id="nothing-holds-it"),
    pytest.param({**KILL, "breaker": OPEN_BREAKER, **RATE, **SLIP, **DUST}, "KILL_SWITCH", id="kill-switch-first"),
    pytest.param({"breaker": OPEN_BREAKER, **RATE, **SLIP, **DUST}, "CIRCUIT_BREAKER", id="breaker-before-rate-limit"),
    pytest.param({"breaker": BreakerState("HALF_OPEN", 3), "close_in_flight": True, **RATE},
                 "CIRCUIT_BREAKER", id="half-open-trial-in-flight"),
    pytest.param({"breaker": BreakerState("HALF_OPEN", 3)}, "Close", id="half-open-no-trial-yet"),
    pytest.param({**RATE, **SLIP, **DUST}, "RATE_LIMITED", id="rate-limit-before-slippage"),
    pytest.param({"triggers_last_hour": 100}, "RATE_LIMITED", id="hourly-rate-limit"),
    pytest.param({**SLIP, **DUST}, "SLIPPAGE_BREACH", id="slippage-before-quantity"),
    pytest.param({**SLIP, "slippage_action": "warn"}, "Close", id="slippage-warn-closes-anyway"),
    pytest.param(DUST, "BELOW_MIN_QTY", id="quantity-last"),
    pytest.param({"free_base": D("0")}, "INSUFFICIENT_BALANCE", id="nothing-free"),
    pytest.param({"remaining": D("0.0005")}, "BELOW_MIN_NOTIONAL", id="under-min-notional"),
    pytest.param({"status": "CLOSING", **KILL}, "Skip", id="not-active-before-any-guard"),
    pytest.param({"stop_price": D("9100"), **KILL}, "Skip", id="level-moved-before-any-guard"),
])
def test_guardrail_order(changes, expected):
    assert reason(plan_close(replace(CLEAR, **changes), TRIGGER, QUOTE, NOW)) == expected


def test_a_clear_trigger_closes_the_free_quantity_with_the_deterministic_token():
    plan = plan_close(replace(CLEAR, free_base=D("0.3"), attempt=2), TRIGGER, QUOTE, NOW)
    assert plan == Close(TRIGGER, "SELL", D("9150"), D("0.3"), execution_token(7, STOP_LOSS, D("9200"), 2), 2,
                         BreakerState(), plan.slippage, shortfall=D("0.2"))  # 0.2 short: recorded for review
    assert plan.slippage.pct == D("0.5435") and plan.slippage.breach is False


def test_a_short_spends_the_quote_balance_at_the_ask():
    short = replace(CLEAR, side="SELL", stop_price=D("9100"), free_quote=D("915"))
    plan = plan_close(short, Trigger(STOP_LOSS, D("9100"), D("9150.01")), QUOTE, NOW)
    assert (plan.side, plan.observed, plan.quantity) == ("BUY", D("9150.01"), D("0.09999"))


def test_the_level_crossed_now_is_the_one_acted_on():
    moved = replace(CLEAR, stop_price=D("9180"))
    assert plan_close(moved, TRIGGER, QUOTE, NOW).trigger == Trigger(STOP_LOSS, D("9180"), D("9150"))


def test_a_breaker_past_its_cool_down_lets_one_trial_through_half_open():
    cooled = replace(CLEAR, breaker=replace(OPEN_BREAKER, retry_at=NOW - timedelta(seconds=1)))
    assert plan_close(cooled, TRIGGER, QUOTE, NOW).breaker.state == "HALF_OPEN"


def test_a_manual_close_skips_the_level_recheck_and_the_slippage_guard():
    manual = Trigger(MANUAL, D("9200"), D("9150"))
    plan = plan_close(replace(CLEAR, stop_price=D("9000"), **SLIP), manual, QUOTE, NOW)
    assert isinstance(plan, Close) and plan.slippage is None and plan.token.startswith("sm7-M1-")


def test_skip_reasons():
    assert plan_close(replace(CLEAR, status="CLOSED"), TRIGGER, QUOTE, NOW) == Skip(
        "NOT_ACTIVE", "status CLOSED: another closer holds it")
    assert plan_close(replace(CLEAR, stop_price=D("9100")), TRIGGER, QUOTE, NOW) == Skip(
        "LEVEL_MOVED", "no level is crossed after the stop or target moved")


# ----------------------------------------------------------------------------- issue #12: fee dust, others' needs, status

def test_fee_dust_after_the_entry_fee_closes_the_operation_with_the_dust():
    # position 1 BTC, free 0.999 after the entry fee: sell 0.999, the 0.001 left is dust (1 % tolerance)
    plan = plan_close(replace(CLEAR, remaining=D("1"), position=D("1"), free_base=D("0.999"), min_notional=D("10")),
                      TRIGGER, QUOTE, NOW)
    assert (type(plan).__name__, plan.quantity, plan.dust, plan.shortfall) == ("Close", D("0.999"), D("0.001"), D("0"))


def test_an_unsellable_remainder_within_the_tolerance_closes_as_dust_without_an_order():
    plan = plan_close(replace(CLEAR, remaining=D("0.0004"), position=D("0.5"), free_base=D("0.0004")),
                      TRIGGER, QUOTE, NOW)
    assert type(plan).__name__ == "CloseAsDust" and plan.dust == D("0.0004")


def test_a_close_never_sells_what_another_operation_of_the_tenant_needs():
    # free 1 BTC, this operation 0.5, another ACTIVE operation of the tenant needs 0.7: only 0.3 is ours
    plan = plan_close(replace(CLEAR, reserved_for_others=D("0.7"), position=D("0.5")), TRIGGER, QUOTE, NOW)
    assert (plan.quantity, plan.shortfall) == (D("0.3"), D("0.2"))
    held = plan_close(replace(CLEAR, reserved_for_others=D("1"), position=D("0.5")), TRIGGER, QUOTE, NOW)
    assert reason(held) == "INSUFFICIENT_BALANCE"


@pytest.mark.parametrize("status", ["HALT", "BREAK", "CANCEL_ONLY"])
def test_a_symbol_that_takes_no_order_is_held_with_symbol_status(status):
    plan = plan_close(replace(CLEAR, symbol_status=status), TRIGGER, QUOTE, NOW)
    assert (reason(plan), plan.block.key) == ("SYMBOL_STATUS", status)
