"""Bearer-token authentication (DRF tokens sent as ``Authorization: Bearer <key>``)."""
from rest_framework.authentication import TokenAuthentication


class BearerTokenAuthentication(TokenAuthentication):
    keyword = "Bearer"
