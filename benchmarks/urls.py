from __future__ import annotations

from django.urls import path

from benchmarks import views

urlpatterns = [
    path("plain/", views.plain),
    path("plain-in-transaction/", views.plain_in_transaction),
    path("atomic/", views.atomic),
    path("lease/", views.lease),
    path("replay-floor/", views.replay_floor),
    path("replay-floor-sql/", views.replay_floor_sql),
]
if views.lease_redis is not None:
    urlpatterns += [
        path("lease-redis/", views.lease_redis),
        path("replay-floor-redis/", views.replay_floor_redis),
    ]
if views.drf_plain is not None and views.drf_protected is not None:
    urlpatterns += [
        path("drf/", views.drf_plain),
        path("drf-atomic/", views.drf_protected),
    ]
