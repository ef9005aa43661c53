"""The admin of stored keys: read-only, with the operations people need.

Built for big tables: the list never loads response bodies, counts at most a
bounded number of rows exactly (PostgreSQL estimates beyond), and its filters
run no query of their own.
"""

from __future__ import annotations

import calendar
import json
from collections.abc import Sequence
from datetime import date
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.views.main import ChangeList
from django.contrib.auth import get_permission_codename
from django.core.paginator import Paginator
from django.db import connections
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import formats, timezone
from django.utils.functional import cached_property
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.text import Truncator, capfirst
from django.utils.translation import gettext, ngettext
from django.utils.translation import gettext_lazy as _

from django_idempotency import outbox, purge, sealing
from django_idempotency.exceptions import SnapshotUnreadable
from django_idempotency.models import IdempotencyKey, IdempotencyStep, OutboxMessage
from django_idempotency.protocol import Call, Snapshot

State = IdempotencyKey.State

#: Characters of a response body shown on the detail page; the rest is cut.
BODY_PREVIEW_CHARACTERS = 20_000
#: Bytes of a binary body shown in hex.
HEX_PREVIEW_BYTES = 256
_HEX_ROW = 16
#: Fields the list leaves in the database: a page of bodies can weigh megabytes.
_HEAVY_FIELDS = ("response_body", "response_headers", "fingerprint", "token")


class EstimatedCountPaginator(Paginator):  # type: ignore[type-arg]
    """Counts up to ``exact_count_limit`` rows exactly; beyond, PostgreSQL estimates.

    ``COUNT(*)`` reads the whole table on PostgreSQL; on a table of millions of
    keys that is seconds for every page. The planner's row estimate is free
    and close enough to page through. Other databases count exactly.
    """

    exact_count_limit = 10_000

    @cached_property
    def count(self) -> int:
        queryset: QuerySet[Any] = self.object_list.order_by()  # type: ignore[attr-defined]
        bounded: int = queryset[: self.exact_count_limit + 1].count()
        if bounded <= self.exact_count_limit:
            return bounded
        if connections[queryset.db].vendor == "postgresql":
            return max(bounded, _planner_estimate(queryset))
        exact: int = queryset.count()
        return exact


def _planner_estimate(queryset: QuerySet[Any]) -> int:
    plan = json.loads(queryset.explain(format="json"))
    return int(plan[0]["Plan"]["Plan Rows"])


