"""URL configuration: the admin, the REST API under /api/v1/, OpenAPI schema and docs.

``/health`` and ``/health/ready`` are answered by ``api.health.HealthProbeMiddleware``; ``/metrics``
(django-prometheus plus the monitor's gauges read from the database) by
``stopmonitor.metrics.MetricsEndpointMiddleware``, only to requests that did not come through the proxy.
Django's own error answers (an unknown URL, a refused host, a server error) are the API's JSON envelope.
"""
from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/v1/", include("api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="docs"),
]

handler400 = "api.errors.handler400"
handler403 = "api.errors.handler403"
handler404 = "api.errors.handler404"
handler500 = "api.errors.handler500"
