"""The results of a run as Markdown, with the targets they meet or miss."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
from importlib.metadata import version
from typing import Any

from django.conf import settings
from django.db import connection

from benchmarks.clients import Sample
from benchmarks.phases import PLAIN, Results
from benchmarks.server import ROOT

# The targets of docs/benchmarks.md, on PostgreSQL with Django's default settings.
MAX_ADDED_STATEMENTS = 2
MAX_ADDED_ROUND_TRIPS = 2  # a first execution, beyond the plain view's
MAX_REPLAY_ROUND_TRIPS = 2
MAX_FIRST_EXECUTION_ADDED_MS = 0.8  # median over HTTP at concurrency 1
MIN_FIRST_EXECUTION_THROUGHPUT = 0.90  # over HTTP at concurrency 8, paired
MAX_REPLAY_RATIO = 0.6  # median over HTTP at concurrency 1, paired
MIN_REPLAY_THROUGHPUT = 1.7  # over HTTP at concurrency 8, paired
MAX_SCALE_RATIO = 1.1


def load_average() -> str:
    """The 1, 5 and 15 minute load averages: how busy the machine was."""
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def machine(load_at_start: str) -> list[str]:
    return [
        f"- CPU: {os.cpu_count()} cores (`nproc`: {len(os.sched_getaffinity(0))}), {_cpu_model()}",
        f"- OS: {platform.system()} {platform.release()}; load average (1 / 5 / 15 min) "
        f"at the start {load_at_start}, at the end {load_average()}",
        f"- Python {platform.python_version()}, Django {version('django')}, "
        f"gunicorn {version('gunicorn')}, {_driver()}",
        f"- Database: {_database_version()}; prepared statements: {_prepared()}",
        f"- Code measured: {_revision()}",
    ]


def _view_queries() -> str:
    queries = getattr(settings, "VIEW_QUERIES", 0)
    return f" and {queries} primary-key reads (--view-queries)" if queries else ""


def _prepared() -> str:
    threshold = connection.settings_dict.get("OPTIONS", {}).get("prepare_threshold")
    if connection.vendor != "postgresql":
        return "n/a"
    return "off (Django's default)" if threshold is None else f"prepare_threshold={threshold}"


def render(results: Results, *, title: str, workers: int, quick: bool, load_at_start: str) -> str:
    lines = [f"### {title}", ""]
    lines += machine(load_at_start)
    lines += [
        f"- gunicorn: {workers} sync workers; client: Python threads, one connection per request",
        f"- View: one INSERT{_view_queries()}",
        f"- Budget: {'--quick (smoke run, figures not meaningful)' if quick else 'full'}"
        f"{'' if results.scaling else '; latency only (--latency-only)'}",
        "",
    ]
    lines += _statements(results)
    lines += _latency("In-process (`django.test.Client`), concurrency 1", results.in_process)
    for concurrency, samples in sorted(results.http.items()):
        lines += _latency(f"Loopback HTTP to gunicorn, concurrency {concurrency}", samples)
    lines += _scaling(results)
    lines += _purge(results)
    lines += _targets(results)
    return "\n".join(lines) + "\n"


def _statements(results: Results) -> list[str]:
    plain = results.statements[PLAIN.label]
    plain_trips = results.round_trips.get(PLAIN.label)
    lines = [
        "#### SQL statements and round trips per request",
        "",
        "Round trips: how often the client waits for the database server's answer",
        "(counted on the wire, `benchmarks/wire.py`); none on SQLite, in the process.",
        "",
        "| request | round trips | round trips added | all statements | transaction control "
        "| SET / PRAGMA | data | beyond transaction control | added to the plain view |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for label, statements in results.statements.items():
        kinds = statements.kinds
        added = statements.beyond_transaction_control - plain.beyond_transaction_control
        trips = results.round_trips.get(label)
        if trips is None or plain_trips is None:
            trips_text = "— | —"
        else:
            trips_text = f"{trips} | {trips - plain_trips:+d}"
        lines.append(
            f"| {label} | {trips_text} | {len(statements.sql)} | {kinds['transaction']} "
            f"| {kinds['setting']} | {kinds['data']} | {statements.beyond_transaction_control} "
            f"| {added:+d} |"
        )
    lines += ["", '<details markdown="1"><summary>The statements</summary>', ""]
    for label, statements in results.statements.items():
        lines += [f"{label}:", "", "```sql", *statements.outline(), "```", ""]
    lines += ["</details>", ""]
    return lines


def _latency(title: str, samples: dict[str, Sample]) -> list[str]:
    plain = samples[PLAIN.label]
    split = plain.database_median is not None
    header = (
        "| request | requests | median ms | p99 ms | req/s | median / plain "
        "| median ms added | p99 / plain | paired median / plain | paired req/s / plain "
    )
    rule = "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|"
    if split:
        header += "| median ms waiting on SQL | median ms elsewhere (Python, Redis) "
        rule += "--:|--:|"
    lines = [
        f"#### {title}",
        "",
        "Paired: the ratio to the plain view within each round (the variants take turns,",
        "round after round), the median of the rounds and, in brackets, their range.",
        "",
        header + "| unexpected answers |",
        rule + "--:|",
    ]
    for label, sample in samples.items():
        lines.append(_latency_row(label, sample, plain, split=split))
    return [*lines, ""]


def _latency_row(label: str, sample: Sample, plain: Sample, *, split: bool) -> str:
    unexpected = "0"
    if sample.unexpected:
        statuses = ", ".join(f"{status}: {n}" for status, n in sorted(sample.statuses.items()))
        unexpected = f"{sample.unexpected} ({statuses})"
    row = (
        f"| {label} | {len(sample.latencies)} | {sample.median * 1000:.2f} "
        f"| {sample.p99 * 1000:.2f} | {sample.throughput:.0f} "
        f"| {sample.median / plain.median:.2f} | {(sample.median - plain.median) * 1000:+.2f} "
        f"| {sample.p99 / plain.p99:.2f} "
        f"| {_paired_text(sample.paired(plain, 0))} | {_paired_text(sample.paired(plain, 2))} "
    )
    if split:
        row += f"| {(sample.database_median or 0) * 1000:.2f} "
        row += f"| {(sample.elsewhere_median or 0) * 1000:.2f} "
    return row + f"| {unexpected} |"


def paired(sample: Sample, plain: Sample, figure: int) -> float:
    """The median over rounds of ``sample``'s figure over the plain view's in that round."""
    return statistics.median(sample.paired(plain, figure))


def _paired_text(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def _scaling(results: Results) -> list[str]:
    if not results.scaling:
        return []
    small, large = sorted(results.scaling)
    lines = [
        "#### Stored keys (in-process, concurrency 1)",
        "",
        "The plain view does not touch the key table: its ratio shows how much the",
        "machine drifted between the two measurements; the last column divides it out.",
        "",
        f"| request | median ms, {small:,} keys | median ms, {large:,} keys | ratio "
        f"| p99 ms, {small:,} | p99 ms, {large:,} | ratio | median ratio, drift corrected |",
        "|---|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for label, few in results.scaling[small].items():
        many = results.scaling[large][label]
        lines.append(
            f"| {label} | {few.median * 1000:.2f} | {many.median * 1000:.2f} "
            f"| {many.median / few.median:.2f} | {few.p99 * 1000:.2f} | {many.p99 * 1000:.2f} "
            f"| {many.p99 / few.p99:.2f} | {_scale_ratio(results, label):.2f} |"
        )
    return [*lines, ""]


def _scale_ratio(results: Results, label: str, *, corrected: bool = True) -> float:
    """Median with many keys over median with few, divided by the plain view's drift."""
    small, large = sorted(results.scaling)
    ratio = results.scaling[large][label].median / results.scaling[small][label].median
    if not corrected:
        return ratio
    drift = results.scaling[large][PLAIN.label].median / results.scaling[small][PLAIN.label].median
    return ratio / drift


