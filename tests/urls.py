from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from rest_framework.routers import SimpleRouter

from tests.testapp import views

router = SimpleRouter()
router.register("viewset", views.OrderViewSet, basename="order")

urlpatterns = [
    path("admin/", admin.site.urls),
    path("plain/", views.plain_view),
    path("optional/", views.optional_waiting_view),
    path("cbv/", views.ClassBasedView.as_view()),
    path("api/function/", views.api_function_view),
    path("api/", include(router.urls)),
]
