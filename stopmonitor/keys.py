"""Are the venue's API keys accepted? One signed read, remembered for every process of the deployment.

Wrong keys passed every start gate before (issue 18, point 7): ``monitor_stops`` then failed each
minute with no event, and the API's close said "quotes cannot be read". Now:

* ``monitor_stops`` (CronJob, ``--loop``, ``--stream``) asks :func:`keys_verdict` at its start: a
  refusal is one line on stderr and exit 1 (nothing to protect with keys Binance refuses); an
  answer that says nothing about the keys (network, 5XX, a ban, clock skew) lets the pass run and
  meet that failure itself.
* ``/health/ready`` reports the last verdict as ``exchange_keys`` without a network call in the
  request: a stale or missing verdict is refreshed by one background thread of that process.
* ``stopmonitor_exchange_keys_accepted{venue}`` is 1 (accepted), 0 (refused) or -1 (unknown) in the
  process that read it (the web pod's ``/metrics`` after a readiness probe, the loop's or stream's
  metrics port).

The read is ``GET /api/v3/account`` (request weight 20, the adapter's ``free_balances``). The
refusals are Binance's "Error codes" -2014 (API-key format invalid), -2015 (invalid API-key, IP,
or permissions for action) and -1022 (signature for this request is not valid). An accepted
verdict is reused for :data:`FRESH_SECONDS` (the CronJob does not add a read every minute); a
refused one is read again at every start (the fix is visible at once).
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass

from stopmonitor.exchange.base import ExchangeError, KeysMissing

#: Binance's answers that mean "these keys are refused" (not "the read failed")
REFUSED_CODES = {
    -2014: "API-key format invalid",
    -2015: "invalid API-key, IP, or permissions for action",
    -1022: "signature for this request is not valid",
}
FRESH_SECONDS = 300
CACHE_KEY = "stopmonitor:exchange-keys:{venue}"
FIX = ("set BINANCE_API_KEY and BINANCE_API_SECRET (or BINANCE_PRIVATE_KEY) to a key of this venue with "
       "Spot trading enabled and this egress IP allowed; `manage.py doctor` checks it")


@dataclass(frozen=True)
class KeysVerdict:
    """``status``: ``accepted`` | ``refused`` | ``unknown``; ``code``: Binance's error code or None;
    ``detail``: one line without secrets; ``checked_at``: UNIX time (UTC) of the read."""

    status: str
    code: int | None
    detail: str
    checked_at: float

    @property
    def gauge(self) -> int:
        return {"accepted": 1, "refused": 0}.get(self.status, -1)

    def summary(self) -> str:
        """The readiness value: ``ok``, ``refused: code -2015 (...)`` or ``unknown: ...``."""
        if self.status == "accepted":
            return "ok"
        return f"{self.status}: {self.detail}"


def is_exchange_venue(venue: str | None) -> bool:
    """Only Binance venues have keys to check (paper and replay sign nothing)."""
    return str(venue or "").startswith("binance")


def read_keys(exchange, *, clock=time.time) -> KeysVerdict:
    """One signed read on ``exchange`` (the port's ``free_balances``): the verdict. Never raises for
    an exchange error (each becomes ``refused`` or ``unknown``)."""
    try:
        exchange.free_balances()
    except KeysMissing:
        return KeysVerdict("refused", None, "no API key/secret is configured for this venue", clock())
    except ExchangeError as exc:
        code = getattr(exc, "code", None)
        if code in REFUSED_CODES:
            return KeysVerdict("refused", code, f"code {code} ({REFUSED_CODES[code]})", clock())
        return KeysVerdict("unknown", code, f"{type(exc).__name__}: {str(exc)[:160]}", clock())
    return KeysVerdict("accepted", None, "signed read accepted", clock())


def _read(exchange_factory, clock) -> KeysVerdict:
    try:
        exchange = exchange_factory()
    except Exception as exc:  # noqa: BLE001 - an adapter that cannot be built says nothing about the keys
        return KeysVerdict("unknown", None, f"{type(exc).__name__}: the adapter could not be built", clock())
    try:
        return read_keys(exchange, clock=clock)
    except Exception as exc:  # noqa: BLE001 - a defect below the port must not kill a start gate or the probe's thread
        return KeysVerdict("unknown", None, f"{type(exc).__name__}: the signed read failed", clock())


def remember(venue: str, verdict: KeysVerdict) -> None:
    """Store ``verdict`` for every process (Django's cache: Redis in a deployment) and set the gauge."""
    from django.core.cache import cache

    from stopmonitor.metrics import EXCHANGE_KEYS

    EXCHANGE_KEYS.labels(venue).set(verdict.gauge)
    try:
        cache.set(CACHE_KEY.format(venue=venue), asdict(verdict), timeout=FRESH_SECONDS * 4)
    except Exception:  # noqa: BLE001 - a cache outage only costs the next process a read
        pass


def last_verdict(venue: str) -> KeysVerdict | None:
    """The verdict some process of this deployment stored last, or None."""
    from django.core.cache import cache

    try:
        stored = cache.get(CACHE_KEY.format(venue=venue))
    except Exception:  # noqa: BLE001
        return None
    return KeysVerdict(**stored) if isinstance(stored, dict) else None


def keys_verdict(venue: str, exchange_factory, *, clock=time.time) -> KeysVerdict:
    """An accepted verdict younger than :data:`FRESH_SECONDS`, else a new read on
    ``exchange_factory()`` (remembered). Raises nothing."""
    known = last_verdict(venue)
    if known is not None and known.status == "accepted" and clock() - known.checked_at < FRESH_SECONDS:
        return known
    verdict = _read(exchange_factory, clock)
    remember(venue, verdict)
    return verdict


_refreshing = threading.Lock()


def readiness_value(venue: str, exchange_factory, *, clock=time.time) -> str:
    """``exchange_keys`` for ``/health/ready``: the stored verdict's :meth:`~KeysVerdict.summary`,
    ``unchecked`` when none is stored yet. A missing or stale verdict starts one background read
    (at most one at a time per process); the request never waits for Binance."""
    known = last_verdict(venue)
    if known is None or clock() - known.checked_at >= FRESH_SECONDS:
        if _refreshing.acquire(blocking=False):
            def refresh():
                try:
                    remember(venue, _read(exchange_factory, clock))
                finally:
                    _refreshing.release()

            threading.Thread(target=refresh, name="exchange-keys", daemon=True).start()
    return known.summary() if known is not None else "unchecked"