def _purge(results: Results) -> list[str]:
    purge = results.purge
    if purge is None:
        return []
    before, after = results.live_keys
    return [
        "#### Purge of expired keys",
        "",
        f"- Method: {purge.method}",
        f"- Deleted {purge.deleted:,} expired keys in {purge.seconds:.1f} s: "
        f"**{purge.rows_per_second:,.0f} rows/s**, {purge.statements} statements",
        f"- Longest single statement: **{purge.longest_seconds * 1000:.0f} ms**: "
        f"`{' '.join(purge.longest_sql.split())[:120]}`",
        f"- Longest batch transaction (first statement to commit): "
        f"**{purge.longest_transaction * 1000:.0f} ms**",
        f"- Live keys beside them: {before:,} before, {after:,} after",
        "",
    ]


def _targets(results: Results) -> list[str]:
    lines = ["#### Targets", ""]
    lines += _statement_targets(results)
    lines += _round_trip_targets(results)
    lines += _latency_targets(results)
    lines += _scale_targets(results)
    return [*lines, ""]


def _statement_targets(results: Results) -> list[str]:
    plain = results.statements[PLAIN.label].beyond_transaction_control
    lines = []
    for label, statements in results.statements.items():
        if "(database)" not in label:
            continue
        count = statements.beyond_transaction_control
        if label.endswith("first execution"):
            added = count - plain
            text = f"adds {added} statements beyond transaction control"
        else:
            added = count
            text = f"runs {count} statements beyond transaction control"
        lines.append(
            _target(
                f"{label} {text} (at most {MAX_ADDED_STATEMENTS})", added <= MAX_ADDED_STATEMENTS
            )
        )
    return lines


