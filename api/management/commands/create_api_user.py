"""``python manage.py create_api_user USERNAME --tenant NAME [--staff]``: a user of one tenant and its API token.

Creates the tenant (``Client``) if it does not exist, the user if it does not exist, attaches
the user to the tenant and prints the bearer token (``Authorization: Bearer <token>``). A
user already attached to another tenant is refused (a user belongs to one tenant).
"""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandError

from stopmonitor.preflight import require_migrated


class Command(BaseCommand):
    help = "Create (or reuse) a tenant and a user of it, and print the user's API bearer token."

    def add_arguments(self, parser):
        parser.add_argument("username")
        parser.add_argument("--tenant", required=True, help="tenant (Client) name; created if missing")
        parser.add_argument("--staff", action="store_true", help="staff users see every tenant")

    def handle(self, *args, username, tenant, staff, **opts):
        require_migrated()  # one line "run migrate" and exit 1, never a traceback (stopmonitor/preflight.py)
        from django.contrib.auth import get_user_model
        from django.db import transaction
        from rest_framework.authtoken.models import Token

        from api.models import Client

        username, tenant = username.strip(), tenant.strip()
        if not username or not tenant:
            raise CommandError("username and --tenant must not be empty")
        with transaction.atomic():
            client, _ = Client.objects.get_or_create(name=tenant)
            user, created = get_user_model().objects.get_or_create(username=username)
            if created:
                user.set_unusable_password()
            if staff and not user.is_staff:
                user.is_staff = True
            user.save()
            other = Client.objects.filter(users=user).exclude(pk=client.pk).first()
            if other is not None:
                raise CommandError(f"user {username!r} already belongs to tenant {other.name!r}")
            client.users.add(user)
            token, _ = Token.objects.get_or_create(user=user)
        self.stdout.write(f"tenant {client.name} (id {client.pk}), user {user.username}; API token:")
        self.stdout.write(token.key)
