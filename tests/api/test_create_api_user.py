"""The README's way to get an API token: create_api_user."""

from io import StringIO

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db


def test_creates_tenant_user_and_a_working_token():
    out = StringIO()
    call_command("create_api_user", "alice", "--tenant", "desk-1", stdout=out)
    token = out.getvalue().strip().splitlines()[-1]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {token}")
    response = client.get("/api/v1/operations/")
    assert response.status_code == 200
    out2 = StringIO()
    call_command("create_api_user", "alice", "--tenant", "desk-1", stdout=out2)  # idempotent: same token
    assert out2.getvalue().strip().splitlines()[-1] == token


def test_a_user_belongs_to_one_tenant():
    call_command("create_api_user", "bob", "--tenant", "desk-1", stdout=StringIO())
    with pytest.raises(CommandError, match="already belongs to tenant 'desk-1'"):
        call_command("create_api_user", "bob", "--tenant", "desk-2", stdout=StringIO())