def _round_trip_targets(results: Results) -> list[str]:
    plain = results.round_trips.get(PLAIN.label)
    if plain is None:
        return []
    lines = []
    for label, trips in results.round_trips.items():
        if "(database)" not in label or trips is None:
            continue
        if label.endswith("first execution"):
            text = f"{label} adds {trips - plain} round trips (at most {MAX_ADDED_ROUND_TRIPS})"
            lines.append(_target(text, trips - plain <= MAX_ADDED_ROUND_TRIPS))
        else:
            text = f"{label} takes {trips} round trips (at most {MAX_REPLAY_ROUND_TRIPS})"
            lines.append(_target(text, trips <= MAX_REPLAY_ROUND_TRIPS))
    return lines


def _latency_targets(results: Results) -> list[str]:
    lines = []
    serial = results.http.get(1, {})
    concurrent = results.http.get(8, {})
    for label, sample in serial.items():
        plain = serial[PLAIN.label]
        if label.endswith("first execution") and "(database)" in label:
            added = (sample.median - plain.median) * 1000
            text = (
                f"HTTP, concurrency 1: {label} adds {added:.2f} ms to the median "
                f"(at most {MAX_FIRST_EXECUTION_ADDED_MS})"
            )
            lines.append(_target(text, added <= MAX_FIRST_EXECUTION_ADDED_MS))
        elif label.endswith("replay"):
            ratio = paired(sample, plain, 0)
            text = (
                f"HTTP, concurrency 1: {label}, median {ratio:.2f}x the plain view's, paired "
                f"(at most {MAX_REPLAY_RATIO})"
            )
            lines.append(_target(text, ratio <= MAX_REPLAY_RATIO))
    for label, sample in concurrent.items():
        plain = concurrent[PLAIN.label]
        ratio = paired(sample, plain, 2)
        if label.endswith("first execution") and "(database)" in label:
            limit = MIN_FIRST_EXECUTION_THROUGHPUT
        elif label.endswith("replay"):
            limit = MIN_REPLAY_THROUGHPUT
        else:
            continue
        text = (
            f"HTTP, concurrency 8: {label}, {ratio:.2f}x the plain view's requests per "
            f"second, paired (at least {limit})"
        )
        lines.append(_target(text, ratio >= limit))
    return lines


def _scale_targets(results: Results) -> list[str]:
    if not results.scaling:
        return []
    small, large = sorted(results.scaling)
    lines = []
    for label in results.scaling[small]:
        if label == PLAIN.label:
            continue
        raw = _scale_ratio(results, label, corrected=False)
        ratio = _scale_ratio(results, label)
        text = (
            f"{label}: median with {large:,} keys {ratio:.2f}x that with {small:,}, "
            f"drift corrected ({raw:.2f}x raw; at most {MAX_SCALE_RATIO})"
        )
        lines.append(_target(text, ratio <= MAX_SCALE_RATIO))
    return lines


def to_json(results: Results, *, title: str, vendor: str) -> dict[str, Any]:
    """The figures the charts draw, and a later run compares with (``--baseline``)."""

    def figures(samples: dict[str, Sample]) -> dict[str, dict[str, Any]]:
        plain = samples[PLAIN.label]
        return {
            label: {
                "median_ms": sample.median * 1000,
                "p99_ms": sample.p99 * 1000,
                "requests_per_second": sample.throughput,
                "paired_median_ratio": paired(sample, plain, 0),
                "paired_p99_ratio": paired(sample, plain, 1),
                "paired_throughput_ratio": paired(sample, plain, 2),
                "unexpected": sample.unexpected,
            }
            for label, sample in samples.items()
        }

    return {
        "title": title,
        "vendor": vendor,
        "revision": _revision(),
        "statements": {
            label: statements.beyond_transaction_control
            for label, statements in results.statements.items()
        },
        "round_trips": results.round_trips,
        "in_process": figures(results.in_process),
        "http": {
            str(concurrency): figures(samples) for concurrency, samples in results.http.items()
        },
    }


def write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as file:
        json.dump(data, file, indent=1)
        file.write("\n")


def _target(text: str, met: bool) -> str:
    return f"- {'met' if met else '**missed**'}: {text}"


def _revision() -> str:
    def git(*args: str) -> str:
        command = ["git", "-C", str(ROOT), *args]
        return subprocess.run(command, capture_output=True, text=True, check=False).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", "django_idempotency")
    return f"commit {commit}" + (" with uncommitted changes to the package" if changed else "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _driver() -> str:
    if connection.vendor == "postgresql":
        return f"psycopg {version('psycopg')}"
    if connection.vendor == "sqlite":
        return f"sqlite3 module, SQLite {sys.modules['sqlite3'].sqlite_version}"
    return connection.vendor


def _database_version() -> str:
    with connection.cursor() as cursor:
        if connection.vendor == "sqlite":
            cursor.execute("SELECT 'SQLite ' || sqlite_version()")
        else:
            cursor.execute("SELECT version()")
        return str(cursor.fetchone()[0])
