from __future__ import annotations

from django.urls import path

from benchmarks import views

urlpatterns = [
    path("plain/", views.plain),
    path("plain-in-transaction/", views.plain_in_transaction),
    path("atomic/", views.atomic),
    path("lease/", views.lease),
    path("replay-floor/", views.replay_floor),
]
if views.lease_redis is not None:
    urlpatterns.append(path("lease-redis/", views.lease_redis))
if views.drf_plain is not None and views.drf_protected is not None:
    urlpatterns += [
        path("drf/", views.drf_plain),
        path("drf-atomic/", views.drf_protected),
    ]
