"""Tenant scoping and the staff-only permission.

A user belongs to one tenant (``Client.users``); every API query is narrowed to it, so another
tenant's object answers 404 exactly like a missing one (never 403, never data). Staff users
see every tenant.
"""

from __future__ import annotations

from rest_framework import exceptions, permissions

_UNSET = object()


class NoTenant(exceptions.PermissionDenied):
    """403: the authenticated user belongs to no tenant, so there is nothing of theirs to change."""

    default_code = "no_tenant"
    default_detail = "This user belongs to no tenant."


def _tenant_ids(user):
    """The ids of ``user``'s tenants, the one that counts first (a user or an ``OuterRef`` to one)."""
    from api.models import Client

    return Client.objects.filter(users=user).order_by("id").values_list("id", flat=True)


def tenant_id_of(user) -> int | None:
    """The id of the user's tenant (the first ``Client`` by id), or None; cached on the user object
    (the bearer-token authentication puts it there with the token's own query)."""
    cached = getattr(user, "_stopmonitor_tenant_id", _UNSET)
    if cached is _UNSET:
        cached = _tenant_ids(user).first()
        remember_tenant_id(user, cached)
    return cached


def tenant_id_subquery(user_field: str):
    """:func:`tenant_id_of` as a subquery on the row's ``user_field`` (a user id), for ``annotate``."""
    from django.db.models import OuterRef, Subquery

    return Subquery(_tenant_ids(OuterRef(user_field))[:1])


def remember_tenant_id(user, tenant_id: int | None) -> None:
    """Cache ``user``'s tenant id (None: no tenant) for :func:`tenant_id_of`."""
    user._stopmonitor_tenant_id = tenant_id


def scope_to_tenant(queryset, user, field: str = "client"):
    """``queryset`` narrowed to ``user``'s tenant through ``field`` (``client`` or ``tenant``);
    unchanged for staff, empty for a user without a tenant."""
    if user.is_staff:
        return queryset
    tenant_id = tenant_id_of(user)
    if tenant_id is None:
        return queryset.none()
    return queryset.filter(**{f"{field}_id": tenant_id})


def require_tenant_id(user) -> int:
    """The user's tenant id; raises :class:`NoTenant` (403) when the user has none."""
    tenant_id = tenant_id_of(user)
    if tenant_id is None:
        raise NoTenant()
    return tenant_id


class IsStaff(permissions.BasePermission):
    """Staff users only (operator actions such as resetting a circuit breaker)."""

    message = "Only staff users may do this."

    def has_permission(self, request, view) -> bool:
        return bool(request.user and request.user.is_authenticated and request.user.is_staff)
