"""Bearer-token authentication (DRF tokens sent as ``Authorization: Bearer <key>``)."""

from django.utils.translation import gettext_lazy as _
from rest_framework import exceptions
from rest_framework.authentication import TokenAuthentication

from api.permissions import remember_tenant_id, tenant_id_subquery


class BearerTokenAuthentication(TokenAuthentication):
    """DRF's token authentication under the ``Bearer`` keyword, reading the token, its user and the
    user's tenant id (:func:`api.permissions.tenant_id_of`) in one query instead of two."""

    keyword = "Bearer"

    def authenticate_credentials(self, key):
        # DRF's TokenAuthentication.authenticate_credentials, with the tenant id annotated
        model = self.get_model()
        try:
            token = self._tokens(model).get(key=key)
        except model.DoesNotExist:
            raise exceptions.AuthenticationFailed(_("Invalid token.")) from None
        if not token.user.is_active:
            raise exceptions.AuthenticationFailed(_("User inactive or deleted."))
        remember_tenant_id(token.user, token.tenant_id_of_user)
        return (token.user, token)

    _queryset = None

    @classmethod
    def _tokens(cls, model):
        """Tokens with their user and the user's tenant id; built once per process (``get`` clones it)."""
        if cls._queryset is None or cls._queryset.model is not model:
            cls._queryset = model.objects.select_related("user").annotate(tenant_id_of_user=tenant_id_subquery("user_id"))
        return cls._queryset
