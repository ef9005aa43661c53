"""The admin of stored keys, through the test client as a logged-in staff user."""

from __future__ import annotations

from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any

import pytest
import time_machine
from django.contrib.auth.models import Permission
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse
from django.utils import timezone

from django_idempotency import admin as idempotency_admin
from django_idempotency.models import IdempotencyKey
from tests.factories import IdempotencyKeyFactory, UserFactory

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:django_idempotency_idempotencykey_changelist"
State = IdempotencyKey.State


def changelist(client: Client, **params: Any) -> list[IdempotencyKey]:
    response = client.get(reverse(CHANGELIST), params)
    assert response.status_code == 200
    return list(response.context["cl"].result_list)


def keys_of(rows: list[IdempotencyKey]) -> set[str]:
    return {row.key for row in rows}


def detail(client: Client, row: IdempotencyKey) -> str:
    response = client.get(reverse("admin:django_idempotency_idempotencykey_change", args=[row.pk]))
    assert response.status_code == 200
    return response.content.decode()


def act(client: Client, action: str, rows: list[IdempotencyKey]) -> Any:
    return client.post(
        reverse(CHANGELIST),
        {"action": action, "_selected_action": [row.pk for row in rows]},
        follow=True,
    )


@pytest.fixture
def variety() -> dict[str, IdempotencyKey]:
    """One key of each kind the filters tell apart."""
    return {
        "created": IdempotencyKeyFactory(key="created-201", path="/orders/"),
        "invalid": IdempotencyKeyFactory(
            key="invalid-422", response_status=422, method="PATCH", path="/orders/7/"
        ),
        "redirect": IdempotencyKeyFactory(key="moved-303", response_status=303),
        "running": IdempotencyKeyFactory(key="running", in_progress=True, scope="user:42"),
        "old": IdempotencyKeyFactory(key="old-expired", expired=True),
        "function": IdempotencyKeyFactory(key="task-9", method="", path=""),
    }


def test_list_shows_the_columns(admin_client: Client, variety: dict[str, IdempotencyKey]) -> None:
    response = admin_client.get(reverse(CHANGELIST))

    content = response.content.decode()
    assert keys_of(list(response.context["cl"].result_list)) == {k.key for k in variety.values()}
    for header in ("Key", "Scope", "Method", "Path", "State", "Response status", "Created"):
        assert f">{header}<" in content or f">{header}</" in content
    assert "in progress" in content
    assert "/orders/7/" in content


def test_list_never_loads_bodies(admin_client: Client, variety: dict[str, IdempotencyKey]) -> None:
    with CaptureQueriesContext(connection) as queries:
        rows = changelist(admin_client)

    assert rows
    assert all("response_body" in row.get_deferred_fields() for row in rows)
    assert not [q for q in queries if "response_body" in q["sql"]]


def test_list_runs_as_many_queries_for_many_rows_as_for_few(admin_client: Client) -> None:
    IdempotencyKeyFactory.create_batch(3)
    with CaptureQueriesContext(connection) as few:
        changelist(admin_client)
    IdempotencyKeyFactory.create_batch(60)
    with CaptureQueriesContext(connection) as many:
        changelist(admin_client)

    assert len(many) == len(few)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"state__exact": "in_progress"}, {"running"}),
        ({"state__exact": "completed"}, {"created", "invalid", "redirect", "old", "function"}),
        ({"status_class": "2xx"}, {"created", "old", "function"}),
        ({"status_class": "3xx"}, {"redirect"}),
        ({"status_class": "4xx"}, {"invalid"}),
        ({"status_class": "none"}, {"running"}),
        ({"method": "PATCH"}, {"invalid"}),
        ({"method": "POST"}, {"created", "redirect", "running", "old"}),
        ({"method": "none"}, {"function"}),
        ({"expired": "yes"}, {"old"}),
        ({"expired": "no"}, {"created", "invalid", "redirect", "running", "function"}),
    ],
)
def test_filters(
    admin_client: Client,
    variety: dict[str, IdempotencyKey],
    params: dict[str, str],
    expected: set[str],
) -> None:
    rows = changelist(admin_client, **params)

    assert keys_of(rows) == {variety[name].key for name in expected}


