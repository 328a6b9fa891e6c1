"""``protect_operations``'s readable lines, its argument refusal (exit 2) and an exchange that
stops answering mid-run (exit 1, the line names where to resume; the batches before it stay armed)."""

from __future__ import annotations

import json
from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from api.models import TenantConfig
from stopmonitor.exchange.base import ExchangeUnavailable

from .test_protect_operations_command import paper  # noqa: F401 - the same paper account

pytestmark = pytest.mark.django_db


def text(*args) -> list[str]:
    out = StringIO()
    call_command("protect_operations", *args, stdout=out)
    return out.getvalue().splitlines()


@pytest.mark.parametrize("args", [("--batch", "0"), ("--after", "-1")])
def test_bad_batch_or_after_is_exit_2(args):
    with pytest.raises(CommandError) as caught:
        call_command("protect_operations", *args)
    assert (str(caught.value), caught.value.returncode) == ("--batch must be at least 1 and --after 0 or more", 2)


def test_readable_lines_for_a_dry_run_and_a_run(paper, tenant, open_op):
    TenantConfig.objects.create(client=tenant, protection_enabled=True)
    ops = [open_op(qty="0.5") for _ in range(3)]
    open_op(stop=None)  # no stop: not a candidate

    dry = text("--dry-run", "--batch", "2")
    assert dry[:-1] == [
        f"batch 1: 2 operations (2 with protection on): 0 armed, 2 would arm, 0 unprotected (reason in their "
        f"events); 4 requests; resume with --after {ops[1].pk}",
        f"batch 2: 1 operations (1 with protection on): 0 armed, 1 would arm, 0 unprotected (reason in their "
        f"events); 4 requests; resume with --after {ops[2].pk}",
    ]
    assert dry[-1].startswith("0 armed, 0 unprotected in 2 batches (8 requests, weight ") and dry[-1].endswith(") (dry run)")
    lines = text("--batch", "2")
    assert [line.split(";")[0] for line in lines[:-1]] == [
        "batch 1: 2 operations (2 with protection on): 2 armed, 0 would arm, 0 unprotected (reason in their events)",
        "batch 2: 1 operations (1 with protection on): 1 armed, 0 would arm, 0 unprotected (reason in their events)",
    ]
    assert lines[-1].startswith("3 armed, 0 unprotected in 2 batches (") and "(dry run)" not in lines[-1]
    assert text() == ["0 armed, 0 unprotected in 0 batches (0 requests, weight 0)"]


def test_an_exchange_that_stops_answering_names_where_to_resume(paper, tenant, open_op, monkeypatch):
    from stopmonitor.engine import protection

    TenantConfig.objects.create(client=tenant, protection_enabled=True)
    ops = [open_op(qty="0.5") for _ in range(3)]
    real, calls = protection.protection_pass, []

    def flaky(*args, **kwargs):
        calls.append(kwargs["operation_ids"])
        if len(calls) == 2:
            raise ExchangeUnavailable("HTTP 503\nfrom the exchange")
        return real(*args, **kwargs)

    monkeypatch.setattr(protection, "protection_pass", flaky)
    out = StringIO()
    with pytest.raises(CommandError) as caught:
        call_command("protect_operations", "--batch", "2", "--json", stdout=out)
    assert (str(caught.value), caught.value.returncode) == (
        f"exchange unavailable (ExchangeUnavailable: HTTP 503\nfrom the exchange); resume with --after {ops[1].pk}", 1)
    assert [json.loads(line)["armed"] for line in out.getvalue().splitlines()] == [2]
    assert calls == [[ops[0].pk, ops[1].pk], [ops[2].pk]]
