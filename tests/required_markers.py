"""``REQUIRE_MARKERS=a,b``: tests with those markers must run, not skip.

CI sets it so that a missing Chromium or PostgreSQL fails the run instead of
passing it with the tests skipped. A pytest plugin of its own (imported by
``conftest.py``), free of Django, so that its own test runs it in a bare pytest.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest

#: Markers whose tests must run, not skip (comma-separated, e.g. "browser,multiprocess").
REQUIRED_MARKERS = frozenset(
    filter(None, (m.strip() for m in os.environ.get("REQUIRE_MARKERS", "").split(",")))
)
_MARK_IN_SOURCE = re.compile(r"pytest\.mark\.(\w+)")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    required = sorted(REQUIRED_MARKERS.intersection(mark.name for mark in item.iter_markers()))
    if report.skipped and required and not hasattr(report, "wasxfail"):
        _fail(report, required)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Any:
    report = yield
    if report.skipped and REQUIRED_MARKERS and isinstance(collector, pytest.Module):
        # Skipped while importing (pytest.importorskip at module level): its
        # pytestmark may not exist yet, so the markers are read from its source.
        used = set(_MARK_IN_SOURCE.findall(collector.path.read_text(encoding="utf-8")))
        required = sorted(REQUIRED_MARKERS & used)
        if required:
            _fail(report, required)
    return report


def _fail(report: Any, required: list[str]) -> None:
    reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
    report.outcome = "failed"
    report.longrepr = f"skipped, but REQUIRE_MARKERS requires {', '.join(required)}: {reason}"