class StatusClassFilter(admin.SimpleListFilter):
    title = _("response status")
    parameter_name = "status_class"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [
            ("2xx", _("2xx success")),
            ("3xx", _("3xx redirection")),
            ("4xx", _("4xx client error")),
            ("none", _("none yet (in progress)")),
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value == "none":
            return queryset.filter(response_status__isnull=True)
        if value in {"2xx", "3xx", "4xx"}:
            low = int(value[0]) * 100
            return queryset.filter(response_status__gte=low, response_status__lt=low + 100)
        return queryset


class MethodFilter(admin.SimpleListFilter):
    """A fixed list: filtering by "all values" would scan the table for them."""

    title = _("method")
    parameter_name = "method"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        methods = [(m, m) for m in ("POST", "PUT", "PATCH", "DELETE")]
        return [*methods, ("none", _("none (a function)"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        value = self.value()
        if value == "none":
            return queryset.filter(method="")
        if value:
            return queryset.filter(method=value)
        return queryset


class ExpiredFilter(admin.SimpleListFilter):
    title = _("expired")
    parameter_name = "expired"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [("yes", _("Yes")), ("no", _("No"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        now = timezone.now()
        if self.value() == "yes":
            return queryset.filter(expires__lte=now)
        if self.value() == "no":
            return queryset.filter(expires__gt=now)
        return queryset


class LightChangeList(ChangeList):
    def get_queryset(self, request: HttpRequest, exclude_parameters: Any = None) -> QuerySet[Any]:
        queryset: QuerySet[Any] = super().get_queryset(request, exclude_parameters)
        return queryset.defer(*_HEAVY_FIELDS)

    @cached_property
    def date_drilldown(self) -> dict[str, Any]:
        """The date hierarchy's links (see the change_list.html of this model)."""
        return date_drilldown(self)


def date_drilldown(cl: ChangeList) -> dict[str, Any]:
    """What Django's date hierarchy shows, without reading the whole table.

    Django's own (the ``date_hierarchy`` template tag) cannot be used as it
    is: on every page it takes MIN and MAX of the column, then
    ``QuerySet.dates()``, a DISTINCT over every row of the chosen year or
    month: full scans of an unindexed column that grow with the table, which
    no list filter of Django's avoids either. Here the bounds are the dates of
    the oldest and newest keys by primary key (two index lookups), and every
    period between them is offered, some possibly empty. The filtering itself
    stays Django's (``ChangeList`` turns the parameters into a range query).
    """
    name = cl.date_hierarchy
    verbose_name = getattr(cl.model._meta.get_field(name), "verbose_name", name)
    try:
        year, month, day = (
            int(cl.params[f"{name}__{part}"]) if f"{name}__{part}" in cl.params else None
            for part in ("year", "month", "day")
        )
    except ValueError:
        return {"show": False}
    bounds = _date_bounds(cl.root_queryset, name)
    if year is None and bounds is not None:
        first, last = bounds
        if first.year == last.year:
            year = first.year
            if first.month == last.month:
                month = first.month
    try:
        # A date that does not exist (day 40, 31 November, month 13) selects
        # no key; Django answers such a list without a drill-down, as here.
        # A year, if unknown, is a leap year so that 29 February passes.
        date(*(1 if part is None else part for part in (year or 2000, month, day)))
    except ValueError:
        return {"show": False}

    def link(filters: dict[str, Any]) -> str:
        return str(cl.get_query_string(filters, [f"{name}__"]))

    drilldown: dict[str, Any] = {"show": True, "field_name": verbose_name, "back": None}
    if year is not None and month is not None and day is not None:
        chosen = date(year, month, day)
        drilldown["back"] = {
            "link": link({f"{name}__year": year, f"{name}__month": month}),
            "title": capfirst(formats.date_format(chosen, "YEAR_MONTH_FORMAT")),
        }
        drilldown["choices"] = [
            {"title": capfirst(formats.date_format(chosen, "MONTH_DAY_FORMAT"))}
        ]
    elif year is not None and month is not None:
        drilldown["back"] = {"link": link({f"{name}__year": year}), "title": str(year)}
        drilldown["choices"] = [
            {
                "link": link(
                    {f"{name}__year": year, f"{name}__month": month, f"{name}__day": d.day}
                ),
                "title": capfirst(formats.date_format(d, "MONTH_DAY_FORMAT")),
            }
            for d in _days(year, month, bounds)
        ]
    elif year is not None:
        drilldown["back"] = {"link": link({}), "title": _("All dates")}
        drilldown["choices"] = [
            {
                "link": link({f"{name}__year": year, f"{name}__month": m}),
                "title": capfirst(formats.date_format(date(year, m, 1), "YEAR_MONTH_FORMAT")),
            }
            for m in _months(year, bounds)
        ]
    elif bounds is not None:
        first, last = bounds
        drilldown["choices"] = [
            {"link": link({f"{name}__year": y}), "title": str(y)}
            for y in range(first.year, last.year + 1)
        ]
    else:
        drilldown["choices"] = []
    return drilldown


def _date_bounds(queryset: QuerySet[Any], name: str) -> tuple[date, date] | None:
    ends = [
        queryset.order_by(order).values_list(name, flat=True).first() for order in ("pk", "-pk")
    ]
    if None in ends:
        return None
    # Local dates, as the lookups in the links are in the current time zone.
    local = sorted(timezone.localtime(end).date() for end in ends)
    return local[0], local[1]


def _months(year: int, bounds: tuple[date, date] | None) -> list[int]:
    if bounds is None:
        return []
    first, last = bounds
    low = first.month if first.year == year else 1
    high = last.month if last.year == year else 12
    return list(range(low, high + 1)) if first.year <= year <= last.year else []


def _days(year: int, month: int, bounds: tuple[date, date] | None) -> list[date]:
    if bounds is None:
        return []
    first, last = bounds
    days = [date(year, month, d) for d in range(1, calendar.monthrange(year, month)[1] + 1)]
    return [d for d in days if first <= d <= last]


@admin.register(IdempotencyKey)
class IdempotencyKeyAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = (
        "short_key",
        "short_scope",
        "method",
        "short_path",
        "state",
        "response_status",
        "created",
        "expires",
    )
    list_display_links = ("short_key",)
    list_filter = ("state", StatusClassFilter, MethodFilter, ExpiredFilter)
    search_fields = ("key", "scope", "path")
    search_help_text = _("Searches keys, scopes and paths.")
    date_hierarchy = "created"
    ordering = ("-pk",)
    # Sorting a big table by an unindexed column is a full sort on every page.
    sortable_by = ("expires",)
    show_full_result_count = False
    # Facet counts are one COUNT per filter choice on every page.
    show_facets = admin.ShowFacets.NEVER
    paginator = EstimatedCountPaginator
    actions = ("release_in_progress", "delete_expired")
    fieldsets = (
        (None, {"fields": ("key", "scope", "state", "attempts")}),
        (_("Request"), {"fields": ("method", "path", "fingerprint")}),
        (_("Claim"), {"fields": ("token", "locked_until")}),
        (_("Response"), {"fields": ("response_status", "headers", "body")}),
        (_("Dates"), {"fields": ("created", "completed", "expires")}),
        (_("Steps and outbox"), {"fields": ("steps", "outbox_messages")}),
    )
    readonly_fields = (
        "key",
        "scope",
        "state",
        "attempts",
        "method",
        "path",
        "fingerprint",
        "token",
        "locked_until",
        "response_status",
        "headers",
        "body",
        "created",
        "completed",
        "expires",
        "steps",
        "outbox_messages",
    )

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Stored outcomes are a record: the detail page is view-only.
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Deleting a live key would let its retries execute again: keys go
        # only through the actions below, which keep live keys.
        return False

    def has_purge_permission(self, request: HttpRequest) -> bool:
        """Who may run the actions: those allowed to delete keys."""
        opts = self.opts
        codename = get_permission_codename("delete", opts)
        return bool(request.user.has_perm(f"{opts.app_label}.{codename}"))

    def get_changelist(self, request: HttpRequest, **kwargs: Any) -> type[ChangeList]:
        return LightChangeList

    # Keys, scopes and paths run to 255 characters: the list shows their start,
    # the whole is in the cell's title (a tooltip, and there for copying).
    @admin.display(description=_("key"))
    def short_key(self, obj: IdempotencyKey) -> str:
        return _shortened(obj.key, 32)

    @admin.display(description=_("scope"))
    def short_scope(self, obj: IdempotencyKey) -> str:
        return _shortened(obj.scope, 24)

    @admin.display(description=_("path"))
    def short_path(self, obj: IdempotencyKey) -> str:
        return _shortened(obj.path, 40)

    def get_fieldsets(self, request: HttpRequest, obj: Any = None) -> Any:
        fieldsets = super().get_fieldsets(request, obj)
        if obj is None or not self.has_decrypt_permission(request):
            return fieldsets
        shown = {"steps": "decrypted_steps"}
        if _sealed(obj):
            shown.update(headers="decrypted_headers", body="decrypted_body")
        return [
            (
                name,
                {**options, "fields": tuple(shown.get(str(f), str(f)) for f in options["fields"])},
            )
            for name, options in fieldsets
        ]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        decrypted = ("decrypted_headers", "decrypted_body", "decrypted_steps")
        return (*super().get_readonly_fields(request, obj), *decrypted)

    def has_decrypt_permission(self, request: HttpRequest) -> bool:
        """Who sees encrypted stored responses in clear: a permission of its own."""
        return may_decrypt(request)

    @admin.display(description=_("response headers"))
    def headers(self, obj: IdempotencyKey) -> str:
        if _sealed(obj):
            return gettext("encrypted")
        lines = [f"{name}: {value}" for name, value in obj.response_headers]
        return format_html("<pre>{}</pre>", "\n".join(lines)) if lines else "-"

    @admin.display(description=_("response body"))
    def body(self, obj: IdempotencyKey) -> SafeString:
        if _sealed(obj):
            return _encrypted_size(obj)
        return render_body(bytes(obj.response_body))

    @admin.display(description=_("response headers (decrypted)"))
    def decrypted_headers(self, obj: IdempotencyKey) -> str:
        snapshot = _unsealed(obj)
        if snapshot is None:
            return gettext("cannot be decrypted with the configured keys")
        lines = [f"{name}: {value}" for name, value in snapshot.headers]
        return format_html("<pre>{}</pre>", "\n".join(lines)) if lines else "-"

    @admin.display(description=_("response body (decrypted)"))
    def decrypted_body(self, obj: IdempotencyKey) -> SafeString:
        snapshot = _unsealed(obj)
        if snapshot is None:
            return format_html(
                "<p>{}</p>",
                gettext("%(size)s; cannot be decrypted with the configured keys")
                % {"size": _encrypted_size(obj)},
            )
        return render_body(snapshot.body)

    @admin.display(description=_("steps"))
    def steps(self, obj: IdempotencyKey) -> SafeString:
        return render_steps(obj)

    @admin.display(description=_("steps (decrypted)"))
    def decrypted_steps(self, obj: IdempotencyKey) -> SafeString:
        return render_steps(obj, decrypt=True)

    @admin.display(description=_("outbox messages"))
    def outbox_messages(self, obj: IdempotencyKey) -> SafeString:
        return render_outbox_messages(obj)

    @admin.action(description=_("Release selected in-progress keys"), permissions=["purge"])
    def release_in_progress(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        released = sum(purge.delete_in_batches(queryset.filter(state=State.IN_PROGRESS)))
        self.message_user(
            request,
            ngettext(
                "Released %(count)d in-progress key; a retry will execute again.",
                "Released %(count)d in-progress keys; retries will execute again.",
                released,
            )
            % {"count": released},
            messages.SUCCESS if released else messages.WARNING,
        )

    @admin.action(description=_("Delete selected keys that have expired"), permissions=["purge"])
    def delete_expired(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        deleted = sum(purge.delete_in_batches(queryset.filter(purge.expired(timezone.now()))))
        self.message_user(
            request,
            ngettext(
                "Deleted %(count)d expired key; live keys were kept.",
                "Deleted %(count)d expired keys; live keys were kept.",
                deleted,
            )
            % {"count": deleted},
            messages.SUCCESS if deleted else messages.WARNING,
        )


def _shortened(value: str, length: int) -> str:
    if len(value) <= length:
        return value
    return format_html('<span title="{}">{}</span>', value, Truncator(value).chars(length))


def render_body(body: bytes) -> SafeString:
    """A stored body for people: JSON indented, text as text, binary in hex; escaped."""
    if not body:
        return format_html("<em>{}</em>", _("empty"))
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return _render_binary(body)
    try:
        text = json.dumps(json.loads(text), indent=2, ensure_ascii=False)
        kind = "JSON"
    except (ValueError, RecursionError):  # nested too deep to decode: shown as text
        kind = gettext("text")
        if any(ord(c) < 32 and c not in "\t\n\r" for c in text):
            return _render_binary(body)
    size = ngettext("%(kind)s, %(size)d byte", "%(kind)s, %(size)d bytes", len(body)) % {
        "kind": kind,
        "size": len(body),
    }
    return format_html('<p>{}</p><pre class="idempotency-body">{}</pre>', size, _truncate(text))


def _truncate(text: str) -> str:
    if len(text) <= BODY_PREVIEW_CHARACTERS:
        return text
    cut = len(text) - BODY_PREVIEW_CHARACTERS
    return (
        text[:BODY_PREVIEW_CHARACTERS]
        + "\n… "
        + str(_("(%(count)d more characters not shown)") % {"count": cut})
    )


def _render_binary(body: bytes) -> SafeString:
    shown = body[:HEX_PREVIEW_BYTES]
    rows = []
    for offset in range(0, len(shown), _HEX_ROW):
        chunk = shown[offset : offset + _HEX_ROW]
        printable = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        rows.append(f"{offset:08x}  {chunk.hex(' '):<{_HEX_ROW * 3}} |{printable}|")
    if len(body) > HEX_PREVIEW_BYTES:
        rows.append(f"… {len(body) - HEX_PREVIEW_BYTES} more bytes not shown")
    size = ngettext("binary, %(size)d byte", "binary, %(size)d bytes", len(body)) % {
        "size": len(body)
    }
    return format_html('<p>{}</p><pre class="idempotency-body">{}</pre>', size, "\n".join(rows))


def may_decrypt(request: HttpRequest) -> bool:
    """Whether the user sees encrypted values in clear (responses, steps, payloads)."""
    app_label = IdempotencyKey._meta.app_label
    return bool(request.user.has_perm(f"{app_label}.view_decrypted_response"))


def _encrypted(size: int) -> str:
    return ngettext("encrypted, %(size)d byte", "encrypted, %(size)d bytes", size) % {"size": size}


def _sealed(obj: IdempotencyKey) -> bool:
    return sealing.is_sealed(bytes(obj.response_body))


def _encrypted_size(obj: IdempotencyKey) -> SafeString:
    return format_html("{}", _encrypted(len(bytes(obj.response_body))))


def _unsealed(obj: IdempotencyKey) -> Snapshot | None:
    """The stored response in clear, or ``None`` if the keys do not open it (logged)."""
    stored = Snapshot(obj.response_status or 0, (), bytes(obj.response_body))
    try:
        return sealing.unseal(stored, Call(obj.scope, obj.key, ""))
    except SnapshotUnreadable:
        return None


# Steps and the outbox ----------------------------------------------------------

#: Rows shown on a key's page; a key with more is unusual enough to search for.
RELATED_ROWS = 100


def render_steps(key: IdempotencyKey, *, decrypt: bool = False) -> SafeString:
    """The key's recorded steps as a table: name, result, when, expiry.

    An encrypted result is shown as its size, or decrypted with ``decrypt``.
    """
    steps = IdempotencyStep.objects.using(key._state.db).filter(scope=key.scope, key=key.key)
    rows = [
        (
            step.name,
            Truncator(_step_result(step, decrypt)).chars(200),
            _when(step.created),
            _when(step.expires),
        )
        for step in steps.order_by("created", "pk")[:RELATED_ROWS]
    ]
    headings = (_("name"), _("result"), _("recorded"), _("expires"))
    return _table(headings, rows, empty=gettext("No step recorded."))


def _step_result(step: IdempotencyStep, decrypt: bool) -> str:
    if not sealing.is_sealed_text(step.result):
        return step.result
    if not decrypt:
        return _encrypted(len(step.result))
    context = sealing.step_context(step.scope, step.key, step.name)
    try:
        return sealing.unseal_text(step.result, context, f"the result of step {step.name!r}")
    except SnapshotUnreadable:
        return gettext("cannot be decrypted with the configured keys")


def render_payload(message: OutboxMessage, *, decrypt: bool = False) -> SafeString:
    """An outbox message's payload as indented JSON; encrypted: its size, or decrypted."""
    stored = message.payload
    if isinstance(stored, str) and sealing.is_sealed_text(stored):
        if not decrypt:
            return format_html("{}", _encrypted(len(stored)))
        try:
            stored = outbox.open_payload(message)
        except SnapshotUnreadable:
            return format_html("{}", gettext("cannot be decrypted with the configured keys"))
    return format_html("<pre>{}</pre>", json.dumps(stored, indent=2, ensure_ascii=False))


def render_outbox_messages(key: IdempotencyKey) -> SafeString:
    """The messages the key's execution enqueued, with their delivery state."""
    messages_ = OutboxMessage.objects.using(key._state.db).filter(
        scope=key.scope, idempotency_key=key.key
    )
    rows = [
        (
            str(message.pk),
            message.topic,
            message.step or "-",
            message.get_state_display(),
            str(message.attempts),
            message.last_error or "-",
        )
        for message in messages_.order_by("created")[:RELATED_ROWS]
    ]
    headings = (_("id"), _("topic"), _("step"), _("state"), _("attempts"), _("last error"))
    return _table(headings, rows, empty=gettext("No message enqueued."))


def _when(value: Any) -> str:
    return str(formats.localize(timezone.localtime(value)))


def _table(headings: tuple[Any, ...], rows: Sequence[tuple[Any, ...]], empty: str) -> SafeString:
    if not rows:
        return format_html("{}", empty)
    head = format_html_join("", "<th>{}</th>", ((heading,) for heading in headings))
    body = format_html_join(
        "",
        "<tr>{}</tr>",
        ((format_html_join("", "<td>{}</td>", ((cell,) for cell in row)),) for row in rows),
    )
    return format_html("<table><thead><tr>{}</tr></thead><tbody>{}</tbody></table>", head, body)


class FailingFilter(admin.SimpleListFilter):
    title = _("delivery")
    parameter_name = "delivery"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, Any]]:
        return [("failing", _("failing (pending, with errors)"))]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Any]) -> QuerySet[Any]:
        if self.value() == "failing":
            return queryset.filter(state=OutboxMessage.State.PENDING).exclude(last_error="")
        return queryset


@admin.register(OutboxMessage)
class OutboxMessageAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """Outbox messages, read-only; failing ones can be sent again at once."""

    list_display = (
        "id",
        "topic",
        "state",
        "attempts",
        "next_attempt",
        "short_error",
        "created",
        "sent",
    )
    list_filter = ("state", FailingFilter, "topic")
    search_fields = ("=id", "topic", "=idempotency_key")
    search_help_text = _("Searches topics; message ids and keys exactly.")
    ordering = ("-created",)
    show_facets = admin.ShowFacets.NEVER
    actions = ("retry_now",)
    readonly_fields = (
        "id",
        "topic",
        "payload_json",
        "state",
        "attempts",
        "next_attempt",
        "last_error",
        "created",
        "sent",
        "scope",
        "idempotency_key",
        "step",
    )
    fields = readonly_fields

    def get_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        fields = super().get_fields(request, obj)
        if not may_decrypt(request):
            return fields
        return [("decrypted_payload" if f == "payload_json" else f) for f in fields]

    def get_readonly_fields(self, request: HttpRequest, obj: Any = None) -> Any:
        return (*super().get_readonly_fields(request, obj), "decrypted_payload")

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # A message deleted before it is sent is a follow-up silently lost.
        return False

    def has_retry_permission(self, request: HttpRequest) -> bool:
        """Who may send messages again: those given the "change outbox message" permission."""
        codename = get_permission_codename("change", self.opts)
        return bool(request.user.has_perm(f"{self.opts.app_label}.{codename}"))

    @admin.display(description=_("payload"))
    def payload_json(self, obj: OutboxMessage) -> SafeString:
        return render_payload(obj)

    @admin.display(description=_("payload (decrypted)"))
    def decrypted_payload(self, obj: OutboxMessage) -> SafeString:
        return render_payload(obj, decrypt=True)

    @admin.display(description=_("last error"))
    def short_error(self, obj: OutboxMessage) -> str:
        return Truncator(obj.last_error).chars(60) or "-"

    @admin.action(description=_("Retry selected pending messages now"), permissions=["retry"])
    def retry_now(self, request: HttpRequest, queryset: QuerySet[Any]) -> None:
        count = outbox.retry_now(queryset.db, list(queryset.values_list("pk", flat=True)))
        self.message_user(
            request,
            ngettext("%(count)d message is due now.", "%(count)d messages are due now.", count)
            % {"count": count},
            messages.SUCCESS,
        )
