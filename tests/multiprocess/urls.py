"""The example project's URLs, and under ``/mp/<protection>/`` the same entry points
protected otherwise (see views.PROTECTIONS)."""

from __future__ import annotations

from django.urls import URLPattern, include, path

from tests.multiprocess import views


def _entry_points(name: str) -> list[URLPattern]:
    options = views.PROTECTIONS[name]
    return [
        path("api/orders/", views.order_viewset(name, options)),
        path("api/payments/", views.payment_view(options)),
        path("orders/", views.plain_order_view(options)),
    ]


urlpatterns = [
    path("mp/ready/", views.ready),
    *(path(f"mp/{name}/", include(_entry_points(name))) for name in views.PROTECTIONS),
    path("", include("example_project.urls")),
]