def test_filters_and_dates_read_no_whole_column(admin_client: Client) -> None:
    IdempotencyKeyFactory()
    with CaptureQueriesContext(connection) as queries:
        changelist(admin_client)

    # "All values" filters, facet counts and Django's own date hierarchy would
    # scan the whole table for their choices on every page.
    sql = " ".join(q["sql"].upper() for q in queries)
    for scan in ("DISTINCT", "MIN(", "MAX("):
        assert scan not in sql


@pytest.mark.parametrize(
    ("term", "expected"),
    [("invalid", {"invalid"}), ("user:42", {"running"}), ("/orders/7", {"invalid"})],
)
def test_search_by_key_scope_and_path(
    admin_client: Client, variety: dict[str, IdempotencyKey], term: str, expected: set[str]
) -> None:
    rows = changelist(admin_client, q=term)

    assert keys_of(rows) == {variety[name].key for name in expected}


def test_date_hierarchy_drills_down_by_created(admin_client: Client) -> None:
    today = IdempotencyKeyFactory()
    IdempotencyKeyFactory(created=timezone.now() - timedelta(days=400))
    local = timezone.localtime(today.created)

    rows = changelist(
        admin_client,
        created__year=local.year,
        created__month=local.month,
        created__day=local.day,
    )

    assert keys_of(rows) == {today.key}


def date_links(client: Client, **params: Any) -> tuple[str | None, list[str]]:
    """The date hierarchy's back link title and choice titles."""
    drilldown = client.get(reverse(CHANGELIST), params).context["cl"].date_drilldown
    back = drilldown["back"]["title"] if drilldown["back"] else None
    return back, [str(choice["title"]) for choice in drilldown["choices"]]


@pytest.fixture
def frozen_now() -> Any:
    with time_machine.travel(datetime(2026, 3, 17, 12, tzinfo=dt_timezone.utc), tick=False):
        yield


def test_date_hierarchy_levels(admin_client: Client, frozen_now: None) -> None:
    IdempotencyKeyFactory(created=timezone.now() - timedelta(days=400))
    IdempotencyKeyFactory(created=timezone.now() - timedelta(days=20))
    IdempotencyKeyFactory()

    assert date_links(admin_client) == (None, ["2025", "2026"])
    # Every month between the bounds, January (empty) included.
    assert date_links(admin_client, created__year=2026) == (
        "All dates",
        ["January 2026", "February 2026", "March 2026"],
    )
    assert date_links(admin_client, created__year=2026, created__month=3) == (
        "2026",
        [f"March {day}" for day in range(1, 18)],
    )
    assert date_links(admin_client, created__year=2026, created__month=3, created__day=17) == (
        "March 2026",
        ["March 17"],
    )


def test_date_hierarchy_starts_at_the_narrowest_level(
    admin_client: Client, frozen_now: None
) -> None:
    IdempotencyKeyFactory(created=timezone.now() - timedelta(days=2))
    IdempotencyKeyFactory()

    assert date_links(admin_client) == ("2026", ["March 15", "March 16", "March 17"])


@pytest.mark.parametrize(
    "params",
    [
        {"created__day": 40},
        {"created__day": 0},
        {"created__month": 2, "created__day": 30},
        {"created__month": 11, "created__day": 31},
        {"created__month": 13},
        {"created__month": 0},
        {"created__year": 2026, "created__month": 13},
        {"created__year": 2026, "created__month": 4, "created__day": 31},
        {"created__year": 0},
        {"created__year": 99999},
        {"created__day": "x"},
    ],
    ids=str,
)
def test_date_hierarchy_answers_invalid_dates_without_an_error(
    admin_client: Client, frozen_now: None, params: dict[str, Any]
) -> None:
    # All keys in one month: the drill-down fills in the year and month itself.
    IdempotencyKeyFactory()
    response = admin_client.get(reverse(CHANGELIST), params, follow=True)
    assert response.status_code == 200


