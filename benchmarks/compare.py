"""Two runs side by side: round trips, statements and paired ratios, before and after.

    python benchmarks/compare.py benchmarks/baseline/postgresql.json build/bench-postgresql.json

Reads the ``--json`` of two runs of ``benchmarks/run.py`` on one database and
prints a Markdown table of each protected request: its round trips and
statements, and its median latency (concurrency 1) and throughput
(concurrency 8) over HTTP, each paired with the plain view's in its round.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

PLAIN = "plain view"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    args = parser.parse_args(argv)
    print(compare(json.loads(args.before.read_text()), json.loads(args.after.read_text())))
    return 0


def compare(before: dict[str, Any], after: dict[str, Any]) -> str:
    lines = [
        "| request | round trips | statements | median / plain, c=1 | req/s / plain, c=8 |",
        "|---|--:|--:|--:|--:|",
    ]
    for label in after["statements"]:
        if label == PLAIN:
            continue
        lines.append(
            f"| {label} | {_pair(before, after, _trips, label)} "
            f"| {_pair(before, after, _statements, label)} "
            f"| {_pair(before, after, _ratio('1', 'paired_median_ratio'), label)} "
            f"| {_pair(before, after, _ratio('8', 'paired_throughput_ratio'), label)} |"
        )
    return "\n".join(lines)


def _pair(before: dict[str, Any], after: dict[str, Any], figure: Any, label: str) -> str:
    then, now = figure(before, label), figure(after, label)
    if then == now:
        return now
    return f"{then} → **{now}**"


def _trips(run: dict[str, Any], label: str) -> str:
    trips = run["round_trips"].get(label)
    return "—" if trips is None else str(trips)


def _statements(run: dict[str, Any], label: str) -> str:
    count = run["statements"].get(label)
    return "—" if count is None else str(count)


def _ratio(concurrency: str, figure: str) -> Any:
    def ratio(run: dict[str, Any], label: str) -> str:
        sample = run["http"].get(concurrency, {}).get(label)
        return "—" if sample is None else f"{sample[figure]:.2f}x"

    return ratio


if __name__ == "__main__":
    sys.exit(main())
