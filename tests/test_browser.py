"""The admin in a real headless Chromium: log in, open the key list and a key.

Uses Debian's ``chromium`` package through Playwright's Python package (no
browser download). Skipped where either is missing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from django_idempotency.models import IdempotencyKey
from tests.factories import IdempotencyKeyFactory

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: Milliseconds Playwright waits for any page or element.
TIMEOUT = 15_000


@pytest.fixture
def stored_keys(admin_user: Any) -> dict[str, IdempotencyKey]:
    # Created before the browser starts: Playwright's event loop, once
    # running in this thread, makes Django refuse synchronous queries here.
    return {
        "json": IdempotencyKeyFactory(
            key="order-42", path="/api/orders/", response_body=b'{"id":42,"item":"<b>tea</b>"}'
        ),
        "running": IdempotencyKeyFactory(key="payment-7", in_progress=True),
    }


@pytest.fixture
def page(stored_keys: dict[str, IdempotencyKey]) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
        )
        try:
            opened = browser.new_page()
            opened.set_default_timeout(TIMEOUT)
            yield opened
        finally:
            browser.close()


def test_admin_list_and_detail_in_chromium(
    live_server: Any, page: Any, stored_keys: dict[str, IdempotencyKey]
) -> None:
    page.goto(f"{live_server.url}/admin/login/?next=/admin/django_idempotency/idempotencykey/")
    page.fill("#id_username", "admin")
    page.fill("#id_password", "password")
    page.click("input[type=submit]")
    page.wait_for_selector("#result_list")

    rows = page.locator("#result_list tbody tr")
    listed = [rows.nth(i).locator("th").inner_text() for i in range(rows.count())]
    assert sorted(listed) == ["order-42", "payment-7"]
    running = page.locator("#result_list tbody tr", has_text="payment-7").inner_text()
    assert "in progress" in running
    filters = page.locator("#changelist-filter").inner_text()
    for title in ("By state", "By response status", "By method", "By expired"):
        assert title in filters
    assert page.locator(".object-tools a.addlink").count() == 0
    assert page.locator("#nav-sidebar tr.model-idempotencykey").count() == 1
    assert page.locator("#nav-sidebar tr.model-idempotencykey a.addlink").count() == 0
    page.screenshot(path=os.environ.get("SCREENSHOT_DIR", "/tmp") + "/idempotency-list.png")

    page.click("#result_list a:text-is('order-42')")
    page.wait_for_selector("pre.idempotency-body")

    assert "View idempotency key" in page.locator("h1").inner_text()
    body = page.locator("pre.idempotency-body").inner_text()
    assert body == '{\n  "id": 42,\n  "item": "<b>tea</b>"\n}'
    # Shown as text, never interpreted as markup.
    assert page.locator("pre.idempotency-body b").count() == 0
    assert page.locator("input[name=_save]").count() == 0
    page.screenshot(
        path=os.environ.get("SCREENSHOT_DIR", "/tmp") + "/idempotency-detail.png", full_page=True
    )


@pytest.fixture
def long_values() -> dict[str, str]:
    values = {"key": "k" * 255, "scope": "tenant:" + "s" * 248, "path": "/orders/" + "p" * 247}
    IdempotencyKeyFactory(**values)
    return values


def test_admin_list_fits_long_keys_scopes_and_paths(
    live_server: Any, long_values: dict[str, str], page: Any
) -> None:
    page.set_viewport_size({"width": 1280, "height": 800})
    page.goto(f"{live_server.url}/admin/login/?next=/admin/django_idempotency/idempotencykey/")
    page.fill("#id_username", "admin")
    page.fill("#id_password", "password")
    page.click("input[type=submit]")
    page.wait_for_selector("#result_list")

    page.screenshot(path=os.environ.get("SCREENSHOT_DIR", "/tmp") + "/idempotency-long.png")
    row = page.locator("#result_list tbody tr", has=page.locator(f"[title='{long_values['key']}']"))
    for value in long_values.values():
        cell = row.locator(f"[title='{value}']")
        assert cell.count() == 1
        # A 255-character value unshortened is over 1,500 pixels wide.
        assert cell.bounding_box()["width"] < 320
        shown = cell.inner_text()
        assert shown.endswith("…")
        assert value.startswith(shown[:-1])
