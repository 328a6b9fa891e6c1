"""The tenant's risk controls and the symbols' circuit breakers, changed by a person (issue 11, item 4).

One home for the two writes the API and the admin both make: :func:`update_risk_config` (kill
switch, slippage limit, execution rate limits, protection settings) and :func:`reset_breaker`.
Each locks its row (bounded by the database's lock_timeout where set), records who and when, and
writes one line to the ``api.audit`` log with the old and new values. Both commit.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone

from django.db import transaction

from api.models import CircuitBreakerState, TenantConfig

audit = logging.getLogger("api.audit")


def update_risk_config(tenant_id: int, changes: dict, actor: str, now: datetime | None = None) -> TenantConfig:
    """Apply validated ``changes`` (field name → value) to the tenant's :class:`TenantConfig`
    under its row lock (created with the defaults when missing).

    Records ``updated_by``/``updated_at`` and, when ``kill_switch`` is given,
    ``kill_switch_by``/``kill_switch_at`` (UTC) and ``kill_switch_reason`` (required with it);
    writes one audit line with the old and new values. Returns the saved row.
    """
    now = now or datetime.now(timezone.utc)
    with transaction.atomic():
        cfg, _ = TenantConfig.objects.select_for_update().get_or_create(client_id=tenant_id)
        diff = {}
        for name, value in changes.items():
            if name in ("kill_switch_reason",):
                continue
            old = getattr(cfg, name)
            if old != value:
                diff[name] = [str(old), str(value)]
            setattr(cfg, name, value)
        if "kill_switch" in changes:
            cfg.kill_switch_reason = changes.get("kill_switch_reason", "")
            cfg.kill_switch_at = now
            cfg.kill_switch_by = actor
        cfg.updated_by = actor
        cfg.save()
    audit.info("risk config changed", extra={
        "tenant_id": tenant_id, "actor": actor, "changes": diff,
        "kill_switch_reason": changes.get("kill_switch_reason", ""),
    })
    return cfg


def reset_breaker(symbol: str, actor: str) -> CircuitBreakerState | None:
    """Close ``symbol``'s circuit breaker now (failures forgotten) under its row lock; one audit
    line. Returns the row, or None when the symbol has no breaker."""
    with transaction.atomic():
        row = CircuitBreakerState.objects.select_for_update().filter(symbol=symbol).first()
        if row is None:
            return None
        before = row.state
        row.state, row.failure_count, row.opened_at, row.retry_at, row.last_error = "CLOSED", 0, None, None, ""
        row.save()
    audit.info("circuit breaker reset", extra={"symbol": symbol, "actor": actor, "from_state": before})
    return row