def test_date_hierarchy_of_an_empty_table(admin_client: Client) -> None:
    assert date_links(admin_client) == (None, [])


def test_detail_pretty_prints_json(admin_client: Client) -> None:
    row = IdempotencyKeyFactory(response_body=b'{"id":7,"items":["a","b"],"note":"caf\xc3\xa9"}')

    content = detail(admin_client, row)

    assert "JSON, 41 bytes" in content
    assert "{\n  &quot;id&quot;: 7,\n  &quot;items&quot;: [\n    &quot;a&quot;," in content
    assert "café" in content


def test_detail_shows_text_as_text_escaped(admin_client: Client) -> None:
    row = IdempotencyKeyFactory(
        response_body=b"<script>alert(1)</script>\nline two",
        response_headers=[["Content-Type", "text/html"], ["Location", "/o/1/"]],
    )

    content = detail(admin_client, row)

    assert "text, 34 bytes" in content
    assert "&lt;script&gt;alert(1)&lt;/script&gt;\nline two" in content
    assert "<script>alert(1)" not in content
    assert "Content-Type: text/html\nLocation: /o/1/" in content


def test_detail_shows_binary_as_size_and_hex(admin_client: Client) -> None:
    body = bytes(range(256)) * 2
    row = IdempotencyKeyFactory(response_body=body)

    content = detail(admin_client, row)

    assert "binary, 512 bytes" in content
    assert (
        "00000000  00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f  |................|" in content
    )
    assert "00000040  40 41 42 43" in content
    assert "|@ABCDEFGHIJKLMNO|" in content
    assert "256 more bytes not shown" in content
    assert "00000100" not in content


def test_detail_truncates_long_bodies(admin_client: Client) -> None:
    limit = idempotency_admin.BODY_PREVIEW_CHARACTERS
    row = IdempotencyKeyFactory(response_body=b"x" * (limit + 500))

    content = detail(admin_client, row)

    assert "x" * limit in content
    assert "x" * (limit + 1) not in content
    assert "(500 more characters not shown)" in content


def test_detail_shows_deeply_nested_json_as_text(admin_client: Client) -> None:
    body = b"[" * 10_000 + b"]" * 10_000
    row = IdempotencyKeyFactory(response_body=body)

    content = detail(admin_client, row)

    assert "text, 20000 bytes" in content
    assert "[[[[" in content


def test_list_truncates_long_keys_scopes_and_paths_with_the_whole_in_a_title(
    admin_client: Client,
) -> None:
    long_key, long_scope, long_path = "k" * 255, "tenant:" + "s" * 248, "/orders/" + "p" * 247
    IdempotencyKeyFactory(key=long_key, scope=long_scope, path=long_path)

    content = admin_client.get(reverse(CHANGELIST)).content.decode()

    for value in (long_key, long_scope, long_path):
        assert f'title="{value}"' in content
        assert f">{value}<" not in content
        assert f'title="{value}">{value[:20]}' in content
    assert "…</span>" in content


def test_list_escapes_the_titles(admin_client: Client) -> None:
    IdempotencyKeyFactory(key='"><script>alert(1)</script>' + "k" * 60)
    content = admin_client.get(reverse(CHANGELIST)).content.decode()
    assert "<script>alert(1)" not in content


def test_detail_of_an_in_progress_key(admin_client: Client) -> None:
    row = IdempotencyKeyFactory(in_progress=True)

    content = detail(admin_client, row)

    assert "empty" in content
    assert row.token in content


