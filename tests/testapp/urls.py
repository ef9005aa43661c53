"""The suite's URLs plus the option variants; tests select it with ``pytest.mark.urls``."""

from __future__ import annotations

from django.urls import include, path
from rest_framework.routers import SimpleRouter

from tests import urls as base
from tests.testapp import variants

router = SimpleRouter()
router.register("guarded", variants.GuardedViewSet, basename="guarded")
router.register("selective", variants.SelectiveViewSet, basename="selective")
router.register("attributes", variants.ClassAttributeViewSet, basename="attributes")
router.register("hooks", variants.HookViewSet, basename="hooks")
router.register("static", variants.StaticAttributeViewSet, basename="static")

urlpatterns = [
    *base.urlpatterns,
    path("variants/short-retention/", variants.short_retention_view),
    path("variants/tenant/", variants.tenant_view),
    path("variants/item-fingerprint/", variants.item_fingerprint_view),
    path("variants/lease/", variants.lease_view),
    path("variants/put-delete/", variants.put_delete_view),
    path("variants/nested-atomic/", variants.nested_atomic_view),
    path("variants/template/", variants.template_view),
    path("variants/api/anonymous/", variants.anonymous_api_view),
    path("variants/api/guarded-function/", variants.guarded_api_view),
    path("variants/api/", include(router.urls)),
]
