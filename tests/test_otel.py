"""OpenTelemetry: a span per protected call and the metrics, read with the SDK in memory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from cryptography.fernet import Fernet
from django.test import Client
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from django_idempotency import otel
from django_idempotency.engine import Call, Policy, Snapshot, run, run_async
from django_idempotency.exceptions import FingerprintMismatch, RequestInProgress, StoreUnavailable
from django_idempotency.models import IdempotencyKey
from django_idempotency.stores import get_store
from tests.lease_stores import (
    lease_store_fixture,  # noqa: F401
    redis_records_fixture,  # noqa: F401
)

pytestmark = pytest.mark.django_db

KEY = "otel-secret-key-7f3a9c2e"
CALL = Call(scope="tests", key=KEY, fingerprint="a" * 64)
START = datetime(2030, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


class Telemetry:
    def __init__(self) -> None:
        self.spans_exporter = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans_exporter))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def spans(self) -> list[ReadableSpan]:
        return list(self.spans_exporter.get_finished_spans())

    def outcomes(self) -> list[str]:
        return [str(span.attributes["idempotency.outcome"]) for span in self.spans()]  # type: ignore[index]

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        return [
            point
            for resource in data.resource_metrics  # type: ignore[union-attr]
            for scope in resource.scope_metrics
            for metric in scope.metrics
            if metric.name == name
            for point in metric.data.data_points
        ]


@pytest.fixture
def telemetry() -> Iterator[Telemetry]:
    recorded = Telemetry()
    otel.instrument(recorded.tracer_provider, recorded.meter_provider)
    yield recorded
    otel.uninstrument()
    recorded.tracer_provider.shutdown()
    recorded.meter_provider.shutdown()


def policy(alias: str, **kwargs: Any) -> Policy:
    return Policy(mode="lease", lease=30, retention=3600, store=alias, **kwargs)


def execute(alias: str = "default") -> Any:
    return run(CALL, policy(alias), lambda: b"done", lambda result: Snapshot(201, body=result))


def test_executed_then_replayed_with_attributes_and_no_key(
    lease_store: str, telemetry: Telemetry
) -> None:
    execute(lease_store)
    execute(lease_store)
    first, _replayed = telemetry.spans()
    assert telemetry.outcomes() == ["executed", "replayed"]
    assert first.name == "idempotency"
    attributes = dict(first.attributes or {})
    assert attributes["idempotency.store"] == lease_store
    assert attributes["idempotency.mode"] == "lease"
    assert attributes["idempotency.key_hash"] == otel.key_hash(CALL)
    assert len(str(attributes["idempotency.key_hash"])) == 12
    assert float(attributes["idempotency.claim_wait_s"]) >= 0  # type: ignore[arg-type]
    assert all(
        KEY not in str(value)
        for span in telemetry.spans()
        for value in (span.attributes or {}).values()
    )
    assert first.start_time is not None
    assert first.end_time is not None
    assert first.start_time <= first.end_time
    assert first.status.status_code == StatusCode.UNSET
    calls = {
        point.attributes["idempotency.outcome"]: point.value
        for point in telemetry.points("idempotency.calls")
    }
    assert calls == {"executed": 1, "replayed": 1}
    operations = {
        point.attributes["idempotency.operation"]: point.count
        for point in telemetry.points("idempotency.store.duration")
    }
    assert operations == {"claim": 2, "complete": 1}
    assert sum(p.count for p in telemetry.points("idempotency.claim.wait")) == 2


def test_conflict_and_mismatch(lease_store: str, telemetry: Telemetry) -> None:
    store = get_store(lease_store)
    held = store.claim(CALL, policy(lease_store))
    with pytest.raises(RequestInProgress):
        execute(lease_store)
    other = Call(scope=CALL.scope, key=CALL.key, fingerprint="b" * 64)
    with pytest.raises(FingerprintMismatch):
        run(other, policy(lease_store), lambda: b"", lambda r: Snapshot(201, body=r))
    store.release(held)
    assert telemetry.outcomes() == ["conflict", "mismatch"]


def test_a_takeover_and_a_lost_lease(
    lease_store: str, telemetry: Telemetry, time_machine: Any
) -> None:
    time_machine.move_to(START, tick=False)
    store = get_store(lease_store)
    store.claim(CALL, policy(lease_store))  # its worker crashes
    time_machine.shift(31)

    def overtaken() -> bytes:
        time_machine.shift(31)
        store.claim(CALL, policy(lease_store))  # a later duplicate takes it over
        return b"late"

    run(CALL, policy(lease_store), overtaken, lambda r: Snapshot(201, body=r))
    time_machine.shift(31)
    execute(lease_store)
    assert telemetry.outcomes() == ["lease_lost", "takeover"]
    lost = telemetry.spans()[0]
    assert lost.status.status_code == StatusCode.ERROR


def test_an_exception_releases(telemetry: Telemetry) -> None:
    def fail() -> bytes:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        run(CALL, policy("default"), fail, lambda r: Snapshot(201, body=r))
    assert telemetry.outcomes() == ["released"]


@pytest.mark.urls("tests.urls")
def test_an_unreadable_snapshot_is_refused_over_http(telemetry: Telemetry, settings: Any) -> None:
    settings.IDEMPOTENCY_ENCRYPTION_KEYS = [Fernet.generate_key().decode()]

    def post() -> Any:
        return Client().post(
            "/plain/",
            json.dumps({"item": "x"}),
            content_type="application/json",
            headers={"Idempotency-Key": KEY},
        )

    assert post().status_code == 201
    IdempotencyKey.objects.update(response_body=b"garbage")
    assert post().status_code == 503
    assert telemetry.outcomes() == ["executed", "refused"]
    assert {span.attributes["idempotency.mode"] for span in telemetry.spans()} == {"atomic"}  # type: ignore[index]
    assert telemetry.spans()[1].status.status_code == StatusCode.ERROR


def test_an_unavailable_store_is_refused_or_unprotected(
    telemetry: Telemetry, settings: Any
) -> None:
    settings.CACHES = {
        **settings.CACHES,
        "nowhere": {
            "BACKEND": "django_redis.cache.RedisCache",
            "LOCATION": "redis://127.0.0.1:1/0",
        },
    }
    backend = "django_idempotency.stores.cache.CacheStore"
    settings.IDEMPOTENCY_STORES = {
        "closed": {"BACKEND": backend, "OPTIONS": {"CACHE": "nowhere"}},
        "open": {"BACKEND": backend, "OPTIONS": {"CACHE": "nowhere", "FAIL_OPEN": True}},
    }
    with pytest.raises(StoreUnavailable):
        run(CALL, policy("closed"), lambda: b"", lambda r: Snapshot(201, body=r))
    run(CALL, policy("open"), lambda: b"", lambda r: Snapshot(201, body=r))
    assert telemetry.outcomes() == ["refused", "unprotected"]


def test_async_calls_are_recorded(lease_store: str, telemetry: Telemetry) -> None:
    async def body() -> bytes:
        return b"async"

    async def twice() -> None:
        for _ in range(2):
            await run_async(CALL, policy(lease_store), body, lambda r: Snapshot(201, body=r))

    # async_to_sync: sync_to_async then runs on this thread, with its connection.
    async_to_sync(twice)()
    assert telemetry.outcomes() == ["executed", "replayed"]


def test_nothing_is_recorded_after_uninstrument(telemetry: Telemetry) -> None:
    otel.uninstrument()
    execute()
    assert telemetry.spans() == []
    otel.instrument(telemetry.tracer_provider, telemetry.meter_provider)
    execute()
    assert telemetry.outcomes() == ["replayed"]
