from __future__ import annotations

from django.contrib import admin
from django.urls import include, path
from rest_framework.routers import DefaultRouter

from example_project.shop import views

router = DefaultRouter()
router.register("orders", views.OrderViewSet, basename="order")

urlpatterns = [
    path("", views.index, name="index"),
    path("orders/", views.create_order, name="create-order"),
    path("api/payments/", views.create_payment, name="payment-list"),
    path("api/payments/<int:pk>/", views.payment_detail, name="payment-detail"),
    path("api/", include(router.urls)),
    path("api-auth/", include("rest_framework.urls")),
    path("admin/", admin.site.urls),
]
