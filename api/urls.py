"""Routes of the REST API, included under ``/api/v1/`` by :mod:`config.urls`."""

from django.urls import include, path
from rest_framework.routers import SimpleRouter

from api import accounts, views

router = SimpleRouter()
router.register("operations", views.OperationViewSet, basename="operation")
router.register("executions", views.ExecutionViewSet, basename="execution")
router.register("risk/circuit-breakers", views.CircuitBreakerViewSet, basename="circuit-breaker")
router.register("symbols", views.SymbolViewSet, basename="symbol")
router.register("accounts", accounts.ExchangeAccountViewSet, basename="account")

app_name = "api"
urlpatterns = [
    path("events/", views.EventFeedView.as_view(), name="event-feed"),
    path("risk/config/", views.RiskConfigView.as_view(), name="risk-config"),
    path("", include(router.urls)),
]
