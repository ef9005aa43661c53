"""The results drawn: one image per database (matplotlib, the ``bench`` group).

Top left, each variant's median and 99th percentile over HTTP at concurrency
1 beside the plain view's; top right, its round trips to the database. Below,
with a baseline (``--baseline``, the JSON of an earlier run), each protected
request's paired ratio to the plain view before and after, at concurrency 1
(latency) and 8 (throughput).

    python benchmarks/charts.py AFTER.json OUT.png [--baseline BEFORE.json]

redraws an image from the JSON of a run (``run.py --json``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLAIN = "plain view"
ORDER = ("plain view", "plain view in transaction.atomic")
COMPARED = (
    "atomic (database), first execution",
    "atomic (database), replay",
    "lease (database), first execution",
    "lease (database), replay",
    "lease (Redis), first execution",
    "lease (Redis), replay",
)


def draw(after: dict[str, Any], before: dict[str, Any] | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: files only
    import matplotlib.pyplot as plt

    figure, ((latency, trips), (change, throughput)) = plt.subplots(2, 2, figsize=(14, 10))
    _latency(latency, after["http"]["1"])
    _round_trips(trips, after, before)
    _before_after(
        change,
        after,
        before,
        "1",
        "paired_median_ratio",
        "median latency / plain view's (concurrency 1)",
    )
    _before_after(
        throughput,
        after,
        before,
        "8",
        "paired_throughput_ratio",
        "requests per second / plain view's (concurrency 8)",
    )
    figure.suptitle(after["title"])
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def _ordered(labels: Any) -> list[str]:
    """Plain views first, then each protected request in the benchmark's order."""
    known = [*ORDER, *COMPARED]
    return sorted(labels, key=lambda label: known.index(label) if label in known else len(known))


def _round_trips(axes: Any, after: dict[str, Any], before: dict[str, Any] | None) -> None:
    labels = _ordered(label for label, trips in after["round_trips"].items() if trips is not None)
    if not labels:
        axes.text(0.5, 0.5, "no round trips: SQLite runs in the process", ha="center")
        axes.set_axis_off()
        return
    positions = range(len(labels))
    now = [after["round_trips"][label] for label in labels]
    axes.barh([y - 0.2 for y in positions], now, height=0.4, label="after", color="tab:green")
    if before is not None:
        then = [before["round_trips"].get(label) or 0 for label in labels]
        axes.barh([y + 0.2 for y in positions], then, height=0.4, label="before", color="tab:gray")
    axes.set_yticks(list(positions), labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("round trips to the database per request", fontsize=9)
    axes.legend(fontsize=8)


def _latency(axes: Any, samples: dict[str, dict[str, float]]) -> None:
    labels = _ordered(samples)
    positions = range(len(labels))
    p50 = [samples[label]["median_ms"] for label in labels]
    p99 = [samples[label]["p99_ms"] for label in labels]
    axes.barh([y + 0.2 for y in positions], p50, height=0.4, label="median (p50)")
    axes.barh([y - 0.2 for y in positions], p99, height=0.4, label="p99", alpha=0.6)
    axes.axvline(samples[PLAIN]["median_ms"], color="black", linewidth=0.8, linestyle="--")
    axes.set_yticks(list(positions), labels, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel("ms over loopback HTTP, concurrency 1 (dashed: plain view's median)")
    axes.legend(fontsize=8)


def _before_after(
    axes: Any,
    after: dict[str, Any],
    before: dict[str, Any] | None,
    concurrency: str,
    figure: str,
    title: str,
) -> None:
    labels = [label for label in COMPARED if label in after["http"][concurrency]]
    positions = range(len(labels))
    now = [after["http"][concurrency][label][figure] for label in labels]
    axes.barh([y - 0.2 for y in positions], now, height=0.4, label="after", color="tab:green")
    if before is not None:
        then = [
            before["http"].get(concurrency, {}).get(label, {}).get(figure, 0.0) for label in labels
        ]
        axes.barh([y + 0.2 for y in positions], then, height=0.4, label="before", color="tab:gray")
    axes.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
    axes.set_yticks(list(positions), [label.replace(", ", "\n") for label in labels], fontsize=8)
    axes.invert_yaxis()
    axes.set_xlabel(title, fontsize=9)
    axes.legend(fontsize=8)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("after", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--baseline", type=Path)
    args = parser.parse_args(argv)
    before = json.loads(args.baseline.read_text()) if args.baseline else None
    draw(json.loads(args.after.read_text()), before, args.output)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