def test_detail_is_read_only(admin_client: Client) -> None:
    row = IdempotencyKeyFactory(key="original", response_status=201)
    url = reverse("admin:django_idempotency_idempotencykey_change", args=[row.pk])

    content = detail(admin_client, row)
    response = admin_client.post(url, {"response_status": "500", "key": "changed"})

    assert "View idempotency key" in content
    assert 'name="_save"' not in content
    assert response.status_code == 403
    row.refresh_from_db()
    assert (row.key, row.response_status) == ("original", 201)


def test_no_add(admin_client: Client) -> None:
    response = admin_client.get(reverse("admin:django_idempotency_idempotencykey_add"))
    listing = admin_client.get(reverse(CHANGELIST)).content.decode()

    assert response.status_code == 403
    assert reverse("admin:django_idempotency_idempotencykey_add") not in listing


def test_actions_offered(admin_client: Client) -> None:
    IdempotencyKeyFactory()

    response = admin_client.get(reverse(CHANGELIST))

    names = [name for name, _ in response.context["action_form"].fields["action"].choices]
    assert names[1:] == ["release_in_progress", "delete_expired"]


def test_release_deletes_only_in_progress_keys(admin_client: Client) -> None:
    running = IdempotencyKeyFactory(in_progress=True)
    stuck = IdempotencyKeyFactory(stale=True)
    done = IdempotencyKeyFactory()

    response = act(admin_client, "release_in_progress", [running, stuck, done])

    assert "Released 2 in-progress keys" in response.content.decode()
    assert list(IdempotencyKey.objects.values_list("pk", flat=True)) == [done.pk]


def test_delete_expired_keeps_live_keys(admin_client: Client) -> None:
    old = IdempotencyKeyFactory(expired=True)
    live = IdempotencyKeyFactory()
    # Past its retention, but its worker's lease still runs: still live.
    leased = IdempotencyKeyFactory(
        expired=True,
        state=State.IN_PROGRESS,
        locked_until=timezone.now() + timedelta(seconds=30),
    )

    response = act(admin_client, "delete_expired", [old, live, leased])

    assert "Deleted 1 expired key" in response.content.decode()
    assert set(IdempotencyKey.objects.values_list("pk", flat=True)) == {live.pk, leased.pk}


def test_action_with_nothing_to_do_warns(admin_client: Client) -> None:
    live = IdempotencyKeyFactory()

    response = act(admin_client, "delete_expired", [live])

    assert "Deleted 0 expired keys" in response.content.decode()
    assert IdempotencyKey.objects.filter(pk=live.pk).exists()


@pytest.fixture
def viewer_client() -> Client:
    """A staff user who may only view keys."""
    user = UserFactory(is_staff=True)
    user.user_permissions.add(Permission.objects.get(codename="view_idempotencykey"))
    client = Client()
    client.force_login(user)
    return client


def test_staff_viewer_sees_keys_but_no_actions(viewer_client: Client) -> None:
    row = IdempotencyKeyFactory()

    response = viewer_client.get(reverse(CHANGELIST))

    assert keys_of(list(response.context["cl"].result_list)) == {row.key}
    assert response.context["action_form"] is None
    assert act(viewer_client, "delete_expired", [row]).status_code == 200
    assert IdempotencyKey.objects.filter(pk=row.pk).exists()


def test_paginator_counts_small_tables_exactly(admin_client: Client) -> None:
    IdempotencyKeyFactory.create_batch(3)

    response = admin_client.get(reverse(CHANGELIST))

    assert response.context["cl"].result_count == 3


def test_paginator_bounds_the_exact_count(
    admin_client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(idempotency_admin.EstimatedCountPaginator, "exact_count_limit", 5)
    IdempotencyKeyFactory.create_batch(8)

    with CaptureQueriesContext(connection) as queries:
        response = admin_client.get(reverse(CHANGELIST))

    count = response.context["cl"].result_count
    explained = [q for q in queries if q["sql"].upper().startswith("EXPLAIN")]
    if connection.vendor == "postgresql":
        # The planner's estimate, never below what was counted.
        assert count >= 6
        assert explained
    else:
        assert count == 8
        assert not explained
